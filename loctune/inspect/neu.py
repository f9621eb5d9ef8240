"""Few-shot defect typing on NEU-DET: name a steel defect from k examples of each type.

Every NEU-DET image holds a defect of one of six types. Given ``k`` example
images of each type, a query is typed by its nearest example (1-NN) under a
similarity of image embeddings (:func:`~loctune.inspect.selection.similarity`:
cosine, dot product, or cosine after centring on the examples' mean). The
embedding is training-free (mean-pooled patch features, pretrained or random),
so every type is "never seen" by it: nothing here is fit on NEU-DET.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from loctune.inspect.selection import similarity


def typing_split(
    types: Sequence[str], k: int, n_query: int, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of ``k`` examples and ``n_query`` queries of every type, disjoint, seeded.

    A type with fewer than ``k + n_query`` images raises ``ValueError``.
    """
    rng = random.Random(f"neu:{seed}")
    by_type: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        by_type.setdefault(t, []).append(i)
    support, queries = [], []
    for t in sorted(by_type):
        members = by_type[t]
        if len(members) < k + n_query:
            raise ValueError(f"type {t!r}: {len(members)} images, need k + n_query = {k + n_query}")
        drawn = rng.sample(members, k + n_query)
        support += drawn[:k]
        queries += drawn[k:]
    return support, queries


def nearest_example_typing(
    embeddings: torch.Tensor,
    types: Sequence[str],
    support: Sequence[int],
    queries: Sequence[int],
    metric: str = "cosine",
) -> dict[str, float]:
    """Type each query as its most similar support example; ``accuracy`` (all queries)
    and ``balanced_accuracy`` (mean over types). ``"centred"`` centres on the support mean."""
    scores = similarity(embeddings[list(queries)], embeddings[list(support)], metric)
    predicted = [types[support[int(j)]] for j in scores.argmax(dim=1)]
    truth = [types[i] for i in queries]
    hits = np.array([p == t for p, t in zip(predicted, truth, strict=True)])
    per_type = [hits[[t == u for t in truth]].mean() for u in sorted(set(truth))]
    return {"accuracy": float(hits.mean()), "balanced_accuracy": float(np.mean(per_type)),
            "n_queries": len(queries)}
