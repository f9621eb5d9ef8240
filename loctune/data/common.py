"""Pieces shared by all readers: the prompt builder, the result container, image headers."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from loctune.data.validate import DataError, ValidationReport, Validator
from loctune.types import Sample

PromptFn = Callable[[Sequence[str]], str]


def detection_prompt(classes: Sequence[str]) -> str:
    """``"detect a ; b"`` for a detection sample over the given class names.

    Readers call this with the dataset's full class list, so the prompt does not
    leak which classes an image contains. Model adapters build their own
    family-specific prompts from ``Sample.labels``; pass ``prompt_fn=`` to a
    reader to change this one.
    """
    return "detect " + " ; ".join(classes)


@dataclass
class SampleSet(Sequence[Sample]):
    """What a reader returns: the samples, the class list and the validation report."""

    samples: list[Sample]
    classes: list[str]
    report: ValidationReport

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):  # type: ignore[override]
        return self.samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def n_boxes(self) -> int:
        return sum(len(s.boxes) for s in self.samples)

    def require_samples(self) -> SampleSet:
        """This set, when every file read gave samples; else a :class:`DataError` naming each
        file that gave none with its main reasons (``160 dropped: missing_image (e.g. ...
        images are looked up in DIR; pass image_root= ...)``). Call it before creating a run
        folder, so that a wrong ``image_root`` is one clear line, not an empty run."""
        if self.report.parts:
            empty = [part for part in self.report.parts if part.n_samples == 0]
        else:
            empty = [] if self.samples else [self.report]
        if empty:
            raise DataError("\n".join(part.why_empty() for part in empty))
        return self


ImageSource = str | os.PathLike | Image.Image  # a file, or an image opened over bytes (hf)


def read_image_size(path: ImageSource, where: str, validator: Validator) -> tuple[int, int] | None:
    """(width, height) from the image header without decoding pixels; None if unreadable.

    EXIF orientation is not applied: sizes and boxes refer to the image as
    stored, like :meth:`Sample.load_image`.
    """
    try:
        with _opened(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError) as err:
        validator.fail("malformed", where, f"cannot read image header of {path}: {err}", "sample")
        return None


def declared_size(width: Any, height: Any) -> tuple[int, int] | None:
    """(width, height) when both are positive numbers, else None: tools write 0 or leave
    them out, and the image header then gives the size."""
    if positive_number(width) and positive_number(height):
        return int(width), int(height)
    return None


def checked_size(
    declared: tuple[int, int] | None,
    path: ImageSource,
    where: str,
    validator: Validator,
    check_images: bool = True,
) -> tuple[int, int] | None:
    """The image's (width, height): the declared one once the image header agrees, the
    header's when none is declared; None (recorded) when they differ (``size_mismatch``):
    boxes drawn for another size would be trained in the wrong place. With
    ``check_images=False`` a declared size is trusted without opening the file.
    Sizes are as stored: EXIF orientation is not applied."""
    if declared is not None and not check_images:
        return declared
    actual = read_image_size(path, where, validator)
    if actual is None or declared is None or tuple(declared) == actual:
        return actual
    validator.fail(
        "size_mismatch",
        where,
        f"declared {declared[0]}x{declared[1]} but the image {path} is {actual[0]}x{actual[1]}"
        f"{_rotation_hint(path, declared, actual)}; sample dropped",
        "sample",
    )
    return None


def _rotation_hint(path: ImageSource, declared: tuple[int, int], actual: tuple[int, int]) -> str:
    """Why a declared size may be the stored one turned: a tool that applied the EXIF rotation."""
    if tuple(declared) != actual[::-1]:
        return ""
    with _opened(path) as im:
        turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF Orientation: a quarter turn
    return (" (the size after its EXIF rotation: boxes must refer to the image as stored)"
            if turned else "")


def _opened(source: ImageSource) -> AbstractContextManager[Image.Image]:
    """The image to read a header from; one already open is left open."""
    return nullcontext(source) if isinstance(source, Image.Image) else Image.open(source)


def resolve(root: str | os.PathLike, name: str) -> Path:
    """``name`` relative to ``root`` unless it is already absolute."""
    path = Path(name)
    return path if path.is_absolute() else Path(root) / path


def read_text(path: str | os.PathLike) -> str:
    """The file's text as UTF-8; bytes that are not become a :class:`DataError` naming the file,
    line and byte offset (not a bare ``UnicodeDecodeError``). A leading byte-order mark, as
    Excel writes one in CSV, is dropped."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} "
            f"({err.reason}); expected the file saved as UTF-8"
        ) from err


def load_json(path: str | os.PathLike) -> Any:
    """Parsed JSON; bad bytes or a syntax error become a :class:`DataError` naming file and line."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err


def is_number(value: Any) -> bool:
    """An int or float, not a bool (JSON ``true`` is not a coordinate)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value) and value > 0
