"""High resolution for multi-image VLMs: a global view plus a grid of full-resolution crops.

A VLM that resizes every image to a few hundred pixels cannot see a 3 px
defect on a 640 px board. Splitting the board into ``rows x cols`` crops
(optionally overlapping) and passing them as extra images keeps native
resolution; a downscaled global view keeps the context. The functions here
are pure: they compute the grid, cut the images, describe the layout for the
prompt, and move boxes between crop and full-image coordinates (targets into
crops for training, detections out of crops at inference, merged by NMS where
crops overlap).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from loctune.inspect.records import GOOD
from loctune.types import Box, Detection, Sample


@dataclass(frozen=True)
class Crop:
    """One cell of a grid: its 0-based ``row``/``col`` and its integer pixel box in the image."""

    row: int
    col: int
    box: tuple[int, int, int, int]

    @property
    def size(self) -> tuple[int, int]:
        return (self.box[2] - self.box[0], self.box[3] - self.box[1])


@dataclass(frozen=True)
class TileGrid:
    """``rows x cols`` crops covering an image of ``image_size`` (width, height), row-major."""

    image_size: tuple[int, int]
    rows: int
    cols: int
    crops: tuple[Crop, ...]

    def crop(self, row: int, col: int) -> Crop:
        return self.crops[row * self.cols + col]


def _starts(length: int, parts: int, overlap: float) -> tuple[int, list[int]]:
    """Crop length and evenly spaced starts so that ``parts`` crops cover ``length`` exactly."""
    size = math.ceil(length / (parts - (parts - 1) * overlap))
    size = min(size, length)
    if parts == 1:
        return size, [0]
    return size, [round(i * (length - size) / (parts - 1)) for i in range(parts)]


def tile_grid(image_size: tuple[int, int], rows: int, cols: int, overlap: float = 0.0) -> TileGrid:
    """The crops of a ``rows x cols`` grid; neighbours share ``overlap`` (a fraction of a crop).

    The first crop starts at 0, the last ends at the image border; all crops
    have the same size, so a model sees every crop at the same scale.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"rows, cols: expected positive integers, got {rows} x {cols}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap: expected a fraction in [0, 1), got {overlap}")
    width, height = image_size
    crop_w, xs = _starts(width, cols, overlap)
    crop_h, ys = _starts(height, rows, overlap)
    crops = tuple(
        Crop(r, c, (x, y, x + crop_w, y + crop_h))
        for r, y in enumerate(ys)
        for c, x in enumerate(xs)
    )
    return TileGrid((width, height), rows, cols, crops)


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

    def views(self, image: Image.Image) -> TiledViews:
        """The global view and crops of ``image`` with the text describing their layout."""
        return tile_views(image, self.rows, self.cols, self.overlap, self.global_size)

    @property
    def first_crop(self) -> int:
        """1-based number of the first crop among a turn's images."""
        return 1 if self.global_size is None else 2


def split_image(image: Image.Image, grid: TileGrid) -> list[Image.Image]:
    """The crops of ``image`` in grid order (row by row)."""
    if image.size != grid.image_size:
        raise ValueError(f"image size {image.size} does not match the grid's {grid.image_size}")
    return [image.crop(c.box) for c in grid.crops]


@dataclass
class TiledViews:
    """What a multi-image prompt shows: ``images[0]`` is the global view, then the crops."""

    images: list[Image.Image]
    grid: TileGrid
    layout: str


def tile_views(
    image: Image.Image, rows: int, cols: int, overlap: float = 0.0, global_size: int | None = 448
) -> TiledViews:
    """Global view (longer side ``global_size``; None leaves it out) plus the grid's crops."""
    grid = tile_grid(image.size, rows, cols, overlap)
    images = split_image(image, grid)
    if global_size is not None:
        scale = global_size / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        images.insert(0, image.resize(size, Image.BICUBIC))
    return TiledViews(images, grid, layout_description(grid, global_size is not None))


def layout_description(grid: TileGrid, with_global: bool = True) -> str:
    """Prompt text telling the model what each image is, e.g.

    ``"image 1: the whole image, downscaled. images 2-5: crops at full resolution,
    row by row: image 2 row 1 col 1 (x 0-320, y 0-320), ..."``
    """
    first = 2 if with_global else 1
    last = first + len(grid.crops) - 1
    parts = ["image 1: the whole image, downscaled."] if with_global else []
    cells = ", ".join(
        f"image {first + i} row {c.row + 1} col {c.col + 1} "
        f"(x {c.box[0]}-{c.box[2]}, y {c.box[1]}-{c.box[3]})"
        for i, c in enumerate(grid.crops)
    )
    parts.append(f"images {first}-{last}: crops at full resolution, row by row: {cells}.")
    return " ".join(parts)


def crop_to_image(boxes: Sequence[Box], crop: Crop) -> list[Box]:
    """Boxes in crop pixels -> the same boxes in full-image pixels."""
    dx, dy = crop.box[0], crop.box[1]
    return [(x1 + dx, y1 + dy, x2 + dx, y2 + dy) for x1, y1, x2, y2 in boxes]


