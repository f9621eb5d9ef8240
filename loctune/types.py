"""The records that flow between stages: a labelled sample in, detections out.

Boxes everywhere in loctune are absolute pixel coordinates ``(x1, y1, x2, y2)``
on the image as stored; image sizes are ``(width, height)``. Only a codec
converts to and from a model family's own token order and quantisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

Box = tuple[float, float, float, float]


@dataclass
class Sample:
    """One training/evaluation example, whatever reader produced it.

    ``prompt`` is the task text without location tokens (a referring expression,
    a class list for detection). ``boxes``/``labels`` are the answer; for a
    referring expression there is one box. ``image`` may be a PIL image or a
    path loaded lazily by :meth:`load_image`.
    """

    image: Image.Image | str
    prompt: str
    boxes: list[Box]
    labels: list[str]
    task: str = "grounding"  # "grounding" | "detection"
    image_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        if isinstance(self.image, Image.Image):
            return self.image
        with Image.open(self.image) as im:
            return im.convert("RGB")

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height), read from the header only when the image is a path."""
        if isinstance(self.image, Image.Image):
            return self.image.size
        if "image_size" in self.meta:
            return tuple(self.meta["image_size"])
        with Image.open(self.image) as im:
            return im.size


@dataclass
class Detection:
    """One decoded object: label, pixel box and a confidence in [0, 1]."""

    label: str
    box: Box
    score: float = 1.0


@dataclass
class DecodeResult:
    """What a codec could read from a generation.

    Decoding never raises on model output; ``n_malformed`` counts the fragments
    (objects, token groups) that could not be turned into a valid box.
    """

    detections: list[Detection]
    n_malformed: int = 0

    def __iter__(self):
        return iter(self.detections)

    def __len__(self) -> int:
        return len(self.detections)
