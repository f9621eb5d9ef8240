"""Synthetic referring-expression and detection scenes, generated from a seed.

Each scene holds a few coloured shapes on a noisy, cluttered background; shapes
may partly hide each other. A grounding sample names one object with an
expression that matches it and no other object ("the small red triangle",
"the circle left of the blue square", "the leftmost green star"); a detection
sample asks for every object of one shape ("detect circle").

Sample ``i`` of a split is drawn from its own random stream, keyed by
(seed, task, split, i). Hence the same arguments give the same data, splits
never share a stream (so never share an image), and ``n=100`` is a prefix of
``n=1000`` — nested training sets for data-efficiency curves come for free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from loctune.types import Box, Sample

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 45, 45),
    "green": (50, 165, 70),
    "blue": (45, 85, 215),
    "yellow": (225, 205, 50),
    "purple": (145, 65, 185),
    "orange": (235, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
#: shapes no default scene and no pretraining source draws: the held-out synthetic domain's
NOVEL_SHAPES: tuple[str, ...] = ("hexagon", "diamond", "ring")
SIZES: tuple[str, ...] = ("small", "large")
# relation word -> (box-centre axis, sign): "left of a" means x < x(a) - margin.
RELATIONS: dict[str, tuple[int, int]] = {
    "left of": (0, -1),
    "right of": (0, 1),
    "above": (1, -1),
    "below": (1, 1),
}
EXTREMES: dict[str, tuple[int, int]] = {
    "leftmost": (0, -1),
    "rightmost": (0, 1),
    "topmost": (1, -1),
    "bottommost": (1, 1),
}
SPLITS: dict[str, int] = {"train": 0, "validation": 1, "val": 1, "test": 2}
#: task name -> the id mixed into a scene's seed, so tasks draw different scenes
TASK_IDS: dict[str, int] = {"grounding": 0, "detection": 1, "caption": 2, "counting": 3}
#: tasks whose answer is plain text (``meta["answer"]``), not boxes: pretraining only
TEXT_TASKS: tuple[str, ...] = ("caption", "counting")
# "grain" (coloured multi-scale noise, like stone or fabric) is drawn by no pretraining source
BACKGROUNDS: tuple[str, ...] = ("gradient", "texture", "grain")
_MAX_SCENE_ATTEMPTS = 200
_MAX_PLACEMENT_ATTEMPTS = 60


@dataclass(frozen=True)
class SyntheticConfig:
    """How scenes look. Radii are fractions of the image side (half the shape's extent)."""

    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 5
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    small_radius: tuple[float, float] = (0.07, 0.10)
    large_radius: tuple[float, float] = (0.14, 0.19)
    p_same_shape: float = 0.4  # chance that a distractor copies the target's shape
    p_same_color: float = 0.4  # ... and its colour (both: a twin, needing a relation)
    min_visible: float = 0.65  # every object keeps at least this fraction of its pixels
    max_rotation: float = 20.0  # degrees, for all shapes but the circle
    color_jitter: int = 20  # per-channel jitter of an object's colour, 0-255 units
    noise_std: float = 6.0  # Gaussian pixel noise, 0-255 units
    max_clutter: int = 6  # grey strokes and dots drawn under the objects
    relation_margin: float = 0.08  # fraction of the image a relation must hold by
    # "gradient": a low-saturation ramp; "texture": also stripes, checks or blotches of
    # random scale and contrast, so that object edges are not the only edges in the image
    backgrounds: tuple[str, ...] = ("gradient",)

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f"SyntheticConfig.image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                "SyntheticConfig needs 1 <= min_objects <= max_objects, got "
                f"{self.min_objects}, {self.max_objects}"
            )
        for name, values, known in (
            ("shapes", self.shapes, SHAPES + NOVEL_SHAPES),
            ("colors", self.colors, PALETTE),
            ("backgrounds", self.backgrounds, BACKGROUNDS),
        ):
            unknown = [v for v in values if v not in known]
            if unknown or not values:
                raise ValueError(
                    f"SyntheticConfig.{name} must be a non-empty subset of {sorted(known)}, "
                    f"got {list(values)}"
                )
        for name in ("p_same_shape", "p_same_color", "min_visible", "relation_margin"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"SyntheticConfig.{name} must be in [0, 1], got {getattr(self, name)}"
                )
        for name in ("small_radius", "large_radius"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi < 0.5:
                raise ValueError(
                    f"SyntheticConfig.{name} must satisfy 0 < lo <= hi < 0.5, got {(lo, hi)}"
                )


#: the held-out synthetic domain of the transfer study: shapes and a background that no
#: pretraining source draws (``named_set("synthetic-novel")``), every colour
NOVEL_DOMAIN = SyntheticConfig(
    image_size=128, min_objects=1, max_objects=4, shapes=NOVEL_SHAPES, colors=tuple(PALETTE),
    backgrounds=("grain",),
)


@dataclass
class SceneObject:
    """One drawn shape; ``box`` is the tight pixel box of its visible pixels."""

    shape: str
    color: str
    size: str
    center: tuple[float, float] = (0.0, 0.0)
    radius: float = 0.0
    rotation: float = 0.0
    box: Box = (0.0, 0.0, 0.0, 0.0)
    visible: float = 1.0
    attributes: dict[str, str] = field(init=False)

    def __post_init__(self):
        self.attributes = {"shape": self.shape, "color": self.color, "size": self.size}

    @property
    def box_center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    def as_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "box": self.box,
            "visible": round(self.visible, 3),
        }


