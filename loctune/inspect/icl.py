"""Few-shot visual inspection by multi-image in-context prompting of chat VLMs.

A query image is shown after ``k`` good and ``k`` defective examples of the
same product, each with its answer, and the model answers for the query in
the same format::

    good
    defective: scratch <bin_120><bin_40><bin_180><bin_52> scratch

(the boxes are written by the adapter's codec, so the tokens are whatever the
adapter writes: added ``<bin_k>`` tokens, Qwen2-VL's plain-text corners ...).

Prompt layout: **one user/assistant turn pair per example**, then the query
as the last user turn with the generation prompt. The alternative, one user
turn with all images and answers as interleaved text, was not chosen because
(a) the query answer is then the only text ever written after the assistant
marker, so the examples would not demonstrate the position and form of the
answer, while with turn pairs every example answer sits exactly where the
query answer will, behind the same template tokens; (b) each example answer
ends with the end-of-turn token, which is the token generation stops on; (c)
each turn is self-contained, so a tiled turn can number its own images
("image 1: the whole image ...") without counting the images of other turns.
SmolVLM/Idefics3 and Qwen2-VL templates both render multi-turn, multi-image
chats.

Tiling (``Tiling``): each image becomes a downscaled global view plus
``rows x cols`` full-resolution crops, the layout described in the turn's
text (``tiling.layout_description``); an answer then gives each box on the
crop that holds it, ``image 3: <box tokens> scratch``, in that crop's
pixels, and parsing maps boxes back to the full image (merged by NMS where
crops overlap).

Image-level score (for AUROC): the model's probability of beginning its
answer with "defective" rather than "good", read at the first token where the
two answers differ (tokens they share, e.g. a leading space, are fed to the
model first), from the same forward pass that starts the greedy answer.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loctune.boxes import iou_matrix
from loctune.codecs import Codec
from loctune.inspect.baseline import PatchCore, RandomConvFeatures, image_to_tensor
from loctune.inspect.metrics import accuracy, auroc, f1, point_in_boxes
from loctune.inspect.records import GOOD, by_product, is_defective
from loctune.inspect.tiling import (
    TileGrid,
    crop_to_image,
    image_to_crop,
    merge_detections,
    tile_grid,
    tile_views,
)
from loctune.types import Box, Detection, Sample

DEFECTIVE = "defective"
STRATEGIES = ("random", "balanced", "nearest")
SIMILARITIES = ("cosine", "dot")

Embedder = Callable[[Sequence[Image.Image]], torch.Tensor]

_VERDICT = re.compile(rf"\s*({GOOD}|{DEFECTIVE})\b\s*:?", re.IGNORECASE)
_IMAGE_REF = re.compile(r"\bimage\s+(\d+)\s*:", re.IGNORECASE)
#: where a defect type ends: the first box markup or image reference
_TYPE_END = re.compile(r"<|\(|\[|\{|\bimage\s+\d+\s*:", re.IGNORECASE)


# ---------------------------------------------------------------------- tiling


@dataclass(frozen=True)
class Tiling:
    """Show every image as a global view (longer side ``global_size``) plus a crop grid."""

    rows: int
    cols: int
    overlap: float = 0.0
    global_size: int | None = 448

    @classmethod
    def parse(cls, spec: str, overlap: float = 0.0, global_size: int | None = 448) -> Tiling:
        """``"2x3"`` -> 2 rows, 3 columns."""
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", spec)
        if not match or min(int(match[1]), int(match[2])) < 1:
            raise ValueError(
                f"tile: expected ROWSxCOLS with positive integers (e.g. 2x2), got {spec!r}"
            )
        return cls(int(match[1]), int(match[2]), overlap, global_size)

    def grid(self, image_size: tuple[int, int]) -> TileGrid:
        return tile_grid(image_size, self.rows, self.cols, self.overlap)

    @property
    def first_crop(self) -> int:
        """1-based number of the first crop among a turn's images."""
        return 1 if self.global_size is None else 2


# ---------------------------------------------------------------------- answers


def answer_text(sample: Sample, codec: Codec, tiling: Tiling | None = None) -> str:
    """What the model should answer for an inspection sample (see the module docstring)."""
    return answer_target(sample, codec, tiling)[0]


