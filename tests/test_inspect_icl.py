"""In-context inspection: prompts, example selection, answer parsing, a tiny Idefics3, the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from loctune.codecs import get_codec
from loctune.inspect.answers import answer_text, parse_answer
from loctune.inspect.evaluation import evaluate_in_context
from loctune.inspect.prompts import build_prompt
from loctune.inspect.records import inspection_sample, is_defective
from loctune.inspect.run import inspect_in_context
from loctune.inspect.selection import ExampleSelector, PooledFeatures, similarity
from loctune.inspect.synthetic import synthetic_inspection_set
from loctune.inspect.tiling import Tiling

os.environ["HF_HUB_OFFLINE"] = "1"

hf_tiny = pytest.importorskip("hf_tiny")

CODEC = get_codec("bins", n_bins=100)


@pytest.fixture(scope="module")
def pool():
    """Two products' worth of 64 px synthetic samples: 3 good, 4 defective (all four types)."""
    return synthetic_inspection_set(products=("tile", "marble"), n_good=3, n_defective=4, size=64)


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    from loctune.models.hf import load_adapter

    path = hf_tiny.tiny_idefics3(tmp_path_factory.mktemp("idefics3"))
    return load_adapter(path, codec="bins:n_bins=100")


def _product(samples, name):
    return [s for s in samples if s.meta["product"] == name]


def test_prompt_interleaves_examples_with_their_answers_then_the_query(pool):
    tile = _product(pool, "tile")
    query = tile[0]
    examples = ExampleSelector(tile, k=2, strategy="random").select(query)
    turns = build_prompt(examples, query, CODEC)
    assert [len(t.images) for t in turns] == [1] * 5
    answers = [t.answer for t in turns]
    assert answers == [answer_text(e, CODEC) for e in examples] + [None]
    assert [a.split(":")[0] for a in answers[:-1]] == ["good", "defective"] * 2
    assert answers[1].startswith(f"defective: {examples[1].meta['defect_type']} <bin_")
    assert turns[-1].images[-1] is query.load_image()
    assert turns[-1].text == query.prompt


def test_chat_adapter_renders_turns_as_user_assistant_pairs_then_the_query(pool, tiny_adapter):
    tile = _product(pool, "tile")
    turns = build_prompt(ExampleSelector(tile, k=2).select(tile[0]), tile[0], CODEC)
    messages, images = tiny_adapter.in_context_messages(turns)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2 * 2 + ["user"]
    n_image_parts = sum(part["type"] == "image" for m in messages for part in m["content"])
    assert n_image_parts == len(images) == 5
    replies = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
    assert replies == [t.answer for t in turns[:-1]]
    with pytest.raises(ValueError, match="query without one"):
        tiny_adapter.in_context_messages(build_prompt([], tile[0], CODEC, answer_query=True))


def test_tiled_prompt_shows_global_view_and_crops_with_the_layout(pool):
    tile = _product(pool, "tile")
    examples, query = tile[3:5], tile[0]
    turns = build_prompt(examples, query, CODEC, Tiling(2, 2, global_size=32))
    assert [len(t.images) for t in turns] == [5] * 3
    assert turns[0].images[0].size == (32, 32) and turns[0].images[1].size == (32, 32)
    assert turns[0].text.startswith("image 1: the whole image, downscaled.")


@pytest.mark.parametrize("overlap", [0.0, 0.25])
def test_box_on_a_crop_maps_back_to_the_full_image_through_the_prompt(overlap):
    image = Image.new("RGB", (200, 100))
    box = (130.0, 60.0, 170.0, 90.0)  # inside the bottom-right crop of a 2x2 grid
    sample = inspection_sample(image, "board", [box], ["scratch"])
    tiling = Tiling(2, 2, overlap=overlap, global_size=50)
    answer = build_prompt([sample], sample, CODEC, tiling)[0].answer
    assert answer.startswith("defective: scratch image 5: <bin_")
    parsed = parse_answer(answer, CODEC, image.size, tiling)
    assert parsed.defective and parsed.defect_type == "scratch"
    assert len(parsed.detections) == 1
    crop_w, crop_h = tiling.grid(image.size).crops[-1].size
    tolerance = max(crop_w, crop_h) / (CODEC.n_bins - 1)
    np.testing.assert_allclose(parsed.detections[0].box, box, atol=tolerance)


