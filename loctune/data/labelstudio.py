"""Label Studio exports for images: ``JSON`` (full) and ``JSON-MIN``.

Both are a JSON list of tasks. The full export keeps each task's
``data.image`` and its ``annotations[].result[]``; JSON-MIN flattens a task to
``{"image": ..., "<control name>": [regions]}``. A rectangle region gives
``x``, ``y``, ``width``, ``height`` in percent of ``original_width`` /
``original_height`` and its class in ``rectanglelabels``. Image paths are the
ones Label Studio wrote (``/data/upload/3/8f2c-dog.jpg``,
``/data/local-files/?d=photos/dog.jpg``, a URL): they are looked up under
``image_root`` by the path, then by the file name, then by the name without the
upload prefix; one that climbs out of ``image_root`` (``../``) is dropped as
``outside_root`` unless ``allow_outside_root=True``. Rotated rectangles and
non-rectangle regions are reported as skipped, not bent into boxes. A task
whose ``original_width``/``original_height`` differ from the image file's header
(e.g. sizes after an EXIF rotation the browser applied) is dropped as
``size_mismatch``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from loctune.data.common import (
    PromptFn,
    SampleSet,
    checked_size,
    detection_prompt,
    is_number,
    load_json,
)
from loctune.data.validate import DataError, OnError, Validator, inside
from loctune.types import Box, Sample


def is_label_studio(data: Any) -> bool:
    """Whether parsed JSON looks like a Label Studio export (a list of tasks with image
    regions), as opposed to RefCOCO refs, the other JSON list loctune reads."""
    if not isinstance(data, list) or not data or not isinstance(data[0], Mapping):
        return False
    task = data[0]
    if "annotations" in task and isinstance(task.get("data"), Mapping):
        return True
    return any(_is_region_list(v) for v in task.values())


def _is_region_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(r, Mapping) and "original_width" in r for r in value)
    )


def read_label_studio(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    prompt_fn: PromptFn = detection_prompt,
    on_error: OnError = "drop",
    min_inside: float = 0.5,
    allow_outside_root: bool = False,
) -> SampleSet:
    """Detection samples of a Label Studio export; images under ``image_root``
    (default: the JSON's folder). The first annotation of a task is read (later
    ones are other annotators' versions, reported as skipped)."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    data = load_json(path)
    if not is_label_studio(data):
        raise DataError(f"{path}: expected a Label Studio JSON or JSON-MIN export (a task list)")
    validator = Validator(str(path), on_error, min_inside, allow_outside_root=allow_outside_root)
    found: list[tuple[int, Path, tuple[int, int] | None, list[Box], list[str], int]] = []
    for i, task in enumerate(data):
        where = f"{path}: [{i}]"
        if not isinstance(task, Mapping):
            validator.fail("malformed", where, "expected a task object", "record")
            continue
        image_ref, regions = _task_parts(task, where, validator)
        if image_ref is None:
            continue
        image = _find_image(root, image_ref)
        if image is None:
            validator.fail("missing_image", f"{where}: image",
                           f"image file not found under {root}: {image_ref}", unit="sample")
            continue
        if not validator.inside_root(image, root, f"{where}: image"):
            continue
        boxes, labels, n_invalid, size = [], [], 0, None
        for k, region in enumerate(regions):
            read = _region_box(region, f"{where}: region {k}", validator)
            if read is None:
                n_invalid += 1
                continue
            box, label, size = read
            boxes.append(box)
            labels.append(label)
        if size is not None and checked_size(
            size, image, f"{where}: original_width/original_height", validator
        ) is None:
            continue
        found.append((i, image, size, boxes, labels, n_invalid))
    classes = sorted({label for *_, labels, _ in found for label in labels})
    prompt = prompt_fn(classes)
    samples = []
    for i, image, size, boxes, labels, n_invalid in found:
        if not validator.keeps_image(f"{path}: [{i}]", len(boxes), n_invalid):
            continue
        meta = {"n_invalid_boxes": n_invalid, "task_index": i}
        if size is not None:
            meta["image_size"] = size
        samples.append(Sample(str(image), prompt, boxes, labels, "detection", image.stem, meta))
    return SampleSet(samples, classes, validator.finish(samples))


def _task_parts(
    task: Mapping[str, Any], where: str, validator: Validator
) -> tuple[str | None, list[Mapping]]:
    """(image reference, rectangle-label regions) of a full or JSON-MIN task."""
    if isinstance(task.get("data"), Mapping):  # full export
        image = task["data"].get("image")
        annotations = [a for a in task.get("annotations") or () if isinstance(a, Mapping)]
        annotations = [a for a in annotations if not a.get("was_cancelled")]
        if len(annotations) > 1:
            validator.skip("extra_annotation", where,
                           f"{len(annotations) - 1} more annotation(s) of this task; "
                           "the first is read", unit="record")
        regions = list(annotations[0].get("result") or ()) if annotations else []
    else:  # JSON-MIN: the image and one key per labelling control
        image = task.get("image")
        regions = [r for v in task.values() if _is_region_list(v) for r in v]
    if not isinstance(image, str) or not image:
        validator.fail("malformed", f"{where}: image", "expected the image path or URL",
                       "record")
        return None, []
    return image, regions


def _region_box(
    region: Any, where: str, validator: Validator
) -> tuple[Box, str, tuple[int, int]] | None:
    """(pixel box, label, image size) of a rectangle region, or None (recorded)."""
    value = region.get("value", region) if isinstance(region, Mapping) else None
    if not isinstance(value, Mapping):
        validator.fail("malformed", where, "expected a region object")
        return None
    if not value.get("rectanglelabels"):
        validator.skip("not_a_box", where,
                       f"region of type {region.get('type', 'unknown')!r} "
                       "is not a labelled rectangle")
        return None
    keys = ("x", "y", "width", "height")
    if not all(is_number(value.get(k)) for k in keys):
        validator.fail("malformed", where, f"expected numbers {keys} (percent of the image)")
        return None
    if value.get("rotation"):
        validator.skip("rotated", where, f"rectangle rotated by {value['rotation']} degrees")
        return None
    w, h = region.get("original_width"), region.get("original_height")
    if not (is_number(w) and is_number(h) and w > 0 and h > 0):
        validator.fail("malformed", where, "expected original_width/original_height in pixels")
        return None
    x, y, bw, bh = (float(value[k]) for k in keys)
    pixel = (x / 100 * w, y / 100 * h, (x + bw) / 100 * w, (y + bh) / 100 * h)
    box = validator.box(pixel, (int(w), int(h)), where)
    labels = value["rectanglelabels"]
    if box is None:
        return None
    if len(labels) > 1:
        validator.skip("extra_label", where, f"labels {labels}: the first is used")
    return box, str(labels[0]), (int(w), int(h))


def _find_image(root: Path, ref: str) -> Path | None:
    """The file a Label Studio image reference names, looked up under ``root`` (one inside
    the root first; the caller refuses one outside it)."""
    parsed = urlparse(ref)
    local = parse_qs(parsed.query).get("d")  # /data/local-files/?d=relative/path
    name = unquote(local[0] if local else parsed.path).lstrip("/")
    base = Path(name).name
    unprefixed = base.split("-", 1)[1] if "-" in base else base  # upload names: "<hash>-name"
    found = [root / n for n in dict.fromkeys((name, base, unprefixed)) if (root / n).is_file()]
    found.sort(key=lambda path: not inside(path, root))  # one under the root first
    return found[0] if found else None


__all__ = ["is_label_studio", "read_label_studio"]
