"""Codecs: round trips, consistency of the location methods, malformed output, formats."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loctune.codecs import (
    BinCodec,
    Kosmos2Codec,
    PatchCodec,
    Qwen2VLCodec,
    get_codec,
    list_codecs,
)

CODECS = {
    "paligemma": get_codec("paligemma"),
    "florence2": get_codec("florence2"),
    "kosmos2": get_codec("kosmos2"),
    "kosmos2_grid10": get_codec("kosmos2", grid=10),
    "bins": get_codec("bins"),
    "bins_yxyx_label_first": get_codec(
        "bins", n_bins=256, token_format="<b{}>", order="yxyx", label_first=True, separator=" | "
    ),
    "bins_floor": get_codec("bins", n_bins=100, quantization="floor", strict=False),
    "rowcol": get_codec("rowcol", grid=8),
    "patch": get_codec("patch", grid=8),
    "qwen2vl": get_codec("qwen2vl"),
}
ALL = pytest.mark.parametrize("codec", list(CODECS.values()), ids=list(CODECS))

sizes = st.tuples(st.integers(1, 4000), st.integers(1, 4000))
# Fractions of the image; a box is at least 1% of a side, more than any codec's bin.
spans = st.tuples(st.floats(0.0, 0.99), st.floats(0.01, 1.0)).map(
    lambda t: (t[0], min(1.0, t[0] + t[1]))
)


@st.composite
def boxes_on_images(draw):
    w, h = draw(sizes)
    (x1, x2), (y1, y2) = draw(spans), draw(spans)
    return (x1 * w, y1 * h, x2 * w, y2 * h), (w, h)


def as_locations(codec, locations: list[int]) -> list[tuple[float, ...]]:
    """Integer locations in the form ``locations_to_box`` takes: (k,) or (row, col)."""
    if codec.space is not None and codec.space.kind == "grid":
        return [divmod(k, codec.space.n) for k in locations]
    return [(k,) for k in locations]


def bin_size(codec, size: float) -> float:
    """Pixels per quantisation step along an axis of ``size`` pixels."""
    if isinstance(codec, Qwen2VLCodec):
        return size / 1000
    if isinstance(codec, BinCodec) and codec.quantization == "round":
        return size / (codec.n_bins - 1)
    return size / codec.space.n


def round_trip_tolerance(codec, box, image_size) -> list[float]:
    """Largest error per coordinate (x1, y1, x2, y2) the codec's quantisation allows.

    Half a bin, floor + bin centre included; Kosmos-2 spans whole cells when
    both corners share a row or column, so there it is one cell.
    """
    w, h = image_size
    half = [bin_size(codec, s) / 2 for s in (w, h, w, h)]
    if isinstance(codec, Kosmos2Codec):
        (r1, c1), (r2, c2) = as_locations(codec, codec.box_to_locations(box, image_size))
        if r1 == r2 or c1 == c2:
            return [2 * t for t in half]
    return half


@ALL
@settings(max_examples=150, deadline=None)
@given(case=boxes_on_images())
def test_round_trip_within_half_a_bin(codec, case):
    box, size = case
    decoded = codec.decode(codec.encode([box], ["red dog"], size), size)
    assert decoded.n_malformed == 0
    assert [d.label for d in decoded] == ["red dog"]
    if isinstance(codec, Qwen2VLCodec):  # written coordinates stop at 999/1000 of a side
        box = tuple(min(v, 0.999 * s) for v, s in zip(box, size * 2, strict=True))
    tolerance = round_trip_tolerance(codec, box, size)
    for got, want, tol in zip(decoded.detections[0].box, box, tolerance, strict=True):
        assert abs(got - want) <= tol * (1 + 1e-3) + 1e-9  # Florence-2 centres are float32


@ALL
@settings(max_examples=100, deadline=None)
@given(case=boxes_on_images())
def test_locations_to_box_on_integer_locations_equals_decode(codec, case):
    box, size = case
    locations = codec.box_to_locations(box, size)
    assert len(locations) == codec.tokens_per_box
    decoded = codec.decode(codec.encode([box], ["x"], size), size)
    assert codec.locations_to_box(as_locations(codec, locations), size) == decoded.detections[0].box


def snap(codec, corner: int, value: float) -> int:
    """A continuous position back to its location the way the codec quantises, ties included.

    Round codecs round; floor codecs take ``floor(c + 0.5)`` (bin k is centred
    at k); Kosmos-2's lower-right corner, ``ceil(x * N - 1)``, rounds half down.
    """
    if isinstance(codec, Qwen2VLCodec) or getattr(codec, "quantization", "") == "round":
        return round(value)
    if isinstance(codec, Kosmos2Codec) and corner == 1:
        return math.ceil(value - 0.5)
    return math.floor(value + 0.5)


@ALL
@settings(max_examples=100, deadline=None)
@given(case=boxes_on_images(), outside=st.floats(-0.2, 0.2))
def test_box_to_continuous_snaps_to_box_to_locations(codec, case, outside):
    """Exactly, on bin edges too (boxes at fractions like 0.5 hit them), and off the image."""
    box, size = case
    for shifted in (box, tuple(v + outside * size[i % 2] for i, v in enumerate(box))):
        continuous = codec.box_to_continuous(shifted, size)
        locations = as_locations(codec, codec.box_to_locations(shifted, size))
        assert len(continuous) == len(locations) == codec.tokens_per_box
        for i, (cont, loc) in enumerate(zip(continuous, locations, strict=True)):
            assert len(cont) == (codec.space.dim if codec.space else 1)
            assert tuple(snap(codec, i, c) for c in cont) == tuple(loc)


@pytest.mark.parametrize("name", ["paligemma", "florence2", "bins", "rowcol", "patch", "qwen2vl"])
def test_fractional_locations_interpolate_linearly(name):
    """Expected-value decoding: halfway between two locations is halfway between their boxes."""
    codec = CODECS[name]
    size = (640, 480)
    low = as_locations(codec, codec.box_to_locations((100, 80, 300, 200), size))
    high = [tuple(v + 1 for v in loc) for loc in low]
    mid = [tuple(v + 0.5 for v in loc) for loc in low]
    a, b, m = (codec.locations_to_box(v, size) for v in (low, high, mid))
    assert m == pytest.approx([(x + y) / 2 for x, y in zip(a, b, strict=True)])


def test_registry_has_every_family():
    families = {"paligemma", "florence2", "kosmos2", "bins", "rowcol", "patch", "qwen2vl"}
    assert families <= set(list_codecs())
    with pytest.raises(KeyError, match="unknown codec 'nope'.*paligemma"):
        get_codec("nope")


@pytest.mark.parametrize(
    ("name", "kwargs", "first", "last", "space"),
    [
        ("paligemma", {}, "<loc0000>", "<loc1023>", ("bins", 1024)),
        ("florence2", {}, "<loc_0>", "<loc_999>", ("bins", 1000)),
        ("kosmos2", {}, "<patch_index_0000>", "<patch_index_1023>", ("grid", 32)),
        ("bins", {"n_bins": 10}, "<bin_0>", "<bin_9>", ("bins", 10)),
        ("rowcol", {"grid": 8}, "<rc_0>", "<rc_7>", ("bins", 8)),
        ("patch", {"grid": 8}, "<patch_0>", "<patch_63>", ("grid", 8)),
    ],
)
def test_location_vocabulary(name, kwargs, first, last, space):
    codec = get_codec(name, **kwargs)
    assert codec.name == name
    assert (codec.space.kind, codec.space.n) == space
    assert len(codec.location_tokens) == codec.space.size
    assert codec.location_tokens[0] == first and codec.location_tokens[-1] == last


def test_qwen2vl_has_no_location_tokens():
    codec = CODECS["qwen2vl"]
    assert codec.space is None and codec.location_tokens == []
    assert codec.box_to_locations((64, 48, 320, 480), (640, 480)) == [100, 100, 500, 999]


# ----------------------------------------------------------------------------- formats


def test_paligemma_format_and_big_vision_quantisation():
    codec = CODECS["paligemma"]
    text = codec.encode([(0, 0, 640, 480), (320, 120, 480, 360)], ["cat", "dog"], (640, 480))
    # ymin xmin ymax xmax; round(v / size * 1023): 120/480*1023 = 255.75 -> 256
    assert text == (
        "<loc0000><loc0000><loc1023><loc1023> cat ; <loc0256><loc0512><loc0767><loc0767> dog"
    )
    assert codec.decode(text, (640, 480)).detections[0].box == (0.0, 0.0, 640.0, 480.0)
    box = codec.locations_to_box([(256,), (512,), (767,), (767,)], (1023, 1023))
    assert box == (512.0, 256.0, 767.0, 767.0)  # token / 1023 * size, back in x1 y1 x2 y2


def test_paligemma_box_within_one_bin_is_malformed():
    """Round quantisation: ymax must exceed ymin after decoding, else the box does not count."""
    codec = CODECS["paligemma"]
    result = codec.decode(
        codec.encode([(10, 100, 200, 100.2)], ["thin"], (1023, 1023)), (1023, 1023)
    )
    assert (len(result), result.n_malformed) == (0, 1)


def test_florence2_format():
    codec = CODECS["florence2"]
    text = codec.encode([(0, 0, 640, 480), (1.3, 0.47, 2.0, 1.0)], ["car", "dog"], (640, 480))
    # floor(v / (size / 1000)), x1 y1 x2 y2, label first, nothing in between
    assert text == "car<loc_0><loc_0><loc_999><loc_999>dog<loc_2><loc_0><loc_3><loc_2>"
    assert codec.decode(text, (640, 480)).detections[1].box == pytest.approx((1.6, 0.24, 2.24, 1.2))


def test_kosmos2_format_groups_consecutive_phrases():
    codec = CODECS["kosmos2"]
    boxes = [(0, 0, 32, 32), (16, 16, 32, 32), (0, 0, 1, 1), (31, 0, 32, 1)]
    text = codec.encode(boxes, ["dog", "dog", "cat", "dog"], (32, 32))
    assert text == (
        "<phrase>dog</phrase><object><patch_index_0000><patch_index_1023>"
        "</delimiter_of_multi_objects/><patch_index_0528><patch_index_1023></object>"
        "<phrase>cat</phrase><object><patch_index_0000><patch_index_0000></object>"
        "<phrase>dog</phrase><object><patch_index_0031><patch_index_0031></object>"
    )
    decoded = codec.decode(text, (32, 32))
    assert [d.label for d in decoded] == ["dog", "dog", "cat", "dog"]
    assert decoded.detections[2].box == (0.0, 0.0, 1.0, 1.0)  # one cell: the whole cell


@pytest.mark.parametrize(
    "codec", [Kosmos2Codec(grid=10), PatchCodec(grid=10)], ids=["kosmos2", "patch"]
)
def test_grid_cells_are_row_major(codec):
    """Cell 60 on a 10-wide grid is row 6, column 0 (its neighbours: 50, 61, 70; not 59)."""
    size = (200, 100)
    box = (5.0, 65.0, 150.0, 95.0)  # upper-left corner in column 0 (x < 20), row 6 (60 <= y < 70)
    ul, lr = codec.box_to_locations(box, size)
    assert ul == 60 and lr == 9 * 10 + 7
    assert codec.space.coords()[60].tolist() == [6.0, 0.0]
    (row, col), _ = codec.box_to_continuous(box, size)
    assert (round(row), round(col)) == (6, 0)
    distance = codec.space.distance(torch.tensor([60]))[0]
    assert distance[[50, 61, 70]].tolist() == [1.0, 1.0, 1.0]
    assert distance[59].item() == pytest.approx(math.hypot(1, 9))


def test_rowcol_writes_rows_then_columns():
    codec = get_codec("rowcol", grid=10)
    # top row 6, left column 0, bottom row 9, right column 7
    assert codec.encode([(5, 65, 150, 95)], ["dog"], (200, 100)) == "dog <rc_6><rc_0><rc_9><rc_7>"


def test_qwen2vl_format():
    codec = CODECS["qwen2vl"]
    text = codec.encode([(64, 48, 320, 240)], ["the dog"], (640, 480))
    assert text == (
        "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>"
    )


# ----------------------------------------------------------------------------- malformed output

MALFORMED = [
    # codec, text, labels decoded, n_malformed
    ("paligemma", "", [], 0),
    ("paligemma", "<loc0100><loc0200><loc0300>", [], 1),  # truncated
    ("paligemma", "<loc0100><loc0200><loc0300><loc0400> dog ; <loc0010><loc0020>", ["dog"], 1),
    ("paligemma", "<loc0300><loc0200><loc0100><loc0400> dog", [], 1),  # ymax < ymin
    ("paligemma", "<loc0100><loc0100><loc0100><loc0200> dog", [], 1),  # ymax == ymin
    ("paligemma", "<loc1024><loc0000><loc0010><loc0010> dog", [], 1),  # beyond the vocabulary
    (
        "paligemma",
        "blah <unk> <loc0100><loc0200><loc0300><loc0400> dog ; !! ; "
        "<loc0001><loc0002><loc0003><loc0004> cat<eos>",
        ["dog", "cat"],
        0,
    ),
    ("paligemma", "<loc0001><loc0002><loc0003><loc0004><loc0005> dog", ["dog"], 1),  # 5 tokens
    ("florence2", "car<loc_1><loc_2><loc_3>", [], 1),
    (
        "florence2",
        "car<loc_10><loc_20><loc_30><loc_40><loc_1>dog<loc_5><loc_5><loc_6><loc_6>",
        ["car", "dog"],
        1,
    ),
    ("florence2", "</s><s>car<loc_10><loc_20><loc_30><loc_40></s><pad>", ["car"], 0),
    ("florence2", "car<loc_30><loc_20><loc_10><loc_40>", [], 1),  # x2 < x1
    ("florence2", "car<loc_1000><loc_0><loc_1><loc_1>", [], 1),
    ("florence2", "car<loc_10><loc_10><loc_10><loc_10>", ["car"], 0),  # one bin: kept
    ("florence2", "car<loc_x><loc_1><loc_2><loc_3><loc_4>", ["car"], 0),  # unknown tag dropped
    ("kosmos2", "<phrase>dog</phrase><object><patch_index_0001>", [], 1),  # truncated
    (
        "kosmos2",
        "<phrase>dog</phrase><object><patch_index_0001><patch_index_0002><patch_index_0003>"
        "</object>",
        [],
        1,
    ),
    ("kosmos2", "<phrase>dog</phrase><object><patch_index_0099><patch_index_0000></object>", [], 1),
    ("kosmos2", "<phrase>dog</phrase><object></object>", [], 1),
    ("kosmos2", "<grounding> a<phrase> dog</phrase>", [], 1),  # phrase cut before its object
    ("kosmos2", "<patch_index_0001><patch_index_0002> x", [], 1),  # tokens outside any object
    (
        "kosmos2",
        "<phrase>dog</phrase><object><patch_index_0000><patch_index_0033>"
        "<phrase>cat</phrase><object><patch_index_0034><patch_index_0099></object>",
        ["dog", "cat"],
        0,
    ),
    ("kosmos2", "<object><patch_index_0000><patch_index_0033></object>", [""], 0),
    (
        "kosmos2",
        "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044>"
        "<patch_index_0863></object> warming himself by<phrase> a fire</phrase><object>"
        "<patch_index_0005><patch_index_0911></object>.",
        ["a snowman", "a fire"],
        0,
    ),
    (
        "kosmos2",
        "<phrase>dog</phrase><object><patch_index_0000><patch_index_0033>"
        "</delimiter_of_multi_objects/><patch_index_0040></object>",
        ["dog"],
        1,
    ),
    (
        "kosmos2_grid10",
        "<phrase>dog</phrase><object><patch_index_0000><patch_index_0100></object>",
        [],
        1,
    ),
    ("bins", "<bin_1><bin_2><bin_3><bin_4> dog <bin_5>", ["dog"], 1),
    (
        "bins",
        "<bin_1><bin_2><bin_3><bin_4> dog <bin_1><bin_2><bin_3><bin_4><bin_5><bin_6><bin_7>"
        "<bin_8> cat",
        ["dog", "cat", "cat"],
        0,
    ),
    (
        "bins_yxyx_label_first",
        "junk | dog <b1><b2><b3><b4> | | cat <b0><b0><b1><b1>",
        ["dog", "cat"],
        0,
    ),
    ("bins_yxyx_label_first", "dog <b1><b2><b3> | cat <b256><b0><b1><b1>", [], 2),
    ("rowcol", "dog <rc_1><rc_2><rc_3>", [], 1),
    ("rowcol", "dog <rc_3><rc_0><rc_1><rc_5>", [], 1),  # bottom row above the top row
    ("rowcol", "dog <rc_8><rc_0><rc_1><rc_5>", [], 1),  # off an 8 grid
    (
        "rowcol",
        "junk ; dog <rc_1><rc_1><rc_2><rc_2> ; ; cat <rc_0><rc_0><rc_1><rc_1>",
        ["dog", "cat"],
        0,
    ),
    ("rowcol", "dog <rc_1><rc_1><rc_1><rc_1>", ["dog"], 0),  # one cell: a zero-size box, kept
    ("patch", "dog <patch_1>", [], 1),
    ("patch", "dog <patch_1><patch_2><patch_3>", ["dog"], 1),
    ("patch", "dog <patch_9><patch_0>", [], 1),  # lower-right cell above and left
    ("patch", "dog <patch_64><patch_65>", [], 1),  # off an 8 x 8 grid
    ("patch", "dog <patch_" + "9" * 40 + "><patch_1>", [], 1),  # absurd index, no overflow
    ("qwen2vl", "<|box_start|>(1,2),(3", [], 1),
    (
        "qwen2vl",
        "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(10,20),(5,40)<|box_end|>",
        [],
        1,
    ),
    ("qwen2vl", "<|box_start|>a,b<|box_end|>", [], 1),
    ("qwen2vl", "<|box_start|>(0,0),(1001,10)<|box_end|>", [], 1),
    (
        "qwen2vl",
        "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(0,0),(1000,1000)"
        "<|box_end|><|box_start|>(1,1),(2,2)<|box_end|>",
        ["dog", "dog"],
        0,
    ),
    ("qwen2vl", "<|box_start|>(1,1),(5,5)<|box_start|>(1,1),(2,2)<|box_end|>", ["", ""], 0),
]


@pytest.mark.parametrize(("name", "text", "labels", "n_malformed"), MALFORMED)
def test_malformed_output_is_counted_not_raised(name, text, labels, n_malformed):
    result = CODECS[name].decode(text, (640, 480))
    assert [d.label for d in result] == labels
    assert result.n_malformed == n_malformed


@ALL
def test_every_prefix_of_an_answer_decodes(codec):
    """Truncated generations never raise and never yield more boxes than were written."""
    boxes = [(10, 20, 300, 200), (50, 60, 400, 380), (1, 2, 630, 470)]
    text = codec.encode(boxes, ["dog", "cat", "red car"], (640, 480))
    for end in range(len(text) + 1):
        result = codec.decode(text[:end], (640, 480))
        assert len(result) + result.n_malformed <= len(boxes)
    assert len(codec.decode(text, (640, 480))) == 3


def fragments(codec) -> list[str]:
    """Pieces a broken generation is made of: real, off-vocabulary and look-alike tokens, markup."""
    pieces = [" ", "dog", " ; ", " | ", "<unk>", "</s>", "<loc>", "<loc_-3>", "<patch_index_>"]
    pieces += ["<phrase>", "</phrase>", "<object>", "</object>", "</delimiter_of_multi_objects/>"]
    pieces += ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]
    pieces += ["(1,2),(300,400)", "(5,5),(1,1)", "(10,20),(1001,30)", "(7,"]
    tokens = codec.location_tokens
    if tokens:
        pieces += [tokens[0], tokens[1], tokens[len(tokens) // 2], tokens[-1]]
        pieces.append(tokens[0].replace("0", "99999", 1))  # an index off the vocabulary
    return pieces


@ALL
def test_random_text_decodes_to_boxes_on_the_image(codec):
    mixed = st.lists(st.one_of(st.sampled_from(fragments(codec)), st.text(max_size=4)), max_size=30)

    @settings(max_examples=100, deadline=None)
    @given(text=st.one_of(st.text(), mixed.map("".join)), size=sizes)
    def check(text, size):
        result = codec.decode(text, size)
        assert isinstance(result.n_malformed, int) and len(result.spans) == len(result)
        if codec.space is not None:  # each object was read from its own location tokens
            found = [codec.location_indices(text[slice(*s.locations)]) for s in result.spans]
            assert all(len(f) == codec.tokens_per_box for f in found)
            if not codec.location_indices(text):
                assert not result.detections
        w, h = size
        for det in result:
            x1, y1, x2, y2 = det.box
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h, det

    check()


# Labels that survive the text up to white space: no markup, no separator marks, not blank
# (with a blank separator a blank label leaves two boxes side by side: one label's two boxes).
label_text = st.text("abcXYZ019 -_.,'", min_size=1, max_size=10).filter(str.strip)


@ALL
@settings(max_examples=40, deadline=None)
@given(cases=st.lists(boxes_on_images(), min_size=1, max_size=5), data=st.data())
def test_several_objects_keep_their_count_and_labels(codec, cases, data):
    size = cases[0][1]
    # every box drawn on its own image, moved onto the first one at the same fractions
    boxes = [
        tuple(v / s * t for v, s, t in zip(b, sz * 2, size * 2, strict=True)) for b, sz in cases
    ]
    labels = [data.draw(label_text) for _ in boxes]
    result = codec.decode(codec.encode(boxes, labels, size), size)
    assert result.n_malformed == 0
    assert [d.label for d in result] == [" ".join(label.split()) for label in labels]


# ----------------------------------------------------------------------------- bad input


@ALL
def test_encode_rejects_bad_input(codec):
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        codec.encode([(0, 0, 1, 1), (0, 0, 2, 2)], ["a"], (10, 10))
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        codec.encode([(0, 0, 1)], ["a"], (10, 10))
    token = codec.location_tokens[0] if codec.location_tokens else "<|box_start|>"
    with pytest.raises(ValueError, match=r"labels\[0\].*location token"):
        codec.encode([(0, 0, 1, 1)], [f"a {token}"], (10, 10))


@pytest.mark.parametrize("name", ["paligemma", "bins_yxyx_label_first", "rowcol", "patch"])
def test_label_with_the_object_separator_is_refused(name):
    """Decoding would cut such a label at the separator: a silently wrong training target."""
    codec = CODECS[name]
    mark = codec.separator.strip()
    with pytest.raises(ValueError, match=r"labels\[1\].*object separator"):
        codec.encode([(0, 0, 5, 5)] * 2, ["ok", f"a {mark} b"], (10, 10))


def test_qwen2vl_label_with_its_markup_is_refused():
    with pytest.raises(ValueError, match=r"labels\[0\]"):
        get_codec("qwen2vl").encode([(0, 0, 5, 5)], ["x<|object_ref_end|>y"], (10, 10))


@ALL
def test_locations_to_box_rejects_wrong_arity(codec):
    dim = codec.space.dim if codec.space else 1
    with pytest.raises(ValueError, match=f"needs {codec.tokens_per_box} locations"):
        codec.locations_to_box([(0,) * dim] * (codec.tokens_per_box + 1), (10, 10))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"order": "xxyy"}, "order"),
        ({"quantization": "ceil"}, "quantization"),
        ({"n_bins": 1}, "n_bins"),
        ({"token_format": "<bin>"}, "token_format"),
    ],
)
def test_bins_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_codec("bins", **kwargs)