def synthetic_vocabulary(config: SyntheticConfig | None = None) -> list[str]:
    """Every word a prompt or label of these scenes can contain (for word tokenizers)."""
    config = config or SyntheticConfig()
    words = ["the", "detect", "caption", "count", "a", "and"]
    words += [*SIZES, *config.colors, *config.shapes]
    for phrase in [*RELATIONS, *EXTREMES]:
        words += phrase.split()
    return sorted(set(words))


# ---------------------------------------------------------------------------
# Drawing


def _polygon(
    shape: str, cx: float, cy: float, r: float, rotation: float
) -> list[tuple[float, float]]:
    """Vertices of a shape whose half-extent is about ``r``; angles in degrees, y down."""
    if shape == "square":
        polar = [(1.2 * r, 45 + 90 * k) for k in range(4)]
    elif shape == "triangle":
        polar = [(1.15 * r, -90 + 120 * k) for k in range(3)]
    elif shape == "star":
        polar = [(1.1 * r * (1.0 if k % 2 == 0 else 0.45), -90 + 36 * k) for k in range(10)]
    elif shape == "hexagon":
        polar = [(1.05 * r, 30 + 60 * k) for k in range(6)]
    elif shape == "diamond":
        polar = [(1.3 * r, -90), (0.75 * r, 0), (1.3 * r, 90), (0.75 * r, 180)]
    elif shape == "cross":
        a, w = r, 0.35 * r  # arm length and half-width
        pts = [(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a)]
        pts += [(-x, -y) for x, y in pts]
        polar = [(math.hypot(x, y), math.degrees(math.atan2(y, x))) for x, y in pts]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return [
        (
            cx + rho * math.cos(math.radians(t + rotation)),
            cy + rho * math.sin(math.radians(t + rotation)),
        )
        for rho, t in polar
    ]


def _shape_mask(obj: SceneObject, size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = obj.center
    if obj.shape in ("circle", "ring"):
        r = obj.radius
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if obj.shape == "ring":
            hole = 0.55 * r
            draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, obj.radius, obj.rotation), fill=255)
    return np.asarray(canvas) > 0


def _background(rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
    """Low-saturation gradient plus grey clutter, so that colour alone is not background."""
    s = cfg.image_size
    base = rng.uniform(50, 190) + rng.uniform(-20, 20, size=3)
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-9
    yy, xx = np.mgrid[0:s, 0:s] / s - 0.5
    ramp = (xx * direction[0] + yy * direction[1])[..., None] * rng.uniform(0, 60)
    pixels = base + ramp
    # one background kind draws nothing, so the default scenes are those of earlier versions
    kind = cfg.backgrounds[0] if len(cfg.backgrounds) == 1 else str(rng.choice(cfg.backgrounds))
    if kind == "texture":
        pixels = pixels + _texture(rng, s)[..., None] * rng.uniform(15, 45)
    elif kind == "grain":
        pixels = pixels + _grain(rng, s) * rng.uniform(20, 50)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, cfg.max_clutter + 1))):
        grey = int(rng.uniform(30, 225))
        x, y = rng.uniform(0, s, size=2)
        if rng.random() < 0.5:
            dx, dy = rng.normal(scale=s / 4, size=2)
            draw.line([x, y, x + dx, y + dy], fill=(grey,) * 3, width=int(rng.integers(1, 3)))
        else:
            d = rng.uniform(1, s / 20)
            draw.ellipse([x - d, y - d, x + d, y + d], fill=(grey,) * 3)
    return np.asarray(img, dtype=np.float64)


