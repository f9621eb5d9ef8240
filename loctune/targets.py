"""Target distributions over a codec's location tokens.

For each supervised location position the target is a distribution over the
``n_loc`` location tokens only (``[positions, n_loc]``, never over the whole
vocabulary), shaped by the distance between each token and the true one in the
codec's :class:`~loctune.codecs.LocationSpace`: along the axis for 1-D bins,
Euclidean on the grid for patch-index tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loctune.codecs.base import LocationSpace

KINDS = ("one_hot", "distance_inverse", "gaussian", "label_smoothing", "two_bin")


@dataclass(frozen=True)
class TargetSpec:
    """Which distribution, and its shape parameters.

    - ``one_hot``: all mass on the true token.
    - ``distance_inverse``: ``w_k = (1 + d_k / scale) ** -power``, normalised;
      ``power = inf`` is one-hot; tokens farther than ``radius`` get 0.
    - ``gaussian``: ``w_k ∝ exp(-d_k² / (2 sigma²))`` (DIST2Loss, arXiv 2503.02379).
    - ``label_smoothing``: ``(1 - smoothing)`` one-hot plus ``smoothing`` uniform.
    - ``two_bin``: distribution-focal-loss style (GFL, arXiv 2006.04388): mass
      split linearly between the two bins around the unquantised coordinate
      (bilinearly among four cells on a grid).
    """

    kind: str = "one_hot"
    power: float = 2.0
    scale: float = 1.0
    radius: float | None = None
    sigma: float = 1.0
    smoothing: float = 0.1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TargetSpec.kind must be one of {KINDS}, got {self.kind!r}")
        if self.scale <= 0 or self.sigma <= 0 or self.power < 0:
            raise ValueError(f"TargetSpec needs scale > 0, sigma > 0, power >= 0; got {self}")
        if not 0 <= self.smoothing <= 1:
            raise ValueError(f"TargetSpec.smoothing must be in [0, 1], got {self.smoothing}")

    @property
    def needs_continuous(self) -> bool:
        return self.kind == "two_bin"


def make_targets(
    spec: TargetSpec,
    index: torch.Tensor,
    space: LocationSpace,
    continuous: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[P, space.size]`` rows summing to 1 for true locations ``index`` (``[P]``).

    ``continuous`` (``[P, space.dim]``, location units with location k at k) is
    required by ``two_bin`` and ignored otherwise.
    """
    index = index.long().reshape(-1)
    if index.numel() and (index.min() < 0 or index.max() >= space.size):
        raise ValueError(f"location index out of range [0, {space.size}): {index.min()}..{index.max()}")
    n = space.size
    if spec.kind == "one_hot" or (spec.kind == "distance_inverse" and math.isinf(spec.power)):
        return torch.nn.functional.one_hot(index, n).float()
    if spec.kind == "label_smoothing":
        t = torch.full((index.numel(), n), spec.smoothing / n, device=index.device)
        t[torch.arange(index.numel(), device=index.device), index] += 1 - spec.smoothing
        return t
    if spec.kind == "two_bin":
        return _two_bin(index, space, continuous)
    d = space.distance(index)
    if spec.kind == "distance_inverse":
        w = (1 + d / spec.scale).pow(-spec.power)
    else:
        w = torch.exp(-(d**2) / (2 * spec.sigma**2))
    if spec.radius is not None:
        w = torch.where(d <= spec.radius, w, torch.zeros_like(w))
    return w / w.sum(dim=1, keepdim=True)


def _two_bin(index: torch.Tensor, space: LocationSpace, continuous: torch.Tensor | None) -> torch.Tensor:
    if continuous is None:
        raise ValueError("two_bin targets need the unquantised coordinates (continuous=...)")
    c = continuous.reshape(index.numel(), space.dim).float()
    if torch.isnan(c).any():
        raise ValueError("two_bin targets got NaN coordinates at a location position")
    c = c.clamp(0, space.n - 1)
    lo = c.floor().clamp(max=space.n - 2) if space.n > 1 else c.floor()
    frac = c - lo  # weight of the upper neighbour, per axis
    lo = lo.long()
    t = torch.zeros(index.numel(), space.size, device=index.device)
    rows = torch.arange(index.numel(), device=index.device)
    hi = (lo + 1).clamp(max=space.n - 1)
    if space.kind == "bins":
        t[rows, lo[:, 0]] += 1 - frac[:, 0]
        t[rows, hi[:, 0]] += frac[:, 0]
        return t
    for r, wr in ((lo[:, 0], 1 - frac[:, 0]), (hi[:, 0], frac[:, 0])):
        for col, wc in ((lo[:, 1], 1 - frac[:, 1]), (hi[:, 1], frac[:, 1])):
            t[rows, r * space.n + col] += wr * wc
    return t
