"""Which examples a query is shown: ``k`` good and ``k`` defective of its product.

Draws are seeded by the seed and the query's id, so every method given the
same arguments (an in-context VLM, the PatchCore baseline) sees the same
examples whatever order queries come in. ``"nearest"`` ranks by an image
embedding, by default :class:`PooledFeatures`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from loctune.inspect.baseline import RandomConvFeatures, image_to_tensor
from loctune.inspect.records import by_product, is_defective
from loctune.types import Sample

STRATEGIES = ("random", "balanced", "nearest")
SIMILARITIES = ("cosine", "dot", "centred")

Embedder = Callable[[Sequence[Image.Image]], torch.Tensor]


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
    def maps(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[N, C, h, w]`` patch features of the images resized to ``input_size``."""
        size = (self.input_size, self.input_size)
        batch = torch.stack(
            [image_to_tensor(im.convert("RGB").resize(size, Image.BILINEAR)) for im in images]
        )
        return self.extractor(batch)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.maps(images).mean(dim=(2, 3))


def similarity(queries: torch.Tensor, keys: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """``[Q, K]`` similarities of embedding rows: ``"cosine"``, ``"dot"`` product, or
    ``"centred"`` cosine: the mean of ``keys`` (the example pool) is subtracted from
    queries and keys before normalising.

    Cosine of raw embeddings can be dominated by what every embedding shares
    (Steck et al. 2024, arXiv 2403.05440: cosine of learned embeddings can be
    arbitrary); pooled ReLU features, all positive, sit in one narrow cone, so
    their cosines are all near 1. Centring on the pool removes the shared
    direction and compares what differs between examples.
    """
    if metric not in SIMILARITIES:
        raise ValueError(f"metric: expected one of {SIMILARITIES}, got {metric!r}")
    queries, keys = queries.float(), keys.float()
    if metric == "centred":
        centre = keys.mean(dim=0, keepdim=True)
        queries, keys = queries - centre, keys - centre
    if metric in ("cosine", "centred"):
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
    similar of each class under ``metric`` (:func:`similarity`; ``"centred"``
    centres on the mean embedding of the whole pool) on ``embed`` (default
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