def test_parse_answer_reads_what_it_can_and_counts_the_rest():
    size = (100, 100)
    good = parse_answer("Good.", CODEC, size)
    assert good.defective is False and not good.malformed
    broken = parse_answer("<bin_3> the product", CODEC, size)
    assert broken.malformed and broken.detections == []
    typed = parse_answer("defective: crack <bin_10><bin_10><bin_50><bin_50> crack", CODEC, size)
    assert typed.defect_type == "crack"
    assert [d.box for d in typed.detections] == [pytest.approx((10.1, 10.1, 50.5, 50.5), abs=0.1)]
    reversed_box = parse_answer(
        "defective: spot <bin_50><bin_50><bin_10><bin_10> spot", CODEC, size
    )
    assert reversed_box.detections == [] and reversed_box.n_malformed_boxes == 1
    tiling = Tiling(2, 2)
    stray = parse_answer(
        "defective: spot image 9: <bin_1><bin_1><bin_5><bin_5> spot", CODEC, size, tiling
    )
    assert stray.detections == [] and stray.n_malformed_boxes == 1
    on_global = parse_answer(
        "defective: spot image 1: <bin_0><bin_0><bin_99><bin_99> spot", CODEC, size, tiling
    )
    assert [d.box for d in on_global.detections] == [pytest.approx((0, 0, 100, 100))]


@pytest.mark.parametrize("strategy", ["random", "balanced", "nearest"])
def test_every_strategy_returns_k_good_and_k_defective_without_the_query(pool, strategy):
    marble = _product(pool, "marble")
    selector = ExampleSelector(marble, k=2, strategy=strategy)
    for query in marble[::3]:
        chosen = selector.select(query)
        assert [is_defective(s) for s in chosen] == [False, True, False, True]
        assert query not in chosen and len({s.image_id for s in chosen}) == 4
        assert chosen == selector.select(query)  # deterministic per query


def test_balanced_selection_covers_distinct_defect_types(pool):
    marble = _product(pool, "marble")
    chosen = ExampleSelector(marble, k=3, strategy="balanced").select(marble[-1])
    assert len({s.meta["defect_type"] for s in chosen if is_defective(s)}) == 3


def test_selection_needs_enough_examples_of_each_class(pool):
    marble = _product(pool, "marble")
    with pytest.raises(ValueError, match="need k=4 good"):
        ExampleSelector(marble, k=4).select(marble[0])


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_nearest_is_the_nearest_under_the_chosen_metric(pool, metric):
    marble = _product(pool, "marble")
    query = marble[0]
    # good candidates 1, 2: cosine prefers the small vector aligned with the query, dot the long one
    vectors = {id(s.load_image()): torch.tensor([0.0, 1.0]) for s in marble}
    vectors[id(query.load_image())] = torch.tensor([1.0, 0.0])
    vectors[id(marble[1].load_image())] = torch.tensor([1.0, 0.1])
    vectors[id(marble[2].load_image())] = torch.tensor([10.0, 10.0])

    def embed(images):
        return torch.stack([vectors[id(im)] for im in images])

    chosen = ExampleSelector(marble, k=1, strategy="nearest", metric=metric, embed=embed)
    expected = marble[1] if metric == "cosine" else marble[2]
    assert chosen.select(query)[0] is expected


def test_nearest_with_default_features_ranks_by_similarity(pool):
    marble = _product(pool, "marble")
    query, embed = marble[0], PooledFeatures()
    chosen = ExampleSelector(marble, k=2, strategy="nearest", embed=embed).select(query)
    candidates = [s for s in marble if s is not query]
    scores = similarity(embed([query.load_image()]), embed([s.load_image() for s in candidates]))
    for defective in (False, True):
        ranked = sorted(
            (float(scores[0, i]), i)
            for i, s in enumerate(candidates)
            if is_defective(s) == defective
        )
        expected = [candidates[i].image_id for _, i in ranked[::-1][:2]]
        assert [s.image_id for s in chosen if is_defective(s) == defective] == expected


def test_run_on_random_weights_parses_or_counts_and_scores_with_the_model(pool, tiny_adapter):
    tile = _product(pool, "tile")
    query = tile[5]
    examples = ExampleSelector(tile, k=1).select(query)
    pred = inspect_in_context(tiny_adapter, query, examples, max_new_tokens=8)
    parsed = parse_answer(pred.text, tiny_adapter.codec, query.image_size)
    assert pred.malformed == parsed.malformed
    assert pred.defective == (parsed.defective if not parsed.malformed else pred.score >= 0.5)
    assert pred.examples == [e.image_id for e in examples]
    # the score is the model's preference at the first token where " good" and " defective" differ
    messages, images = tiny_adapter.in_context_messages(
        build_prompt(examples, query, tiny_adapter.codec)
    )
    text = tiny_adapter.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.count("<image>") == 3
    good, bad = (
        tiny_adapter.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        for word in ("good", "defective")
    )
    n = next(i for i, (g, b) in enumerate(zip(good, bad, strict=False)) if g != b)
    assert n == 1  # this byte-level tokenizer writes the space as its own token: fed first
    enc = tiny_adapter.processor(text=[text], images=[images], return_tensors="pt")
    enc["input_ids"] = torch.cat([enc["input_ids"], torch.tensor([good[:n]])], dim=1)
    enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    with torch.no_grad():
        logits = tiny_adapter.model(**enc).logits[0, -1]
    expected = torch.sigmoid(logits[bad[n]] - logits[good[n]])
    assert pred.score == pytest.approx(float(expected), rel=1e-4)


