"""The Florence-2 and Kosmos-2 codecs against transformers' own conversions, on random boxes.

Processors are built offline: a small BPE tokenizer with the family's special
tokens and an image processor from its class defaults.
"""

from __future__ import annotations

import random

import pytest
import torch
from hf_tiny import bpe_tokenizer
from transformers import CLIPImageProcessorPil, Florence2Processor, Kosmos2Processor
from transformers.models.kosmos2.processing_kosmos2 import (
    clean_text_and_extract_entities_with_bboxes,
    coordinate_to_patch_index,
)

from loctune.codecs import get_codec

PHRASES = ["dog", "cat", "red car", "person", "traffic light", "a small bird"]
N_RANDOM = 400
EDGES = [0.0, 0.25, 0.5, 1.0]  # fractions on bin and cell edges, where floor/ceil choices show


def _image_processor(**extra) -> CLIPImageProcessorPil:
    size = {"height": 32, "width": 32}
    return CLIPImageProcessorPil(size=size, crop_size=size, do_center_crop=False, **extra)


def random_scene(rng: random.Random, max_objects: int = 4):
    """Image size, boxes (x2 > x1, y2 > y1, inside the image, some on its edges) and labels."""
    w, h = rng.randint(1, 5000), rng.randint(1, 5000)
    boxes = []
    for _ in range(rng.randint(1, max_objects)):
        xs = sorted(rng.choice([*EDGES, rng.random(), rng.random()]) for _ in range(2))
        ys = sorted(rng.choice([*EDGES, rng.random(), rng.random()]) for _ in range(2))
        if xs[0] == xs[1] or ys[0] == ys[1]:
            xs, ys = [0.25, 0.75], [0.1, 0.9]
        boxes.append((xs[0] * w, ys[0] * h, xs[1] * w, ys[1] * h))
    return (w, h), boxes, [rng.choice(PHRASES) for _ in boxes]


# ----------------------------------------------------------------------------- Florence-2


@pytest.fixture(scope="module")
def florence_processor() -> Florence2Processor:
    tokenizer = bpe_tokenizer(
        ["<image>"], bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", image_token="<image>"
    )
    tokenizer.add_tokens([f"<loc_{i}>" for i in range(1000)])
    return Florence2Processor(
        image_processor=_image_processor(image_seq_length=4),
        tokenizer=tokenizer,
        post_processor_config={"description_with_bboxes": {}, "phrase_grounding": {}},
    )


def test_florence2_bins_equal_transformers_quantize(florence_processor):
    codec = get_codec("florence2")
    rng = random.Random(0)
    for _ in range(N_RANDOM):
        size, boxes, _ = random_scene(rng)
        theirs = florence_processor.post_processor.quantize(
            torch.tensor(boxes, dtype=torch.float64), size
        )
        assert [codec.box_to_locations(b, size) for b in boxes] == theirs.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_florence2_bins_of_a_tensor_equal_transformers_in_its_dtype(florence_processor, dtype):
    """transformers quantises a tensor of boxes in its dtype; the codec, given that tensor (or
    its numpy array), too: float32 and float64 bins differ at some one-decimal pixels."""
    codec = get_codec("florence2")
    rng = random.Random(3)
    differ = 0
    for _ in range(N_RANDOM):
        size, boxes, labels = random_scene(rng)
        boxes = torch.tensor([[round(v, 1) for v in b] for b in boxes], dtype=dtype)
        theirs = florence_processor.post_processor.quantize(boxes, size).tolist()
        assert [codec.box_to_locations(b, size) for b in boxes] == theirs
        assert [codec.box_to_locations(b, size) for b in boxes.numpy()] == theirs
        assert codec.location_indices(codec.encode(boxes, labels, size)) == sum(theirs, [])
        differ += [codec.box_to_locations(b, size) for b in boxes.tolist()] != theirs
    assert differ > 0 if dtype == torch.float32 else differ == 0


def _assert_florence_decodes_alike(codec, processor, text: str, size, task: str = "<OD>"):
    ours = codec.decode(text, size)
    theirs = processor.post_process_generation(text=text, task=task, image_size=size)[task]
    assert ours.n_malformed == 0
    assert [d.label for d in ours] == theirs["labels"]
    # transformers truncates the float32 bin centre to whole pixels; loctune keeps that centre
    assert [[int(v) for v in d.box] for d in ours] == theirs["bboxes"]


def test_florence2_decode_truncates_like_transformers_float32(florence_processor):
    """612.5 * 4.56 is 2793 in float32 but 2792.9999999999995 in float64: the codec must say
    2793."""
    codec = get_codec("florence2")
    text = "dog<loc_224><loc_20><loc_825><loc_612>"
    _assert_florence_decodes_alike(codec, florence_processor, text, (2681, 4560))
    assert int(codec.decode(text, (2681, 4560)).detections[0].box[3]) == 2793


