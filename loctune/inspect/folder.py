"""Read inspection images in the MVTec AD / anomalib ``Folder`` layout.

::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect_type>/*.png
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png   (optional)

Defect boxes come from the masks, one box per connected region (8-connected).
A defective image without a mask is still defective but has no boxes. Images
are returned as paths and opened lazily; masks are read at load time because
the boxes are needed up front. :func:`read_inspection_data` reads what the
CLI names: such a folder, or ``synthetic``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from loctune.inspect.records import GOOD, inspection_sample
from loctune.inspect.regions import mask_to_boxes
from loctune.inspect.synthetic import synthetic_inspection_set
from loctune.types import DataError, Sample, header_size, read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "test")
LAYOUT = "<category>/{train,test}/good/, <category>/test/<defect_type>/"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _is_category(folder: Path) -> bool:
    return any((folder / split).is_dir() for split in SPLITS)


def folder_categories(root: str | os.PathLike) -> list[str]:
    """Category folders under ``root`` (those holding ``train/`` or ``test/``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: inspection folder not found")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _is_category(p))


def _mask_for(category_dir: Path, defect_type: str, image: Path) -> Path | None:
    folder = category_dir / "ground_truth" / defect_type
    for suffix in IMAGE_SUFFIXES:
        for name in (f"{image.stem}_mask{suffix}", f"{image.stem}{suffix}"):
            if (folder / name).is_file():
                return folder / name
    return None


def _read_mask(path: Path, image: Path) -> tuple[np.ndarray, tuple[int, int]]:
    mask = np.asarray(read_image(path, "L")) > 127
    size = header_size(image)
    if mask.shape[::-1] != size:
        raise DataError(f"{path}: mask size {mask.shape[::-1]} differs from image {image} {size}")
    return mask, size


def load_inspection_folder(
    root: str | os.PathLike, category: str | None = None, split: str = "test"
) -> list[Sample]:
    """Samples of one category and split (``"train"``, ``"test"`` or ``"all"``).

    ``root`` is either the dataset folder (then ``category`` names the
    sub-folder; all categories are read when it is None) or a category folder
    itself. ``meta`` holds ``split`` and, when a mask was read, ``mask_path``
    and ``image_size``.
    """
    root = Path(root)
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split: expected 'train', 'test' or 'all', got {split!r}")
    if category is not None:
        category_dirs = [root / category]
    elif _is_category(root):
        category_dirs = [root]
    else:
        category_dirs = [root / name for name in folder_categories(root)]
        if not category_dirs:
            raise FileNotFoundError(f"{root}: no category folders; expected the layout {LAYOUT}")
    samples = []
    for category_dir in category_dirs:
        samples += _read_category(category_dir, SPLITS if split == "all" else (split,))
    return samples


def _read_category(category_dir: Path, splits: tuple[str, ...]) -> list[Sample]:
    product = category_dir.name
    if not category_dir.is_dir():
        raise FileNotFoundError(f"{category_dir}: category folder not found")
    samples = []
    for split in splits:
        split_dir = category_dir / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"{split_dir}: missing '{split}' folder; expected the layout {LAYOUT}"
            )
        if not (split_dir / GOOD).is_dir() and split == "train":
            raise FileNotFoundError(f"{split_dir}: missing 'good' folder of defect-free images")
        type_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
        if not type_dirs:
            raise FileNotFoundError(
                f"{split_dir}: no image folders; expected '{GOOD}' and one folder per defect type"
            )
        for type_dir in type_dirs:
            images = _images(type_dir)
            if not images:
                raise FileNotFoundError(f"{type_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
            for image in images:
                samples.append(_sample(category_dir, product, split, type_dir.name, image))
    return samples


def _sample(category_dir: Path, product: str, split: str, defect_type: str, image: Path) -> Sample:
    image_id = f"{product}/{split}/{defect_type}/{image.stem}"
    if defect_type == GOOD:
        return inspection_sample(str(image), product, image_id=image_id, split=split)
    mask_path = _mask_for(category_dir, defect_type, image)
    if mask_path is None:
        return inspection_sample(
            str(image), product, defect_type=defect_type, image_id=image_id, split=split
        )
    mask, size = _read_mask(mask_path, image)
    boxes = mask_to_boxes(mask)
    return inspection_sample(
        str(image),
        product,
        boxes=boxes,
        labels=[defect_type] * len(boxes),
        defect_type=defect_type,
        image_id=image_id,
        split=split,
        mask_path=str(mask_path),
        image_size=size,
    )


def read_inspection_data(spec: str) -> list[Sample]:
    """Samples of an inspection data spec: ``synthetic`` or a folder in the MVTec layout.

    A folder is read in every split it has (``train`` and/or ``test``), so
    its test images can be scored with examples drawn from both splits;
    ``meta["split"]`` tells them apart. ``synthetic`` is the built-in
    evaluation products (8 good and 8 defective 256 px images each).
    """
    if spec == "synthetic":
        return synthetic_inspection_set("test")
    root = Path(spec)
    categories = [root] if _is_category(root) else [root / c for c in folder_categories(root)]
    samples = []
    for category in categories:
        for split in SPLITS:
            if (category / split).is_dir():
                samples += load_inspection_folder(category, split=split)
    if not samples:
        raise FileNotFoundError(f"{root}: no inspection images; expected the layout {LAYOUT}")
    return samples