def _texture(rng: np.random.Generator, s: int) -> np.ndarray:
    """``[s, s]`` pattern in [-1, 1]: oriented stripes, a checkerboard or smooth blotches."""
    yy, xx = np.mgrid[0:s, 0:s] / s
    kind = int(rng.integers(3))
    if kind == 0:
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.03, 0.2)
        return np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    if kind == 1:
        cells = int(rng.integers(3, 12))
        return ((np.floor(xx * cells) + np.floor(yy * cells)) % 2) * 2.0 - 1
    coarse = rng.uniform(-1, 1, size=(int(rng.integers(3, 8)),) * 2)
    return np.asarray(
        Image.fromarray(((coarse + 1) * 127.5).astype(np.uint8)).resize(
            (s, s), Image.Resampling.BICUBIC
        ),
        dtype=np.float64,
    ) / 127.5 - 1


def _grain(rng: np.random.Generator, s: int) -> np.ndarray:
    """``[s, s, 3]`` coloured noise in about [-1, 1], summed over four scales (stone, fabric)."""
    out = np.zeros((s, s, 3))
    for octave in range(4):
        cells = 4 * 2**octave
        coarse = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
        layer = np.asarray(Image.fromarray(coarse, "RGB").resize((s, s), Image.Resampling.BICUBIC),
                           dtype=np.float64)
        out += (layer / 127.5 - 1) / 2**octave
    return out / 1.875


