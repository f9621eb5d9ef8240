"""CVAT for images 1.1 XML: one ``annotations.xml`` for the whole task.

``<annotations>`` holds one ``<image id name width height>`` per frame, each with
``<box label xtl ytl xbr ybr occluded>`` children in pixels (``xbr``/``ybr``
exclusive corners, as x2/y2 elsewhere in loctune). ``<polygon>``, ``<points>``
and other shapes are reported as skipped; a box with a ``rotation`` is skipped
too rather than bent into an axis-aligned one. Images are ``name`` under
``image_root`` (default: an ``images/`` folder beside the XML, else its folder).
An image whose header size differs from ``width``/``height`` is dropped as
``size_mismatch``; a ``name`` resolving outside ``image_root`` as ``outside_root``
unless ``allow_outside_root=True``.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from loctune.data.common import PromptFn, SampleSet, checked_size, detection_prompt
from loctune.data.validate import DataError, OnError, Validator
from loctune.types import Box, Sample

_CORNERS = ("xtl", "ytl", "xbr", "ybr")
_SHAPES = ("polygon", "polyline", "points", "ellipse", "mask", "cuboid", "skeleton", "tag")


def is_cvat(path: str | os.PathLike) -> bool:
    """Whether an XML file is a CVAT-for-images export: an ``<annotations>`` root whose
    frames are ``<image>`` elements (CVAT's video format has ``<track>``s instead)."""
    try:
        events = ET.iterparse(path, events=("start",))
        _, root = next(events)
        if root.tag != "annotations":
            return False
        for _, element in events:
            if element.tag in ("image", "track"):
                return element.tag == "image"
    except (ET.ParseError, OSError, StopIteration):
        return False
    return False


def read_cvat(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    keep_empty: bool = True,
    prompt_fn: PromptFn = detection_prompt,
    on_error: OnError = "drop",
    min_inside: float = 0.5,
    allow_outside_root: bool = False,
) -> SampleSet:
    """Detection samples of a CVAT-for-images XML; the class list is the task's
    ``<labels>`` when the export has them, else every label seen, sorted."""
    path = Path(path)
    if path.is_dir():
        path = path / "annotations.xml"
    root = Path(image_root) if image_root else _default_root(path)
    try:
        tree = ET.parse(path)
    except ET.ParseError as err:
        raise DataError(f"{path}:{err.position[0]}: invalid XML: {err}") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err}") from err
    if tree.getroot().tag != "annotations":
        raise DataError(f"{path}: expected a CVAT <annotations> root, got <{tree.getroot().tag}>")
    validator = Validator(str(path), on_error, min_inside, allow_outside_root=allow_outside_root)
    declared = [e.text.strip() for e in tree.getroot().iterfind("meta//labels/label/name")
                if e.text and e.text.strip()]
    parsed = []
    for i, image in enumerate(tree.getroot().iterfind("image")):
        record = _read_image(image, i, path, root, validator)
        if record is not None and (record[2] or keep_empty):
            parsed.append(record)
    classes = declared or sorted({label for r in parsed for label in r[3]})
    prompt = prompt_fn(classes)
    samples = []
    for where, file, boxes, labels, size, n_invalid in parsed:
        if not validator.keeps_image(where, len(boxes), n_invalid):
            continue
        meta = {"image_size": size, "n_invalid_boxes": n_invalid}
        samples.append(Sample(str(file), prompt, boxes, labels, "detection", file.stem, meta))
    return SampleSet(samples, classes, validator.finish(samples))


def _read_image(image: ET.Element, index: int, path: Path, root: Path, validator: Validator):
    name = image.get("name") or ""
    where = f"{path}: image[{index}] ({name or 'no name'})"
    try:
        size = (int(image.get("width", "")), int(image.get("height", "")))
    except ValueError:
        validator.fail("malformed", f"{where}: width/height",
                       f"expected integers, got {image.get('width')!r}, {image.get('height')!r}",
                       "sample")
        return None
    file = root / name
    if not name:
        validator.fail("malformed", f"{where}: name", "expected an image path", "sample")
        return None
    if not validator.usable_image(file, root, f"{where}: name"):
        return None
    if checked_size(size, file, f"{where}: width/height", validator) is None:
        return None
    boxes: list[Box] = []
    labels: list[str] = []
    n_invalid = 0
    for k, shape in enumerate(image):
        at = f"{where}: {shape.tag}[{k}]"
        if shape.tag in _SHAPES:
            validator.skip("not_a_box", at, f"<{shape.tag}> is not a box")
            continue
        if shape.tag != "box":
            continue
        box = _box(shape, at, size, validator)
        if box is None:
            n_invalid += 1
            continue
        boxes.append(box)
        labels.append(shape.get("label", ""))
    return where, file, boxes, labels, size, n_invalid


def _box(shape: ET.Element, where: str, size: tuple[int, int], validator: Validator) -> Box | None:
    if not shape.get("label"):
        validator.fail("malformed", f"{where}: label", "expected a label name")
        return None
    try:
        corners = [float(shape.get(k, "")) for k in _CORNERS]
    except ValueError:
        validator.fail("malformed", where, f"expected numbers {_CORNERS}, got "
                       f"{[shape.get(k) for k in _CORNERS]}")
        return None
    rotation = float(shape.get("rotation", 0) or 0)
    if math.isfinite(rotation) and rotation % 360:
        validator.skip("rotated", where, f"box rotated by {rotation:g} degrees")
        return None
    return validator.box(corners, size, where)


def _default_root(xml_file: Path) -> Path:
    images = xml_file.parent / "images"
    return images if images.is_dir() else xml_file.parent


__all__ = ["is_cvat", "read_cvat"]
