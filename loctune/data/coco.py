"""COCO instances JSON (``images`` / ``annotations`` / ``categories``).

Boxes are ``[x, y, width, height]`` in pixels, converted to ``(x1, y1, x2, y2)``.
Image paths are ``file_name`` relative to ``image_root`` (default: the JSON's
folder). ``iscrowd=1`` annotations mark a *region* of many objects, not one
object: they are kept out of training by default (counted as ``crowd`` in the
report) and kept in ``meta["crowd"]``, so evaluation ignores detections on them as
pycocotools does; ``include_crowd=True`` trains on them as boxes flagged in
``meta["iscrowd"]``. Images
without annotations are kept as samples with no boxes (negatives for detection)
unless ``keep_empty=False``. A repeated image or annotation ``id`` raises
:class:`DataError` naming both positions (one record would silently replace
the other); a second image record for the same file is dropped as
``duplicate_image`` (two samples would each teach the other's objects as
background). An image's ``width``/``height`` are checked against its header
(``check_images=True``, the default): a sample whose image has another size is
dropped as ``size_mismatch``, since its boxes were drawn for another image.
A ``file_name`` resolving outside ``image_root`` (``../``, absolute) is dropped
as ``outside_root`` unless ``allow_outside_root=True``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loctune.boxes import xywh_to_xyxy
from loctune.data.common import (
    PromptFn,
    SampleSet,
    checked_size,
    declared_size,
    detection_prompt,
    is_number,
    load_json,
    resolve,
)
from loctune.data.validate import DataError, OnError, Validator
from loctune.types import Box, Sample


@dataclass
class CocoImage:
    image_id: Any
    path: Path
    size: tuple[int, int]


class CocoIndex:
    """A validated view of a COCO instances file, shared by the COCO and RefCOCO readers."""

    def __init__(self, path: Path, image_root: Path, validator: Validator, check_images: bool):
        self.path = path
        self.image_root = image_root
        self.validator = validator
        self.check_images = check_images
        data = load_json(path)
        if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
            raise DataError(
                f"{path}: expected a COCO instances object with 'images', 'annotations' "
                f"and 'categories' keys"
            )
        for key in ("images", "annotations", "categories"):
            if not isinstance(data[key], list):
                got = "null" if data[key] is None else type(data[key]).__name__
                raise DataError(f"{path}: {key}: expected a list of objects, got {got}")
        self.categories: dict[Any, str] = {}
        for i, cat in enumerate(data["categories"]):
            if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
                raise DataError(f"{path}: categories[{i}]: expected {{'id', 'name'}}, got {cat!r}")
            self.categories[cat["id"]] = str(cat["name"])
        for cat_id in _grouping_categories(data["categories"], data["annotations"]):
            del self.categories[cat_id]
        self.classes = [self.categories[k] for k in sorted(self.categories, key=_sort_key)]
        self._raw_images = {}
        for i, img in enumerate(data["images"]):
            where = f"{path}: images[{i}]"
            if not isinstance(img, dict) or not _is_id(img.get("id")) or "file_name" not in img:
                self.validator.fail(
                    "malformed", where, "expected an object with an 'id' (integer or text) and "
                    "'file_name'", "record"
                )
                continue
            if img["id"] in self._raw_images:
                raise _repeated_id(path, "images", img["id"], self._raw_images[img["id"]][0], i)
            self._raw_images[img["id"]] = (i, where, img)
        self._images: dict[Any, CocoImage | None] = {}
        self.annotations: dict[Any, tuple[int, dict]] = {}
        for i, ann in enumerate(data["annotations"]):
            if (not isinstance(ann, dict) or not _is_id(ann.get("image_id")) or "bbox" not in ann
                    or not _is_id(ann.get("id", i))):
                self.validator.fail(
                    "malformed",
                    f"{path}: annotations[{i}]",
                    "expected an object with 'image_id' and 'bbox' (ids integers or text)",
                    "record",
                )
                continue
            ann_id = ann.get("id", i)
            if ann_id in self.annotations:
                raise _repeated_id(path, "annotations", ann_id, self.annotations[ann_id][0], i)
            self.annotations[ann_id] = (i, ann)

    @property
    def image_ids(self) -> list[Any]:
        return list(self._raw_images)

    def image(self, image_id: Any) -> CocoImage | None:
        """The image record, checked once (file present, size known); None if unusable."""
        if image_id not in self._images:
            self._images[image_id] = self._check_image(image_id)
        return self._images[image_id]

    def _check_image(self, image_id: Any) -> CocoImage | None:
        _, where, img = self._raw_images[image_id]
        path = resolve(self.image_root, str(img["file_name"]))
        if not self.validator.usable_image(path, self.image_root, f"{where}: file_name",
                                           self.check_images):
            return None
        declared = declared_size(img.get("width"), img.get("height"))
        size = checked_size(
            declared, path, f"{where}: width/height", self.validator, self.check_images
        )
        return None if size is None else CocoImage(image_id, path, size)

    def box(self, position: int, ann: dict, image: CocoImage) -> Box | None:
        """The annotation's bbox as a validated pixel xyxy box, or None (recorded)."""
        where = f"{self.path}: annotations[{position}] (id={ann.get('id')}) bbox"
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(is_number, bbox))):
            self.validator.fail(
                "malformed", where, f"expected [x, y, width, height] numbers, got {bbox!r}"
            )
            return None
        return self.validator.box(tuple(xywh_to_xyxy(bbox).tolist()), image.size, where)

    def category(self, position: int, ann: dict) -> str | None:
        name = self.categories.get(ann.get("category_id"))
        if name is None:
            self.validator.fail(
                "unknown_class",
                f"{self.path}: annotations[{position}] (id={ann.get('id')}) category_id",
                f"{ann.get('category_id')!r} is not in categories "
                f"(ids {sorted(self.categories, key=_sort_key)})",
            )
        return name

    def known_image(self, position: int, ann: dict) -> bool:
        if ann["image_id"] in self._raw_images:
            return True
        self.validator.fail(
            "malformed",
            f"{self.path}: annotations[{position}] (id={ann.get('id')}) image_id",
            f"{ann['image_id']!r} is not in images",
        )
        return False