def _render(
    objects: list[SceneObject],
    masks: list[np.ndarray],
    rng: np.random.Generator,
    cfg: SyntheticConfig,
) -> Image.Image:
    pixels = _background(rng, cfg)
    for obj, mask in zip(objects, masks, strict=True):
        color = np.asarray(PALETTE[obj.color], dtype=np.float64)
        color = color + rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, size=3)
        pixels[mask] = color
    pixels += rng.normal(scale=cfg.noise_std, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def _place(
    objects: list[SceneObject], rng: np.random.Generator, cfg: SyntheticConfig
) -> list[np.ndarray] | None:
    """Give each object (in drawing order) a pose keeping every object mostly visible.

    Returns the full (unoccluded) masks, or None when no valid layout was found.
    """
    s = cfg.image_size
    masks: list[np.ndarray] = []
    for obj in objects:
        lo, hi = cfg.small_radius if obj.size == "small" else cfg.large_radius
        for _ in range(_MAX_PLACEMENT_ATTEMPTS):
            obj.radius = float(rng.uniform(lo, hi) * s)
            obj.rotation = float(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
            margin = 1.2 * obj.radius + 1
            obj.center = (
                float(rng.uniform(margin, s - margin)),
                float(rng.uniform(margin, s - margin)),
            )
            mask = _shape_mask(obj, s)
            # Same-coloured shapes must not touch: merged, they would read as one blob.
            halo = _dilate(mask)
            if all(
                _visible_fraction(m, masks[i + 1 :] + [mask]) >= cfg.min_visible
                and not (objects[i].color == obj.color and (halo & m).any())
                for i, m in enumerate(masks)
            ):
                masks.append(mask)
                break
        else:
            return None
    return masks


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a mask by one pixel in the 8-neighbourhood."""
    out = mask.copy()
    padded = np.pad(mask, 1)
    h, w = mask.shape
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def _visible_fraction(mask: np.ndarray, above: list[np.ndarray]) -> float:
    total = mask.sum()
    if total == 0:
        return 0.0
    covered = np.logical_or.reduce(above) if above else np.zeros_like(mask)
    return float((mask & ~covered).sum() / total)


def _finish_boxes(objects: list[SceneObject], masks: list[np.ndarray]) -> None:
    """Set each object's box to the tight box of its pixels not hidden by later objects."""
    for i, obj in enumerate(objects):
        above = masks[i + 1 :]
        visible = masks[i] & ~np.logical_or.reduce(above) if above else masks[i]
        ys, xs = np.nonzero(visible)
        obj.box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        obj.visible = float(visible.sum() / masks[i].sum())


def _sample_attributes(
    rng: np.random.Generator, cfg: SyntheticConfig, like: SceneObject | None
) -> SceneObject:
    """Random attributes; with ``like``, copy its shape/colour with the configured chances."""
    shape = str(rng.choice(cfg.shapes))
    color = str(rng.choice(cfg.colors))
    if like is not None and rng.random() < cfg.p_same_shape:
        shape = like.shape
    if like is not None and rng.random() < cfg.p_same_color:
        color = like.color
    return SceneObject(shape=shape, color=color, size=str(rng.choice(SIZES)))


# ---------------------------------------------------------------------------
# Referring expressions


def _matches(obj: SceneObject, attributes: dict[str, str]) -> bool:
    return all(obj.attributes[k] == v for k, v in attributes.items())


def _phrase(attributes: dict[str, str]) -> str:
    return " ".join(attributes[k] for k in ("size", "color", "shape") if k in attributes)


def _unique_descriptions(index: int, objects: list[SceneObject]) -> list[dict[str, str]]:
    """Attribute sets (always naming the shape) that match object ``index`` and no other."""
    obj = objects[index]
    out = []
    for extra in ((), ("color",), ("size",), ("size", "color")):
        attributes = {k: obj.attributes[k] for k in ("shape", *extra)}
        if sum(_matches(o, attributes) for o in objects) == 1:
            out.append(attributes)
    return out


def _describe(
    target: int, objects: list[SceneObject], rng: np.random.Generator, cfg: SyntheticConfig
) -> tuple[str, dict[str, Any]] | None:
    """A unique expression for ``objects[target]`` and its structure, or None if none exists.

    Attributes are used when they suffice; otherwise a spatial relation picks the
    target out of its look-alikes, either as an extreme among them or relative to
    an anchor object that attributes alone identify.
    """
    own = _unique_descriptions(target, objects)
    if own:
        attributes = own[int(rng.integers(len(own)))]
        return f"the {_phrase(attributes)}", {"attributes": attributes, "relation": None}

    margin = cfg.relation_margin * cfg.image_size
    attributes = dict(objects[target].attributes)
    twins = [o for i, o in enumerate(objects) if i != target and _matches(o, attributes)]
    here = objects[target].box_center
    candidates: list[tuple[str, dict[str, Any]]] = []
    for word, (axis, sign) in EXTREMES.items():
        if all(sign * (here[axis] - t.box_center[axis]) >= margin for t in twins):
            candidates.append(
                (f"the {word} {_phrase(attributes)}", {"attributes": attributes, "relation": word})
            )
    for a, anchor in enumerate(objects):
        anchor_descriptions = _unique_descriptions(a, objects)
        if a == target or not anchor_descriptions:
            continue
        anchor_attributes = anchor_descriptions[int(rng.integers(len(anchor_descriptions)))]
        there = anchor.box_center
        for word, (axis, sign) in RELATIONS.items():
            holds = sign * (here[axis] - there[axis]) >= margin
            twins_fail = all(sign * (t.box_center[axis] - there[axis]) <= 0 for t in twins)
            if holds and twins_fail:
                candidates.append(
                    (
                        f"the {_phrase(attributes)} {word} the {_phrase(anchor_attributes)}",
                        {
                            "attributes": attributes,
                            "relation": word,
                            "anchor": a,
                            "anchor_attributes": anchor_attributes,
                        },
                    )
                )
    if not candidates:
        return None
    return candidates[int(rng.integers(len(candidates)))]


# ---------------------------------------------------------------------------
# Samples


def _scene(
    rng: np.random.Generator, cfg: SyntheticConfig, grounding: bool
) -> tuple[Image.Image, list[SceneObject], int, tuple[str, dict[str, Any]] | None]:
    """Draw until a valid scene (and, for grounding, a unique expression) comes out."""
    for _ in range(_MAX_SCENE_ATTEMPTS):
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        first = _sample_attributes(rng, cfg, None)
        objects = [first] + [
            _sample_attributes(rng, cfg, first if grounding else None) for _ in range(n - 1)
        ]
        order = rng.permutation(n)  # the target is not always drawn on top
        objects = [objects[i] for i in order]
        target = int(np.flatnonzero(order == 0)[0])
        masks = _place(objects, rng, cfg)
        if masks is None:
            continue
        _finish_boxes(objects, masks)
        expression = _describe(target, objects, rng, cfg) if grounding else None
        if grounding and expression is None:
            continue
        return _render(objects, masks, rng, cfg), objects, target, expression
    raise RuntimeError(
        f"could not build a valid scene in {_MAX_SCENE_ATTEMPTS} attempts; the SyntheticConfig "
        "is too crowded (fewer/smaller objects or a lower min_visible help)"
    )


def _stream(seed: int, task: str, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    key = (TASK_IDS[task], SPLITS[split], index)
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=key))


def make_sample(
    task: str, split: str, index: int, seed: int = 0, config: SyntheticConfig | None = None
) -> Sample:
    """Sample ``index`` of a split: the same arguments always give the same sample."""
    if task not in TASK_IDS:
        raise ValueError(f"task must be one of {sorted(TASK_IDS)}, got {task!r}")
    cfg = config or SyntheticConfig()
    rng = _stream(seed, task, split, index)
    image, objects, target, expression = _scene(rng, cfg, grounding=task == "grounding")
    canonical_split = "validation" if split == "val" else split
    meta: dict[str, Any] = {"objects": [o.as_dict() for o in objects], "split": canonical_split}
    image_id = f"synthetic-{task}-{canonical_split}-{seed}-{index}"
    if expression is not None:
        text, structure = expression
        meta.update(target=target, expression=structure)
        return Sample(
            image=image,
            prompt=text,
            boxes=[objects[target].box],
            labels=[objects[target].shape],
            task=task,
            image_id=image_id,
            meta=meta,
        )
    if task == "caption":
        # objects left to right, each by its full phrase: what projector alignment reads
        ordered = sorted(objects, key=lambda o: o.box_center[0])
        answer = " and ".join(f"a {_phrase(o.attributes)}" for o in ordered)
        return Sample(image=image, prompt="caption", boxes=[], labels=[], task=task,
                      image_id=image_id, meta={**meta, "answer": answer})
    wanted = objects[int(rng.integers(len(objects)))].shape
    if task == "counting":
        count = sum(o.shape == wanted for o in objects)
        return Sample(image=image, prompt=f"count {wanted}", boxes=[], labels=[], task=task,
                      image_id=image_id, meta={**meta, "answer": str(count)})
    found = sorted((o.box for o in objects if o.shape == wanted), key=lambda b: (b[1], b[0]))
    return Sample(
        image=image,
        prompt=f"detect {wanted}",
        boxes=found,
        labels=[wanted] * len(found),
        task=task,
        image_id=image_id,
        meta=meta,
    )


def make_split(
    task: str,
    split: str,
    n: int,
    seed: int = 0,
    config: SyntheticConfig | None = None,
    **overrides: Any,
) -> list[Sample]:
    """``n`` samples of ``task`` for ``split``; keyword overrides patch ``config``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    cfg = replace(config or SyntheticConfig(), **overrides)
    return [make_sample(task, split, i, seed, cfg) for i in range(n)]


def make_grounding_split(
    split: str, n: int, seed: int = 0, config: SyntheticConfig | None = None, **overrides: Any
) -> list[Sample]:
    """Referring-expression samples, one box each, e.g. ``make_grounding_split("train", 1000)``."""
    return make_split("grounding", split, n, seed, config, **overrides)


def make_detection_split(
    split: str, n: int, seed: int = 0, config: SyntheticConfig | None = None, **overrides: Any
) -> list[Sample]:
    """Detection samples: all objects of one shape, prompt ``"detect <shape>"``."""
    return make_split("detection", split, n, seed, config, **overrides)
