"""Running an adapter on in-context inspection prompts: answers, parsed and scored.

The adapter is used only through :meth:`VLMAdapter.generate_in_context`, the
way an evaluator receives a predict function: this module never looks inside
a model family. Image-level score (for AUROC): the model's probability of
beginning its answer with "defective" rather than "good", read at the first
token where the two answers differ, from the same forward pass that starts the
greedy answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from loctune.codecs import Codec
from loctune.inspect.answers import VERDICTS, parse_answer
from loctune.inspect.prompts import Episode, episode_prompt
from loctune.inspect.tiling import Tiling
from loctune.models.base import VLMAdapter
from loctune.types import Detection, Sample


@dataclass
class ICLPrediction:
    """One query's answer: the decision (parsed verdict, or the score when unparseable)."""

    image_id: str
    text: str
    defective: bool
    score: float  # P(answer starts "defective") / (P("defective") + P("good"))
    defect_type: str
    detections: list[Detection]
    malformed: bool  # no verdict could be read; ``defective`` then comes from the score
    n_malformed_boxes: int
    examples: list[str]  # image ids of the examples shown, in prompt order

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def prediction_from_answer(
    query: Sample,
    examples: Sequence[Sample],
    text: str,
    score: float,
    codec: Codec,
    tiling: Tiling | None = None,
) -> ICLPrediction:
    """A generated answer parsed into a prediction; without a readable verdict the score decides."""
    parsed = parse_answer(text, codec, query.image_size, tiling)
    return ICLPrediction(
        image_id=query.image_id,
        text=text,
        defective=parsed.defective if parsed.defective is not None else score >= 0.5,
        score=score,
        defect_type=parsed.defect_type,
        detections=parsed.detections,
        malformed=parsed.malformed,
        n_malformed_boxes=parsed.n_malformed_boxes,
        examples=[e.image_id for e in examples],
    )


@torch.no_grad()
def predict_episodes(
    adapter: VLMAdapter,
    episodes: Sequence[Episode],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
) -> list[ICLPrediction]:
    """Greedy answers for episodes' queries, ``batch_size`` prompts per adapter call."""
    predictions = []
    for start in range(0, len(episodes), batch_size):
        batch = episodes[start : start + batch_size]
        prompts = [episode_prompt(e, adapter.codec) for e in batch]
        answers = adapter.generate_in_context(prompts, VERDICTS, max_new_tokens)
        for episode, answer in zip(batch, answers, strict=True):
            good, bad = answer.choice_logprobs
            score = float(torch.sigmoid(torch.tensor(bad - good)))
            p = prediction_from_answer(
                episode.query, episode.examples, answer.text, score, adapter.codec, episode.tiling
            )
            predictions.append(p)
            if progress:
                print(
                    f"[{len(predictions)}/{len(episodes)}] {p.image_id}: {p.text!r} "
                    f"(score {p.score:.3f})"
                )
    return predictions


def inspect_in_context(
    adapter: VLMAdapter,
    query: Sample,
    examples: Sequence[Sample],
    tiling: Tiling | None = None,
    max_new_tokens: int = 64,
) -> ICLPrediction:
    """Greedy answer for ``query`` after ``examples``, parsed and scored."""
    return predict_episodes(adapter, [Episode(list(examples), query, tiling)], max_new_tokens)[0]
