"""Inspection records: a ``Sample`` with ``task="inspection"`` and a fixed ``meta``.

Every inspection reader (folder, synthetic, DeepPCB) returns plain
``loctune.types.Sample`` objects, so the codecs, adapters and training loop
take them unchanged: ``boxes``/``labels`` are the defect boxes and their
defect types (both empty for a good image) and ``meta`` always holds

- ``product``: the product/category name; few-shot episodes group by it,
- ``defective``: bool, the image-level answer,
- ``defect_type``: ``"good"`` or the defect type name (several types on one
  image are joined with ``","`` in sorted order).

Readers may add more (``split``, ``mask``, ``template``, ``pair_id``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from loctune.types import Box, Sample

GOOD = "good"


def inspection_prompt(product: str) -> str:
    """The question asked about one image; episodes prepend their examples to it."""
    name = product.replace("_", " ")
    return f"inspect the {name}: good or defective? if defective, name and locate each defect"


def inspection_sample(
    image: Image.Image | str,
    product: str,
    boxes: Sequence[Box] = (),
    labels: Sequence[str] = (),
    defect_type: str | None = None,
    image_id: str = "",
    **meta,
) -> Sample:
    """Build an inspection ``Sample``; ``defect_type`` defaults to the joined labels.

    An image is defective when it has boxes or a ``defect_type`` other than
    ``"good"`` (a defective image without a mask has no boxes but still a type).
    """
    if len(boxes) != len(labels):
        raise ValueError(f"{image_id}: {len(boxes)} boxes but {len(labels)} labels")
    if defect_type is None:
        defect_type = ",".join(sorted(set(labels))) if labels else GOOD
    defective = defect_type != GOOD
    if not defective and boxes:
        raise ValueError(f"{image_id}: a good image cannot have defect boxes")
    return Sample(
        image=image,
        prompt=inspection_prompt(product),
        boxes=[tuple(float(v) for v in b) for b in boxes],
        labels=list(labels),
        task="inspection",
        image_id=image_id,
        meta={"product": product, "defective": defective, "defect_type": defect_type, **meta},
    )


def is_defective(sample: Sample) -> bool:
    return bool(sample.meta["defective"])


@dataclass
class ProductSamples:
    """The good and defective samples of one product, in reading order."""

    good: list[Sample] = field(default_factory=list)
    defective: list[Sample] = field(default_factory=list)


def by_product(samples: Iterable[Sample]) -> dict[str, ProductSamples]:
    """Group samples by ``meta["product"]`` (first-seen order), the unit of a few-shot episode."""
    groups: dict[str, ProductSamples] = {}
    for s in samples:
        group = groups.setdefault(s.meta["product"], ProductSamples())
        (group.defective if is_defective(s) else group.good).append(s)
    return groups
