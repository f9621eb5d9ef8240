"""Few-shot defect typing and localisation on NEU-DET: name and box a steel defect from k
examples of each type.

Every NEU-DET image holds a defect of one of six types. Given ``k`` example
images of each type, a query is typed by its nearest example (1-NN) under a
similarity of image embeddings (:func:`~loctune.inspect.selection.similarity`:
cosine, dot product, or cosine after centring on the examples' mean). Its defect is
boxed from the examples' boxes by patch prototypes (:func:`prototype_score_map`). The
features are training-free (patch features, pretrained or random), so every type is
"never seen" by them: nothing here is fit on NEU-DET.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from loctune.boxes import iou_matrix
from loctune.inspect.regions import largest_region, mask_box
from loctune.inspect.selection import similarity
from loctune.types import Box


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


def patch_mask(boxes: Sequence[Box], image_size: tuple[int, int], grid: tuple[int, int]
               ) -> torch.Tensor:
    """``[h, w]`` bool: the patches of an ``h x w`` feature grid whose centre lies in a box."""
    (width, height), (h, w) = image_size, grid
    ys = (torch.arange(h) + 0.5) * height / h
    xs = (torch.arange(w) + 0.5) * width / w
    mask = torch.zeros(h, w, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes:
        mask |= ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]
    return mask


def prototype_score_map(query: torch.Tensor, defect: torch.Tensor, background: torch.Tensor
                        ) -> torch.Tensor:
    """``[h, w]`` defect score of a query's ``[C, h, w]`` patch features: cosine to the nearest
    defect patch of the examples (``[Nd, C]``) minus cosine to the nearest background patch
    (``[Nb, C]``). Positive where a patch looks more like the examples' defects than like
    their surfaces: PatchCore's nearest-patch idea with a second, defective bank."""
    c, h, w = query.shape
    patches = F.normalize(query.reshape(c, -1).T.float(), dim=1)
    nearest = [(patches @ F.normalize(bank.float(), dim=1).T).amax(dim=1)
               for bank in (defect, background)]
    return (nearest[0] - nearest[1]).reshape(h, w)


def score_map_box(score: torch.Tensor, image_size: tuple[int, int]) -> Box | None:
    """Box, in image pixels, of the largest connected region of positive score; None if none."""
    box = mask_box(largest_region(score.numpy() > 0))
    if box is None:
        return None
    (width, height), (h, w) = image_size, score.shape
    x1, y1, x2, y2 = box
    return (x1 * width / w, y1 * height / h, x2 * width / w, y2 * height / h)


def localisation_hits(predicted: Box | None, peak: tuple[float, float] | None,
                      truth: Sequence[Box]) -> tuple[bool, bool]:
    """(Acc@0.5 hit: IoU >= 0.5 with some true box, pointing hit: ``peak`` in some true box)."""
    acc = predicted is not None and bool((iou_matrix([predicted], truth) >= 0.5).any())
    point = peak is not None and any(x1 <= peak[0] < x2 and y1 <= peak[1] < y2
                                     for x1, y1, x2, y2 in truth)
    return acc, point


def prototype_localisation(
    maps: torch.Tensor,
    boxes: Sequence[Sequence[Box]],
    types: Sequence[str],
    image_sizes: Sequence[tuple[int, int]],
    support: Sequence[int],
    queries: Sequence[int],
) -> dict[str, float]:
    """Box each query's defect given its type, from the ``k`` examples of that type.

    ``maps[i]`` holds image ``i``'s ``[C, h, w]`` patch features. A query's defect bank is
    the patches inside the boxes of its type's examples; its background bank the patches
    outside every example's boxes (all types). The box is the largest region where
    :func:`prototype_score_map` is positive. Baseline on the same queries: the mean box of
    the type's examples. ``loc_acc50``/``loc_pointing`` (the map's peak in a true box) and
    ``mean_box_acc50``/``mean_box_pointing`` (its centre), over all queries.
    """
    grid = tuple(maps.shape[2:])
    masks = {i: patch_mask(boxes[i], image_sizes[i], grid) for i in support}
    flat = {i: maps[i].flatten(1).T for i in support}  # [h*w, C]
    background = torch.cat([flat[i][~masks[i].flatten()] for i in support])
    hits = []
    for q in queries:
        same = [i for i in support if types[i] == types[q]]
        defect = torch.cat([flat[i][masks[i].flatten()] for i in same])
        size = image_sizes[q]
        if len(defect) == 0:  # boxes too small to cover a patch centre: no defect bank
            box, peak = None, None
        else:
            score = prototype_score_map(maps[q], defect, background)
            box = score_map_box(score, size)
            row, col = divmod(int(score.argmax()), grid[1])
            peak = ((col + 0.5) * size[0] / grid[1], (row + 0.5) * size[1] / grid[0])
        examples = torch.tensor([b for i in same for b in boxes[i]], dtype=torch.float64)
        mean = tuple(examples.mean(dim=0).tolist())
        centre = ((mean[0] + mean[2]) / 2, (mean[1] + mean[3]) / 2)
        hits.append((*localisation_hits(box, peak, boxes[q]),
                     *localisation_hits(mean, centre, boxes[q])))
    rates = np.array(hits, dtype=float).mean(axis=0)
    names = ("loc_acc50", "loc_pointing", "mean_box_acc50", "mean_box_pointing")
    return {**dict(zip(names, rates.tolist(), strict=True)), "n_queries": len(queries)}