def answer_target(
    sample: Sample, codec: Codec, tiling: Tiling | None = None
) -> tuple[str, list[tuple[Box, tuple[int, int]]]]:
    """:func:`answer_text` and the boxes it writes, in text order, each with the size of
    the image it is written on (the crop's, when tiled): what location targets need."""
    if not is_defective(sample):
        return GOOD, []
    text = f"{DEFECTIVE}: {sample.meta['defect_type']}"
    if not sample.boxes:
        return text, []
    if tiling is None:
        size = sample.image_size
        encoded = codec.encode(sample.boxes, sample.labels, size)
        return f"{text} {encoded}", [(box, size) for box in sample.boxes]
    written = []
    grid = tiling.grid(sample.image_size)
    for number, crop in enumerate(grid.crops, start=tiling.first_crop):
        boxes, labels = image_to_crop(sample.boxes, sample.labels, crop)
        if boxes:
            text += f" image {number}: {codec.encode(boxes, labels, crop.size)}"
            written += [(box, crop.size) for box in boxes]
    return text, written


@dataclass
class ParsedAnswer:
    """What could be read from an answer; ``defective`` is None when it names no verdict."""

    defective: bool | None
    defect_type: str = ""
    detections: list[Detection] = field(default_factory=list)
    n_malformed_boxes: int = 0

    @property
    def malformed(self) -> bool:
        return self.defective is None


def parse_answer(
    text: str, codec: Codec, image_size: tuple[int, int], tiling: Tiling | None = None
) -> ParsedAnswer:
    """Verdict, defect type and full-image boxes of an answer; never raises on model output.

    With ``tiling``, boxes after ``image N:`` are decoded on crop N (or on the
    whole image for the global view) and mapped back; a reference to an image
    that the turn did not have counts as a malformed box, as do the fragments
    the codec could not read. Boxes after a "good" verdict are ignored.
    """
    match = _VERDICT.match(text)
    if match is None:
        return ParsedAnswer(None)
    if match[1].lower() == GOOD:
        return ParsedAnswer(False, GOOD)
    rest = text[match.end() :]
    end = _TYPE_END.search(rest)
    defect_type = rest[: end.start() if end else len(rest)].strip(" \t\n;,.")
    if tiling is None:
        decoded = codec.decode(rest, image_size)
        return ParsedAnswer(True, defect_type, list(decoded), decoded.n_malformed)
    grid = tiling.grid(image_size)
    refs = list(_IMAGE_REF.finditer(rest))
    # text before the first reference is read on the whole image, as the global view is
    whole = codec.decode(rest[: refs[0].start() if refs else len(rest)], image_size)
    found, bad = list(whole), whole.n_malformed
    for i, ref in enumerate(refs):
        segment = rest[ref.end() : refs[i + 1].start() if i + 1 < len(refs) else len(rest)]
        number, index = int(ref[1]), int(ref[1]) - tiling.first_crop
        if number == 1 and tiling.global_size is not None:
            decoded = codec.decode(segment, image_size)
            found += list(decoded)
        elif 0 <= index < len(grid.crops):
            crop = grid.crops[index]
            decoded = codec.decode(segment, crop.size)
            found += [Detection(d.label, crop_to_image([d.box], crop)[0], d.score) for d in decoded]
        else:
            bad += 1  # an image the turn did not show
            continue
        bad += decoded.n_malformed
    return ParsedAnswer(True, defect_type, merge_detections(found), bad)


# ---------------------------------------------------------------------- prompt


@dataclass
class ICLPrompt:
    """Chat messages for ``processor.apply_chat_template`` and their images, in order."""

    messages: list[dict[str, Any]]
    images: list[Image.Image]


def turn_images(sample: Sample, tiling: Tiling | None) -> tuple[list[Image.Image], str]:
    """The images one turn shows for a sample (the image, or global view + crops) and,
    when tiled, the text describing their layout ("" otherwise)."""
    image = sample.load_image()
    if tiling is None:
        return [image], ""
    views = tile_views(image, tiling.rows, tiling.cols, tiling.overlap, tiling.global_size)
    return views.images, views.layout


