"""Decoding adversarial model output: huge numbers, non-ASCII digits, unclosed markup, fuzz.

Every registered codec, built with its defaults, must read what it can and count
the rest as malformed, never raise, and take time linear in the text.
"""

from __future__ import annotations

import random
import re
import time

import fuzz_texts
import pytest
import torch

from loctune.codecs import get_codec, list_codecs
from loctune.codecs.parsing import TOO_BIG

CODECS = {name: get_codec(name) for name in list_codecs()}
ALL = pytest.mark.parametrize("codec", list(CODECS.values()), ids=list(CODECS))
SIZE = (640, 480)
BOX, LABEL = (64.0, 48.0, 320.0, 240.0), "dog"


def with_first_number(codec, spell) -> str:
    """One encoded object with the first number of its location text respelled by ``spell``."""
    encoding = codec.encode_spans([BOX], [LABEL], SIZE)
    start, end = encoding.spans[0].locations
    text = encoding.text
    number = re.compile("[0-9]+").search(text, start, end)
    return text[: number.start()] + spell(number.group()) + text[number.end() :]


def test_registry_has_seven_codecs():
    assert sorted(CODECS) == [
        "bins", "florence2", "kosmos2", "paligemma", "patch", "qwen2vl", "rowcol"
    ]  # fmt: skip


@ALL
def test_the_unchanged_object_decodes(codec):
    """The respelling helper changes nothing by itself: the baseline of the tests below."""
    decoded = codec.decode(with_first_number(codec, lambda digits: digits), SIZE)
    assert [d.label for d in decoded] == [LABEL] and decoded.n_malformed == 0


@ALL
@pytest.mark.parametrize("n_digits", [10, 4301, 100_000])
def test_a_number_longer_than_any_index_is_malformed_not_raised(codec, n_digits):
    """int() raises past 4,300 digits; such a number is no location, counted malformed."""
    text = with_first_number(codec, lambda digits: "9" * n_digits)
    decoded = codec.decode(text, SIZE)
    assert decoded.detections == [] and decoded.n_malformed >= 1
    assert codec.location_indices(text)[:1] in ([], [TOO_BIG])


@ALL
@pytest.mark.parametrize(
    "digits", [fuzz_texts.ARABIC_INDIC, fuzz_texts.FULLWIDTH], ids=["arabic_indic", "fullwidth"]
)
def test_non_ascii_digits_are_no_location(codec, digits):
    """``\\d`` matches ``٠١`` and int() reads it; no codec writes such digits."""
    text = with_first_number(codec, lambda ascii_digits: ascii_digits.translate(digits))
    decoded = codec.decode(text, SIZE)
    assert decoded.detections == []
    original = codec.location_indices(with_first_number(codec, str))
    assert len(codec.location_indices(text)) == max(len(original) - 1, 0)


QWEN_BOX = "<|box_start|>(100,100),(500,500)<|box_end|>"


def test_qwen2vl_decoding_is_linear_in_unclosed_phrases():
    """8,000 unclosed phrase starts took 8.6 s when each box searched back for its phrase."""
    codec = CODECS["qwen2vl"]
    text = "<|object_ref_start|>dog<|object_ref_end|>" + "<|object_ref_start|>" * 10_000
    start = time.perf_counter()
    decoded = codec.decode(text + QWEN_BOX * 10_000, SIZE)
    assert time.perf_counter() - start < 1.0
    assert len(decoded) == 10_000 and decoded.n_malformed == 0
    assert {d.label for d in decoded} == {"dog"}  # unclosed phrases label nothing


