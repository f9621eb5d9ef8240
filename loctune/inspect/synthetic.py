"""A built-in few-shot inspection set: textured products with tiny defects.

Eight product types (different textures and structures) are split into
training types and evaluation types, so an evaluation episode always shows a
product never seen in training -- the few-shot setting. Defects (scratch,
crack, spot, missing piece) are one to a few pixels wide on a 256 px image:
at full resolution they are obvious, after a 4x downscale most of their
contrast is averaged away, which is what tiling and multi-scale features are
for. Each defect is near-white or near-black, the polarity drawn per sample
(about half each on every product type), so neither the training nor the
evaluation types can be told defective by brightness alone. Everything is
deterministic in ``seed``; image ``i`` of a product is the same whatever else
is generated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from loctune.inspect.records import inspection_sample
from loctune.inspect.regions import mask_box
from loctune.types import Sample

TRAIN_PRODUCTS = ("wood", "woven_fabric", "pcb", "leather", "carpet")
TEST_PRODUCTS = ("brushed_metal", "tile", "marble")
PRODUCTS = TRAIN_PRODUCTS + TEST_PRODUCTS
DEFECT_TYPES = ("scratch", "crack", "spot", "missing_piece")

Texture = Callable[[np.random.Generator, int], np.ndarray]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = np.arange(size, dtype=np.float32)
    return np.meshgrid(coords, coords)  # x, y


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise in about [-1, 1]: random values on a coarse grid, bicubic-upsampled."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC)) / 2


def _mix(a: Sequence[float], b: Sequence[float], t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of two RGB colours by ``t`` in [0, 1]."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a + (b - a) * np.clip(t, 0, 1)[..., None]


def _wood(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    period = rng.uniform(9, 14)
    warp = 10 * _smooth_noise(rng, size, 4) + 0.05 * x * rng.uniform(-1, 1)
    grain = 0.5 + 0.5 * np.sin(2 * math.pi * (y + warp) / period)
    return _mix((0.62, 0.42, 0.24), (0.40, 0.24, 0.12), grain**2)


def _woven_fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    pitch = int(rng.integers(5, 8))
    over = ((x // pitch + y // pitch) % 2).astype(np.float32)  # warp on top vs weft on top
    across = np.where(
        over > 0, np.sin(math.pi * (y % pitch) / pitch), np.sin(math.pi * (x % pitch) / pitch)
    )
    colour = rng.uniform(0.0, 0.1, 3) + np.array([0.25, 0.35, 0.6], np.float32)
    return colour * (0.55 + 0.45 * across[..., None])


def _pcb(rng: np.random.Generator, size: int) -> np.ndarray:
    copper = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(copper)
    for _ in range(int(rng.integers(8, 13))):
        x0, y0 = rng.integers(0, size, 2).tolist()
        length = int(rng.integers(size // 4, size // 2))
        x1, y1 = (x0 + length, y0) if rng.random() < 0.5 else (x0, y0 + length)
        draw.line([(x0, y0), (x1, y1)], fill=255, width=int(rng.integers(3, 6)))
        for px, py in ((x0, y0), (x1, y1)):
            draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=255)
    return _mix((0.08, 0.35, 0.15), (0.80, 0.62, 0.30), np.asarray(copper) / 255.0)


def _leather(rng: np.random.Generator, size: int) -> np.ndarray:
    pores = Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8))
    pores = np.asarray(pores.filter(ImageFilter.GaussianBlur(1.0)), np.float32) / 255 - 0.5
    shade = 0.5 + 0.25 * _smooth_noise(rng, size, 8) + 0.4 * pores
    return _mix((0.30, 0.14, 0.08), (0.55, 0.30, 0.18), shade)


def _carpet(rng: np.random.Generator, size: int) -> np.ndarray:
    fibres = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    fibres = Image.fromarray(fibres).filter(ImageFilter.GaussianBlur(1.2))
    base = np.array([0.45, 0.15, 0.2], np.float32) + rng.uniform(-0.05, 0.05, 3)
    return base + 0.6 * (np.asarray(fibres, np.float32) / 255.0 - 0.5)


def _brushed_metal(rng: np.random.Generator, size: int) -> np.ndarray:
    x, _ = _grid(size)
    streaks = rng.standard_normal((size, size + 48)).astype(np.float32)
    streaks = np.cumsum(streaks, axis=1)
    streaks = (streaks[:, 48:] - streaks[:, :-48]) / math.sqrt(48)  # box blur along x
    grey = 0.55 + 0.06 * streaks + 0.1 * (x / size - 0.5) * rng.uniform(-1, 1)
    return np.repeat(grey[..., None], 3, axis=2) * np.array([1.0, 1.0, 1.04], np.float32)


def _tile(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    pitch, grout = int(rng.integers(28, 40)), 2
    ox, oy = rng.integers(0, pitch, 2)
    col, row = (x + ox) // pitch, (y + oy) // pitch
    shade = rng.uniform(-0.06, 0.06, (size // pitch + 2, size // pitch + 2)).astype(np.float32)
    tone = 0.8 + shade[row.astype(int), col.astype(int)]
    in_grout = ((x + ox) % pitch < grout) | ((y + oy) % pitch < grout)
    tone = np.where(in_grout, 0.5, tone)
    return tone[..., None] * np.array([0.95, 0.88, 0.75], np.float32)


def _marble(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    angle = rng.uniform(0, math.pi)
    along = x * math.cos(angle) + y * math.sin(angle)
    turbulence = 6 * _smooth_noise(rng, size, 6) + 2 * _smooth_noise(rng, size, 16)
    veins = np.abs(np.sin(2 * math.pi * along / 70 + turbulence)) ** 0.3
    return _mix((0.45, 0.45, 0.5), (0.92, 0.91, 0.9), veins)


TEXTURES: dict[str, Texture] = {
    "wood": _wood,
    "woven_fabric": _woven_fabric,
    "pcb": _pcb,
    "leather": _leather,
    "carpet": _carpet,
    "brushed_metal": _brushed_metal,
    "tile": _tile,
    "marble": _marble,
}


def _defect_mask(defect_type: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A thin or tiny defect shape somewhere away from the border, as a boolean mask."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(24, size - 24, 2)
    angle = rng.uniform(0, 2 * math.pi)
    if defect_type == "scratch":
        half = rng.uniform(8, 18)
        dx, dy = half * math.cos(angle), half * math.sin(angle)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=1)
    elif defect_type == "crack":
        points = [(cx, cy)]
        for _ in range(int(rng.integers(5, 9))):
            angle += rng.uniform(-0.8, 0.8)
            step = rng.uniform(3, 6)
            points.append(
                (points[-1][0] + step * math.cos(angle), points[-1][1] + step * math.sin(angle))
            )
        draw.line(points, fill=255, width=1)
    elif defect_type == "spot":
        r = rng.uniform(1.0, 2.0)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif defect_type == "missing_piece":
        corners = [
            (
                cx + r * math.cos(angle + k * 2 * math.pi / 5),
                cy + r * math.sin(angle + k * 2 * math.pi / 5),
            )
            for k, r in enumerate(rng.uniform(1.2, 2.2, 5))
        ]
        draw.polygon(corners, fill=255)
    else:
        raise ValueError(f"defect_type: expected one of {DEFECT_TYPES}, got {defect_type!r}")
    return np.asarray(mask) > 127


def render_synthetic(
    product: str, index: int, defect_type: str | None = None, seed: int = 0, size: int = 256
) -> tuple[Image.Image, np.ndarray]:
    """Image ``index`` of ``product`` and its defect mask (all False when ``defect_type`` is None).

    The texture depends only on ``(seed, product, index)``, so the good and the
    defective rendering of one index differ exactly by the defect.
    """
    if product not in TEXTURES:
        raise ValueError(f"product: expected one of {sorted(TEXTURES)}, got {product!r}")
    product_id = PRODUCTS.index(product)
    texture = TEXTURES[product](np.random.default_rng([seed, product_id, index]), size)
    texture = np.clip(texture, 0, 1)
    mask = np.zeros((size, size), dtype=bool)
    if defect_type is not None:
        rng = np.random.default_rng([seed, product_id, index, 1])
        mask = _defect_mask(defect_type, rng, size)
        # Polarity is drawn per sample, independent of the product: a defect is near-white or
        # near-black whatever the surface, so on every product type some defects are brighter
        # and some darker than their surroundings, and brightness alone does not mark a defect.
        # (Painting against the product's luminance made every defect of the dark training
        # products bright and every defect of the bright test products dark, a confound a
        # model could learn instead of "differs from the examples".)
        tint = rng.uniform(0.0, 0.1, 3)
        bright = rng.random() < 0.5
        colour = 0.9 + tint if bright else 0.08 + tint
        texture[mask] = 0.1 * texture[mask] + 0.9 * colour
    image = Image.fromarray((np.clip(texture, 0, 1) * 255).round().astype(np.uint8))
    return image, mask


def synthetic_inspection_set(
    split: str = "test",
    n_good: int = 8,
    n_defective: int = 8,
    seed: int = 0,
    size: int = 256,
    products: Sequence[str] | None = None,
) -> list[Sample]:
    """``n_good`` good then ``n_defective`` defective samples for each product of ``split``.

    ``split`` is ``"train"`` (``TRAIN_PRODUCTS``), ``"test"`` (``TEST_PRODUCTS``)
    or ``"all"``; ``products`` overrides it. Defect types cycle through
    ``DEFECT_TYPES``; each defective sample has one box, the bounding box of the
    defect mask, and ``meta["mask"]`` (a boolean array) for pixel-level metrics.
    """
    if products is None:
        splits = {"train": TRAIN_PRODUCTS, "test": TEST_PRODUCTS, "all": PRODUCTS}
        if split not in splits:
            raise ValueError(f"split: expected one of {sorted(splits)}, got {split!r}")
        products = splits[split]
    samples = []
    for product in products:
        for i in range(n_good + n_defective):
            defect_type = None if i < n_good else DEFECT_TYPES[(i - n_good) % len(DEFECT_TYPES)]
            image, mask = render_synthetic(product, i, defect_type, seed, size)
            box = mask_box(mask)
            samples.append(
                inspection_sample(
                    image,
                    product,
                    boxes=[box] if box else [],
                    labels=[defect_type] if box else [],
                    defect_type=defect_type or "good",
                    image_id=f"{product}/{i:03d}",
                    split="train" if product in TRAIN_PRODUCTS else "test",
                    mask=mask,
                )
            )
    return samples