def test_florence2_decode_matches_post_process_generation(florence_processor):
    """Our encoded answers and random bin texts (several boxes per label) read alike."""
    codec = get_codec("florence2")
    rng = random.Random(1)
    for _ in range(N_RANDOM // 2):
        size, boxes, labels = random_scene(rng)
        _assert_florence_decodes_alike(
            codec, florence_processor, "<s>" + codec.encode(boxes, labels, size) + "</s>", size
        )
        parts = []
        for label in rng.sample(PHRASES, 3):
            parts.append(label)
            for _ in range(rng.randint(1, 3)):
                x1, x2 = sorted(rng.randrange(1000) for _ in range(2))
                y1, y2 = sorted(rng.randrange(1000) for _ in range(2))
                parts.append("".join(f"<loc_{k}>" for k in (x1, y1, x2, y2)))
        text = "".join(parts)
        for task in ("<OD>", "<CAPTION_TO_PHRASE_GROUNDING>"):
            _assert_florence_decodes_alike(codec, florence_processor, text, size, task)


# ----------------------------------------------------------------------------- Kosmos-2


@pytest.fixture(scope="module", params=[32, 10], ids=["grid32", "grid10"])
def kosmos(request) -> tuple[int, Kosmos2Processor]:
    grid = request.param
    tokenizer = bpe_tokenizer([], bos="<s>", eos="</s>", pad="<pad>", unk="<unk>")
    processor = Kosmos2Processor(
        image_processor=_image_processor(), tokenizer=tokenizer, num_patch_index_tokens=grid * grid
    )
    return grid, processor


def _phrase_groups(boxes, labels, size):
    """Consecutive same-label objects as (label, [normalised boxes]), as the codec groups them."""
    w, h = size
    groups: list[tuple[str, list]] = []
    for box, label in zip(boxes, labels, strict=True):
        norm = (box[0] / w, box[1] / h, box[2] / w, box[3] / h)
        if groups and groups[-1][0] == label:
            groups[-1][1].append(norm)
        else:
            groups.append((label, [norm]))
    return groups


def test_kosmos2_encode_equals_processor(kosmos):
    """Same patch indices as transformers, and the same token ids as the processor's text."""
    grid, processor = kosmos
    codec = get_codec("kosmos2", grid=grid)
    rng = random.Random(2)
    for _ in range(N_RANDOM):
        size, boxes, labels = random_scene(rng)
        groups = _phrase_groups(boxes, labels, size)
        norms = [norm for _, group in groups for norm in group]
        for box, norm in zip(boxes, norms, strict=True):
            assert codec.box_to_locations(box, size) == list(coordinate_to_patch_index(norm, grid))
        theirs = processor.preprocess_examples(
            "".join(f"<phrase>{label}</phrase>" for label, _ in groups),
            bboxes=[group for _, group in groups],
        )
        ours = codec.encode(boxes, labels, size)
        # transformers puts spaces between the object's tags; its added tokens strip them
        assert ours == theirs.replace("> <", "><")
        assert processor.tokenizer(ours).input_ids == processor.tokenizer(theirs).input_ids


def test_kosmos2_decode_equals_post_process_generation(kosmos):
    """Random grounded captions (several boxes per phrase) decode to transformers' boxes, exactly.

    ``Kosmos2Processor.post_process_generation`` always assumes a 32 grid, so
    other grids go through the function it calls, with the grid passed.
    """
    grid, processor = kosmos
    codec = get_codec("kosmos2", grid=grid)
    token = codec.location_tokens
    rng = random.Random(3)
    for _ in range(N_RANDOM // 2):
        size = (rng.randint(1, 2000), rng.randint(1, 2000))
        text = "<grounding> An image of"
        for label in rng.sample(PHRASES, 3):
            pairs = []
            for _ in range(rng.randint(1, 3)):
                r1, r2 = sorted(rng.randrange(grid) for _ in range(2))
                c1, c2 = sorted(rng.randrange(grid) for _ in range(2))
                pairs.append(token[r1 * grid + c1] + token[r2 * grid + c2])
            objects = "</delimiter_of_multi_objects/>".join(pairs)
            text += f"<phrase> {label}</phrase><object>{objects}</object> and"
        text += "."
        _, entities = clean_text_and_extract_entities_with_bboxes(text, num_patches_per_side=grid)
        if grid == 32:  # the processor's own entry point assumes the default grid
            assert processor.post_process_generation(text)[1] == entities
        expected = [
            (name, tuple(v * s for v, s in zip(box, size * 2, strict=True)))
            for name, _, boxes in entities
            for box in boxes
        ]
        ours = codec.decode(text, size)
        assert ours.n_malformed == 0
        assert [(d.label, d.box) for d in ours] == expected
