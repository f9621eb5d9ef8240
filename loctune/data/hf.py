"""Hugging Face ``datasets`` detection datasets with an ``objects`` column.

The common hub layout: an ``image`` column (``Image`` feature) and an
``objects`` column holding, per image, a list of boxes (``bbox``) and class ids
(``category``) — stored either as a dict of lists or as a list of dicts.
Class names come from the ``ClassLabel`` feature of the category; string
categories are used as they are. ``bbox_format`` is ``"xywh"`` (COCO-style,
the usual one) or ``"xyxy"``. Optional ``width`` / ``height`` columns give the
size, checked against the image header (another size drops the row as
``size_mismatch``), else the image header does. A ``DatasetDict`` keeps its split names in
``meta["split"]``.

Images are not decoded here: a sample's image is the file path when the
dataset points at a file on disk, else a lazily decoded PIL image over the
stored bytes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any, Literal

import datasets
from PIL import Image, UnidentifiedImageError

from loctune.boxes import xywh_to_xyxy
from loctune.data.common import (
    PromptFn,
    SampleSet,
    checked_size,
    declared_size,
    detection_prompt,
    is_number,
)
from loctune.data.validate import DataError, OnError, Validator
from loctune.types import Box, Sample


def read_hf(
    dataset: datasets.Dataset | datasets.DatasetDict,
    *,
    bbox_format: Literal["xywh", "xyxy"] = "xywh",
    image_column: str = "image",
    objects_column: str = "objects",
    bbox_key: str = "bbox",
    category_key: str = "category",
    classes: Sequence[str] | None = None,
    source: str = "hf",
    prompt_fn: PromptFn = detection_prompt,
    on_error: OnError = "drop",
    min_inside: float = 0.5,
) -> SampleSet:
    """Detection samples, one per row. ``classes`` names integer categories lacking a ClassLabel."""
    if bbox_format not in ("xywh", "xyxy"):
        raise ValueError(f"bbox_format must be 'xywh' or 'xyxy', got {bbox_format!r}")
    parts = dataset.items() if isinstance(dataset, datasets.DatasetDict) else [(None, dataset)]
    validator = Validator(source, on_error, min_inside)
    rows: list[tuple[Sample, Any]] = []
    seen_names: set[str] = set()
    names: list[str] | None = list(classes) if classes is not None else None
    for split, part in parts:
        for column in (image_column, objects_column):
            if column not in part.column_names:
                raise DataError(f"{source}: no column {column!r} (columns: {part.column_names})")
        names = names or _class_label_names(part.features[objects_column], category_key)
        reader = _RowReader(
            part, split, names, bbox_format, image_column, objects_column, bbox_key, category_key
        )
        for index, row in enumerate(part.cast_column(image_column, datasets.Image(decode=False))):
            sample = reader.read(
                index, row, f"{source}{f'[{split}]' if split else ''}[{index}]", validator
            )
            if sample is not None:
                seen_names.update(sample.labels)
                rows.append((sample, split))
    class_list = names if names is not None else sorted(seen_names)
    prompt = prompt_fn(class_list)
    for sample, _ in rows:
        sample.prompt = prompt
    samples = [sample for sample, _ in rows]
    return SampleSet(samples, class_list, validator.finish(samples))


class _RowReader:
    """Turns one row of one split into a Sample."""

    def __init__(
        self,
        part: datasets.Dataset,
        split: str | None,
        names: list[str] | None,
        bbox_format: str,
        image_column: str,
        objects_column: str,
        bbox_key: str,
        category_key: str,
    ) -> None:
        self.split = split
        self.names = names
        self.xywh = bbox_format == "xywh"
        self.image_column = image_column
        self.objects_column = objects_column
        self.bbox_key = bbox_key
        self.category_key = category_key
        self.has_size = {"width", "height"} <= set(part.column_names)
        self.has_id = "image_id" in part.column_names

    def read(self, index: int, row: dict, where: str, validator: Validator) -> Sample | None:
        image = _image(row[self.image_column], f"{where}.{self.image_column}", validator)
        if image is None:
            return None
        declared = declared_size(row["width"], row["height"]) if self.has_size else None
        size = checked_size(declared, image, f"{where}.{self.image_column}", validator)
        if size is None:
            return None
        objects = _as_records(row[self.objects_column], self.bbox_key, self.category_key)
        if objects is None:
            validator.fail(
                "malformed",
                f"{where}.{self.objects_column}",
                f"expected {{{self.bbox_key!r}: [...], {self.category_key!r}: [...]}} of equal "
                f"lengths or a list of such objects",
                "sample",
            )
            return None
        boxes: list[Box] = []
        labels: list[str] = []
        crowd: list[list] = []  # as read_coco: [label, box] regions, ignored in AP
        n_invalid = 0
        for j, (bbox, category, is_crowd) in enumerate(objects):
            field = f"{where}.{self.objects_column}[{j}]"
            label = self._label(category, f"{field}.{self.category_key}", validator)
            box = (
                None
                if label is None
                else self._box(bbox, size, f"{field}.{self.bbox_key}", validator)
            )
            if box is None:
                n_invalid += 1
            elif is_crowd:
                validator.skip("crowd", f"{field}.iscrowd",
                               "crowd region kept out of training, ignored in AP")
                crowd.append([label, list(box)])
            else:
                boxes.append(box)
                labels.append(label)
        if not validator.keeps_image(where, len(boxes), n_invalid):
            return None
        meta: dict[str, Any] = {"image_size": size, "row": index, "n_invalid_boxes": n_invalid}
        if crowd:
            meta["crowd"] = crowd
        if isinstance(image, Image.Image):
            meta["source"] = f"{where}.{self.image_column}"  # named if it fails to decode
        if self.split is not None:
            meta["split"] = self.split
        image_id = str(row["image_id"]) if self.has_id else f"{self.split or ''}:{index}"
        return Sample(image, "", boxes, labels, "detection", image_id, meta)

    def _label(self, category: Any, where: str, validator: Validator) -> str | None:
        if isinstance(category, str):
            if self.names is not None and category not in self.names:
                validator.fail("unknown_class", where, f"{category!r} is not in {self.names}")
                return None
            return category
        if self.names is None:
            raise DataError(
                f"{where}: integer category {category!r} but the feature is not a ClassLabel; "
                f"pass classes=[...] to name the ids"
            )
        if is_number(category) and float(category).is_integer() and 0 <= category < len(self.names):
            return self.names[int(category)]
        validator.fail(
            "unknown_class", where, f"{category!r} is not a class id (0..{len(self.names) - 1})"
        )
        return None

    def _box(
        self, bbox: Any, size: tuple[int, int], where: str, validator: Validator
    ) -> Box | None:
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(map(is_number, bbox))):
            validator.fail("malformed", where, f"expected 4 numbers, got {bbox!r}")
            return None
        corners = xywh_to_xyxy(bbox).tolist() if self.xywh else map(float, bbox)
        return validator.box(tuple(corners), size, where)


def _class_label_names(feature: Any, category_key: str) -> list[str] | None:
    """Names of the ClassLabel under ``objects`` (dict of lists or list of dicts), if any."""
    feature = _unwrap(feature)
    if isinstance(feature, dict) and category_key in feature:
        label = _unwrap(feature[category_key])
        if isinstance(label, datasets.ClassLabel):
            return list(label.names)
    return None


def _unwrap(feature: Any) -> Any:
    """Strip list-like wrappers (List, Sequence, LargeList, ``[feature]``) around a feature."""
    while True:
        if isinstance(feature, list) and len(feature) == 1:
            feature = feature[0]
        elif not isinstance(feature, (dict, datasets.ClassLabel)) and hasattr(feature, "feature"):
            feature = feature.feature
        else:
            return feature


def _as_records(
    objects: Any, bbox_key: str, category_key: str
) -> list[tuple[Any, Any, bool]] | None:
    """``[(bbox, category, iscrowd), ...]`` from either layout; None when malformed.

    ``iscrowd`` comes from an optional ``iscrowd`` key beside the boxes, as in datasets
    converted from COCO; absent, no object is a crowd region."""
    if isinstance(objects, dict):
        bboxes, categories = objects.get(bbox_key), objects.get(category_key)
        crowd = objects.get("iscrowd")
        if (
            isinstance(bboxes, list)
            and isinstance(categories, list)
            and len(bboxes) == len(categories)
            and (crowd is None or (isinstance(crowd, list) and len(crowd) == len(bboxes)))
        ):
            flags = [bool(c) for c in crowd] if crowd is not None else [False] * len(bboxes)
            return list(zip(bboxes, categories, flags, strict=True))
        return None
    if isinstance(objects, list) and all(
        isinstance(o, dict) and bbox_key in o and category_key in o for o in objects
    ):
        return [(o[bbox_key], o[category_key], bool(o.get("iscrowd", 0))) for o in objects]
    return None


def _image(value: Any, where: str, validator: Validator) -> Image.Image | str | None:
    """The file path when it exists on disk, else a lazily decoded image over the bytes."""
    path, data = (value or {}).get("path"), (value or {}).get("bytes")
    if path and os.path.isfile(path):
        return str(path)
    if data:
        try:
            return Image.open(io.BytesIO(data))
        except (OSError, UnidentifiedImageError) as err:
            validator.fail("malformed", where, f"cannot read image bytes: {err}", "sample")
            return None
    validator.fail("missing_image", where, f"no image bytes and no file at {path!r}", "sample")
    return None

