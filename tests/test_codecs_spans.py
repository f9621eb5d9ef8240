"""Per-object spans: encode and decode say where each box's locations and label are written."""

import math

import pytest
import torch

from loctune.codecs import get_codec, list_codecs
from loctune.codecs.parsing import clean_label
from loctune.evaluate import GenerationDecoder
from loctune.models.base import Generation

SIZE = (640, 480)
BOXES = [(10.0, 20.0, 200.0, 300.0), (300.0, 40.0, 620.0, 470.0), (0.0, 0.0, 64.0, 48.0)]
# a digit, a location-like word and a number-only label: none may shift a span
LABELS = ["cat 2", "loc0012 rc_3 bin_7", "42"]
CODEC_ARGS = {"patch": {"grid": 8}, "rowcol": {"grid": 16}}


def codec_of(name):
    return get_codec(name, **CODEC_ARGS.get(name, {}))


@pytest.fixture(params=list_codecs())
def codec(request):
    return codec_of(request.param)


def test_every_codec_registers_spans():
    assert set(list_codecs()) == {
        "bins", "florence2", "kosmos2", "paligemma", "patch", "qwen2vl", "rowcol",
    }  # fmt: skip


def test_encode_spans_point_at_each_box_and_its_label(codec):
    enc = codec.encode_spans(BOXES, LABELS, SIZE)
    assert enc.text == codec.encode(BOXES, LABELS, SIZE)
    assert [s.index for s in enc.spans] == [0, 1, 2]
    found = codec.location_indices(enc.text)
    for span, box, label in zip(enc.spans, BOXES, LABELS, strict=True):
        assert enc.text[slice(*span.label)] == label
        if codec.space is None:  # plain-text coordinates: the span holds the digits
            x1, y1, x2, y2 = codec.box_to_locations(box, SIZE)
            assert enc.text[slice(*span.locations)] == f"({x1},{y1}),({x2},{y2})"
            assert len(span.tokens) == 0
        else:
            locs = codec.box_to_locations(box, SIZE)
            assert [found[k] for k in span.tokens] == locs
            written = "".join(codec.location_tokens[k] for k in locs)
            assert enc.text[slice(*span.locations)] == written


def test_spans_are_disjoint_and_in_text_order(codec):
    enc = codec.encode_spans(BOXES, LABELS, SIZE)
    ends = [s.locations[1] for s in enc.spans]
    starts = [s.locations[0] for s in enc.spans]
    assert all(e <= s for e, s in zip(ends, starts[1:], strict=False))
    tokens = [k for s in enc.spans for k in s.tokens]
    assert tokens == list(range(len(tokens)))
    assert len(tokens) == (0 if codec.space is None else codec.tokens_per_box * len(BOXES))


def test_decode_spans_match_encode_spans(codec):
    enc = codec.encode_spans(BOXES, LABELS, SIZE)
    dec = codec.decode(enc.text, SIZE)
    assert len(dec.spans) == len(dec.detections) == 3
    for d, (det, span), want in zip(
        range(3), zip(dec.detections, dec.spans, strict=True), enc.spans, strict=True
    ):
        assert span.index == d
        assert (span.locations, span.tokens) == (want.locations, want.tokens)
        assert clean_label(enc.text[slice(*span.label)]) == det.label == LABELS[d]
        assert span.label_first == want.label_first


def test_label_side_is_the_families_own():
    sides = {name: codec_of(name).encode_spans(BOXES[:1], ["x"], SIZE).spans[0].label_first
             for name in list_codecs()}  # fmt: skip
    assert sides == {
        "bins": False, "florence2": True, "kosmos2": True, "patch": True, "qwen2vl": True,
        "rowcol": True, "paligemma": False,
    }  # fmt: skip


def test_kosmos_boxes_of_one_phrase_share_its_label_span():
    codec = get_codec("kosmos2")
    enc = codec.encode_spans(BOXES, ["dog", "dog", "cat"], SIZE)
    assert enc.text.count("<phrase>") == 2
    assert enc.spans[0].label == enc.spans[1].label != enc.spans[2].label
    assert enc.text[slice(*enc.spans[1].label)] == "dog"
    dec = codec.decode(enc.text, SIZE)
    assert [s.label for s in dec.spans] == [s.label for s in enc.spans]


