"""Ultralytics YOLO layout: ``data.yaml`` + ``images/`` + ``labels/`` text files.

``data.yaml`` keys: ``path`` (dataset root; relative paths are taken from the
YAML's folder, which is also the default), ``train`` / ``val`` / ``test`` (each
a folder of images, a ``.txt`` list of image paths, or a list of those) and
``names`` (a list, or a mapping ``id: name``). An image's labels are the
``.txt`` file at the same path with the last ``images`` folder replaced by
``labels``; each line is ``class cx cy w h`` normalised to [0, 1], or a
segmentation polygon ``class x1 y1 x2 y2 ...`` whose bounding box is used. An
image without a label file is a background image (no boxes), as in
Ultralytics. Image sizes come from the image headers (no pixel decoding). An
image listed twice in one split is read once; the repeat is reported as
``duplicate_image``. A list file's entry resolving outside the dataset root is
dropped as ``outside_root`` unless ``allow_outside_root=True``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from loctune.data.common import (
    PromptFn,
    SampleSet,
    detection_prompt,
    read_image_size,
    read_text,
)
from loctune.data.validate import DataError, OnError, Validator
from loctune.types import Box, Sample

IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".mpo", ".dng"}
SPLITS = ("train", "val", "test")


def read_yolo(
    data_yaml: str | os.PathLike,
    splits: Sequence[str] | None = None,
    *,
    prompt_fn: PromptFn = detection_prompt,
    on_error: OnError = "drop",
    min_inside: float = 0.5,
    allow_outside_root: bool = False,
) -> SampleSet:
    """Detection samples of the given splits (default: all of train/val/test the YAML names).

    ``meta["split"]`` holds the split; ``image_id`` is the image path relative
    to the dataset root, so the same file listed in two splits is detectable.
    """
    data_yaml = Path(data_yaml)
    config = _load_yaml(data_yaml)
    root = Path(config.get("path") or ".")
    root = root if root.is_absolute() else data_yaml.parent / root
    names = _class_names(config, data_yaml)
    classes = list(names.values())
    wanted = [s for s in SPLITS if config.get(s)] if splits is None else list(splits)
    validator = Validator(
        str(data_yaml), on_error, min_inside, allow_outside_root=allow_outside_root
    )
    prompt = prompt_fn(classes)
    samples = []
    for split in wanted:
        if not config.get(split):
            raise DataError(
                f"{data_yaml}: {split}: no such split (has {[s for s in SPLITS if config.get(s)]})"
            )
        for image_path in _split_images(config[split], root, f"{data_yaml}: {split}", validator):
            sample = _read_image(image_path, root, names, validator)
            if sample is not None:
                sample.prompt = prompt
                sample.meta["split"] = split
                samples.append(sample)
    return SampleSet(samples, classes, validator.finish(samples))


def label_path(image_path: Path) -> Path:
    """Ultralytics' rule: the last ``/images/`` folder becomes ``/labels/``, suffix ``.txt``."""
    parts = list(image_path.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise DataError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a mapping with 'names' and 'train'/'val'/'test'")
    return config


def _class_names(config: dict[str, Any], path: Path) -> dict[int, str]:
    names = config.get("names")
    if isinstance(names, list):
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict):
        try:
            return {int(k): str(names[k]) for k in sorted(names, key=int)}
        except (TypeError, ValueError) as err:
            raise DataError(f"{path}: names: ids must be integers, got {list(names)}") from err
    raise DataError(f"{path}: names: expected a list or an {{id: name}} mapping, got {names!r}")


def _split_images(entry: Any, root: Path, where: str, validator: Validator) -> list[Path]:
    """Image paths of one split entry: folder(s) searched recursively and/or ``.txt`` lists."""
    entries = entry if isinstance(entry, list) else [entry]
    images: list[tuple[Path, str]] = []  # (image, where it is listed)
    for item in entries:
        path = Path(str(item))
        path = path if path.is_absolute() else root / path
        if not path.exists() and str(item).startswith("../"):
            # Roboflow exports write "train: ../train/images" beside the export's root;
            # Ultralytics reads it from the root, as here
            path = root / str(item)[3:]
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            images.extend((p, str(p)) for p in found)
        elif path.suffix == ".txt" and path.is_file():
            images.extend(_listed_images(path, root, validator))
        else:
            raise DataError(f"{where}: {path} is neither a folder nor a .txt list of images")
    seen: dict[Path, str] = {}
    return [path for path, at in images if validator.unique_image(path, at, seen)]


def _listed_images(list_file: Path, root: Path, validator: Validator) -> list[tuple[Path, str]]:
    """Paths in a list file; ``./x`` is relative to the list's folder (Ultralytics), else the
    root."""
    images = []
    for lineno, line in enumerate(read_text(list_file).splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        path = Path(name)
        if not path.is_absolute():
            path = list_file.parent / path if name.startswith("./") else root / path
        where = f"{list_file}:{lineno}"
        if validator.inside_root(path, root, where) and validator.image_file(path, where):
            images.append((path, where))
    return images


def _read_image(
    image_path: Path, root: Path, names: dict[int, str], validator: Validator
) -> Sample | None:
    size = read_image_size(image_path, str(image_path), validator)
    if size is None:
        return None
    labels_file = label_path(image_path)
    boxes: list[Box] = []
    labels: list[str] = []
    dropped_before = validator.report.n_dropped
    if labels_file.is_file():
        for lineno, line in enumerate(read_text(labels_file).splitlines(), 1):
            if line.strip():
                parsed = _parse_line(line, f"{labels_file}:{lineno}", size, names, validator)
                if parsed is not None:
                    boxes.append(parsed[0])
                    labels.append(parsed[1])
    n_invalid = validator.report.n_dropped - dropped_before
    if not validator.keeps_image(str(labels_file), len(boxes), n_invalid):
        return None
    try:
        image_id = image_path.relative_to(root).as_posix()
    except ValueError:
        image_id = image_path.as_posix()
    meta = {
        "image_size": size,
        "label_file": str(labels_file) if labels_file.is_file() else None,
        "n_invalid_boxes": n_invalid,
    }
    return Sample(str(image_path), "", boxes, labels, "detection", image_id, meta)


def _parse_line(
    line: str, where: str, size: tuple[int, int], names: dict[int, str], validator: Validator
) -> tuple[Box, str] | None:
    fields = line.split()
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        validator.fail(
            "malformed",
            where,
            f"expected 'class cx cy w h' or a polygon 'class x1 y1 x2 y2 x3 y3 ...', "
            f"got {len(fields)} values: {line.strip()!r}",
        )
        return None
    try:
        values = [float(v) for v in fields]
    except ValueError:
        validator.fail("malformed", where, f"non-numeric value in {line.strip()!r}")
        return None
    cls = values[0]
    if not cls.is_integer() or int(cls) not in names:
        validator.fail(
            "unknown_class",
            f"{where}: class",
            f"{fields[0]!r} is not a class id of names (0..{max(names)})" if names else "no names",
        )
        return None
    w, h = size
    if len(values) == 5:
        cx, cy, bw, bh = values[1:]
        corners = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
    else:
        xs, ys = values[1::2], values[2::2]
        corners = (min(xs) * w, min(ys) * h, max(xs) * w, max(ys) * h)
    box = validator.box(corners, size, where)
    return None if box is None else (box, names[int(cls)])