def test_tiled_run_and_evaluation_metrics(pool, tiny_adapter):
    tile = _product(pool, "tile")
    result = evaluate_in_context(
        tiny_adapter, tile[2:4], tile, k=1, tiling=Tiling(1, 2, global_size=32), max_new_tokens=6
    )
    metrics, predictions = result.metrics, result.predictions
    assert metrics["n_queries"] == 2 and [p.image_id for p in predictions] == [
        q.image_id for q in tile[2:4]
    ]
    right = [p.defective == is_defective(q) for p, q in zip(predictions, tile[2:4], strict=True)]
    assert metrics["accuracy"] == np.mean(right)
    assert metrics["malformed_rate"] == np.mean([p.malformed for p in predictions])
    assert set(metrics) >= {"f1", "loc_acc50", "type_accuracy", "auroc_per_product"}
    # every tiled prompt showed the global view and two crops per turn, read by the same parser
    for p, query in zip(predictions, tile[2:4], strict=True):
        parsed = parse_answer(p.text, CODEC, query.image_size, Tiling(1, 2, global_size=32))
        assert (p.malformed, p.detections) == (parsed.malformed, parsed.detections)


def _write_folder(root, pool):
    """An MVTec-layout category from synthetic samples: train/good, test/good and defects."""
    category = root / "tile"
    for i, sample in enumerate(_product(pool, "tile")):
        split = "train" if i < 2 else "test"
        kind = sample.meta["defect_type"]
        (category / split / kind).mkdir(parents=True, exist_ok=True)
        sample.load_image().save(category / split / kind / f"{i:03d}.png")
        if is_defective(sample):
            (category / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            mask = Image.fromarray(np.asarray(sample.meta["mask"], dtype=np.uint8) * 255)
            mask.save(category / "ground_truth" / kind / f"{i:03d}_mask.png")
    return category


def test_cli_writes_predictions_and_metrics(pool, tiny_adapter, tmp_path, capsys):
    from loctune.cli import main

    model = tmp_path / "model"
    tiny_adapter.save_pretrained(str(model))
    data = _write_folder(tmp_path / "data", pool)
    query = data / "test" / "good" / "002.png"
    common = [
        "--model",
        str(model),
        "--k",
        "1",
        "--max-new-tokens",
        "4",
        "--project",
        str(tmp_path / "runs"),
    ]
    assert main(["inspect", *common, "--examples", str(data), "--query", str(query)]) == 0
    records = json.loads((tmp_path / "runs" / "exp" / "predictions.json").read_text())
    assert [r["image"] for r in records] == [str(query)]
    assert str(query) in capsys.readouterr().out
    assert (
        main(
            [
                "inspect",
                *common,
                "--data",
                str(data),
                "--eval",
                "--n",
                "2",
                "--select",
                "nearest",
                "--name",
                "ev",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "runs" / "ev" / "metrics.json").read_text())
    assert metrics["n_queries"] == 2
    with pytest.raises(SystemExit, match="--examples DIR --query"):
        main(["inspect", *common, "--data", str(data)])


def test_chat_adapters_admit_inspection_samples(pool, tiny_adapter):
    query = _product(pool, "tile")[0]
    assert query.task == "inspection"
    batch = tiny_adapter.collate([query], train=False)
    prompt = tiny_adapter.tokenizer.decode(batch["input_ids"][0])
    assert query.prompt in prompt and prompt.count("<image>") >= 1


def test_choices_that_one_token_cannot_tell_apart_are_refused(tiny_adapter):
    forced, first = tiny_adapter._choice_tokens(("good", "defective"))
    assert len(first) == 2 and first[0] != first[1]
    assert tiny_adapter.tokenizer.decode(forced) == " "  # the shared leading space
    with pytest.raises(ValueError, match="cannot tell"):
        tiny_adapter._choice_tokens(("good", "good"))