@pytest.mark.parametrize(
    ("text", "labels", "n_malformed"),
    [
        # a phrase left open before a box keeps the previous phrase
        ("<|object_ref_start|>a<|object_ref_end|>" + QWEN_BOX + "<|object_ref_start|>b" + QWEN_BOX,
         ["a", "a"], 0),
        # the last of several open phrase starts is the phrase
        ("<|object_ref_start|>x<|object_ref_start|>cat<|object_ref_end|>" + QWEN_BOX, ["cat"], 0),
        # phrase markup inside a box breaks that box only
        ("<|box_start|>(1,1),<|object_ref_start|>a<|object_ref_end|>(5,5)<|box_end|>" + QWEN_BOX,
         [""], 1),
        # a box runs to the next box start, or to the end of the text
        ("<|box_start|>(1,1),(5,5)" + QWEN_BOX + "<|box_start|>(1,1),(5,5)", ["", "", ""], 0),
        # stray ends are ignored
        ("<|box_end|><|object_ref_end|><|object_ref_start|>a<|object_ref_end|>" + QWEN_BOX,
         ["a"], 0),
    ],
)  # fmt: skip
def test_qwen2vl_markup_edge_cases(text, labels, n_malformed):
    decoded = CODECS["qwen2vl"].decode(text, SIZE)
    assert [d.label for d in decoded] == labels and decoded.n_malformed == n_malformed


# --- fuzz: every codec, adversarial generations (benchmarks/decoder_fuzz.py runs many more) -------


@ALL
def test_fuzzed_generations_decode_without_raising(codec):
    rng = random.Random(13)
    for _ in range(150):
        text = fuzz_texts.generation(codec, rng)
        decoded = codec.decode(text, SIZE)
        assert len(decoded.spans) == len(decoded.detections) and decoded.n_malformed >= 0
        for d in decoded:
            assert all(0 <= v <= s for v, s in zip(d.box, SIZE * 2, strict=True))
        codec.location_indices(text)


@ALL
def test_long_generations_decode_in_linear_time(codec):
    """128 KB of each shape in well under 2 s (linear decoding takes ~0.15 s; the quadratic
    Qwen2-VL parser took minutes)."""
    for kind, text in fuzz_texts.long_texts(codec, random.Random(0), 1 << 17).items():
        start = time.perf_counter()
        codec.decode(text, SIZE)
        assert time.perf_counter() - start < 2.0, kind


# --- Florence-2 bins in the boxes' own dtype -------------------------------------------------


def test_florence2_bins_a_tensor_in_its_dtype_as_transformers_does():
    """310.4 px of 640 is 485.0 in float32 (transformers' quantize of a float32 tensor) but
    484.99999999999994 in float64: the bin follows the dtype the boxes come in."""
    codec, size = CODECS["florence2"], (640, 640)
    box = [310.4, 310.4, 320.0, 320.0]
    f32 = torch.tensor([box], dtype=torch.float32)
    assert (f32 / (size[0] / 1000)).floor()[0, :2].tolist() == [485, 485]  # transformers' formula
    assert codec.box_to_locations(f32[0], size)[:2] == [485, 485]
    assert codec.box_to_locations(f32.numpy()[0], size)[:2] == [485, 485]
    assert codec.location_indices(codec.encode(f32, [LABEL], size))[:2] == [485, 485]
    assert codec.box_to_locations(box, size)[:2] == [484, 484]
    assert codec.box_to_locations(torch.tensor(box, dtype=torch.float64), size)[:2] == [484, 484]


def test_inspection_answer_naming_a_huge_image_number_is_malformed_not_raised():
    """``image N:`` picks a crop; int() raised past 4,300 digits and read ``٣`` as 3."""
    from loctune.inspect.answers import parse_answer
    from loctune.inspect.tiling import Tiling

    codec = CODECS["rowcol"]
    boxes = codec.encode([BOX], [LABEL], SIZE)

    def parse(number: str):
        return parse_answer(
            f"defective: scratch image {number}: {boxes}", codec, SIZE, Tiling(2, 2)
        )

    for number in ("9999", "9" * 5000):  # no such crop: the box is malformed
        assert (parse(number).detections, parse(number).n_malformed_boxes) == ([], 1)
    arabic = parse("3".translate(fuzz_texts.ARABIC_INDIC))  # no reference: read on the image
    assert [d.box for d in arabic.detections] == [d.box for d in codec.decode(boxes, SIZE)]
