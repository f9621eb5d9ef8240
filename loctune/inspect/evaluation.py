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

from loctune.inspect.baseline import AnomalyPrediction, PatchCore
from loctune.inspect.metrics import inspection_metrics, point_in_boxes
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
    ``loc_peak``: see :func:`_patchcore_evaluation`.
    """
    if k < 1:
        raise ValueError(f"k: PatchCore needs at least one good shot, got k={k}")
    chosen = select_examples(queries, support, k, strategy, metric, embed, seed)
    found = []
    for query, examples in zip(queries, chosen, strict=True):
        good = [e for e in examples if not is_defective(e)]
        threshold = None if len(good) >= 2 else math.inf
        detector = make_detector().fit([e.load_image() for e in good], threshold=threshold)
        found.append((detector.predict(query.load_image()), good))
    return _patchcore_evaluation(queries, found, calibrated=k >= 2)


def evaluate_patchcore_fixed_shots(
    queries: Sequence[Sample],
    examples: Sequence[Sample],
    make_detector: Callable[[], PatchCore] = PatchCore,
) -> ICLEvaluation:
    """PatchCore with one set of shots for every query, the usual few-shot anomaly protocol.

    The detector is fit once on the good ones among ``examples`` (the defective
    ones are not used) and scores every query; the threshold is calibrated by
    leave-one-out on them, which needs two (else accuracy, F1 and box
    localisation are NaN, as in :func:`evaluate_patchcore_in_context`).
    """
    good = [e for e in examples if not is_defective(e)]
    if not good:
        raise ValueError("evaluate_patchcore_fixed_shots: no good example to fit on")
    threshold = None if len(good) >= 2 else math.inf
    detector = make_detector().fit([e.load_image() for e in good], threshold=threshold)
    found = [(detector.predict(q.load_image()), good) for q in queries]
    return _patchcore_evaluation(queries, found, calibrated=len(good) >= 2)


def _patchcore_evaluation(
    queries: Sequence[Sample],
    found: Sequence[tuple[AnomalyPrediction, Sequence[Sample]]],
    calibrated: bool,
) -> ICLEvaluation:
    """Predictions and metrics of PatchCore verdicts (each with the good shots it was fit on).

    Besides :func:`inspection_metrics`, ``loc_peak`` is threshold-free pointing:
    the share of defective queries with boxes whose score-map maximum lies in a
    true box.
    """
    predictions = [
        ICLPrediction(
            image_id=query.image_id,
            text="",
            defective=verdict.defective,
            score=verdict.score,
            defect_type="",
            detections=[Detection("defect", verdict.box)] if verdict.box is not None else [],
            malformed=False,
            n_malformed_boxes=0,
            examples=[e.image_id for e in good],
        )
        for query, (verdict, good) in zip(queries, found, strict=True)
    ]
    peaks = [
        point_in_boxes(verdict.peak, query.boxes)
        for query, (verdict, _) in zip(queries, found, strict=True)
        if is_defective(query) and query.boxes
    ]
    metrics = {
        **inspection_metrics(predictions, queries),
        "type_accuracy": float("nan"),
        "loc_peak": float(sum(peaks) / len(peaks)) if peaks else float("nan"),
    }
    if not calibrated:
        metrics.update(dict.fromkeys(("accuracy", "f1", "loc_acc50", "loc_pointing"), float("nan")))
    return ICLEvaluation(metrics, predictions)
