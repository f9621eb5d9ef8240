"""Referring expressions: RefCOCO-style refs + COCO instances, and a plain JSONL.

One grounding :class:`Sample` per expression: ``prompt`` is the expression,
one box, ``labels=[expression]`` (or the COCO category with
``label="category"``; the other one is kept in ``meta``).

RefCOCO/RefCOCO+/RefCOCOg ship their refs as a Python pickle (``refs(unc).p``).
Unpickling runs arbitrary code, so this reader does not open pickles: convert
the file once, in an environment you trust, to JSON holding the same list of
refs (``json.dump(pickle.load(f), out)``). Each ref needs ``ann_id``,
``split`` and ``sentences: [{"sent": ...}]``; ``image_id``, ``ref_id`` and
``category_id`` are used when present.

The JSONL format has one object per line::

    {"image": "img/1.jpg", "expression": "the dog on the left", "box": [x1, y1, x2, y2]}

or ``"bbox": [x, y, w, h]`` with ``box_format="xywh"``; optional ``width``,
``height`` (else read from the image header; when given, checked against it,
another size dropping the line as ``size_mismatch``), ``split`` and ``category``.
In both formats an image path resolving outside ``image_root`` is dropped as
``outside_root`` unless ``allow_outside_root=True``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from loctune.boxes import xywh_to_xyxy
from loctune.data.coco import CocoIndex
from loctune.data.common import (
    SampleSet,
    checked_size,
    declared_size,
    is_number,
    load_json,
    read_text,
    resolve,
)
from loctune.data.validate import DataError, OnError, Validator
from loctune.types import Sample

LabelFrom = Literal["expression", "category"]
_PICKLE_SUFFIXES = {".p", ".pkl", ".pickle"}


def read_refcoco(
    refs_path: str | os.PathLike,
    instances_path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    splits: Sequence[str] | None = None,
    label: LabelFrom = "expression",
    check_images: bool = True,
    on_error: OnError = "drop",
    min_inside: float = 0.5,
    allow_outside_root: bool = False,
) -> SampleSet:
    """Samples for every sentence of every ref (only refs in ``splits`` if given).

    The ref's ``split`` is kept in ``meta["split"]``; RefCOCO's splits are by
    image, so :func:`loctune.data.splits.split_samples` can use them as they are.
    """
    refs_path, instances_path = Path(refs_path), Path(instances_path)
    _refuse_pickle(refs_path)
    validator = Validator(
        str(refs_path), on_error, min_inside, allow_outside_root=allow_outside_root
    )
    root = Path(image_root) if image_root else instances_path.parent
    index = CocoIndex(instances_path, root, validator, check_images)
    refs = load_json(refs_path)
    if isinstance(refs, dict) and "refs" in refs:
        refs = refs["refs"]
    if not isinstance(refs, list):
        raise DataError(f"{refs_path}: expected a JSON list of refs (or {{'refs': [...]}})")

    samples = []
    for i, ref in enumerate(refs):
        where = f"{refs_path}: refs[{i}]"
        if not isinstance(ref, dict) or "ann_id" not in ref or "sentences" not in ref:
            validator.fail(
                "malformed", where, "expected an object with 'ann_id' and 'sentences'", "record"
            )
            continue
        if not isinstance(ref["sentences"], list):
            validator.fail("malformed", f"{where}.sentences",
                           f"expected a list of {{'sent': text}}, got {ref['sentences']!r:.60}",
                           "record")
            continue
        if splits is not None and ref.get("split") not in splits:
            continue
        if ref["ann_id"] not in index.annotations:
            validator.fail(
                "malformed",
                f"{where}.ann_id",
                f"{ref['ann_id']!r} is not in {instances_path}",
                "record",
            )
            continue
        position, ann = index.annotations[ref["ann_id"]]
        if "image_id" in ref and ref["image_id"] != ann["image_id"]:
            validator.fail(
                "malformed",
                f"{where}.image_id",
                f"{ref['image_id']!r} differs from annotation {ref['ann_id']}'s image_id "
                f"{ann['image_id']!r}",
                "record",
            )
            continue
        if not index.known_image(position, ann) or (image := index.image(ann["image_id"])) is None:
            continue
        category = index.category(position, ann)
        box = index.box(position, ann, image) if category is not None else None
        if box is None:
            continue
        for j, sentence in enumerate(ref["sentences"]):
            text = sentence.get("sent") if isinstance(sentence, dict) else None
            if not isinstance(text, str) or not text.strip():
                validator.fail(
                    "malformed",
                    f"{where}.sentences[{j}].sent",
                    f"expected text, got {text!r}",
                    "record",
                )
                continue
            meta = {
                "image_size": image.size,
                "ann_id": ref["ann_id"],
                "ref_id": ref.get("ref_id"),
                "sent_id": sentence.get("sent_id"),
                "category": category,
                "expression": text,
            }
            if "split" in ref:
                meta["split"] = ref["split"]
            samples.append(
                Sample(
                    image=str(image.path),
                    prompt=text,
                    boxes=[box],
                    labels=[category if label == "category" else text],
                    task="grounding",
                    image_id=str(ann["image_id"]),
                    meta=meta,
                )
            )
    return SampleSet(samples, index.classes, validator.finish(samples))


def read_referring_jsonl(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    box_format: Literal["xyxy", "xywh"] = "xyxy",
    check_images: bool = True,
    on_error: OnError = "drop",
    min_inside: float = 0.5,
    allow_outside_root: bool = False,
) -> SampleSet:
    """One grounding sample per line; image paths relative to ``image_root`` (default: the
    file's folder)."""
    if box_format not in ("xyxy", "xywh"):
        raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}")
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    box_key = "box" if box_format == "xyxy" else "bbox"
    validator = Validator(str(path), on_error, min_inside, allow_outside_root=allow_outside_root)
    sizes: dict[tuple, tuple[int, int]] = {}
    samples = []
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        record = _parse_record(line, where, validator)
        if record is None:
            continue
        missing = [k for k in ("image", "expression", box_key) if k not in record]
        if missing:
            validator.fail("malformed", where, f"missing field(s) {missing}", "record")
            continue
        text, raw = record["expression"], record[box_key]
        if not isinstance(text, str) or not text.strip():
            validator.fail(
                "malformed", f"{where}: expression", f"expected text, got {text!r}", "record"
            )
            continue
        if not (isinstance(raw, list) and len(raw) == 4 and all(map(is_number, raw))):
            validator.fail(
                "malformed", f"{where}: {box_key}", f"expected 4 numbers, got {raw!r}"
            )
            continue
        image_path = resolve(root, str(record["image"]))
        if not validator.usable_image(image_path, root, f"{where}: image", check_images):
            continue
        size = _record_size(record, image_path, where, validator, sizes, check_images)
        if size is None:
            continue
        corners = xywh_to_xyxy(raw).tolist() if box_format == "xywh" else map(float, raw)
        box = validator.box(tuple(corners), size, f"{where}: {box_key}")
        if box is None:
            continue
        category = record.get("category")
        meta: dict[str, Any] = {"image_size": size, "line": lineno, "expression": text}
        if category is not None:
            meta["category"] = str(category)
        if "split" in record:
            meta["split"] = str(record["split"])
        samples.append(
            Sample(
                image=str(image_path),
                prompt=text,
                boxes=[box],
                labels=[text],
                task="grounding",
                image_id=str(record.get("image_id", record["image"])),
                meta=meta,
            )
        )
    classes = sorted({s.meta["category"] for s in samples if "category" in s.meta})
    return SampleSet(samples, classes, validator.finish(samples))


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise DataError(
            f"{path}: refusing to unpickle (loading a pickle can run arbitrary code). Convert it "
            f"once, in an environment you trust, to JSON with the same list of refs, e.g. "
            f"json.dump(pickle.load(open(p, 'rb')), open('refs.json', 'w')), and pass that file."
        )


def _parse_record(line: str, where: str, validator: Validator) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        validator.fail(
            "malformed", where, f"invalid JSON: {err.msg} (column {err.colno})", "record"
        )
        return None
    if not isinstance(record, dict):
        validator.fail(
            "malformed", where, f"expected a JSON object, got {type(record).__name__}", "record"
        )
        return None
    return record


def _record_size(
    record: dict,
    image_path: Path,
    where: str,
    validator: Validator,
    cache: dict[tuple, tuple[int, int]],
    check_images: bool,
) -> tuple[int, int] | None:
    """Size from the record's width/height checked against the image header, else from the
    header (each once per image and declared size)."""
    declared = declared_size(record.get("width"), record.get("height"))
    key = (image_path, declared)
    if key not in cache:
        size = checked_size(declared, image_path, f"{where}: width/height", validator, check_images)
        if size is None:
            return None  # not cached, so every line of an unusable image is reported
        cache[key] = size
    return cache[key]
