"""Quantisation and a tolerant parser shared by the codecs.

Model output is untrusted: the parser walks the text once, collects runs of
location tokens with the label text next to them, and reports what it could
not use instead of raising.
"""

from __future__ import annotations

import math
import re

_TAG = re.compile(r"<[^<>]*>")


def quantize(v: float, size: float, n: int, mode: str) -> int:
    """Coordinate ``v`` in ``[0, size]`` to a bin in ``[0, n-1]``.

    ``round``: big_vision/PaliGemma, ``round(v / size * (n-1))``;
    ``floor``: Florence-2, ``floor(v / (size / n))``.
    """
    if mode == "round":
        k = round(v / size * (n - 1))
    elif mode == "floor":
        k = math.floor(v / (size / n))
    else:
        raise ValueError(f"quantisation mode must be 'round' or 'floor', got {mode!r}")
    return min(max(int(k), 0), n - 1)


def continuous(v: float, size: float, n: int, mode: str) -> float:
    """Unquantised position in bin units, bin k centred at k: ``round`` of it gives :func:`quantize`."""
    x = v / size * (n - 1) if mode == "round" else v / (size / n) - 0.5
    return min(max(x, 0.0), float(n - 1))


def dequantize(k: float, size: float, n: int, mode: str) -> float:
    """Bin (possibly fractional) back to a coordinate: ``k/(n-1)*size`` or the bin centre."""
    return k / (n - 1) * size if mode == "round" else (k + 0.5) * (size / n)


def token_pattern(fmt: str) -> re.Pattern:
    """Regex with one integer group from a token format such as ``"<loc{:04d}>"``."""
    head, _, tail = fmt.partition("{")
    tail = tail.partition("}")[2]
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))


def clean_label(text: str, sep: str) -> str:
    """Label text without markup tags, separators and surrounding white space."""
    text = _TAG.sub("", text)
    if sep.strip():
        text = text.replace(sep.strip(), " ")
    return " ".join(text.split())


def token_runs(text: str, token: re.Pattern, label_first: bool, sep: str) -> list[tuple[str, list[int]]]:
    """``(label, [token values])`` for each maximal run of location tokens.

    Tokens separated only by white space belong to one run. The label is the
    text before the run (``label_first``) or after it, up to the neighbouring run.
    """
    runs: list[tuple[int, int, list[int]]] = []  # start, end, values
    for m in token.finditer(text):
        if runs and not text[runs[-1][1] : m.start()].strip():
            start, _, values = runs[-1]
            runs[-1] = (start, m.end(), [*values, int(m.group(1))])
        else:
            runs.append((m.start(), m.end(), [int(m.group(1))]))
    out = []
    for i, (start, end, values) in enumerate(runs):
        if label_first:
            lo = runs[i - 1][1] if i else 0
            label = text[lo:start]
        else:
            hi = runs[i + 1][0] if i + 1 < len(runs) else len(text)
            label = text[end:hi]
            if sep.strip() and sep.strip() in label:  # the label ends at the separator
                label = label.split(sep.strip())[0]
        out.append((clean_label(label, sep), values))
    return out
