"""Draw boxes on images: the picture a person checks predictions with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from loctune.types import Detection

_COLORS = ["#ff00ff", "#00c8ff", "#ffa000", "#00ff64", "#ff3232", "#ffff00"]


def draw_detections(
    image: Image.Image,
    detections: Sequence[Detection | Mapping],
    path: str | Path | None = None,
    truth: Sequence[Sequence[float]] = (),
) -> Image.Image:
    """A copy of ``image`` with predictions (coloured, labelled with score) and truth (green).

    Detections may be :class:`Detection` objects or their dict form as written
    to ``predictions.jsonl``; saved as PNG when ``path`` is given.
    """
    im = image.convert("RGB").copy()
    draw = ImageDraw.Draw(im)
    width = max(1, round(max(im.size) / 200))
    for box in truth:
        draw.rectangle(list(box), outline="#00ff00", width=width)
    labels = {}
    for det in detections:
        label, box, score = (
            (det.label, det.box, det.score)
            if isinstance(det, Detection)
            else (det["label"], det["box"], det.get("score", 1.0))
        )
        color = _COLORS[labels.setdefault(label, len(labels)) % len(_COLORS)]
        draw.rectangle(list(box), outline=color, width=width)
        draw.text((box[0] + 2, max(0, box[1] - 11)), f"{label} {score:.2f}", fill=color)
    if path is not None:
        im.save(path)
    return im
