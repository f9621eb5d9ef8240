"""Codecs that write one token per coordinate: PaliGemma, Florence-2, OFA/Pix2Seq bins, row/column.

They differ only in token spelling, number of bins, coordinate order,
quantisation and where the label goes, so one class covers them all and each
family is a registered preset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from loctune.codecs.base import Codec, LocationSpace, register_codec
from loctune.codecs.parsing import (
    TextWriter,
    check_locations,
    check_objects,
    continuous,
    dequantize,
    object_span,
    quantize,
    read_index,
    token_pattern,
    token_runs,
    token_starts,
)
from loctune.types import Box, DecodeResult, Detection, Encoding

_AXES = {"x1": (0, 0), "y1": (1, 1), "x2": (2, 0), "y2": (3, 1)}  # box index, size index


@register_codec("bins")
class BinCodec(Codec):
    """One token per coordinate, ``n_bins`` tokens shared by both axes.

    ``token_format``: the token spelling with one ``{}`` field for the bin
    (``"<bin_{}>"`` OFA, ``"<loc{:04d}>"`` PaliGemma). ``order``: ``"xyxy"`` or
    ``"yxyx"``. ``label_first``: ``label <tokens>`` instead of ``<tokens> label``;
    label and tokens are joined by one space, or by nothing when ``separator``
    (between objects) is empty, as Florence-2 writes. ``quantization``: ``"round"``
    (``round(v/size*(n-1))``, decoded ``k/(n-1)*size``) or ``"floor"`` (floor
    to a bin of width ``size/n``, decoded at the bin centre). A decoded box is
    kept when ``x2 > x1`` and ``y2 > y1`` (``strict``) or ``>=`` (not strict,
    for floor bins, where a box inside one bin has both corners in it);
    otherwise it is counted as malformed, never swapped: reversed corners are
    a model error worth seeing in the unparseable rate.
    """

    tokens_per_box = 4

    def __init__(
        self,
        n_bins: int = 1000,
        token_format: str = "<bin_{}>",
        order: str = "xyxy",
        quantization: str = "round",
        label_first: bool = False,
        separator: str = " ",
        strict: bool = True,
    ):
        if order not in ("xyxy", "yxyx"):
            raise ValueError(f"order must be 'xyxy' or 'yxyx', got {order!r}")
        if quantization not in ("round", "floor"):
            raise ValueError(f"quantization must be 'round' or 'floor', got {quantization!r}")
        if n_bins < 2:
            raise ValueError(
                f"n_bins must be >= 2 (one bin cannot place a coordinate), got {n_bins}"
            )
        self.n_bins = n_bins
        self.token_format = token_format
        self.order = order
        self._axes = ("x1", "y1", "x2", "y2") if order == "xyxy" else ("y1", "x1", "y2", "x2")
        self.quantization = quantization
        self.label_first = label_first
        self.separator = separator
        self.strict = strict
        self.space = LocationSpace("bins", n_bins)
        self._token = token_pattern(token_format)
        self._tokens = [token_format.format(k) for k in range(n_bins)]

    @property
    def location_tokens(self) -> list[str]:
        return self._tokens

    def box_to_locations(self, box: Box, image_size: tuple[int, int]) -> list[int]:
        n, mode = self.n_bins, self.quantization
        return [quantize(box[_AXES[a][0]], image_size[_AXES[a][1]], n, mode) for a in self._axes]

    def box_to_continuous(self, box: Box, image_size: tuple[int, int]) -> list[tuple[float, ...]]:
        n, mode = self.n_bins, self.quantization
        return [
            (continuous(box[_AXES[a][0]], image_size[_AXES[a][1]], n, mode),) for a in self._axes
        ]

    def locations_to_box(
        self, values: Sequence[Sequence[float]], image_size: tuple[int, int]
    ) -> Box:
        coords = [0.0] * 4
        for a, (k,) in zip(self._axes, check_locations(values, 4, 1), strict=True):
            box_index, size_index = _AXES[a]
            coords[box_index] = dequantize(
                k, image_size[size_index], self.n_bins, self.quantization
            )
        return tuple(coords)

    def encode_spans(
        self, boxes: Sequence[Box], labels: Sequence[str], image_size: tuple[int, int]
    ) -> Encoding:
        check_objects(boxes, labels, self._token, self.separator.strip())
        gap = " " if self.separator else ""
        out = TextWriter(self._token)
        for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
            if i:
                out.write(self.separator)
            tokens = "".join(self._tokens[k] for k in self.box_to_locations(box, image_size))
            if self.label_first:
                label_span, _, locations = out.write(label), out.write(gap), out.write(tokens)
            else:
                locations, _, label_span = out.write(tokens), out.write(gap), out.write(label)
            out.add(i, locations, label_span)
        return out.encoding()

    def decode(self, text: str, image_size: tuple[int, int]) -> DecodeResult:
        result, starts = DecodeResult([]), token_starts(text, self._token)
        for run in token_runs(text, self._token, self.label_first, self.separator):
            result.n_malformed += int(len(run.tokens) % 4 != 0)  # a truncated or padded run
            for i in range(0, len(run.tokens) - 3, 4):
                group = run.tokens[i : i + 4]
                values = [read_index(m.group(1)) for m in group]
                box = None
                if all(k < self.n_bins for k in values):
                    box = self.locations_to_box(values, image_size)
                if box is None or not self._ordered(box):
                    result.n_malformed += 1
                    continue
                span = object_span(
                    starts,
                    len(result.detections),
                    (group[0].start(), group[-1].end()),
                    run.label_span,
                )
                result.detections.append(Detection(run.label, box))
                result.spans.append(span)
        return result

    def _ordered(self, box: Box) -> bool:
        if self.strict:
            return box[2] > box[0] and box[3] > box[1]
        return box[2] >= box[0] and box[3] >= box[1]


@register_codec("paligemma")
class PaliGemmaCodec(BinCodec):
    """``<loc0000>``..``<loc1023>``: ymin xmin ymax xmax, label; objects joined by `` ; ``."""

    def __init__(self):
        super().__init__(1024, "<loc{:04d}>", "yxyx", "round", label_first=False, separator=" ; ")


@register_codec("florence2")
class Florence2Codec(BinCodec):
    """``<loc_0>``..``<loc_999>``, label then x1 y1 x2 y2, floor bins decoded at their centre.

    The bins are exactly transformers' ``Florence2PostProcessor.quantize`` of boxes
    in the dtype they come in: a float32 tensor or array is divided in float32, as
    transformers divides a float32 tensor, Python numbers in float64, as a float64
    tensor. The two differ on some bin edges (310.4 px of 640 is bin 485 in float32,
    484 in float64), so pass the tensor itself, not its ``tolist()``. The
    decoded box is its ``dequantize`` before the final ``.int()``: transformers
    truncates to whole pixels, loctune keeps the bin centre (up to one pixel
    more exact, and continuous for expected-value decoding). The centre is
    computed in float32 as transformers does (``(k + 0.5) * (size / 1000)``),
    so ``int()`` of a decoded coordinate is transformers' pixel to the bit; in
    float64 a centre such as 2793 comes out 2792.9999999999995 and truncates
    one pixel lower. A label may be followed by several boxes (phrase
    grounding gives one phrase several).
    Both corners in one bin decode to a zero-size box, kept as transformers
    keeps it; reversed corners are malformed.
    """

    def __init__(self):
        super().__init__(
            1000, "<loc_{}>", "xyxy", "floor", label_first=True, separator="", strict=False
        )

    def locations_to_box(
        self, values: Sequence[Sequence[float]], image_size: tuple[int, int]
    ) -> Box:
        w, h = image_size
        bins = np.float32([k for (k,) in check_locations(values, 4, 1)]) + np.float32(0.5)
        per_bin = np.float32([w / self.n_bins, h / self.n_bins] * 2)
        return tuple((bins * per_bin).tolist())


@register_codec("rowcol")
class RowColCodec(BinCodec):
    """loctune's small-VLM form: ``label <rc_top><rc_left><rc_bottom><rc_right>`` on an N grid.

    Row and column index of the upper-left and lower-right corners, floor
    quantisation, bin-centre decoding; both corners may share a row/column.
    """

    def __init__(self, grid: int = 32):
        if grid < 2:
            raise ValueError(f"rowcol grid must be >= 2, got {grid}")
        super().__init__(
            grid, "<rc_{}>", "yxyx", "floor", label_first=True, separator=" ; ", strict=False
        )
        self.grid = grid
