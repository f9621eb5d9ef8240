"""Codecs with two tokens per box, one grid cell per corner: patch index and Kosmos-2.

Cells are numbered row-major on an N x N grid (cell = row * N + col), so the
location space is 2-D: cell 60 on a 10-wide grid is row 6, column 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from loctune.codecs.base import Codec, LocationSpace, register_codec
from loctune.codecs.parsing import clean_label, token_pattern, token_runs
from loctune.types import Box, DecodeResult, Detection


def _cell(row: float, col: float, n: int) -> int:
    r = min(max(int(row), 0), n - 1)
    c = min(max(int(col), 0), n - 1)
    return r * n + c


@register_codec("patch")
class PatchCodec(Codec):
    """loctune's small-VLM form: ``label <patch_ul><patch_lr>`` on an N x N grid.

    Each corner goes to the cell containing it (floor), and is decoded at that
    cell's centre, so a round trip is within half a cell per coordinate. Both
    corners may share a cell (a degenerate box, kept); a lower-right cell above
    or left of the upper-left one is counted as malformed.
    """

    tokens_per_box = 2

    def __init__(self, grid: int = 16, token_format: str = "<patch_{}>", separator: str = " ; "):
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.grid = grid
        self.separator = separator
        self.space = LocationSpace("grid", grid)
        self._pattern = token_pattern(token_format)
        self._tokens = [token_format.format(k) for k in range(grid * grid)]

    @property
    def location_tokens(self) -> list[str]:
        return self._tokens

    def box_to_continuous(self, box: Box, image_size: tuple[int, int]) -> list[tuple[float, ...]]:
        w, h = image_size
        n = self.grid

        def pos(v: float, size: float) -> float:  # cell k is centred at k
            return min(max(v / size * n - 0.5, 0.0), n - 1.0)

        return [(pos(box[1], h), pos(box[0], w)), (pos(box[3], h), pos(box[2], w))]

    def box_to_locations(self, box: Box, image_size: tuple[int, int]) -> list[int]:
        w, h = image_size
        n = self.grid
        return [
            _cell(math.floor(box[1] / h * n), math.floor(box[0] / w * n), n),
            _cell(math.floor(box[3] / h * n), math.floor(box[2] / w * n), n),
        ]

    def locations_to_box(self, values: Sequence[Sequence[float]], image_size: tuple[int, int]) -> Box:
        w, h = image_size
        (r1, c1), (r2, c2) = values
        n = self.grid
        return ((c1 + 0.5) * w / n, (r1 + 0.5) * h / n, (c2 + 0.5) * w / n, (r2 + 0.5) * h / n)

    def encode(self, boxes: Sequence[Box], labels: Sequence[str], image_size: tuple[int, int]) -> str:
        if len(boxes) != len(labels):
            raise ValueError(f"encode got {len(boxes)} boxes but {len(labels)} labels")
        return self.separator.join(
            f"{label} " + "".join(self._tokens[k] for k in self.box_to_locations(box, image_size))
            for box, label in zip(boxes, labels, strict=True)
        )

    def decode(self, text: str, image_size: tuple[int, int]) -> DecodeResult:
        detections, bad = [], 0
        for label, values in token_runs(text, self._pattern, True, self.separator):
            bad += int(len(values) % 2 != 0)
            for i in range(len(values) // 2):
                ul, lr = values[2 * i : 2 * i + 2]
                box = self._cells_to_box(ul, lr, image_size)
                if box is None:
                    bad += 1
                else:
                    detections.append(Detection(label, box))
        return DecodeResult(detections, bad)

    def _cells_to_box(self, ul: int, lr: int, image_size: tuple[int, int]) -> Box | None:
        n = self.grid
        if ul >= n * n or lr >= n * n:
            return None
        (r1, c1), (r2, c2) = divmod(ul, n), divmod(lr, n)
        if r2 < r1 or c2 < c1:
            return None
        return self.locations_to_box([(r1, c1), (r2, c2)], image_size)


_KOSMOS_OBJECT = re.compile(r"(?:<phrase>([^<]*)</phrase>)?\s*<object>(.*?)(?:</object>|$)", re.S)
_KOSMOS_DELIMITER = "</delimiter_of_multi_objects/>"


@register_codec("kosmos2")
class Kosmos2Codec(PatchCodec):
    """Kosmos-2's ``<phrase>label</phrase><object><patch_index_UL><patch_index_LR></object>``.

    Quantisation and decoding follow transformers' ``coordinate_to_patch_index``
    and ``patch_index_to_coordinate``: the upper-left corner floors to its
    cell, the lower-right takes ``ceil(x * N - 1)``; decoding puts corners at
    cell centres, or at cell edges when the two cells share a row or column.
    Several boxes of one phrase are joined by ``</delimiter_of_multi_objects/>``.
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

    def locations_to_box(self, values: Sequence[Sequence[float]], image_size: tuple[int, int]) -> Box:
        (r1, c1), (r2, c2) = values
        w, h = image_size
        n = self.grid
        if r1 == r2 or c1 == c2:  # same row or column: span whole cells, as transformers does
            return (c1 / n * w, r1 / n * h, (c2 + 1) / n * w, (r2 + 1) / n * h)
        return ((c1 + 0.5) / n * w, (r1 + 0.5) / n * h, (c2 + 0.5) / n * w, (r2 + 0.5) / n * h)

    def _cells_to_box(self, ul: int, lr: int, image_size: tuple[int, int]) -> Box | None:
        n = self.grid
        if ul >= n * n or lr >= n * n:
            return None
        return self.locations_to_box([divmod(ul, n), divmod(lr, n)], image_size)

    def encode(self, boxes: Sequence[Box], labels: Sequence[str], image_size: tuple[int, int]) -> str:
        if len(boxes) != len(labels):
            raise ValueError(f"encode got {len(boxes)} boxes but {len(labels)} labels")
        groups: dict[str, list[str]] = {}
        for box, label in zip(boxes, labels, strict=True):
            ul, lr = self.box_to_locations(box, image_size)
            groups.setdefault(label, []).append(self._tokens[ul] + self._tokens[lr])
        return "".join(
            f"<phrase>{label}</phrase><object>{_KOSMOS_DELIMITER.join(pairs)}</object>"
            for label, pairs in groups.items()
        )

    def decode(self, text: str, image_size: tuple[int, int]) -> DecodeResult:
        detections, bad = [], 0
        for m in _KOSMOS_OBJECT.finditer(text):
            label = clean_label(m.group(1) or "", "")
            for pair in m.group(2).split(_KOSMOS_DELIMITER):
                cells = [int(v) for v in self._pattern.findall(pair)]
                box = self._cells_to_box(*cells, image_size) if len(cells) == 2 else None
                if box is None:
                    bad += 1
                else:
                    detections.append(Detection(label, box))
        return DecodeResult(detections, bad)
