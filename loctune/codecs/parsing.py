"""Quantisation, input checks and a tolerant parser shared by the codecs.

Model output is untrusted: the parser walks the text once, collects runs of
location tokens with the label text next to them, and reports what it could
not use instead of raising. Encoding and decoding both say where each object
is written (:class:`~loctune.types.ObjectSpan`), so callers align text with
tokens through the codec instead of re-parsing. Caller input (boxes and labels to encode) is
trusted less kindly: a mistake there raises with the offending field named.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from loctune.types import Box, Encoding, ObjectSpan, Span

_TAG = re.compile(r"<[^<>]*>")
#: digits read as a location number: ASCII only, as ``\d`` also matches Arabic-Indic or fullwidth
#: digits, which no codec writes and ``int()`` would read
DIGITS = "[0-9]+"
#: more digits than any location index has
MAX_DIGITS = 9
#: what :func:`read_index` gives for a longer number: above every valid index, so range checks
#: count the token as malformed
TOO_BIG = 10**MAX_DIGITS


def quantize(v: float, size: float, n: int, mode: str) -> int:
    """Coordinate ``v`` in ``[0, size]`` to a bin in ``[0, n-1]``; outside values clip.

    ``round``: big_vision/PaliGemma, ``round(v / size * (n-1))`` (ties to even,
    as ``tf.round``); ``floor``: Florence-2, ``floor(v / (size / n))``. A torch or
    numpy ``v`` is divided in its own dtype, as transformers divides a tensor of
    boxes: 310.4 px of 640 is bin 485 in float32 but 484.99999999999994 in float64,
    where a Python number is divided.
    """
    if isinstance(v, np.ndarray | np.generic):
        v = torch.from_numpy(np.asarray(v))  # numpy 1.x would divide a float32 in float64
    if mode == "round":
        k = round(v / size * (n - 1))
    elif mode == "floor":
        k = math.floor(v / (size / n))
    else:
        raise ValueError(f"quantisation mode must be 'round' or 'floor', got {mode!r}")
    return min(max(int(k), 0), n - 1)


def continuous(v: float, size: float, n: int, mode: str) -> float:
    """Unquantised position in bin units (bin k centred at k), which rounds to :func:`quantize`."""
    x = v / size * (n - 1) if mode == "round" else v / (size / n) - 0.5
    return min(max(x, 0.0), float(n - 1))


def dequantize(k: float, size: float, n: int, mode: str) -> float:
    """Bin (possibly fractional) back to a coordinate: ``k/(n-1)*size`` or the bin centre."""
    return k / (n - 1) * size if mode == "round" else (k + 0.5) * (size / n)


def token_pattern(fmt: str) -> re.Pattern:
    """Regex with one integer group from a token format such as ``"<loc{:04d}>"``."""
    head, brace, tail = fmt.partition("{")
    if not brace or "}" not in tail:
        raise ValueError(f"token_format must contain one '{{}}' field for the index, got {fmt!r}")
    return re.compile(re.escape(head) + f"({DIGITS})" + re.escape(tail.partition("}")[2]))


def read_index(digits: str) -> int:
    """The number a run of ASCII digits spells, or :data:`TOO_BIG` when it has more digits
    than any location index: ``int()`` of a long run is slow and past 4,300 digits raises."""
    return int(digits) if len(digits) <= MAX_DIGITS else TOO_BIG


def check_objects(
    boxes: Sequence[Box], labels: Sequence[str], token: re.Pattern | None = None, mark: str = ""
) -> None:
    """Raise ``ValueError`` on encode input the codec could not write back readably.

    Boxes must be four numbers each and pair up with labels; a label must not
    contain a location token (``token``), which decoding would read as a box,
    nor the mark separating objects (``mark``), where decoding would cut it.
    """
    if len(boxes) != len(labels):
        raise ValueError(f"encode got {len(boxes)} boxes but {len(labels)} labels")
    for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        if len(box) != 4:
            raise ValueError(f"boxes[{i}] must be (x1, y1, x2, y2), got {box!r}")
        if not isinstance(label, str):
            raise ValueError(f"labels[{i}] must be a string, got {type(label).__name__}")
        if token is not None and token.search(label):
            raise ValueError(f"labels[{i}] = {label!r} contains a location token")
        if mark and mark in label:
            raise ValueError(f"labels[{i}] = {label!r} contains the object separator {mark!r}")


def check_locations(values: Sequence, count: int, dim: int) -> list[tuple[float, ...]]:
    """``values`` as ``count`` tuples of ``dim`` floats; bare numbers are fine when ``dim`` is 1."""
    if len(values) != count:
        raise ValueError(f"locations_to_box needs {count} locations, got {len(values)}")
    out = []
    for v in values:
        t = (float(v),) if dim == 1 and not isinstance(v, Sequence) else tuple(map(float, v))
        if len(t) != dim:
            raise ValueError(f"each location needs {dim} value(s), got {v!r}")
        out.append(t)
    return out


def clean_label(text: str) -> str:
    """Label text without markup tags and with white space collapsed."""
    return " ".join(_TAG.sub("", text).split())


class TokenRun(NamedTuple):
    """One maximal run of location tokens, the label read next to it and its span."""

    label: str
    label_span: Span
    tokens: list[re.Match]

    @property
    def values(self) -> list[int]:
        return [read_index(m.group(1)) for m in self.tokens]


def token_runs(text: str, token: re.Pattern, label_first: bool, sep: str) -> list[TokenRun]:
    """Each maximal run of location tokens with the label text next to it.

    Tokens separated only by white space belong to one run. The label is the
    text before the run (``label_first``) or after it, up to the neighbouring
    run; with a visible separator, only the part next to the run (after the
    last separator before it, or before the first one after it), so garbage
    between objects does not leak into labels.
    """
    runs: list[list[re.Match]] = []
    for m in token.finditer(text):
        if runs and not text[runs[-1][-1].end() : m.start()].strip():
            runs[-1].append(m)
        else:
            runs.append([m])
    mark = sep.strip()
    out = []
    for i, run in enumerate(runs):
        if label_first:
            start, end = runs[i - 1][-1].end() if i else 0, run[0].start()
            cut = text.rfind(mark, start, end) if mark else -1
            start = cut + len(mark) if cut >= 0 else start
        else:
            start, end = run[-1].end(), runs[i + 1][0].start() if i + 1 < len(runs) else len(text)
            cut = text.find(mark, start, end) if mark else -1
            end = cut if cut >= 0 else end
        out.append(TokenRun(clean_label(text[start:end]), (start, end), run))
    return out


def token_starts(text: str, token: re.Pattern | None) -> list[int] | None:
    """Start offsets of every location token in ``text``; None for a plain-text codec."""
    return None if token is None else [m.start() for m in token.finditer(text)]


def object_span(starts: list[int] | None, index: int, locations: Span, label: Span) -> ObjectSpan:
    """:class:`ObjectSpan` of an object, its token positions read off ``token_starts``."""
    if starts is None:
        return ObjectSpan(index, locations, label, range(0))
    first, stop = (bisect.bisect_left(starts, at) for at in locations)
    return ObjectSpan(index, locations, label, range(first, stop))


class TextWriter:
    """Builds a codec's text piece by piece and records where each object went."""

    def __init__(self, token: re.Pattern | None):
        self._token = token
        self._parts: list[str] = []
        self._length = 0
        self._objects: list[tuple[int, Span, Span]] = []

    def write(self, text: str) -> Span:
        """Append ``text``; returns its span."""
        start = self._length
        self._parts.append(text)
        self._length += len(text)
        return start, self._length

    def add(self, index: int, locations: Span, label: Span) -> None:
        """Record object ``index`` as written at these spans."""
        self._objects.append((index, locations, label))

    def encoding(self) -> Encoding:
        text = "".join(self._parts)
        starts = token_starts(text, self._token)
        return Encoding(text, tuple(object_span(starts, *o) for o in self._objects))
