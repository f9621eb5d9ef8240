"""Multi-scale features from a fixed-size encoder (the S2-Wrapper idea, arXiv 2403.13043).

An encoder trained at ``base_size`` pixels sees a fine defect only if the
image is shown larger, but running it on a larger image changes its token
count and, often, its behaviour. S2 keeps the encoder at its own size: for
scale ``s`` the image is resized to ``s * base_size``, cut into ``s x s``
crops of ``base_size``, each crop is encoded, the crop feature maps are
stitched into one ``s*h x s*w`` map and average-pooled back to ``h x w``.
The maps of all scales are concatenated along channels, so downstream layers
get the base grid with ``len(scales)`` times the channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Encoder = Callable[[torch.Tensor], torch.Tensor]


def _as_map(features: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """Encoder output -> ``[N, C, h, w]``; token sequences ``[N, h*w, C]`` need a square or
    given grid."""
    if features.ndim == 4:
        return features
    if features.ndim != 3:
        raise ValueError(
            "encoder output: expected [N, C, h, w] or [N, h*w, C], got shape "
            f"{tuple(features.shape)}"
        )
    n, tokens, channels = features.shape
    if grid is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(
                f"encoder output: {tokens} tokens is not a square grid; pass token_grid=(h, w) "
                "(and drop any class token before wrapping the encoder)"
            )
        grid = (side, side)
    if grid[0] * grid[1] != tokens:
        raise ValueError(f"token_grid {grid} does not hold {tokens} tokens")
    return features.transpose(1, 2).reshape(n, channels, *grid)


class MultiScaleEncoder(nn.Module):
    """Wrap ``encoder(images[B, 3, base, base])`` into S2 multi-scale features.

    Output has the encoder's own layout (map or token sequence) with the
    channels of every scale concatenated, smallest scale first. ``scales=(1,)``
    is exactly the plain encoder on the image resized to ``base_size``.
    """

    def __init__(
        self,
        encoder: Encoder,
        base_size: int,
        scales: Sequence[int] = (1, 2),
        token_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if not scales or any(int(s) != s or s < 1 for s in scales):
            raise ValueError(f"scales: expected positive integers, got {tuple(scales)}")
        self.encoder = encoder
        self.base_size = base_size
        self.scales = tuple(int(s) for s in scales)
        self.token_grid = token_grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"images: expected [B, 3, H, W], got shape {tuple(images.shape)}")
        batch, base = images.shape[0], self.base_size
        maps, as_tokens = [], False
        for s in self.scales:
            size = s * base
            resized = images
            if images.shape[-2:] != (size, size):
                resized = F.interpolate(
                    images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
                )
            # [B, 3, s*base, s*base] -> [B*s*s, 3, base, base], crops row-major per image
            crops = resized.unflatten(2, (s, base)).unflatten(4, (s, base))
            crops = crops.permute(0, 2, 4, 1, 3, 5).reshape(batch * s * s, -1, base, base)
            out = self.encoder(crops)
            as_tokens = out.ndim == 3
            fmap = _as_map(out, self.token_grid)
            channels, h, w = fmap.shape[1:]
            # [B*s*s, C, h, w] -> [B, C, s*h, s*w], then back to the base grid
            stitched = fmap.reshape(batch, s, s, channels, h, w).permute(0, 3, 1, 4, 2, 5)
            stitched = stitched.reshape(batch, channels, s * h, s * w)
            maps.append(F.adaptive_avg_pool2d(stitched, (h, w)) if s > 1 else stitched)
        merged = torch.cat(maps, dim=1)
        return merged.flatten(2).transpose(1, 2) if as_tokens else merged