def read_coco(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    include_crowd: bool = False,
    keep_empty: bool = True,
    check_images: bool = True,
    prompt_fn: PromptFn = detection_prompt,
    on_error: OnError = "drop",
    min_inside: float = 0.5,
    allow_outside_root: bool = False,
) -> SampleSet:
    """One detection :class:`Sample` per image of a COCO instances file."""
    path = Path(path)
    validator = Validator(str(path), on_error, min_inside, allow_outside_root=allow_outside_root)
    index = CocoIndex(
        path, Path(image_root) if image_root else path.parent, validator, check_images
    )
    objects: dict[Any, list[tuple[Box, str, Any, bool]]] = {i: [] for i in index.image_ids}
    invalid: Counter[Any] = Counter()
    regions: dict[Any, list[list]] = {i: [] for i in index.image_ids}  # crowd: [label, box]
    for ann_id, (position, ann) in index.annotations.items():
        if not index.known_image(position, ann):
            continue
        image = index.image(ann["image_id"])
        if image is None:
            continue  # already reported once for the image
        crowd = bool(ann.get("iscrowd", 0))
        if crowd and not include_crowd:
            validator.skip(
                "crowd",
                f"{path}: annotations[{position}] (id={ann_id}) iscrowd",
                "crowd region kept out of training, ignored in AP "
                "(include_crowd=True trains on it)",
            )
            name = index.category(position, ann)
            region = index.box(position, ann, image) if name is not None else None
            if region is not None:
                regions[ann["image_id"]].append([name, list(region)])
            continue
        name = index.category(position, ann)
        box = index.box(position, ann, image) if name is not None else None
        if box is None:
            invalid[ann["image_id"]] += 1
        else:
            objects[ann["image_id"]].append((box, name, ann_id, crowd))

    prompt = prompt_fn(index.classes)
    samples = []
    seen: dict[Path, str] = {}
    for image_id, found in objects.items():
        image = index.image(image_id)
        if image is None:
            continue
        where = f"{path}: images (id={image_id})"
        if not validator.unique_image(image.path, where, seen):
            continue
        if not validator.keeps_image(where, len(found), invalid[image_id]):
            continue
        if not found and not keep_empty:
            continue
        meta = {
            "image_size": image.size,
            "ann_ids": [a for _, _, a, _ in found],
            "iscrowd": [c for _, _, _, c in found],
            "n_invalid_boxes": invalid[image_id],
            "crowd": regions[image_id],
        }
        samples.append(
            Sample(
                image=str(image.path),
                prompt=prompt,
                boxes=[b for b, _, _, _ in found],
                labels=[n for _, n, _, _ in found],
                task="detection",
                image_id=str(image_id),
                meta=meta,
            )
        )
    return SampleSet(samples, index.classes, validator.finish(samples))


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _repeated_id(path: Path, key: str, record_id: Any, first: int, again: int) -> DataError:
    """A repeated id would replace the earlier record (its boxes then land on another
    image, or an annotation vanishes): the file is refused, naming both positions."""
    return DataError(
        f"{path}: {key}[{again}]: id {record_id!r} repeats {key}[{first}]; "
        f"expected unique {key} ids"
    )


def _grouping_categories(categories: list, annotations: Any) -> list[Any]:
    """Ids of categories that only group others: named as another category's
    ``supercategory`` and used by no annotation. Roboflow exports list such a category
    (id 0, e.g. "cells" over "RBC", "WBC"); as a class it would be one no box has."""
    used = (
        {a.get("category_id") for a in annotations if isinstance(a, dict)}
        if isinstance(annotations, list)
        else set()
    )
    return [
        c["id"]
        for c in categories
        if c["id"] not in used
        and any(o is not c and o.get("supercategory") == c["name"] for o in categories)
    ]


def _sort_key(key: Any) -> tuple[str, Any]:
    """Sort ids that may mix ints and strings without a TypeError."""
    return (type(key).__name__, key)
