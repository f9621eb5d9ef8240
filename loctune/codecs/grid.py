"""Codecs with two tokens per box, one grid cell per corner: patch index and Kosmos-2.

Cells are numbered row-major on an N x N grid (cell = row * N + col), so the
location space is 2-D: cell 60 on a 10-wide grid is row 6, column 0.
Locations are ``(row, col)`` pairs, upper-left corner first. A lower-right
cell above or left of the upper-left one is counted as malformed, never
swapped.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence

from loctune.codecs.base import Codec, LocationSpace, register_codec
from loctune.codecs.parsing import (
    TextWriter,
    check_locations,
    check_objects,
    clean_label,
    object_span,
    read_index,
    token_pattern,
    token_runs,
    token_starts,
)
from loctune.types import Box, DecodeResult, Detection, Encoding


def _cell(row: int, col: int, n: int) -> int:
    """Row-major cell index, each coordinate clipped onto the grid."""
    return min(max(row, 0), n - 1) * n + min(max(col, 0), n - 1)


@register_codec("patch")
class PatchCodec(Codec):
    """loctune's small-VLM form: ``label <patch_ul><patch_lr>`` on an N x N grid.

    Objects are joined by ``separator``. Each corner goes to the cell
    containing it (floor) and is decoded at that cell's centre, so a round trip
    is within half a cell per coordinate. Both corners may share a cell (a
    zero-size box, kept).
    """

    tokens_per_box = 2

    def __init__(self, grid: int = 16, token_format: str = "<patch_{}>", separator: str = " ; "):
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.grid = grid
        self.separator = separator
        self.space = LocationSpace("grid", grid)
        self._token = token_pattern(token_format)
        self._tokens = [token_format.format(k) for k in range(grid * grid)]

    @property
    def location_tokens(self) -> list[str]:
        return self._tokens

    def box_to_locations(self, box: Box, image_size: tuple[int, int]) -> list[int]:
        w, h = image_size
        n = self.grid
        return [
            _cell(math.floor(box[1] / h * n), math.floor(box[0] / w * n), n),
            _cell(math.floor(box[3] / h * n), math.floor(box[2] / w * n), n),
        ]

    def box_to_continuous(self, box: Box, image_size: tuple[int, int]) -> list[tuple[float, ...]]:
        w, h = image_size
        n = self.grid

        def pos(v: float, size: float) -> float:  # cell k is centred at k
            return min(max(v / size * n - 0.5, 0.0), n - 1.0)

        return [(pos(box[1], h), pos(box[0], w)), (pos(box[3], h), pos(box[2], w))]

    def locations_to_box(
        self, values: Sequence[Sequence[float]], image_size: tuple[int, int]
    ) -> Box:
        (r1, c1), (r2, c2) = check_locations(values, 2, 2)
        w, h = image_size
        n = self.grid
        return ((c1 + 0.5) * w / n, (r1 + 0.5) * h / n, (c2 + 0.5) * w / n, (r2 + 0.5) * h / n)

    def encode_spans(
        self, boxes: Sequence[Box], labels: Sequence[str], image_size: tuple[int, int]
    ) -> Encoding:
        check_objects(boxes, labels, self._token, self.separator.strip())
        out = TextWriter(self._token)
        for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
            if i:
                out.write(self.separator)
            label_span = out.write(label)
            out.write(" ")
            tokens = "".join(self._tokens[k] for k in self.box_to_locations(box, image_size))
            out.add(i, out.write(tokens), label_span)
        return out.encoding()

    def decode(self, text: str, image_size: tuple[int, int]) -> DecodeResult:
        result, starts = DecodeResult([]), token_starts(text, self._token)
        for run in token_runs(text, self._token, True, self.separator):
            result.n_malformed += len(run.tokens) % 2  # a truncated run
            for i in range(0, len(run.tokens) - 1, 2):
                ul, lr = run.tokens[i : i + 2]
                box = self._cells_to_box(
                    read_index(ul.group(1)), read_index(lr.group(1)), image_size
                )
                if box is None:
                    result.n_malformed += 1
                    continue
                span = object_span(
                    starts, len(result.detections), (ul.start(), lr.end()), run.label_span
                )
                result.detections.append(Detection(run.label, box))
                result.spans.append(span)
        return result

    def _cells_to_box(self, ul: int, lr: int, image_size: tuple[int, int]) -> Box | None:
        """The box of two cell indices, or None when a cell is off the grid or corners reverse."""
        n = self.grid
        if ul >= n * n or lr >= n * n:
            return None
        (r1, c1), (r2, c2) = divmod(ul, n), divmod(lr, n)
        if r2 < r1 or c2 < c1:
            return None
        return self.locations_to_box([(r1, c1), (r2, c2)], image_size)


KOSMOS_DELIMITER = "</delimiter_of_multi_objects/>"
# One object block; a missing </object> ends at the next block or the end of the text.
_KOSMOS_OBJECT = re.compile(
    r"(?:<phrase>(?P<phrase>[^<]*)</phrase>\s*)?<object>(?P<body>.*?)"
    r"(?:</object>|(?=<object>|<phrase>)|$)",
    re.S,
)
_KOSMOS_PHRASE = re.compile(r"<phrase>[^<]*</phrase>")


@register_codec("kosmos2")
class Kosmos2Codec(PatchCodec):
    """Kosmos-2's ``<phrase>label</phrase><object><patch_index_UL><patch_index_LR></object>``.

    Quantisation and decoding are transformers' ``coordinate_to_patch_index``
    and ``patch_index_to_coordinate``: the upper-left corner floors to its
    cell, the lower-right takes ``ceil(x * N - 1)``; decoding puts corners at
    cell centres, or at the outer cell edges when the two cells share a row or
    column. Consecutive objects with the same label share one phrase, their
    boxes joined by ``</delimiter_of_multi_objects/>``; objects stay in the
    given order. Boxes outside the image are clipped onto the grid (transformers
    would write negative or out-of-range indices).

    Decoding differs from transformers only on malformed text: reversed
    corners, cells off the grid, a pair with other than two tokens, a phrase
    without an object and patch tokens outside any object each count as
    malformed; an object without a phrase gets the empty label.
    """

    def __init__(self, grid: int = 32):
        super().__init__(grid, "<patch_index_{:04d}>", separator="")

    def box_to_locations(self, box: Box, image_size: tuple[int, int]) -> list[int]:
        w, h = image_size
        n = self.grid
        x1, y1, x2, y2 = box[0] / w, box[1] / h, box[2] / w, box[3] / h
        return [
            _cell(math.floor(y1 * n), math.floor(x1 * n), n),
            _cell(math.ceil(y2 * n - 1), math.ceil(x2 * n - 1), n),
        ]

    def locations_to_box(
        self, values: Sequence[Sequence[float]], image_size: tuple[int, int]
    ) -> Box:
        (r1, c1), (r2, c2) = check_locations(values, 2, 2)
        cell = 1.0 / self.grid  # computed as transformers does, so results agree to the bit
        if r1 == r2 or c1 == c2:  # one row or column: span whole cells
            x1, y1, x2, y2 = c1 * cell, r1 * cell, c2 * cell + cell, r2 * cell + cell
        else:
            half = cell / 2
            x1, y1, x2, y2 = c1 * cell + half, r1 * cell + half, c2 * cell + half, r2 * cell + half
        w, h = image_size
        return (x1 * w, y1 * h, x2 * w, y2 * h)

    def encode_spans(
        self, boxes: Sequence[Box], labels: Sequence[str], image_size: tuple[int, int]
    ) -> Encoding:
        check_objects(boxes, labels, self._token)
        for i, label in enumerate(labels):
            if "<" in label:
                raise ValueError(f"labels[{i}] = {label!r}: a Kosmos-2 phrase cannot contain '<'")
        out = TextWriter(self._token)
        objects = enumerate(zip(boxes, labels, strict=True))
        for label, group in itertools.groupby(objects, key=lambda obj: obj[1][1]):
            out.write("<phrase>")
            label_span = out.write(label)
            out.write("</phrase><object>")
            for j, (i, (box, _)) in enumerate(group):
                if j:
                    out.write(KOSMOS_DELIMITER)
                tokens = "".join(self._tokens[k] for k in self.box_to_locations(box, image_size))
                out.add(i, out.write(tokens), label_span)
            out.write("</object>")
        return out.encoding()

    def decode(self, text: str, image_size: tuple[int, int]) -> DecodeResult:
        result, last, starts = DecodeResult([]), 0, token_starts(text, self._token)
        for m in _KOSMOS_OBJECT.finditer(text):
            result.n_malformed += self._count_stray(text[last : m.start()])
            last = m.end()
            label = clean_label(m.group("phrase") or "")
            label_span = m.span("phrase") if m.group("phrase") is not None else (m.start(),) * 2
            at = m.start("body")
            for pair in m.group("body").split(KOSMOS_DELIMITER):
                cells = list(self._token.finditer(text, at, at + len(pair)))
                at += len(pair) + len(KOSMOS_DELIMITER)
                box = None
                if len(cells) == 2:
                    box = self._cells_to_box(*(read_index(c.group(1)) for c in cells), image_size)
                if box is None:
                    result.n_malformed += 1
                    continue
                span = object_span(
                    starts, len(result.detections), (cells[0].start(), cells[1].end()), label_span
                )
                result.detections.append(Detection(label, box))
                result.spans.append(span)
        result.n_malformed += self._count_stray(text[last:])
        return result

    def _count_stray(self, text: str) -> int:
        """Phrases without an object, and runs of patch tokens outside any object."""
        return len(_KOSMOS_PHRASE.findall(text)) + len(token_runs(text, self._token, True, ""))
