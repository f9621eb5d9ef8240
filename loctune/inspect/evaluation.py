"""The few-shot inspection protocol: every query after examples of its product, then metrics.

One protocol for every method: :func:`~loctune.inspect.selection.select_examples`
gives each query its examples, so an in-context VLM
(:func:`evaluate_in_context`) and the PatchCore baseline
(:func:`evaluate_patchcore_in_context`) see the same shots at the same
arguments, and :func:`~loctune.inspect.metrics.inspection_metrics` scores both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loctune.inspect.baseline import PatchCore
from loctune.inspect.metrics import inspection_metrics
from loctune.inspect.prompts import Episode
from loctune.inspect.records import is_defective
from loctune.inspect.run import ICLPrediction, predict_episodes
from loctune.inspect.selection import Embedder, select_examples
from loctune.inspect.tiling import Tiling
from loctune.models.base import VLMAdapter
from loctune.types import Detection, Sample


@dataclass
class ICLEvaluation:
    """Metrics and per-query predictions of an in-context evaluation."""

    metrics: dict[str, Any]
    predictions: list[ICLPrediction]

    def save(self, directory: str | Path) -> Path:
        """Write ``metrics.json`` and ``predictions.json`` to ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(self.metrics, indent=1))
        records = [p.to_json() for p in self.predictions]
        (out / "predictions.json").write_text(json.dumps(records, indent=1))
        return out


def evaluate_in_context(
    adapter: VLMAdapter,
    queries: Sequence[Sample],
    support: Sequence[Sample] | None = None,
    k: int = 2,
    strategy: str = "balanced",
    metric: str = "cosine",
    embed: Embedder | None = None,
    tiling: Tiling | None = None,
    seed: int = 0,
    max_new_tokens: int = 64,
    progress: bool = False,
    batch_size: int = 16,
) -> ICLEvaluation:
    """Answer every query after examples of its product (:func:`select_examples`) and score.

    ``batch_size`` prompts go to the adapter at once (chat adapters still run
    them one by one).
    """
    chosen = select_examples(queries, support, k, strategy, metric, embed, seed)
    episodes = [Episode(list(ex), q, tiling) for q, ex in zip(queries, chosen, strict=True)]
    predictions = predict_episodes(adapter, episodes, max_new_tokens, batch_size, progress)
    return ICLEvaluation(inspection_metrics(predictions, queries), predictions)


def evaluate_patchcore_in_context(
    queries: Sequence[Sample],
    support: Sequence[Sample] | None = None,
    k: int = 2,
    make_detector: Callable[[], PatchCore] = PatchCore,
    strategy: str = "balanced",
    metric: str = "cosine",
    embed: Embedder | None = None,
    seed: int = 0,
) -> ICLEvaluation:
    """The PatchCore baseline under the in-context protocol, for a like-for-like comparison.

    Each query is scored by a detector fit on the good ones among the examples
    :func:`select_examples` gives it, i.e. the same good shots an in-context
    model sees with the same arguments (the defective examples are not used).
    The threshold is calibrated on those shots by leave-one-out
    (:meth:`PatchCore.fit`), which needs ``k >= 2``; with ``k = 1`` accuracy,
    F1 and localisation are NaN and only the threshold-free AUROC is
    reported. A flagged query's box is the largest region above the
    threshold. PatchCore names no defect type: ``type_accuracy`` is NaN.
    """
    if k < 1:
        raise ValueError(f"k: PatchCore needs at least one good shot, got k={k}")
    chosen = select_examples(queries, support, k, strategy, metric, embed, seed)
    predictions = []
    for query, examples in zip(queries, chosen, strict=True):
        good = [e for e in examples if not is_defective(e)]
        threshold = None if len(good) >= 2 else math.inf
        detector = make_detector().fit([e.load_image() for e in good], threshold=threshold)
        found = detector.predict(query.load_image())
        predictions.append(
            ICLPrediction(
                image_id=query.image_id,
                text="",
                defective=found.defective,
                score=found.score,
                defect_type="",
                detections=[Detection("defect", found.box)] if found.box is not None else [],
                malformed=False,
                n_malformed_boxes=0,
                examples=[e.image_id for e in good],
            )
        )
    metrics = {**inspection_metrics(predictions, queries), "type_accuracy": float("nan")}
    if k < 2:
        metrics.update(dict.fromkeys(("accuracy", "f1", "loc_acc50", "loc_pointing"), float("nan")))
    return ICLEvaluation(metrics, predictions)
