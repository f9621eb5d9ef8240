"""A pretrained timm CNN as the small VLM's vision encoder, with a cache of its features.

The backbone's chosen stages are brought to the grid of the finest one (nearest
upsampling) and concatenated, so a stride-16 map keeps the detail a stride-32
map has lost while the stride-32 map adds context: the multi-scale,
multi-layer features of the research plan, as one switch (``vision_stages``).

A frozen backbone gives the same features for the same pixels every step, and on
a CPU it costs more than the rest of the model, so its outputs are cached per
image. The key is a digest of the pre-processed pixels, so a change of image,
size or normalisation misses, plus the version counters of the backbone's
tensors, so loading or training weights invalidates the cache, and the autocast dtype.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loctune.models.backbones import create_backbone


class FeatureCache:
    """Least-recently-used map from (pixels digest, weights version) to one image's tokens."""

    def __init__(self, max_mb: int):
        self.max_bytes = max_mb * 2**20
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def __call__(
        self, pixels: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor], version: int
    ) -> torch.Tensor:
        """``encode(pixels)``, computed only for the images not cached under ``version``."""
        keys = [(_digest(row), version) for row in pixels]
        missing = [i for i, key in enumerate(keys) if key not in self.entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        rows: list[torch.Tensor] = [pixels.new_empty(0)] * len(keys)
        for i, key in enumerate(keys):
            if key in self.entries:
                self.entries.move_to_end(key)
                rows[i] = self.entries[key]
        if missing:
            with torch.no_grad():
                fresh = encode(pixels[missing])
            for i, features in zip(missing, fresh, strict=True):
                self._put(keys[i], features)
                rows[i] = self.entries.get(keys[i], features.float())
        return torch.stack(rows)

    def _put(self, key: tuple, features: torch.Tensor) -> None:
        # a copy, not a view into the batch; float32 whatever autocast computed it in, so a
        # later call without autocast gets what it would have computed itself
        features = features.detach().float().clone()
        self.entries[key] = features
        self.bytes += features.numel() * features.element_size()
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def _digest(pixels: torch.Tensor) -> bytes:
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).digest() + repr(tuple(pixels.shape)).encode()


class TimmEncoder(nn.Module):
    """Image ``[N, 3, H, W]`` -> ``[N, grid*grid, width]`` tokens of a timm CNN (row-major).

    Batch-norm statistics stay the pretrained ones in training mode too: a few
    labelled images in batches of 8 would otherwise overwrite ImageNet's
    statistics with noisy ones (the affine parameters still train when unfrozen).
    """

    def __init__(self, cfg, pretrained: bool):
        super().__init__()
        self.backbone = create_backbone(
            cfg.vision_backbone,
            pretrained=cfg.vision_pretrained if pretrained else "none",
            out_indices=tuple(cfg.vision_stages),
        )
        reductions = list(self.backbone.feature_info.reduction())
        self.finest = reductions.index(min(reductions))
        if min(reductions) != cfg.patch_size:
            raise ValueError(
                f"SmallVLMConfig.patch_size ({cfg.patch_size}) must be the stride of the finest "
                f"vision stage: stages {list(cfg.vision_stages)} of {cfg.vision_backbone} have "
                f"strides {reductions}"
            )
        self.width = sum(self.backbone.feature_info.channels())
        self.cache = FeatureCache(cfg.vision_cache_mb)
        self.backbone.eval()

    def train(self, mode: bool = True) -> TimmEncoder:
        super().train(mode)
        self.backbone.eval()
        return self

    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.cache.enabled and self.frozen():
            flat = self.cache(pixel_values, self._stage_maps, self._weights_version())
        else:
            flat = self._stage_maps(pixel_values)
        return self._merge(flat, pixel_values.shape[-2:])

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tokens, computed (never from the cache)."""
        return self._merge(self._stage_maps(pixel_values), pixel_values.shape[-2:])

    def _stage_maps(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, D]``: every chosen stage's map, flattened (cached as is: 2.3x smaller than
        the merged tokens when a stride-32 map is upsampled onto a stride-16 grid)."""
        return torch.cat([m.flatten(1) for m in self.backbone(pixel_values)], dim=1)

    def _merge(self, flat: torch.Tensor, image_hw: torch.Size) -> torch.Tensor:
        info = self.backbone.feature_info
        shapes = [
            (c, -(-image_hw[0] // r), -(-image_hw[1] // r))  # ceil: "same" padding
            for c, r in zip(info.channels(), info.reduction(), strict=True)
        ]
        sizes = [c * h * w for c, h, w in shapes]
        maps = [
            part.view(-1, *shape) for part, shape in zip(flat.split(sizes, 1), shapes, strict=True)
        ]
        size = maps[self.finest].shape[-2:]
        merged = torch.cat(
            [
                m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="nearest")
                for m in maps
            ],
            dim=1,
        )
        return merged.flatten(2).transpose(1, 2)

    def _weights_version(self) -> int:
        """Changes when any backbone tensor is replaced or written, or autocast is switched
        (features computed in bf16 are not the float32 ones)."""
        tensors = [*self.backbone.parameters(), *self.backbone.buffers()]
        device = tensors[0].device.type
        precision = (
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        )
        return hash((precision, *((t.data_ptr(), t._version) for t in tensors)))
