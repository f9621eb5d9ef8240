"""Soft target distributions over the location tokens of a :class:`LocationSpace`.

A target row is a distribution over the ``space.size`` location tokens only,
never over the whole vocabulary: losses put it on the location slice of the
logits. Distances come from :meth:`LocationSpace.distance`, so 1-D bins are
measured along their axis and 2-D patch-index tokens on the grid (on a 10-wide
grid cell 60 is next to 50, 61 and 70, not to 59).

Kinds (``TargetSpec.kind``):

- ``one_hot``: all mass on the true token.
- ``distance_inverse``: ``w_k = (1 + d_k / scale) ** -power``, normalised; heavy
  tails. ``power = inf`` is exactly one-hot.
- ``gaussian``: ``w_k ∝ exp(-d_k**2 / (2 sigma**2))`` (the DIST2Loss form,
  arXiv 2503.02379).
- ``label_smoothing``: ``(1 - smoothing) * one_hot + smoothing / size`` (uniform
  over location tokens).
- ``two_bin``: distribution-focal-loss style (GFL, arXiv 2006.04388): the mass
  is split linearly between the two bins either side of the unquantised
  coordinate, bilinearly among the four surrounding cells on a grid. Needs
  ``continuous`` (``[P, space.dim]``, in location units, ``(row, col)`` on a
  grid, with location k centred at k, as ``Codec.box_to_continuous`` gives).

``radius`` (for the distance kinds) zeroes the weight of tokens farther than
``radius`` from the true one before normalising.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from loctune.codecs.base import LocationSpace

KINDS = ("one_hot", "distance_inverse", "gaussian", "label_smoothing", "two_bin")
# Full [size, size] target tables are cached up to this many tokens (1024 bins or a
# 32x32 grid is 4 MiB); larger spaces compute rows on demand.
_MAX_CACHED_SIZE = 4096


@dataclass(frozen=True)
class TargetSpec:
    """How the target distribution of one location token is built (see module doc)."""

    kind: str = "one_hot"
    power: float = 2.0
    scale: float = 1.0
    radius: float | None = None
    sigma: float = 1.0
    smoothing: float = 0.1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TargetSpec.kind must be one of {KINDS}, got {self.kind!r}")
        checks = {
            "power": self.power >= 0,
            "scale": self.scale > 0,
            "sigma": self.sigma > 0,
            "smoothing": 0.0 <= self.smoothing <= 1.0,
            "radius": self.radius is None or self.radius >= 0,
        }
        expected = {
            "power": ">= 0 (inf for one-hot)",
            "scale": "> 0",
            "sigma": "> 0",
            "smoothing": "in [0, 1]",
            "radius": ">= 0 or None",
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"TargetSpec.{name} must be {expected[name]}, got {getattr(self, name)!r}"
                )

    @property
    def needs_continuous(self) -> bool:
        """Whether :func:`make_targets` needs the unquantised coordinates."""
        return self.kind == "two_bin"


def make_targets(
    spec: TargetSpec,
    index: torch.Tensor,
    space: LocationSpace,
    continuous: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[P, space.size]`` float32 target rows (each sums to 1) for true tokens ``index[P]``.

    ``continuous`` (``[P, space.dim]``) is needed by ``two_bin`` only.
    """
    index = torch.as_tensor(index).long().reshape(-1)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= space.size):
        raise ValueError(
            f"location index out of range [0, {space.size}) for {space}: "
            f"min {int(index.min())}, max {int(index.max())}"
        )
    if spec.kind == "two_bin":
        return _two_bin(index, space, continuous)
    if space.size <= _MAX_CACHED_SIZE:
        return _target_table(spec, space, str(index.device))[index]
    return _target_rows(spec, index, space)


@lru_cache(maxsize=32)
def _target_table(spec: TargetSpec, space: LocationSpace, device: str) -> torch.Tensor:
    """Target of every token, computed once per (spec, space, device); rows are then indexed."""
    return _target_rows(spec, torch.arange(space.size, device=device), space)


def _target_rows(spec: TargetSpec, index: torch.Tensor, space: LocationSpace) -> torch.Tensor:
    one_hot = torch.zeros(index.numel(), space.size, device=index.device)
    one_hot[torch.arange(index.numel(), device=index.device), index] = 1.0
    if spec.kind == "one_hot" or (spec.kind == "distance_inverse" and math.isinf(spec.power)):
        return one_hot
    if spec.kind == "label_smoothing":
        return (1.0 - spec.smoothing) * one_hot + spec.smoothing / space.size
    d = space.distance(index).double()
    # Log-weights, so that a large power underflows to an exact 0 instead of overflowing.
    if spec.kind == "distance_inverse":
        log_w = -spec.power * torch.log1p(d / spec.scale)
    else:
        log_w = -(d**2) / (2.0 * spec.sigma**2)
    if spec.radius is not None:
        log_w = log_w.masked_fill(d > spec.radius, -math.inf)
    return torch.softmax(log_w, dim=1).float()  # the true token (log-weight 0) keeps it finite


def _two_bin(
    index: torch.Tensor, space: LocationSpace, continuous: torch.Tensor | None
) -> torch.Tensor:
    if continuous is None:
        raise ValueError(
            "TargetSpec(kind='two_bin') needs the unquantised coordinates: pass `continuous` "
            f"([positions, {space.dim}] in location units, e.g. from codec.box_to_continuous)"
        )
    x = torch.as_tensor(continuous, device=index.device, dtype=torch.float64)
    x = x.reshape(index.numel(), -1)
    if x.shape[1] != space.dim:
        raise ValueError(
            f"two_bin: continuous must be [{index.numel()}, {space.dim}], got {list(x.shape)}"
        )
    bad = torch.isnan(x).any(dim=1)
    if bad.any():
        raise ValueError(
            f"two_bin: continuous coordinates are NaN at {int(bad.sum())} of {index.numel()} "
            f"location positions (first at position {int(bad.nonzero()[0])}); every location "
            "token needs its unquantised coordinate"
        )
    # Per axis: lower neighbour and the fraction of mass that goes to the upper one.
    x = x.clamp(0, space.n - 1)
    lower = x.floor().clamp(max=max(space.n - 2, 0))
    frac = x - lower
    lower = lower.long()
    upper = (lower + 1).clamp(max=space.n - 1)
    out = torch.zeros(index.numel(), space.size, dtype=torch.float64, device=index.device)
    rows = torch.arange(index.numel(), device=index.device)
    if space.kind == "bins":
        out.index_put_((rows, lower[:, 0]), 1.0 - frac[:, 0], accumulate=True)
        out.index_put_((rows, upper[:, 0]), frac[:, 0], accumulate=True)
        return out.float()
    for r_idx, r_w in ((lower[:, 0], 1.0 - frac[:, 0]), (upper[:, 0], frac[:, 0])):
        for c_idx, c_w in ((lower[:, 1], 1.0 - frac[:, 1]), (upper[:, 1], frac[:, 1])):
            out.index_put_((rows, r_idx * space.n + c_idx), r_w * c_w, accumulate=True)
    return out.float()
