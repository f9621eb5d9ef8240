"""Pascal VOC XML: one ``<annotation>`` file per image.

Each file gives ``filename``, ``size/width|height`` and ``object``s with
``name``, ``bndbox/xmin|ymin|xmax|ymax`` and optional ``difficult`` /
``truncated`` flags. Coordinates are taken as written (no 1-based shift), so
boxes match CSV exports of the same annotations. ``difficult`` objects are
kept by default with ``meta["difficult"]`` (one flag per box), since VOC
evaluation ignores rather than penalises them; ``skip_difficult=True`` leaves
them out (counted in the report). Errors name the file and the field path,
e.g. ``raccoon-1.xml: object[2]/bndbox/xmax``. When two files name one image,
the first (by file name) is read and the other reported as ``duplicate_image``.
``<size>`` is checked against the image header (``check_images=True``): another
size drops the sample as ``size_mismatch``. A ``<filename>`` resolving outside
the image root is dropped as ``outside_root`` unless ``allow_outside_root=True``.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from loctune.data.common import (
    PromptFn,
    SampleSet,
    checked_size,
    detection_prompt,
)
from loctune.data.validate import OnError, Validator
from loctune.types import Box, Sample

_COORDS = ("xmin", "ymin", "xmax", "ymax")


def read_voc(
    annotations: str | os.PathLike | Sequence[str | os.PathLike],
    image_root: str | os.PathLike | None = None,
    *,
    classes: Sequence[str] | None = None,
    skip_difficult: bool = False,
    keep_empty: bool = True,
    check_images: bool = True,
    prompt_fn: PromptFn = detection_prompt,
    on_error: OnError = "drop",
    min_inside: float = 0.5,
    allow_outside_root: bool = False,
) -> SampleSet:
    """Detection samples from a folder of ``.xml`` files (or a list of them).

    ``image_root`` defaults to a sibling ``JPEGImages/`` or ``images/`` folder
    of the annotation folder, else the annotation folder itself. With
    ``classes`` given, other names are errors (``unknown_class``); otherwise the
    class list is every name seen, sorted.
    """
    files, folder = _xml_files(annotations)
    root = Path(image_root) if image_root else _default_image_root(folder)
    validator = Validator(str(folder), on_error, min_inside, allow_outside_root=allow_outside_root)
    known = set(classes) if classes is not None else None
    parsed = []
    seen: dict[Path, str] = {}
    for xml_file in files:
        record = _read_file(xml_file, root, known, skip_difficult, check_images, validator)
        if record is None or not validator.unique_image(record[0], str(xml_file), seen):
            continue
        if record[1] or keep_empty:
            parsed.append(record)
    class_list = list(classes) if classes is not None else sorted({n for r in parsed for n in r[2]})
    prompt = prompt_fn(class_list)
    samples = [
        Sample(str(path), prompt, boxes, labels, "detection", path.name, meta)
        for path, boxes, labels, meta in parsed
    ]
    return SampleSet(samples, class_list, validator.finish(samples))


def _xml_files(annotations) -> tuple[list[Path], Path]:
    if isinstance(annotations, (str, os.PathLike)):
        folder = Path(annotations)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a folder of VOC .xml files")
        files = sorted(folder.glob("*.xml"))
        if not files:
            raise FileNotFoundError(f"{folder}: no .xml files")
        return files, folder
    files = sorted(Path(f) for f in annotations)
    if not files:
        raise ValueError("read_voc: empty list of annotation files")
    return files, files[0].parent


def _default_image_root(folder: Path) -> Path:
    for name in ("JPEGImages", "images"):
        if (folder.parent / name).is_dir():
            return folder.parent / name
    return folder


def _read_file(
    xml_file: Path,
    root: Path,
    known: set[str] | None,
    skip_difficult: bool,
    check_images: bool,
    validator: Validator,
) -> tuple[Path, list[Box], list[str], dict] | None:
    try:
        tree = ET.parse(xml_file).getroot()
    except ET.ParseError as err:
        line, column = err.position
        validator.fail(
            "malformed", f"{xml_file}:{line}", f"invalid XML (column {column}): {err}", "sample"
        )
        return None
    filename = (tree.findtext("filename") or "").strip()
    if not filename:
        validator.fail(
            "malformed", f"{xml_file}: filename", "missing or empty <filename>", "sample"
        )
        return None
    image_path = _with_image_suffix(root / filename)
    if not validator.usable_image(image_path, root, f"{xml_file}: filename", check_images):
        return None
    size = _size(tree, xml_file, image_path, validator, check_images)
    if size is None:
        return None
    boxes: list[Box] = []
    labels: list[str] = []
    difficult: list[bool] = []
    truncated: list[bool] = []
    dropped_before = validator.report.n_dropped
    for i, obj in enumerate(tree.findall("object"), 1):
        where = f"{xml_file}: object[{i}]"
        name = (obj.findtext("name") or "").strip()
        if not name:
            validator.fail("malformed", f"{where}/name", "missing or empty <name>")
            continue
        if known is not None and name not in known:
            validator.fail("unknown_class", f"{where}/name", f"{name!r} is not in {sorted(known)}")
            continue
        is_difficult = _flag(obj, "difficult")
        if is_difficult and skip_difficult:
            validator.skip("difficult", f"{where}/difficult", "difficult object skipped")
            continue
        corners = _corners(obj, where, validator)
        box = None if corners is None else validator.box(corners, size, f"{where}/bndbox")
        if box is not None:
            boxes.append(box)
            labels.append(name)
            difficult.append(is_difficult)
            truncated.append(_flag(obj, "truncated"))
    n_invalid = validator.report.n_dropped - dropped_before
    if not validator.keeps_image(str(xml_file), len(boxes), n_invalid):
        return None
    meta = {
        "image_size": size,
        "annotation_file": str(xml_file),
        "difficult": difficult,
        "truncated": truncated,
        "n_invalid_boxes": n_invalid,
    }
    return image_path, boxes, labels, meta


def _size(
    tree: ET.Element, xml_file: Path, image_path: Path, validator: Validator, check_images: bool
) -> tuple[int, int] | None:
    """``<size>`` checked against the image header, or the header's when ``<size>`` is absent or
    0 (some tools write 0); anything else (text, ``1e999``, negative) drops the sample."""
    values = []
    for key in ("width", "height"):
        text = (tree.findtext(f"size/{key}") or "0").strip()
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            validator.fail("malformed", f"{xml_file}: size/{key}",
                           f"expected a positive number of pixels, got {text!r}", "sample")
            return None
        values.append(int(value))
    declared = (values[0], values[1]) if all(values) else None
    return checked_size(declared, image_path, f"{xml_file}: size", validator, check_images)


def _corners(obj: ET.Element, where: str, validator: Validator) -> tuple[float, ...] | None:
    values = []
    for key in _COORDS:
        text = obj.findtext(f"bndbox/{key}")
        try:
            values.append(float(text))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            validator.fail("malformed", f"{where}/bndbox/{key}", f"expected a number, got {text!r}")
            return None
    return tuple(values)


def _flag(obj: ET.Element, key: str) -> bool:
    return (obj.findtext(key) or "0").strip() not in ("0", "", "false", "False")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def _with_image_suffix(path: Path) -> Path:
    """``path``, or the one image beside it with its stem when ``<filename>`` has no suffix
    (NEU-DET writes ``patches_104`` for ``patches_104.jpg``)."""
    if path.suffix or path.exists():
        return path
    found = [path.with_name(path.name + s) for s in IMAGE_SUFFIXES
             if path.with_name(path.name + s).is_file()]
    return found[0] if len(found) == 1 else path
