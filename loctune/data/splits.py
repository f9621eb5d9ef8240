"""Train/val/test splits by image.

Splits are made over *images*, never samples: a referring dataset has several
expressions per image, and an image seen in training must not be scored in
evaluation. Random splits are deterministic in the seed and independent of
the order samples arrive in. A dataset's own split (``meta["split"]``, set by
the YOLO, RefCOCO, CSV-per-split and Hugging Face readers) is used as it is.

To carve a validation set out of a dataset that only ships train/test::

    parts = split_samples(samples)                       # the dataset's own split
    parts |= split_by_image(parts["train"], {"train": 0.875, "val": 0.125}, seed=0)
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from loctune.data.validate import DataError
from loctune.types import Sample

DEFAULT_RATIOS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}


def image_key(sample: Sample) -> str:
    """What identifies a sample's image: its ``image_id``, else its path or object id."""
    if sample.image_id:
        return sample.image_id
    return sample.image if isinstance(sample.image, str) else f"object:{id(sample.image)}"


def split_by_image(
    samples: Sequence[Sample], ratios: Mapping[str, float] = DEFAULT_RATIOS, seed: int = 0
) -> dict[str, list[Sample]]:
    """Random split of the images in the given ratios (normalised to sum to 1).

    Image counts are the ratios times the number of images, rounded by largest
    remainder, so they add up exactly. Samples keep their input order within a
    split.
    """
    if not ratios or any(not math.isfinite(r) or r < 0 for r in ratios.values()):
        raise ValueError(f"ratios must be non-negative numbers, got {dict(ratios)}")
    total = sum(ratios.values())
    if total <= 0:
        raise ValueError(f"ratios must not all be zero, got {dict(ratios)}")
    keys = sorted({image_key(s) for s in samples})
    random.Random(seed).shuffle(keys)
    counts = _allocate(len(keys), [r / total for r in ratios.values()])
    assignment: dict[str, str] = {}
    start = 0
    for name, count in zip(ratios, counts, strict=True):
        assignment.update((key, name) for key in keys[start : start + count])
        start += count
    parts: dict[str, list[Sample]] = {name: [] for name in ratios}
    for sample in samples:
        parts[assignment[image_key(sample)]].append(sample)
    return parts


def dataset_splits(samples: Sequence[Sample]) -> dict[str, list[Sample]] | None:
    """The dataset's own split from ``meta["split"]``; None when no sample has one.

    Raises :class:`DataError` when only some samples have a split, or when one
    image is in two splits (e.g. a YOLO ``data.yaml`` with ``val`` = ``train``).
    """
    with_split = [s for s in samples if "split" in s.meta]
    if not with_split:
        return None
    if len(with_split) != len(samples):
        raise DataError(
            f"{len(with_split)} of {len(samples)} samples have meta['split'] and the others do "
            f"not; give all of them a split or use split_by_image"
        )
    parts: dict[str, list[Sample]] = {}
    split_of: dict[str, str] = {}
    for sample in samples:
        name, key = str(sample.meta["split"]), image_key(sample)
        if split_of.setdefault(key, name) != name:
            raise DataError(
                f"image {key!r} is in both the {split_of[key]!r} and the {name!r} split of the "
                f"dataset; splits must not share images"
            )
        parts.setdefault(name, []).append(sample)
    return parts


def split_samples(
    samples: Sequence[Sample],
    ratios: Mapping[str, float] | None = None,
    seed: int = 0,
    use_dataset_split: bool = True,
) -> dict[str, list[Sample]]:
    """The dataset's own split when it has one (and ``use_dataset_split``), else a random one."""
    if use_dataset_split and (own := dataset_splits(samples)) is not None:
        return own
    return split_by_image(samples, ratios or DEFAULT_RATIOS, seed)


def _allocate(n: int, fractions: list[float]) -> list[int]:
    """Integer counts summing to ``n``, as close as possible to ``n * fractions``."""
    exact = [n * f for f in fractions]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts
