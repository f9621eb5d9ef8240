"""Qwen2-VL grounding: plain-text corners ``(x1,y1),(x2,y2)`` in [0, 1000).

Qwen2-VL writes coordinates as ordinary digits, so there are no location
tokens and soft location targets do not apply (``space`` is None); use loctune's
``bins`` codec with added tokens to supervise Qwen with geometry.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from loctune.codecs.base import Codec, register_codec
from loctune.codecs.parsing import (
    DIGITS,
    TextWriter,
    check_locations,
    check_objects,
    clean_label,
    object_span,
    read_index,
)
from loctune.types import Box, DecodeResult, Detection, Encoding

_NUMBER = rf"\s*({DIGITS})\s*"
_CORNERS = re.compile(rf"\s*\({_NUMBER},{_NUMBER}\)\s*,\s*\({_NUMBER},{_NUMBER}\)\s*")
_MARKUP = re.compile(r"<\|(object_ref|box)_(start|end)\|>")  # no label may contain one
SCALE = 1000


@register_codec("qwen2vl")
class Qwen2VLCodec(Codec):
    """``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``.

    Coordinates are ``round(v / size * 1000)`` clipped to [0, 999] and decoded
    as ``k / 1000 * size``; decoding also accepts 1000 (the far edge), which
    the model may write. ``box_to_locations`` returns the four integers in
    x1 y1 x2 y2 order (``box_to_continuous`` the unrounded values, 1-D each):
    they are digits in the text, not token ids, and ``location_tokens`` is empty.
    A box without its own reference phrase takes the previous phrase, as
    Qwen2-VL lists several boxes after one phrase; a box with reversed or
    equal corners is malformed.
    """

    tokens_per_box = 4
    space = None

    @property
    def location_tokens(self) -> list[str]:
        return []

    def box_to_continuous(self, box: Box, image_size: tuple[int, int]) -> list[tuple[float, ...]]:
        w, h = image_size
        return [
            (min(max(v / s * SCALE, 0.0), SCALE - 1.0),)
            for v, s in zip(box, (w, h, w, h), strict=True)
        ]

    def box_to_locations(self, box: Box, image_size: tuple[int, int]) -> list[int]:
        return [round(v) for (v,) in self.box_to_continuous(box, image_size)]

    def locations_to_box(
        self, values: Sequence[Sequence[float]], image_size: tuple[int, int]
    ) -> Box:
        w, h = image_size
        coords = check_locations(values, 4, 1)
        return tuple(v / SCALE * s for (v,), s in zip(coords, (w, h, w, h), strict=True))

    def encode_spans(
        self, boxes: Sequence[Box], labels: Sequence[str], image_size: tuple[int, int]
    ) -> Encoding:
        check_objects(boxes, labels, _MARKUP)
        out = TextWriter(None)
        for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
            x1, y1, x2, y2 = self.box_to_locations(box, image_size)
            out.write("<|object_ref_start|>")
            label_span = out.write(label)
            out.write("<|object_ref_end|><|box_start|>")
            out.add(i, out.write(f"({x1},{y1}),({x2},{y2})"), label_span)
            out.write("<|box_end|>")
        return out.encoding()

    def decode(self, text: str, image_size: tuple[int, int]) -> DecodeResult:
        """One pass over the markup, linear in the text (a regex per box was quadratic in
        unclosed phrases). A box runs to its ``<|box_end|>``, the next ``<|box_start|>`` or
        the end of the text; a phrase counts once closed before a box, and phrase markup
        inside a box is part of that box's (then malformed) text."""
        result, label, label_span = DecodeResult([]), "", (0, 0)
        phrase = box = None  # where the open phrase's / box's text starts
        for m in _MARKUP.finditer(text):
            kind, edge = m.groups()
            if kind == "box":
                if box is not None:
                    self._read_box(text, (box, m.start()), label, label_span, image_size, result)
                    box = None
                if edge == "start":
                    phrase, box = None, m.end()
            elif box is None and edge == "start":
                phrase = m.end()
            elif box is None and phrase is not None:
                label, label_span = clean_label(text[phrase : m.start()]), (phrase, m.start())
                phrase = None
        if box is not None:
            self._read_box(text, (box, len(text)), label, label_span, image_size, result)
        return result

    def _read_box(self, text, span, label, label_span, image_size, result: DecodeResult) -> None:
        """Add the box written at ``span`` to ``result``, or count it malformed."""
        corners = _CORNERS.fullmatch(text, *span)
        k = [read_index(v) for v in corners.groups()] if corners else []
        if not k or max(k) > SCALE or k[2] <= k[0] or k[3] <= k[1]:
            result.n_malformed += 1
            return
        result.spans.append(object_span(None, len(result.detections), span, label_span))
        result.detections.append(Detection(label, self.locations_to_box(k, image_size)))
