"""Box tables: ``filename,width,height,class,xmin,ymin,xmax,ymax``, one row per box.

The layout of TensorFlow object-detection tutorials and of many Kaggle/Roboflow
exports. Rows are grouped by ``filename`` (first-seen order) into one detection
sample per image; extra columns are ignored. Only images with at least one row
appear, so a table has no negative images. Errors name the file, line and
column, e.g. ``labels.csv:7: xmax``. ``width``/``height`` are checked against
the image header (``check_images=True``): another size drops the image as
``size_mismatch``. A ``filename`` resolving outside ``image_root`` is dropped as
``outside_root`` unless ``allow_outside_root=True``. A UTF-8 byte-order mark
(Excel's default) is allowed.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

from loctune.data.common import (
    PromptFn,
    SampleSet,
    checked_size,
    detection_prompt,
    read_text,
    resolve,
)
from loctune.data.validate import DataError, OnError, Validator
from loctune.types import Box, Sample

_CORNERS = ("xmin", "ymin", "xmax", "ymax")
COLUMNS = ("filename", "width", "height", "class", *_CORNERS)


def read_csv_boxes(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    classes: Sequence[str] | None = None,
    split: str | None = None,
    check_images: bool = True,
    prompt_fn: PromptFn = detection_prompt,
    on_error: OnError = "drop",
    min_inside: float = 0.5,
    allow_outside_root: bool = False,
) -> SampleSet:
    """Detection samples from a box table; images relative to ``image_root`` (default: its folder).

    With ``classes`` given, other class names are errors; otherwise the class
    list is every name seen, sorted. ``split`` is stored in ``meta["split"]``
    (for tables that are one split of a dataset, e.g. ``train_labels.csv``).
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    validator = Validator(str(path), on_error, min_inside, allow_outside_root=allow_outside_root)
    known = set(classes) if classes is not None else None
    images: dict[str, _Image] = {}
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}:1: header lacks column(s) {missing}; expected {','.join(COLUMNS)}"
            )
        for row in reader:
            if None in row or any(row[c] is None for c in COLUMNS):
                validator.fail(
                    "malformed",
                    f"{path}:{reader.line_num}",
                    f"expected {len(reader.fieldnames)} fields like the header",
                    "record",
                )
                continue
            _add_row(row, path, reader.line_num, images, root, known, check_images, validator)

    class_list = (
        list(classes)
        if classes is not None
        else sorted({label for image in images.values() for label in image.labels})
    )
    prompt = prompt_fn(class_list)
    samples = []
    for name, image in images.items():
        if image.dropped or not validator.keeps_image(
            f"{path}:{image.first_line}", len(image.boxes), image.n_invalid
        ):
            continue
        meta = {"image_size": image.size, "lines": image.lines, "n_invalid_boxes": image.n_invalid}
        if split is not None:
            meta["split"] = split
        samples.append(
            Sample(str(image.path), prompt, image.boxes, image.labels, "detection", name, meta)
        )
    return SampleSet(samples, class_list, validator.finish(samples))


class _Image:
    """Rows of one filename collected so far."""

    def __init__(self, path: Path, size: tuple[int, int], first_line: int, dropped: bool):
        self.path = path
        self.size = size
        self.first_line = first_line
        self.dropped = dropped  # missing or not of its declared size
        self.boxes: list[Box] = []
        self.labels: list[str] = []
        self.lines: list[int] = []
        self.n_invalid = 0


def _add_row(
    row: dict[str, str],
    path: Path,
    line: int,
    images: dict[str, _Image],
    root: Path,
    known: set[str] | None,
    check_images: bool,
    validator: Validator,
) -> None:
    where = f"{path}:{line}"
    name = row["filename"].strip()
    try:
        size = (int(row["width"]), int(row["height"]))
    except ValueError:
        validator.fail(
            "malformed",
            f"{where}: width/height",
            f"expected integers, got {row['width']!r}, {row['height']!r}",
            "record",
        )
        return
    if name not in images:
        image_path = resolve(root, name)
        usable = (
            validator.usable_image(image_path, root, f"{where}: filename", check_images)
            and checked_size(size, image_path, f"{where}: width/height", validator, check_images)
        )
        images[name] = _Image(image_path, size, line, dropped=not usable)
    image = images[name]
    if image.dropped:
        return  # the image was reported once, on its first row
    if size != image.size:
        validator.fail(
            "malformed",
            f"{where}: width/height",
            f"{size} differs from {image.size} on line {image.first_line}",
        )
        image.n_invalid += 1
        return
    box = _row_box(row, where, known, size, validator)
    if box is None:
        image.n_invalid += 1
        return
    image.boxes.append(box)
    image.labels.append(row["class"].strip())
    image.lines.append(line)


def _row_box(
    row: dict[str, str],
    where: str,
    known: set[str] | None,
    size: tuple[int, int],
    validator: Validator,
) -> Box | None:
    label = row["class"].strip()
    if not label:
        validator.fail("malformed", f"{where}: class", "empty class name")
        return None
    if known is not None and label not in known:
        validator.fail("unknown_class", f"{where}: class", f"{label!r} is not in {sorted(known)}")
        return None
    coords: dict[str, float] = {}
    for key in _CORNERS:
        try:
            coords[key] = float(row[key])
        except ValueError:
            validator.fail("malformed", f"{where}: {key}", f"expected a number, got {row[key]!r}")
            return None
    bad = [key for key, value in coords.items() if not math.isfinite(value)]
    if bad:
        validator.fail("not_finite", f"{where}: {','.join(bad)}", f"non-finite value(s) {coords}")
        return None
    return validator.box(list(coords.values()), size, where)