def test_decode_spans_count_the_tokens_of_malformed_fragments():
    codec = get_codec("rowcol", grid=8)
    text = "a <rc_6><rc_6><rc_2><rc_2> ; b 7 <rc_1><rc_1><rc_3><rc_3>"  # the first box is reversed
    dec = codec.decode(text, (64, 64))
    assert dec.n_malformed == 1 and [d.label for d in dec.detections] == ["b 7"]
    (span,) = dec.spans
    assert span.index == 0 and span.tokens == range(4, 8)
    assert text[slice(*span.locations)] == "<rc_1><rc_1><rc_3><rc_3>"
    assert clean_label(text[slice(*span.label)]) == "b 7"


def test_qwen_decode_span_of_a_box_without_its_own_phrase_takes_the_previous_label():
    codec = get_codec("qwen2vl")
    text = (
        "<|object_ref_start|>car 3<|object_ref_end|><|box_start|>(1,2),(30,40)<|box_end|>"
        "<|box_start|>(5,6),(70,80)<|box_end|>"
    )
    dec = codec.decode(text, (1000, 1000))
    assert [d.label for d in dec.detections] == ["car 3", "car 3"]
    assert dec.spans[0].label == dec.spans[1].label
    assert text[slice(*dec.spans[1].locations)] == "(5,6),(70,80)"


def test_decode_results_compare_by_objects_not_spans():
    codec = get_codec("rowcol", grid=8)
    a = codec.decode("x <rc_1><rc_1><rc_3><rc_3>", (64, 64))
    b = codec.decode("  x   <rc_1><rc_1><rc_3><rc_3>", (64, 64))
    assert a == b and a.spans != b.spans


# --- the evaluator aligns through the spans ----------------------------------------------


def _generation(codec, pieces, logprobs):
    index = {tok: k for k, tok in enumerate(codec.location_tokens)}
    ids = [100 + index[p] if p in index else 10_000 + i for i, p in enumerate(pieces)]
    return Generation("".join(pieces), ids, logprobs)


def test_evaluator_scores_kosmos_boxes_of_one_phrase_separately():
    codec = get_codec("kosmos2", grid=4)
    loc = codec.location_tokens
    pieces = ["<phrase>", "dog 2", "</phrase>", "<object>", loc[0], loc[5],
              "</delimiter_of_multi_objects/>", loc[10], loc[15], "</object>"]  # fmt: skip
    lp = [0.0, math.log(0.5), 0.0, 0.0, math.log(0.9), math.log(0.9), math.log(0.2),
          math.log(0.4), math.log(0.4), 0.0]  # fmt: skip
    ids = [100 + k for k in range(16)]
    out = GenerationDecoder(codec, ids)(_generation(codec, pieces, lp), (64, 64))
    assert out.n_malformed == 0 and [d.label for d in out.detections] == ["dog 2", "dog 2"]
    # the phrase's tokens go with the first box, the delimiter with the second
    first = math.exp((math.log(0.5) + 2 * math.log(0.9)) / 6)
    second = math.exp((math.log(0.2) + 2 * math.log(0.4)) / 3)
    assert [d.score for d in out.detections] == pytest.approx([first, second])


def test_evaluator_does_not_align_tokens_the_text_does_not_spell():
    codec = get_codec("rowcol", grid=8)
    ids = [100 + k for k in range(8)]
    # the ids hold location 2 where the text says 1: the text was not read as generated
    gen = Generation("a <rc_1><rc_1><rc_3><rc_3>", [10, 102, 101, 103, 103], [math.log(0.5)] * 5)
    probs = torch.zeros(5, 8)
    probs[1:, 7] = 1.0
    out = GenerationDecoder(codec, ids)(
        Generation(gen.text, gen.token_ids, gen.token_logprobs, probs), (64, 64)
    )
    assert out.n_malformed == 1 and out.detections[0].score == pytest.approx(0.5)
    assert out.ev_detections[0].box == out.detections[0].box  # no EV from misaligned steps