def image_to_crop(
    boxes: Sequence[Box],
    labels: Sequence[str],
    crop: Crop,
    min_visible: float = 0.25,
    min_side: float = 2.0,
) -> tuple[list[Box], list[str]]:
    """Full-image boxes -> the parts inside ``crop``, in crop pixels, with their labels.

    A box that straddles the crop border is clipped to it; a clipped part that
    keeps less than ``min_visible`` of the box's area or is thinner than
    ``min_side`` pixels is dropped as a sliver (the neighbouring crop, or the
    overlap, holds the rest). Degenerate input boxes (zero area) are kept
    only when they lie inside the crop.
    """
    cx1, cy1, cx2, cy2 = crop.box
    out_boxes, out_labels = [], []
    for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True):
        kx1, ky1 = max(x1, cx1), max(y1, cy1)
        kx2, ky2 = min(x2, cx2), min(y2, cy2)
        if kx2 < kx1 or ky2 < ky1:
            continue
        area = (x2 - x1) * (y2 - y1)
        kept = (kx2 - kx1) * (ky2 - ky1)
        clipped = (kx1, ky1, kx2, ky2) != (x1, y1, x2, y2)
        if clipped and (kept < min_visible * area or min(kx2 - kx1, ky2 - ky1) < min_side):
            continue
        out_boxes.append((kx1 - cx1, ky1 - cy1, kx2 - cx1, ky2 - cy1))
        out_labels.append(label)
    return out_boxes, out_labels


def nms(boxes: Sequence[Box], scores: Sequence[float], iou_threshold: float = 0.5) -> list[int]:
    """Greedy non-maximum suppression (``torchvision.ops.nms``): indices kept, highest score
    first; of equal scores the earlier box is kept."""
    from torchvision.ops import nms as tv_nms

    if not boxes:
        return []
    order = torch.argsort(
        torch.as_tensor(scores, dtype=torch.float64), descending=True, stable=True
    )
    # rank as the score, so ties keep the earlier box whatever torchvision's sort does
    ranks = torch.arange(len(order), 0, -1, dtype=torch.float64)
    keep = tv_nms(torch.as_tensor(boxes, dtype=torch.float64)[order], ranks, iou_threshold)
    return order[keep].tolist()


def merge_detections(
    detections: Sequence[Detection], iou_threshold: float = 0.5
) -> list[Detection]:
    """Per-label NMS, for duplicates of one object found in two overlapping crops."""
    merged = []
    for label in dict.fromkeys(d.label for d in detections):
        same = [d for d in detections if d.label == label]
        keep = nms([d.box for d in same], [d.score for d in same], iou_threshold)
        merged.extend(same[i] for i in keep)
    return merged


def detections_from_crops(
    per_crop: Sequence[Sequence[Detection]], grid: TileGrid, iou_threshold: float = 0.5
) -> list[Detection]:
    """Detections decoded on each crop (grid order) -> merged full-image detections."""
    if len(per_crop) != len(grid.crops):
        raise ValueError(f"expected detections for {len(grid.crops)} crops, got {len(per_crop)}")
    mapped = [
        replace(d, box=crop_to_image([d.box], crop)[0])
        for dets, crop in zip(per_crop, grid.crops, strict=True)
        for d in dets
    ]
    return merge_detections(mapped, iou_threshold)


def crop_samples(
    sample: Sample,
    rows: int,
    cols: int,
    overlap: float = 0.0,
    min_visible: float = 0.25,
    min_side: float = 2.0,
) -> list[Sample]:
    """Training samples, one per crop, with the sample's boxes moved into each crop.

    ``meta["crop"]`` records ``(row, col, box)`` so predictions map back. For an
    inspection sample with boxes, each crop's ``defective``/``defect_type`` say
    whether a defect box (not a dropped sliver) lies in that crop; a defective
    sample without boxes cannot be localised, so its crops keep its label. COCO's crowd
    regions (``meta["crowd"]``) and per-box ``meta["iscrowd"]`` flags move with the boxes.
    """
    image = sample.load_image()
    grid = tile_grid(image.size, rows, cols, overlap)
    out = []
    for crop, crop_image in zip(grid.crops, split_image(image, grid), strict=True):
        # boxes tagged by index, so per-box metadata (iscrowd flags) follows the kept ones
        tags = [str(i) for i in range(len(sample.boxes))]
        boxes, kept = image_to_crop(sample.boxes, tags, crop, min_visible, min_side)
        labels = [sample.labels[int(i)] for i in kept]
        meta = {**sample.meta, "crop": (crop.row, crop.col, crop.box)}
        meta.pop("image_size", None)
        if "iscrowd" in meta:
            meta["iscrowd"] = [meta["iscrowd"][int(i)] for i in kept]
        if "crowd" in meta:  # crowd regions: any visible part still excuses detections on it
            names = [name for name, _ in meta["crowd"]]
            regions, names = image_to_crop([tuple(b) for _, b in meta["crowd"]], names, crop,
                                           min_visible=0.0, min_side=1.0)
            meta["crowd"] = [[name, list(box)] for name, box in zip(names, regions, strict=True)]
        if "mask" in meta:  # synthetic/folder samples carry a pixel mask; keep it aligned
            x1, y1, x2, y2 = crop.box
            meta["mask"] = np.asarray(meta["mask"])[y1:y2, x1:x2]
        if sample.task == "inspection" and sample.boxes:
            meta["defective"] = bool(boxes)
            meta["defect_type"] = ",".join(sorted(set(labels))) if labels else GOOD
        out.append(
            replace(
                sample,
                image=crop_image,
                boxes=boxes,
                labels=labels,
                image_id=f"{sample.image_id}@r{crop.row + 1}c{crop.col + 1}",
                meta=meta,
            )
        )
    return out
