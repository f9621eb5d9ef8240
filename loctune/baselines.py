"""Trivial baselines every localisation figure is read against: the mean training box.

On raccoon the mean box alone scores Acc@0.5 0.775, so a model's number means
little until it is set beside this one on the same split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from loctune.metrics import coco_detection_metrics, grounding_metrics
from loctune.types import Box, Detection, Sample


def mean_relative_box(train: Sequence[Sample]) -> np.ndarray:
    """Mean of the training boxes as fractions of their image's width and height."""
    rel = [
        [b[0] / w, b[1] / h, b[2] / w, b[3] / h]
        for s in train
        for (w, h) in [s.image_size]
        for b in s.boxes
    ]
    if not rel:
        raise ValueError("mean box baseline: the training samples hold no box")
    return np.asarray(rel).mean(0)


def _scaled(rel: np.ndarray, sample: Sample) -> Box:
    w, h = sample.image_size
    return tuple(float(v) for v in rel * np.array([w, h, w, h]))


def mean_box_scores(train: Sequence[Sample], test: Sequence[Sample]) -> dict[str, float]:
    """Scores of answering the mean training box for every test sample.

    Grounding samples give ``acc50``/``miou``; detection samples ``ap``/``ap50``/``ap75``
    with one box per image, labelled with the most frequent training class (the class
    prior) at score 1.
    """
    rel = mean_relative_box(train)
    out: dict[str, float] = {}
    grounding = [s for s in test if s.task == "grounding"]
    if grounding:
        out.update(grounding_metrics([_scaled(rel, s) for s in grounding],
                                     [s.boxes[0] for s in grounding]))
    detection = [s for s in test if s.task == "detection"]
    if detection:
        labels = [label for s in train for label in s.labels]
        prior = max(set(labels), key=labels.count)
        scores = coco_detection_metrics(
            [[Detection(prior, _scaled(rel, s), 1.0)] for s in detection],
            [[Detection(c, b) for b, c in zip(s.boxes, s.labels, strict=True)] for s in detection],
        )
        out.update({k: scores[k] for k in ("ap", "ap50", "ap75")})
    return out
