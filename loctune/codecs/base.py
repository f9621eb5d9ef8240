"""The codec interface: the only place that knows a model family's box text.

A codec turns pixel boxes into the text a model family writes
(``encode``) and back (``decode``), and exposes the geometry of its location
tokens (:class:`LocationSpace`) so that targets and losses can put distance
back into supervision without knowing the family. Both directions also say
where each object is written (``encode_spans``, ``DecodeResult.spans``), so
collation and evaluation tie tokens to boxes without re-parsing the text.
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loctune.codecs.parsing import read_index
from loctune.types import Box, DecodeResult, Encoding


@dataclass(frozen=True)
class LocationSpace:
    """Geometry of the location tokens of one codec.

    ``kind="bins"``: ``n`` tokens on one axis (token k is bin k); a box uses
    several tokens, each a coordinate along its own axis.
    ``kind="grid"``: ``n x n`` cells numbered row-major (cell = row * n + col);
    distance between tokens is Euclidean on the grid, not |index difference|.
    """

    kind: str
    n: int

    def __post_init__(self):
        if self.kind not in ("bins", "grid"):
            raise ValueError(f"LocationSpace.kind must be 'bins' or 'grid', got {self.kind!r}")
        if self.n < 1:
            raise ValueError(f"LocationSpace.n must be >= 1, got {self.n}")

    @property
    def size(self) -> int:
        """Number of location tokens."""
        return self.n if self.kind == "bins" else self.n * self.n

    @property
    def dim(self) -> int:
        """Dimensions of a location: 1 for bins, 2 (row, col) for a grid."""
        return 1 if self.kind == "bins" else 2

    def coords(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """``[size, dim]`` coordinates of every token (bin index, or (row, col))."""
        k = torch.arange(self.size, device=device)
        if self.kind == "bins":
            return k.to(dtype)[:, None]
        return torch.stack([k // self.n, k % self.n], dim=1).to(dtype)

    def distance(self, index: torch.Tensor) -> torch.Tensor:
        """``[P, size]`` distances from each true token ``index[p]`` to every token."""
        c = self.coords(device=index.device)
        return torch.cdist(c[index.long()], c)


class Codec(ABC):
    """Box <-> text for one model family. Subclasses set the class attributes."""

    name: str = ""
    tokens_per_box: int = 4
    space: LocationSpace | None = None  # None: coordinates written as plain text
    _token: re.Pattern | None = None  # a location token, its index in group 1; None: plain text

    def __new__(cls, *args: Any, **kwargs: Any):
        # the options a codec was built with, however it was built, so that its spec rebuilds it
        codec = super().__new__(cls)
        bound = inspect.signature(cls.__init__).bind(codec, *args, **kwargs)
        codec._options = {k: v for k, v in list(bound.arguments.items())[1:]}
        return codec

    @property
    def spec(self) -> str:
        """``name:key=value,...`` of the options this codec was built with (:func:`get_codec`)."""
        from loctune.config import format_spec

        return format_spec(self.name, self._options)

    @property
    @abstractmethod
    def location_tokens(self) -> list[str]:
        """Token strings of the location vocabulary; index k is location k of ``space``."""

    def encode(
        self, boxes: Sequence[Box], labels: Sequence[str], image_size: tuple[int, int]
    ) -> str:
        """Text for these objects (pixel xyxy boxes on an image of (width, height))."""
        return self.encode_spans(boxes, labels, image_size).text

    @abstractmethod
    def encode_spans(
        self, boxes: Sequence[Box], labels: Sequence[str], image_size: tuple[int, int]
    ) -> Encoding:
        """The text of :meth:`encode` and, per object, where its locations and label are."""

    @abstractmethod
    def decode(self, text: str, image_size: tuple[int, int]) -> DecodeResult:
        """Objects found in ``text``, with their spans; never raises on malformed model output."""

    def location_indices(self, text: str) -> list[int]:
        """Index of every location token in ``text``, in order (what ``ObjectSpan.tokens`` counts).

        A tokenisation of the text holds the same indices at its location ids;
        a generation where they differ was not read the way it was written.
        """
        if self._token is None:
            return []
        return [read_index(m.group(1)) for m in self._token.finditer(text)]

    @abstractmethod
    def box_to_locations(self, box: Box, image_size: tuple[int, int]) -> list[int]:
        """Location indices (into ``location_tokens``) of a box, in text order."""

    @abstractmethod
    def box_to_continuous(self, box: Box, image_size: tuple[int, int]) -> list[tuple[float, ...]]:
        """Unquantised positions, in location units, matching ``box_to_locations``.

        Each entry has ``space.dim`` values on the scale where location k sits at
        k (a bin's or cell's centre), so ``round`` gives the location, up to ties
        at bin edges, whatever the codec's own quantisation. Used by targets that
        split mass between the neighbouring locations (``two_bin``).
        """

    @abstractmethod
    def locations_to_box(
        self, values: Sequence[Sequence[float]], image_size: tuple[int, int]
    ) -> Box:
        """Pixel box from ``tokens_per_box`` locations, each ``space.dim`` values.

        Integer locations give exactly what ``decode`` gives for those tokens;
        fractional ones (an expected value over the location distribution) are
        mapped the same way, continuously.
        """


_REGISTRY: dict[str, Callable[..., Codec]] = {}


def register_codec(name: str):
    """Class decorator adding a codec to the registry under ``name``."""

    def wrap(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def get_codec(spec: str | Mapping[str, Any], **options: Any) -> Codec:
    """Build a registered codec from a spec: ``get_codec("rowcol:grid=16")``,
    ``get_codec("bins:n_bins=1000")`` (the grammar of loss variants, :func:`loctune.config.
    parse_spec`), a mapping ``{"name": "rowcol", "grid": 16}``, or a name plus ``options``.

    The codec's :attr:`~Codec.spec` is the canonical string of what built it, so a saved
    model records its codec as one string that rebuilds it.
    """
    from loctune.config import coerce_options, parse_spec

    if isinstance(spec, Mapping):
        opts = dict(spec)
        name = opts.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"codec spec {dict(spec)!r} needs a 'name'")
    else:
        name, opts = parse_spec(spec, "codec spec")
    opts |= options
    if name not in _REGISTRY:
        raise KeyError(f"unknown codec {name!r}; available: {sorted(_REGISTRY)}")
    opts = coerce_options(_REGISTRY[name], opts, f"codec {name!r}")
    try:
        codec = _REGISTRY[name](**opts)
    except TypeError as err:
        params = [p for p in inspect.signature(_REGISTRY[name]).parameters if p != "self"]
        raise ValueError(
            f"codec {name!r}: {err}; its options: {', '.join(params) or 'none'}"
        ) from None
    return codec


def list_codecs() -> list[str]:
    return sorted(_REGISTRY)
