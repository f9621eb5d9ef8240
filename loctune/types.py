"""The records that flow between stages: a labelled sample in, detections out.

Boxes everywhere in loctune are absolute pixel coordinates ``(x1, y1, x2, y2)``
on the image as stored; image sizes are ``(width, height)``. Only a codec
converts to and from a model family's own token order and quantisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

Box = tuple[float, float, float, float]

#: tasks whose answer is boxes, the ones the box metrics and the HF adapters take
BOX_TASKS: tuple[str, ...] = ("grounding", "detection")
#: label of a position no loss is taken at (prompt, padding), PyTorch's cross-entropy default
IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad annotation or image data; the message starts with ``file[:line]: field:``.

    Defined here, beside :class:`Sample`, so that loading an image can raise it;
    readers use it through :mod:`loctune.data.validate`.
    """


def read_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """The decoded image; an unreadable or truncated file raises :class:`DataError` naming it
    (PIL's own ``image file is truncated`` names none, and would stop a training run)."""
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (OSError, SyntaxError) as err:  # PIL raises SyntaxError for some broken PNGs
        raise DataError(f"{path}: cannot read image: {err}") from err


def header_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the image header, as stored; :class:`DataError` naming the file."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError) as err:
        raise DataError(f"{path}: cannot read image header: {err}") from err


@dataclass
class Sample:
    """One training/evaluation example, whatever reader produced it.

    ``prompt`` is the task text without location tokens (a referring expression,
    a class list for detection). ``boxes``/``labels`` are the answer; for a
    referring expression there is one box. ``image`` may be a PIL image or a
    path loaded lazily by :meth:`load_image`. An image that cannot be decoded raises
    :class:`DataError` naming the file, or ``meta["source"]`` (where a reader found
    an in-memory image) and the ``image_id``.
    """

    image: Image.Image | str
    prompt: str
    boxes: list[Box]
    labels: list[str]
    task: str = "grounding"  # "grounding" | "detection"
    image_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        if not isinstance(self.image, Image.Image):
            return read_image(self.image)
        try:
            self.image.load()  # an image opened lazily over bytes decodes here
        except (OSError, SyntaxError) as err:
            where = f"{self.meta.get('source', 'in-memory image')} (image_id {self.image_id!r})"
            raise DataError(f"{where}: cannot read image: {err}") from err
        return self.image

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height), read from the header only when the image is a path."""
        if isinstance(self.image, Image.Image):
            return self.image.size
        if "image_size" in self.meta:
            return tuple(self.meta["image_size"])
        return header_size(self.image)


@dataclass
class Detection:
    """One decoded object: label, pixel box and a confidence in [0, 1]."""

    label: str
    box: Box
    score: float = 1.0


Span = tuple[int, int]  # character offsets [start, end) into a codec's text


@dataclass(frozen=True)
class ObjectSpan:
    """Where a codec's text writes one object, so that no caller has to re-parse it.

    ``index`` is the object's position in the boxes given to ``encode`` (in
    ``DecodeResult.detections`` for ``decode``). ``locations`` and ``label``
    are character spans of its location text and of its label as written
    (raw, before white space is collapsed; a label shared by several boxes,
    as Kosmos-2 writes, is the same span for each). ``tokens`` are the
    positions of its location tokens among all location tokens of the text,
    which is also their order among the location ids of the text's
    tokenisation; empty for a codec that writes coordinates as plain text.
    """

    index: int
    locations: Span
    label: Span
    tokens: range

    @property
    def label_first(self) -> bool:
        """Whether the label is written before the location text."""
        return self.label[0] < self.locations[0]


@dataclass(frozen=True)
class Encoding:
    """A codec's text for some objects and, in text order, where each one is written."""

    text: str
    spans: tuple[ObjectSpan, ...]


@dataclass
class DecodeResult:
    """What a codec could read from a generation.

    Decoding never raises on model output; ``n_malformed`` counts the fragments
    (objects, token groups) that could not be turned into a valid box.
    ``spans[i]`` is where ``detections[i]`` was read (not part of equality:
    two results are equal when they found the same objects).
    """

    detections: list[Detection]
    n_malformed: int = 0
    spans: list[ObjectSpan] = field(default_factory=list, compare=False)

    def __iter__(self):
        return iter(self.detections)

    def __len__(self) -> int:
        return len(self.detections)
