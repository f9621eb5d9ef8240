import hashlib

import numpy as np
import pytest

from loctune.data.synthetic import (
    PALETTE,
    SHAPES,
    SIZES,
    SyntheticConfig,
    make_detection_split,
    make_grounding_split,
    synthetic_vocabulary,
)


def digest(sample) -> str:
    return hashlib.sha1(sample.image.tobytes()).hexdigest()


def parse_attributes(words: list[str]) -> dict[str, str]:
    out = {}
    for w in words:
        key = (
            "color" if w in PALETTE else "size" if w in SIZES else "shape" if w in SHAPES else None
        )
        assert key is not None, f"unexpected word {w!r}"
        out[key] = w
    return out


def centre(obj) -> np.ndarray:
    x1, y1, x2, y2 = obj["box"]
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2])


def referents(prompt: str, objects: list[dict]) -> list[int]:
    """Objects an independent reader of ``prompt`` would accept (plain, margin-free semantics)."""
    words = prompt.split()
    assert words[0] == "the"
    relation_axes = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
    extremes = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1)}
    text = " ".join(words[1:])
    anchor = None
    for rel, axis_sign in relation_axes.items():
        if f" {rel} the " in text:
            text, anchor_text = text.split(f" {rel} the ")
            anchor_attrs = parse_attributes(anchor_text.split())
            anchors = [o for o in objects if all(o[k] == v for k, v in anchor_attrs.items())]
            assert len(anchors) == 1, f"anchor of {prompt!r} is ambiguous"
            anchor = (centre(anchors[0]), axis_sign)
    head = text.split()
    extreme = extremes.get(head[0])
    attrs = parse_attributes(head[1:] if extreme else head)
    found = [i for i, o in enumerate(objects) if all(o[k] == v for k, v in attrs.items())]
    if anchor is not None:
        where, (axis, sign) = anchor
        found = [i for i in found if sign * (centre(objects[i])[axis] - where[axis]) > 0]
    if extreme is not None:
        axis, sign = extreme
        best = max(sign * centre(objects[i])[axis] for i in found)
        found = [i for i in found if sign * centre(objects[i])[axis] == best]
    return found


def test_same_seed_same_data_and_prefix_stable():
    a = make_grounding_split("train", 6, seed=3)
    b = make_grounding_split("train", 6, seed=3)
    c = make_grounding_split("train", 3, seed=3)
    assert [digest(s) for s in a] == [digest(s) for s in b]
    assert [(s.prompt, s.boxes) for s in a] == [(s.prompt, s.boxes) for s in b]
    assert [digest(s) for s in c] == [digest(s) for s in a[:3]]
    other_seed = make_grounding_split("train", 6, seed=4)
    assert {digest(s) for s in other_seed}.isdisjoint(digest(s) for s in a)


@pytest.mark.parametrize("make", [make_grounding_split, make_detection_split])
def test_splits_never_share_images(make):
    hashes = {
        split: {digest(s) for s in make(split, 60, seed=0)}
        for split in ("train", "validation", "test")
    }
    assert all(len(h) == 60 for h in hashes.values())
    assert hashes["train"].isdisjoint(hashes["validation"])
    assert hashes["train"].isdisjoint(hashes["test"])
    assert hashes["validation"].isdisjoint(hashes["test"])
    assert {digest(s) for s in make("val", 5, seed=0)} <= hashes["validation"]


def test_grounding_and_detection_never_share_images():
    g = {digest(s) for s in make_grounding_split("train", 30)}
    d = {digest(s) for s in make_detection_split("train", 30)}
    assert g.isdisjoint(d)


def test_expressions_pick_out_exactly_their_target():
    samples = make_grounding_split("train", 300, seed=1)
    kinds = {s.meta["expression"]["relation"] for s in samples}
    assert None in kinds and kinds & {"left of", "right of", "above", "below"}
    assert kinds & {"leftmost", "rightmost", "topmost", "bottommost"}
    for s in samples:
        objects = s.meta["objects"]
        assert referents(s.prompt, objects) == [s.meta["target"]], s.prompt
        assert s.boxes == [objects[s.meta["target"]]["box"]]
        assert s.labels == [objects[s.meta["target"]]["shape"]]
        assert set(s.prompt.split()) <= set(synthetic_vocabulary())


@pytest.mark.parametrize("image_size", [64, 128])
def test_boxes_inside_image_and_nonempty(image_size):
    samples = make_grounding_split("test", 40, image_size=image_size)
    samples += make_detection_split("test", 40, image_size=image_size)
    for s in samples:
        assert s.image.size == (image_size, image_size) and s.image.mode == "RGB"
        assert 1 <= len(s.boxes) == len(s.labels)
        assert 2 <= len(s.meta["objects"]) <= 5
        for x1, y1, x2, y2 in s.boxes:
            assert 0 <= x1 < x2 <= image_size and 0 <= y1 < y2 <= image_size


def test_detection_returns_every_object_of_the_class():
    for s in make_detection_split("train", 40, seed=2):
        shape = s.prompt.removeprefix("detect ")
        expected = sorted(
            (o["box"] for o in s.meta["objects"] if o["shape"] == shape), key=lambda b: (b[1], b[0])
        )
        assert s.boxes == expected and s.labels == [shape] * len(expected)


def test_box_edges_touch_the_object_colour():
    """Without noise/jitter every edge of the box has a pixel of the target's colour: tight,
    x/y not swapped."""
    cfg = SyntheticConfig(noise_std=0.0, color_jitter=0)
    for s in make_grounding_split("train", 30, config=cfg):
        pixels = np.asarray(s.image).astype(int)
        colour = PALETTE[s.meta["objects"][s.meta["target"]]["color"]]
        x1, y1, x2, y2 = (int(v) for v in s.boxes[0])
        inside = (pixels[y1:y2, x1:x2] == colour).all(-1)
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"image_size": 16}, "image_size"),
        ({"colors": ("red", "teal")}, "colors"),
        ({"min_objects": 4, "max_objects": 3}, "min_objects"),
        ({"p_same_shape": 1.5}, "p_same_shape"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**kwargs)


def test_unknown_split_is_a_clear_error():
    with pytest.raises(ValueError, match="split"):
        make_grounding_split("training", 1)
