"""A non-VLM few-shot baseline: PatchCore-style nearest-neighbour anomaly scores.

Whatever a VLM learns in context must beat this: the patch features of the
``k`` good examples form a memory bank; a query patch's anomaly score is the
distance to its nearest neighbour in the bank; the image score is the largest
patch score, and the defect box is the largest connected region of the score
map above the threshold. The threshold is calibrated on the good examples
alone (leave-one-out), as a few-shot user would have to. It is evaluated under
the same protocol as the VLMs (:mod:`loctune.inspect.evaluation`).

Feature extractors are pluggable (any ``f(images[B, 3, H, W] in [0, 1]) ->
[B, C, h, w]``, e.g. a pretrained backbone, or one wrapped in
``MultiScaleEncoder``), or named: ``"random"`` (:class:`RandomConvFeatures`, the
default, needs no weights) or ``"lite0"`` (the ImageNet-pretrained
EfficientNet-Lite0's stride-8 and stride-16 stages, PatchCore's mid-level
recipe, :class:`~loctune.inspect.features.PretrainedPatchFeatures`).
With ``tiles=(rows, cols)`` every image is cut into crops first (see
``tiling``), each crop is featurised at ``input_size`` and the crop score maps
are stitched back, so small defects are seen at native resolution.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from loctune.inspect.regions import largest_region, mask_box
from loctune.inspect.tiling import tile_grid
from loctune.types import Box

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]
#: named feature extractors, see :func:`patch_extractor`
FEATURES = ("random", "lite0")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> ``[3, H, W]`` float32 in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class RandomConvFeatures(nn.Module):
    """Fixed random convolutions, a feature extractor that needs no pretrained weights.

    Two 3x3 convolutions with seeded Gaussian weights and ReLU run at full
    input resolution, so a 1 px line still changes the activations; both
    layers' responses are average-pooled to ``stride`` and concatenated, then
    averaged over 3x3 neighbouring patches (PatchCore's local aggregation).
    Random filters are a weak but honest stand-in for a pretrained backbone:
    they respond to local colour and edge structure, nothing semantic.
    """

    def __init__(self, channels: int = 32, stride: int = 4, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        for conv in (self.conv1, self.conv2):
            fan_in = conv.weight[0].numel()
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / fan_in**0.5)
                conv.bias.zero_()
        self.stride = stride
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        first = F.relu(self.conv1(images - 0.5))
        second = F.relu(self.conv2(first))
        pooled = [F.avg_pool2d(t, self.stride) for t in (first, second)]
        return F.avg_pool2d(
            torch.cat(pooled, dim=1), 3, stride=1, padding=1, count_include_pad=False
        )


def patch_extractor(name: str, seed: int = 0) -> nn.Module:
    """A named PatchCore feature extractor: ``"random"`` convolutions (seeded by ``seed``)
    or ``"lite0"``, pretrained EfficientNet-Lite0 mid-level features (``seed`` unused)."""
    if name == "random":
        return RandomConvFeatures(seed=seed)
    if name == "lite0":
        from loctune.inspect.features import PretrainedPatchFeatures

        return PretrainedPatchFeatures()
    raise ValueError(f"features: expected one of {FEATURES}, got {name!r}")


def _device_of(extractor: FeatureExtractor) -> torch.device:
    """Where a module extractor's weights are (e.g. a VLM encoder on the GPU); CPU otherwise.

    Features come back to the CPU: the bank and its nearest-neighbour search are small.
    """
    if isinstance(extractor, nn.Module):
        for t in itertools.chain(extractor.parameters(), extractor.buffers()):
            return t.device
    return torch.device("cpu")


@dataclass
class AnomalyPrediction:
    """One image's verdict: score, decision, full-resolution score map, defect box and peak."""

    score: float
    defective: bool
    score_map: torch.Tensor  # [H, W] on the image's own pixels
    box: Box | None  # None when judged good
    peak: tuple[float, float]  # (x, y) of the highest score, pixel centre


class PatchCore:
    """Few-shot nearest-neighbour anomaly detector over patch features.

    ``input_size``: side the whole image (or each crop with ``tiles``) is
    resized to before featurising. ``bank_size``: cap on the memory bank,
    filled by greedy k-centre selection (PatchCore's coreset) to bound the
    cost of the nearest-neighbour search; None keeps every patch.
    ``extractor``: a callable, or a name of :data:`FEATURES`. ``cache``: a dict
    shared by detectors with the same extractor, ``input_size`` and tiling
    that keeps each image's features (keyed by the image object, which it
    holds), so examples reused across many fits are featurised once.
    ``ignore_border``: pixels at the image border that do not count towards the
    image score, the peak or the box (0: all count). Patches at a crop's edge
    see zero padding and structures cut by the border, which few good shots
    cover; on DeepPCB crops they were the commonest false alarms.
    """

    def __init__(
        self,
        extractor: FeatureExtractor | str | None = None,
        input_size: int = 256,
        tiles: tuple[int, int] | None = None,
        overlap: float = 0.0,
        bank_size: int | None = None,
        cache: dict | None = None,
        ignore_border: int = 0,
    ) -> None:
        if extractor is None:
            extractor = RandomConvFeatures()
        elif isinstance(extractor, str):
            extractor = patch_extractor(extractor)
        self.extractor = extractor
        self.cache = cache
        self.ignore_border = ignore_border
        self.input_size = input_size
        self.tiles = tiles
        self.overlap = overlap
        self.bank_size = bank_size
        self.bank: torch.Tensor | None = None
        self.threshold: float | None = None

    def _views(self, image: Image.Image) -> list[tuple[int, int, int, int]]:
        """Pixel boxes of the views featurised for one image: the whole image, or the crops."""
        if self.tiles is None:
            return [(0, 0, image.width, image.height)]
        return [c.box for c in tile_grid(image.size, *self.tiles, self.overlap).crops]

    @torch.no_grad()
    def _features(self, image: Image.Image) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """``[views, C, h, w]`` features of one image and the view boxes."""
        if self.cache is not None:
            hit = self.cache.get(id(image))
            if hit is not None and hit[0] is image:
                return hit[1], hit[2]
        boxes = self._views(image)
        tensor = image_to_tensor(image)
        views = torch.stack(
            [
                F.interpolate(
                    tensor[None, :, y1:y2, x1:x2],
                    size=(self.input_size, self.input_size),
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )[0]
                for x1, y1, x2, y2 in boxes
            ]
        )
        features = self.extractor(views.to(_device_of(self.extractor))).float().cpu()
        if self.cache is not None:
            self.cache[id(image)] = (image, features, boxes)
        return features, boxes

    @staticmethod
    def _patches(features: torch.Tensor) -> torch.Tensor:
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])

    def fit(self, good: Sequence[Image.Image], threshold: float | None = None) -> PatchCore:
        """Build the bank from good images; calibrate the threshold unless one is given.

        Calibration scores each good image against a bank of the others and
        takes the highest score, so no good example would have been flagged.
        It needs at least two good images.
        """
        if not good:
            raise ValueError("fit: need at least one good image")
        if threshold is None and len(good) < 2:
            raise ValueError(
                "fit: calibrating the threshold needs two good images; pass threshold="
            )
        featurised = [self._features(im) for im in good]
        per_image = [self._patches(features) for features, _ in featurised]
        if threshold is None:
            loo = []
            for i, (im, (features, boxes)) in enumerate(zip(good, featurised, strict=True)):
                others = self._select(torch.cat(per_image[:i] + per_image[i + 1 :]))
                loo.append(self._image_score(*self._score_map(im, features, boxes, others)))
            threshold = max(loo)
        self.bank = self._select(torch.cat(per_image))
        self.threshold = threshold
        return self

    def _select(self, patches: torch.Tensor) -> torch.Tensor:
        if self.bank_size is None or len(patches) <= self.bank_size:
            return patches
        return patches[greedy_coreset(patches, self.bank_size)]

    def _score_map(
        self, image: Image.Image, features: torch.Tensor, boxes: list, bank: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch scores ``[views, h, w]`` against ``bank`` and the stitched full-image map."""
        views, _, h, w = features.shape
        patch_scores = _nearest_distance(self._patches(features), bank).reshape(views, h, w)
        score_map = torch.zeros(image.height, image.width)
        for view_scores, (x1, y1, x2, y2) in zip(patch_scores, boxes, strict=True):
            up = F.interpolate(view_scores[None, None], size=(y2 - y1, x2 - x1), mode="bilinear")
            score_map[y1:y2, x1:x2] = torch.maximum(score_map[y1:y2, x1:x2], up[0, 0])
        return patch_scores, score_map

    def _interior(self, score_map: torch.Tensor) -> torch.Tensor:
        """A mask of the pixels that count: all, or those ``ignore_border`` px inside."""
        keep = torch.ones_like(score_map, dtype=torch.bool)
        b = self.ignore_border
        if b:
            h, w = score_map.shape
            if 2 * b >= min(h, w):
                raise ValueError(f"ignore_border={b} px leaves nothing of a {w}x{h} image")
            keep[:b], keep[-b:], keep[:, :b], keep[:, -b:] = False, False, False, False
        return keep

    def _image_score(self, patch_scores: torch.Tensor, score_map: torch.Tensor) -> float:
        if not self.ignore_border:
            return float(patch_scores.max())
        return float(score_map[self._interior(score_map)].max())

    @torch.no_grad()
    def predict(self, image: Image.Image) -> AnomalyPrediction:
        if self.bank is None or self.threshold is None:
            raise RuntimeError("predict: call fit() with good images first")
        features, boxes = self._features(image)
        patch_scores, score_map = self._score_map(image, features, boxes, self.bank)
        score = self._image_score(patch_scores, score_map)
        defective = score > self.threshold
        interior = self._interior(score_map)
        box = None
        if defective:
            box = mask_box(largest_region(((score_map > self.threshold) & interior).numpy()))
        masked = torch.where(interior, score_map, torch.tensor(-torch.inf))
        peak_y, peak_x = divmod(int(masked.argmax()), image.width)
        return AnomalyPrediction(score, defective, score_map, box, (peak_x + 0.5, peak_y + 0.5))


def _nearest_distance(
    queries: torch.Tensor, bank: torch.Tensor, chunk: int = 2**24
) -> torch.Tensor:
    """Euclidean distance of each query row to its nearest bank row, in memory-bounded chunks."""
    rows = max(1, chunk // max(1, len(bank)))
    return torch.cat([torch.cdist(q, bank).min(dim=1).values for q in queries.split(rows)])


def greedy_coreset(points: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of ``size`` rows chosen by greedy k-centre (each pick is farthest from the picks).

    Deterministic: starts from row 0. Covers the feature space with few rows,
    so rare good patches stay in the bank while repeated ones are thinned.
    Squared distances come from the row norms (``|a|^2 - 2 a.b + |b|^2``, one
    matrix-vector product per pick), several times faster than ``cdist``.
    """
    size = min(size, len(points))
    points = points.double()  # the norm expansion cancels; double keeps the picks exact
    norms = (points * points).sum(dim=1)
    chosen = torch.zeros(size, dtype=torch.long)

    def to(i: int) -> torch.Tensor:
        return (norms - 2 * (points @ points[i]) + norms[i]).clamp_(min=0)

    nearest = to(0)
    for i in range(1, size):
        chosen[i] = int(nearest.argmax())
        nearest = torch.minimum(nearest, to(int(chosen[i])))
    return chosen