def _user_turn(sample: Sample, tiling: Tiling | None) -> tuple[dict[str, Any], list[Image.Image]]:
    images, layout = turn_images(sample, tiling)
    text = f"{layout} {sample.prompt}" if layout else sample.prompt
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}, images


def build_prompt(
    examples: Sequence[Sample], query: Sample, codec: Codec, tiling: Tiling | None = None
) -> ICLPrompt:
    """One user/assistant turn pair per example (in the given order), then the query's user turn."""
    messages, images = [], []
    for example in examples:
        turn, turn_images = _user_turn(example, tiling)
        answer = answer_text(example, codec, tiling)
        messages += [turn, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        images += turn_images
    turn, turn_images = _user_turn(query, tiling)
    messages.append(turn)
    images += turn_images
    return ICLPrompt(messages, images)


# ---------------------------------------------------------------------- example selection


class PooledFeatures:
    """Default embedding for nearest-neighbour selection: PatchCore's extractor, mean-pooled.

    Images are resized to ``input_size`` and featurised by
    :class:`RandomConvFeatures` (no pretrained weights); the spatial mean
    summarises colour and texture, enough to find examples that look alike.
    Any ``f(images) -> [N, D]`` can replace it.
    """

    def __init__(self, input_size: int = 64, extractor: torch.nn.Module | None = None) -> None:
        self.input_size = input_size
        self.extractor = extractor if extractor is not None else RandomConvFeatures()

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        size = (self.input_size, self.input_size)
        batch = torch.stack(
            [image_to_tensor(im.convert("RGB").resize(size, Image.BILINEAR)) for im in images]
        )
        return self.extractor(batch).mean(dim=(2, 3))


def similarity(queries: torch.Tensor, keys: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """``[Q, K]`` similarities of embedding rows: ``"cosine"`` or ``"dot"`` product."""
    if metric not in SIMILARITIES:
        raise ValueError(f"metric: expected one of {SIMILARITIES}, got {metric!r}")
    queries, keys = queries.float(), keys.float()
    if metric == "cosine":
        queries, keys = F.normalize(queries, dim=-1), F.normalize(keys, dim=-1)
    return queries @ keys.T


def _interleave(good: Sequence[Sample], defective: Sequence[Sample]) -> list[Sample]:
    return [s for pair in zip(good, defective, strict=True) for s in pair]


class ExampleSelector:
    """Picks ``k`` good and ``k`` defective examples for a query from a pool of one product.

    ``k=0`` selects nothing (a zero-shot query).

    ``"random"``: uniformly within each class. ``"balanced"``: defective
    examples cycle through the defect types (random within a type), so ``k``
    examples cover ``min(k, types)`` types. ``"nearest"``: the ``k`` most
    similar of each class under ``metric`` on ``embed`` (default
    :class:`PooledFeatures`; pool embeddings are computed once). Random draws
    are seeded by ``seed`` and the query's id, so a query gets the same
    examples whatever order queries come in. The query itself, and samples
    sharing its ``meta["pair_id"]``, are never chosen. Examples are returned
    interleaved good, defective, good, ... (most similar first for nearest).
    """

    def __init__(
        self,
        pool: Sequence[Sample],
        k: int = 2,
        strategy: str = "balanced",
        metric: str = "cosine",
        embed: Embedder | None = None,
        seed: int = 0,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        if metric not in SIMILARITIES:
            raise ValueError(f"metric: expected one of {SIMILARITIES}, got {metric!r}")
        if k < 0:
            raise ValueError(f"k: expected a number of examples per class >= 0, got {k}")
        self.pool = list(pool)
        self.k, self.strategy, self.metric, self.seed = k, strategy, metric, seed
        self._embed = embed
        self._pool_embeddings: torch.Tensor | None = None

    @property
    def embed(self) -> Embedder:
        """The embedding for ``"nearest"``; the default is built on first use only."""
        if self._embed is None:
            self._embed = PooledFeatures()
        return self._embed

    def _candidates(self, query: Sample) -> tuple[list[int], list[int]]:
        pair = query.meta.get("pair_id")
        good, defective = [], []
        for i, s in enumerate(self.pool):
            same = s is query or (query.image_id and s.image_id == query.image_id)
            if same or (pair is not None and s.meta.get("pair_id") == pair):
                continue
            (defective if is_defective(s) else good).append(i)
        if len(good) < self.k or len(defective) < self.k:
            product = query.meta.get("product", "?")
            raise ValueError(
                f"product {product!r}: need k={self.k} good and {self.k} defective examples "
                f"besides the query, the pool has {len(good)} good and {len(defective)} defective"
            )
        return good, defective

    def select(self, query: Sample) -> list[Sample]:
        if self.k == 0:
            return []
        good, defective = self._candidates(query)
        rng = random.Random(f"{self.seed}:{query.image_id}")
        if self.strategy == "nearest":
            query_embedding = self.embed([query.load_image()])
            scores = similarity(query_embedding, self._embeddings(), self.metric)[0]
            good, defective = (
                sorted(c, key=lambda i: -float(scores[i]))[: self.k] for c in (good, defective)
            )
        elif self.strategy == "random":
            good, defective = rng.sample(good, self.k), rng.sample(defective, self.k)
        else:
            good = rng.sample(good, self.k)
            defective = self._cycle_types(defective, rng)
        return _interleave([self.pool[i] for i in good], [self.pool[i] for i in defective])

    def _cycle_types(self, candidates: list[int], rng: random.Random) -> list[int]:
        by_type: dict[str, list[int]] = {}
        for i in candidates:
            by_type.setdefault(self.pool[i].meta["defect_type"], []).append(i)
        queues = [rng.sample(members, len(members)) for members in by_type.values()]
        rng.shuffle(queues)
        chosen: list[int] = []
        while len(chosen) < self.k:
            for queue in queues:
                if queue and len(chosen) < self.k:
                    chosen.append(queue.pop())
        return chosen

    def _embeddings(self) -> torch.Tensor:
        if self._pool_embeddings is None:
            rows = self.embed([s.load_image() for s in self.pool])
            if rows.shape[0] != len(self.pool):
                raise ValueError(f"embed returned {rows.shape[0]} rows for {len(self.pool)} images")
            self._pool_embeddings = rows
        return self._pool_embeddings


# ---------------------------------------------------------------------- running a model


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


def _is_small_vlm(adapter: Any) -> bool:
    from loctune.models.small_vlm_adapter import SmallVLMAdapter

    return isinstance(adapter, SmallVLMAdapter)


def _check_chat_adapter(adapter: Any) -> None:
    from loctune.models.hf.chat import ChatAdapter

    if not isinstance(adapter, ChatAdapter):
        raise TypeError(
            "in-context inspection needs a multi-image chat VLM (SmolVLM/Idefics3, Qwen2-VL) "
            f"or loctune's small VLM; got {type(adapter).__name__}"
        )


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


def _verdict_tokens(adapter: Any) -> tuple[list[int], int, int]:
    """Tokens both verdicts start with, then the first token of "good" and of "defective"."""
    good, bad = (
        adapter.tokenizer(adapter.answer_prefix + word, add_special_tokens=False)["input_ids"]
        for word in (GOOD, DEFECTIVE)
    )
    n = 0
    while n < min(len(good), len(bad)) and good[n] == bad[n]:
        n += 1
    if n == min(len(good), len(bad)):
        raise ValueError(f"the tokenizer cannot tell {GOOD!r} from {DEFECTIVE!r} apart")
    return good[:n], good[n], bad[n]


def _model_inputs(adapter: Any, prompt: ICLPrompt, forced: list[int]) -> dict[str, Any]:
    """Processor outputs for one multi-image prompt, with ``forced`` answer tokens appended."""
    text = adapter.processor.apply_chat_template(
        prompt.messages, add_generation_prompt=True, tokenize=False
    )
    enc = dict(adapter.processor(text=[text], images=[prompt.images], return_tensors="pt"))
    if "token_type_ids" not in adapter.token_fields:
        enc.pop("token_type_ids", None)
    extra = torch.tensor([forced], dtype=torch.long)
    enc["input_ids"] = torch.cat([enc["input_ids"], extra], dim=1)
    enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones_like(extra)], dim=1)
    for key, fill in adapter.token_fields.items():
        if key in enc:
            enc[key] = torch.cat([enc[key], torch.full_like(extra, fill)], dim=1)
    return adapter.model_inputs(enc)


@torch.no_grad()
def inspect_in_context(
    adapter: Any,
    query: Sample,
    examples: Sequence[Sample],
    tiling: Tiling | None = None,
    max_new_tokens: int = 64,
) -> ICLPrediction:
    """Greedy answer for ``query`` after ``examples``, parsed and scored.

    Chat adapters get a turn-pair prompt; loctune's small VLM an episode
    (:mod:`loctune.inspect.episodes`), the layout it was trained on.
    """
    if _is_small_vlm(adapter):
        from loctune.inspect.episodes import Episode, predict_episodes

        episode = Episode(list(examples), query, tiling)
        return predict_episodes(adapter, [episode], max_new_tokens)[0]
    _check_chat_adapter(adapter)
    prompt = build_prompt(examples, query, adapter.codec, tiling)
    forced, good_id, bad_id = _verdict_tokens(adapter)
    out = adapter.greedy(_model_inputs(adapter, prompt, forced), max_new_tokens)
    first = out.logits[0][0].float()
    score = float(torch.sigmoid(first[bad_id] - first[good_id]))
    new = out.sequences[0, -len(out.logits) :].tolist()
    stops = set(adapter.stop_token_ids)
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    text = adapter.tokenizer.decode(
        forced + new, skip_special_tokens=False, clean_up_tokenization_spaces=False
    ).strip()
    return prediction_from_answer(query, examples, text, score, adapter.codec, tiling)


# ---------------------------------------------------------------------- evaluation


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


def _localised(prediction: ICLPrediction, truth: Sample) -> bool:
    """Acc@0.5 hit: the first predicted box overlaps some true box with IoU >= 0.5."""
    if not prediction.detections:
        return False
    return bool(iou_matrix([prediction.detections[0].box], truth.boxes).max() >= 0.5)


def _pointed(prediction: ICLPrediction, truth: Sample) -> bool:
    """Pointing hit: the centre of the first predicted box lies in some true box."""
    if not prediction.detections:
        return False
    x1, y1, x2, y2 = prediction.detections[0].box
    return point_in_boxes(((x1 + x2) / 2, (y1 + y2) / 2), truth.boxes)


def inspection_metrics(
    predictions: Sequence[ICLPrediction], queries: Sequence[Sample]
) -> dict[str, Any]:
    """Image-level accuracy, F1, AUROC (per product and mean) and defect localisation.

    Localisation is over defective queries with true boxes, a query without a
    predicted box counting as a miss: ``loc_acc50`` (Acc@0.5: the first box has
    IoU >= 0.5 with a true box) and ``loc_pointing`` (the first box's centre
    lies in a true box, which stays meaningful for defects a few pixels wide,
    where one location bin already costs most of the IoU). ``type_accuracy``
    is over defective queries, the predicted type compared with
    ``meta["defect_type"]``.
    """
    truth = [is_defective(q) for q in queries]
    decided = [p.defective for p in predictions]
    per_product = {}
    for product in by_product(queries):
        rows = [i for i, q in enumerate(queries) if q.meta["product"] == product]
        per_product[product] = auroc([predictions[i].score for i in rows], [truth[i] for i in rows])
    defective = [(p, q) for p, q in zip(predictions, queries, strict=True) if is_defective(q)]
    boxed = [(p, q) for p, q in defective if q.boxes]
    aurocs = [v for v in per_product.values() if not np.isnan(v)]
    return {
        "accuracy": accuracy(decided, truth),
        "f1": f1(decided, truth),
        "auroc": float(np.mean(aurocs)) if aurocs else float("nan"),
        "auroc_per_product": per_product,
        "loc_acc50": float(np.mean([_localised(p, q) for p, q in boxed]))
        if boxed
        else float("nan"),
        "loc_pointing": float(np.mean([_pointed(p, q) for p, q in boxed]))
        if boxed
        else float("nan"),
        "type_accuracy": (
            float(np.mean([p.defect_type == q.meta["defect_type"] for p, q in defective]))
            if defective
            else float("nan")
        ),
        "malformed_rate": float(np.mean([p.malformed for p in predictions]))
        if predictions
        else 0.0,
        "malformed_boxes": int(sum(p.n_malformed_boxes for p in predictions)),
        "n_queries": len(predictions),
    }


def select_examples(
    queries: Sequence[Sample],
    support: Sequence[Sample] | None = None,
    k: int = 2,
    strategy: str = "balanced",
    metric: str = "cosine",
    embed: Embedder | None = None,
    seed: int = 0,
) -> list[list[Sample]]:
    """The examples shown with each query: ``k`` good and ``k`` defective of its product.

    Examples come from ``support`` (default: the queries themselves, the query
    and its pair never shown as its own example). One selector per product,
    so nearest-neighbour embeddings of the pool are computed once; the draws
    depend on (``seed``, query id) only, so every method given the same
    arguments sees the same examples.
    """
    pools = {
        p: g.good + g.defective
        for p, g in by_product(support if support is not None else queries).items()
    }
    selectors: dict[str, ExampleSelector] = {}
    chosen = []
    for query in queries:
        product = query.meta["product"]
        if product not in pools:
            raise ValueError(f"query {query.image_id}: no support examples of product {product!r}")
        if product not in selectors:
            selectors[product] = ExampleSelector(pools[product], k, strategy, metric, embed, seed)
        chosen.append(selectors[product].select(query))
    return chosen


def _answers(
    adapter: Any,
    queries: Sequence[Sample],
    chosen: Sequence[Sequence[Sample]],
    tiling: Tiling | None,
    max_new_tokens: int,
    batch_size: int,
) -> Iterator[ICLPrediction]:
    """Predictions in query order: one prompt at a time for chat adapters, batched for the small VLM."""
    if not _is_small_vlm(adapter):
        for query, examples in zip(queries, chosen, strict=True):
            yield inspect_in_context(adapter, query, examples, tiling, max_new_tokens)
        return
    from loctune.inspect.episodes import Episode, predict_episodes

    episodes = [Episode(list(ex), q, tiling) for q, ex in zip(queries, chosen, strict=True)]
    for start in range(0, len(episodes), batch_size):
        batch = episodes[start : start + batch_size]
        yield from predict_episodes(adapter, batch, max_new_tokens, batch_size)


def evaluate_in_context(
    adapter: Any,
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

    ``batch_size`` queries are answered at once by the small VLM; chat
    adapters answer one prompt at a time.
    """
    chosen = select_examples(queries, support, k, strategy, metric, embed, seed)
    predictions = []
    answers = _answers(adapter, queries, chosen, tiling, max_new_tokens, batch_size)
    for n, (query, p) in enumerate(zip(queries, answers, strict=True), start=1):
        predictions.append(p)
        if progress:
            print(f"[{n}/{len(queries)}] {query.image_id}: {p.text!r} (score {p.score:.3f})")
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


# ---------------------------------------------------------------------- data for the CLI


def read_inspection_data(spec: str) -> list[Sample]:
    """Samples of an inspection data spec: ``synthetic`` or a folder in the MVTec layout.

    A folder is read in every split it has (``train`` and/or ``test``), so
    its test images can be scored with examples drawn from both splits;
    ``meta["split"]`` tells them apart. ``synthetic`` is the built-in
    evaluation products (8 good and 8 defective 256 px images each).
    """
    from loctune.inspect.folder import LAYOUT, SPLITS, folder_categories, load_inspection_folder

    if spec == "synthetic":
        from loctune.inspect.synthetic import synthetic_inspection_set

        return synthetic_inspection_set("test")
    root = Path(spec)
    is_category = any((root / split).is_dir() for split in SPLITS)
    categories = [root] if is_category else [root / c for c in folder_categories(root)]
    samples = []
    for category in categories:
        for split in SPLITS:
            if (category / split).is_dir():
                samples += load_inspection_folder(category, split=split)
    if not samples:
        raise FileNotFoundError(f"{root}: no inspection images; expected the layout {LAYOUT}")
    return samples
