"""Draw boxes on images: the picture a person checks predictions with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from loctune.types import Detection

_COLORS = ["#ff00ff", "#00c8ff", "#ffa000", "#ffff00", "#ff3232", "#b400ff"]
TRUTH_COLOR = "#00ff00"


def draw_detections(
    image: Image.Image,
    detections: Sequence[Detection | Mapping],
    path: str | Path | None = None,
    truth: Sequence[Sequence[float]] = (),
    *,
    truth_labels: Sequence[str] = (),
    min_side: int = 320,
) -> Image.Image:
    """A copy of ``image`` with predictions (a colour per label, tagged "label score") and
    truth (green).

    Detections may be :class:`Detection` objects or their dict form as written
    to ``predictions.jsonl``; boxes are in ``image``'s pixels. Images whose short
    side is under ``min_side`` are enlarged first, so that labels stay readable on
    a 64 px synthetic scene as on a photo; line width and text size follow the
    drawn size. Saved as PNG when ``path`` is given.
    """
    im = image.convert("RGB")
    scale = max(1.0, min_side / min(im.size)) if min_side else 1.0
    if scale > 1:
        im = im.resize(
            (round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC
        )
    else:
        im = im.copy()
    pen = _Pen(im)
    for i, box in enumerate(truth):
        label = truth_labels[i] if i < len(truth_labels) else ""
        pen.box([c * scale for c in box], TRUTH_COLOR, label, below=True)
    colors: dict[str, str] = {}
    for det in detections:
        label, box, score = (
            (det.label, det.box, det.score)
            if isinstance(det, Detection)
            else (det["label"], det["box"], det.get("score", 1.0))
        )
        color = colors.setdefault(label, _COLORS[len(colors) % len(_COLORS)])
        pen.box([c * scale for c in box], color, f"{label} {score:.2f}")
    pen.write_tags()  # after every outline, so no box line crosses a tag
    if path is not None:
        im.save(path)
    return im


def draw_truth_and_predictions(
    image: Image.Image,
    detections: Sequence[Detection | Mapping],
    truth: Sequence[Sequence[float]],
    truth_labels: Sequence[str] = (),
    height: int = 480,
) -> Image.Image:
    """Truth (left) and predictions (right) of one image, side by side at ``height`` px,
    each panel titled, so a reader compares them without the two sets of tags overlapping."""
    scale = height / image.height
    size = (max(1, round(image.width * scale)), height)
    base = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)

    def scaled(box):
        return [c * scale for c in box]

    truth_panel = draw_detections(base, [], truth=[scaled(b) for b in truth],
                                  truth_labels=truth_labels, min_side=0)
    pred_panel = draw_detections(
        base,
        [Detection(d.label, scaled(d.box), d.score) if isinstance(d, Detection)
         else {**d, "box": scaled(d["box"])} for d in detections],
        min_side=0,
    )
    gap = max(4, height // 80)
    pen = _Pen(truth_panel)  # the panels' text size, for a title strip above them
    strip = pen.extent("predicted")[1]
    out = Image.new("RGB", (2 * size[0] + gap, height + strip), "white")
    out.paste(truth_panel, (0, strip))
    out.paste(pred_panel, (size[0] + gap, strip))
    pen = _Pen(out, font=pen.font, width=pen.width)
    pen.tag(0, 0, "truth", "#ffffff")
    pen.tag(size[0] + gap, 0, f"predicted ({len(detections)})", "#ffffff")
    return out


def tile(images: Sequence[Image.Image], columns: int = 2, gap: int = 6) -> Image.Image:
    """``images`` in a grid, ``columns`` wide, row by row, on white."""
    if not images:
        raise ValueError("tile: no images")
    columns = max(1, min(columns, len(images)))
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    width = max(sum(im.width for im in row) + gap * (len(row) - 1) for row in rows)
    height = sum(max(im.height for im in row) for row in rows) + gap * (len(rows) - 1)
    out = Image.new("RGB", (width, height), "white")
    y = 0
    for row in rows:
        x = 0
        for im in row:
            out.paste(im, (x, y))
            x += im.width + gap
        y += max(im.height for im in row) + gap
    return out


class _Pen:
    """Box outlines with tags on a filled background, sized from the image."""

    def __init__(self, im: Image.Image, font=None, width: int | None = None):
        self.draw = ImageDraw.Draw(im)
        self.size = im.size
        self.width = width or max(2, round(max(im.size) / 250))
        self.font = font or ImageFont.load_default(size=max(12, round(min(im.size) * 0.04)))
        self.pending: list[tuple[float, float, str, str]] = []

    def box(self, box: Sequence[float], color: str, label: str, below: bool = False) -> None:
        x0, y0, x1, y1 = box
        self.draw.rectangle([x0, y0, x1, y1], outline=color, width=self.width)
        if not label:
            return
        w, h = self.extent(label)
        x = min(max(0.0, x0), max(0.0, self.size[0] - w))
        if below:  # truth tags go under the box so they never cover a prediction's tag
            y = y1 if y1 + h <= self.size[1] else y1 - h
        else:
            y = y0 - h if y0 - h >= 0 else y0
        self.pending.append((x, y, label, color))

    def write_tags(self) -> None:
        """The tags of the boxes drawn so far, on top of every outline."""
        for x, y, label, color in self.pending:
            self.tag(x, y, label, color)
        self.pending.clear()

    def tag(self, x: float, y: float, label: str, color: str) -> None:
        """``label`` on a filled ``color`` background with its top-left corner at (x, y)."""
        left, top, _, _ = self.draw.textbbox((0, 0), label, font=self.font)
        w, h = self.extent(label)
        self.draw.rectangle([x, y, x + w, y + h], fill=color)
        self.draw.text((x + self.width - left, y + self.width - top), label, font=self.font,
                       fill=_ink(color))

    def extent(self, label: str) -> tuple[int, int]:
        left, top, right, bottom = self.draw.textbbox((0, 0), label, font=self.font)
        return right - left + 2 * self.width, bottom - top + 2 * self.width


def _ink(color: str) -> str:
    """Black or white, whichever reads better on ``color`` (a ``#rrggbb`` string)."""
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#ffffff"
