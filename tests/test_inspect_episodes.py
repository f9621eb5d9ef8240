"""In-context learning in the small VLM: interleaved collate, episodes, training, scoring,
metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from loctune.codecs import get_codec
from loctune.inspect.answers import answer_target, answer_text
from loctune.inspect.baseline import PatchCore
from loctune.inspect.episodes import (
    EncoderFeatures,
    EpisodeAdapter,
    episode_parts,
    training_episodes,
)
from loctune.inspect.evaluation import evaluate_patchcore_in_context
from loctune.inspect.metrics import inspection_metrics
from loctune.inspect.prompts import Episode, build_prompt
from loctune.inspect.records import inspection_sample, is_defective
from loctune.inspect.run import ICLPrediction, predict_episodes, prediction_from_answer
from loctune.inspect.selection import select_examples
from loctune.inspect.synthetic import synthetic_inspection_set
from loctune.inspect.tiling import Tiling
from loctune.models.base import Turn
from loctune.models.small_vlm_adapter import Answer, SmallVLMAdapter, in_context_parts
from loctune.models.tokenizer import WordTokenizer
from loctune.types import Detection

CODEC = get_codec("bins:n_bins=16,strict=false")
TILING = Tiling(2, 2, global_size=16)


@pytest.fixture(scope="module")
def pool():
    """Two training products at 64 px: 4 good and 4 defective images each (all defect types)."""
    return synthetic_inspection_set(products=("wood", "pcb"), n_good=4, n_defective=4, size=64)


def tiny_adapter(samples, seed=0) -> SmallVLMAdapter:
    texts = [answer_text(s, CODEC, t) for s in samples for t in (None, TILING)]
    torch.manual_seed(seed)
    return SmallVLMAdapter.build(
        CODEC,
        texts=texts,
        config="tiny",
        image_size=16,
        vision_width=32,
        vision_depth=1,
        max_positions=256,
    )


@pytest.fixture(scope="module")
def adapter(pool):
    return tiny_adapter(pool)


def test_tokenizer_keeps_snake_case_defect_types_whole():
    assert WordTokenizer.split("defective: missing_piece <bin_3>") == [
        "defective",
        ":",
        "missing_piece",
        "<bin_3>",
    ]


def test_interleaved_collate_puts_each_image_in_its_place_and_labels_only_answers(adapter):
    tok, n = adapter.tokenizer, adapter.config.n_image_tokens
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    red, green, blue, yellow = (Image.new("RGB", (64, 64), c) for c in colours)
    box, size = (8.0, 16.0, 40.0, 48.0), (64, 64)
    defect = Answer(f"defective: spot {CODEC.encode([box], ['spot'], size)}", [(box, size)])
    first = ["<bos>", red, "<sep>", Answer("good"), green, blue, "<sep>", defect]
    second = ["<bos>", yellow, "<sep>"]
    batch = adapter.collate_sequences([first, second])
    ids, labels, cont = batch["input_ids"], batch["labels"], batch["loc_continuous"]
    assert batch["pixel_values"].shape[0] == 4

    good_ids = tok.encode("good") + [tok.eos_id]
    defect_ids = tok.encode(defect.text) + [tok.eos_id]
    img = [tok.image_id] * n
    expected = [tok.bos_id, *img, tok.sep_id, *good_ids, *img, *img, tok.sep_id, *defect_ids]
    assert ids[0].tolist() == expected
    assert ids[1].tolist()[: 2 + n] == [tok.bos_id, *img, tok.sep_id]
    assert batch["attention_mask"][1].sum() == 2 + n  # right padding after the short row
    # labels: -100 everywhere but the two answers (eos included)
    start_good = 2 + n
    start_defect = start_good + len(good_ids) + 2 * n + 1
    supervised = torch.nonzero(labels[0] != -100).squeeze(1).tolist()
    answer_span = [*range(start_good, start_good + len(good_ids))]
    answer_span += [*range(start_defect, start_defect + len(defect_ids))]
    assert supervised == answer_span
    assert labels[0, supervised].tolist() == ids[0, supervised].tolist()
    assert (labels[1] == -100).all()
    loc = [i for i in range(ids.shape[1]) if int(ids[0, i]) in set(adapter.loc_token_ids)]
    assert len(loc) == 4 and torch.isnan(cont[0]).sum() == cont.shape[1] - 4
    assert cont[0, loc, 0].tolist() == [v for (v,) in CODEC.box_to_continuous(box, size)]

    # the decoder reads image j's features at image j's placeholders, row by row
    model = adapter.model.eval()
    with torch.no_grad():
        embedded = model.embed(ids, batch["pixel_values"])
        features = model.projector(model.vision(batch["pixel_values"]))
    slots = ids == tok.image_id
    torch.testing.assert_close(embedded[slots], features.reshape(-1, features.shape[-1]))
    starts = [1, 2 + n + len(good_ids), 2 + 2 * n + len(good_ids)]
    for image, start in enumerate(starts):
        torch.testing.assert_close(embedded[0, start : start + n], features[image])
    torch.testing.assert_close(embedded[1, 1 : 1 + n], features[3])

    prompts = adapter.collate_sequences([first, second], train=False)
    assert "labels" not in prompts
    assert prompts["input_ids"][1, -(2 + n) :].tolist() == [tok.bos_id, *img, tok.sep_id]


def test_an_answer_whose_boxes_disagree_with_its_text_is_refused(adapter):
    image = Image.new("RGB", (64, 64))
    wrong = Answer(f"defective: spot {CODEC.encode([(0, 0, 8, 8)], ['spot'], (64, 64))}")
    with pytest.raises(ValueError, match="box_to_locations"):
        adapter.collate_sequences([[image, "<sep>", wrong]])
    with pytest.raises(TypeError, match="PIL image, a str or an Answer"):
        adapter.collate_sequences([[image, 3]])


@pytest.mark.parametrize("supervise_examples", [True, False])
def test_tiled_episode_shows_five_views_per_turn_and_supervises_the_answers(
    adapter, pool, supervise_examples
):
    wood = [s for s in pool if s.meta["product"] == "wood"]
    examples, query = [wood[0], wood[5]], wood[6]
    episode = Episode(examples, query, TILING)
    batch = EpisodeAdapter(adapter, supervise_examples).collate([episode])
    n = adapter.config.n_image_tokens
    assert batch["pixel_values"].shape[0] == 3 * 5
    assert int((batch["input_ids"] == adapter.tokenizer.image_id).sum()) == 15 * n
    shown = [*examples, query] if supervise_examples else [query]
    tok = adapter.tokenizer
    expected = [i for s in shown for i in tok.encode(answer_text(s, CODEC, TILING)) + [tok.eos_id]]
    labels = batch["labels"][0]
    assert labels[labels != -100].tolist() == expected
    # every supervised location token has the continuous position of its box on its crop
    written = [box for s in shown for box in answer_target(s, CODEC, TILING)[1]]
    assert written and all(size == (32, 32) for _, size in written)
    assert int((~torch.isnan(batch["loc_continuous"][0, :, 0])).sum()) == 4 * len(written)
    # generation prompts stop where the query's answer starts
    parts = episode_parts(episode, CODEC, train=False)
    assert parts[-1] == "<sep>" and not any(isinstance(p, Answer) for p in parts)


def test_training_episodes_are_class_balanced_within_one_product(pool):
    def draw():
        return training_episodes(
            pool, n_groups=8, group_images=15, k_choices=(0, 1, 3), tiling=TILING
        )

    def ids(groups):
        return [[(e.query.image_id, [x.image_id for x in e.examples]) for e in g] for g in groups]

    groups = draw()
    assert ids(groups) == ids(draw())
    for group in groups:
        ks = {len(e.examples) // 2 for e in group}
        tilings = {e.tiling for e in group}
        assert len(ks) == 1 and ks <= {0, 1, 3} and len(tilings) == 1
        turns, views = 2 * ks.pop() + 1, 5 if tilings.pop() else 1
        assert len(group) == max(1, 15 // (turns * views))  # as many as fit in 15 images
        for e in group:
            product = e.query.meta["product"]
            assert all(x.meta["product"] == product for x in e.examples)
            assert sum(is_defective(x) for x in e.examples) == len(e.examples) // 2
            assert e.query.image_id not in {x.image_id for x in e.examples}
    assert {e.tiling for g in groups for e in g} == {None, TILING}
    with pytest.raises(ValueError, match="needs a tiling"):
        training_episodes(pool, 1, tiled_fraction=0.5)


def test_episode_training_through_the_loop_lowers_the_loss(pool, tmp_path):
    from loctune.losses import LocationLoss, loss_config
    from loctune.train import TrainConfig, train

    adapter = tiny_adapter(pool, seed=1)
    group = training_episodes(pool, 1, group_images=60, k_choices=(1,), tiling=TILING, seed=3)[0]
    episodes = EpisodeAdapter(adapter)
    loss_fn = LocationLoss(loss_config("distance_inverse"), adapter.loc_token_ids, CODEC.space)

    def loss() -> float:
        batch = episodes.collate(group)
        with torch.no_grad():
            logits = episodes.forward(batch)
        return float(loss_fn(logits, batch["labels"], batch["loc_continuous"], shift=True))

    before = loss()
    config = TrainConfig(
        run_dir=str(tmp_path), steps=8, batch_size=1, lr=3e-3, progress=False, save_every=0
    )
    train(episodes, [group], config, loss_fn=loss_fn)
    assert loss() < before - 0.3


def test_prediction_score_is_the_first_answer_token_verdict_probability(adapter, pool):
    wood = [s for s in pool if s.meta["product"] == "wood"]
    episode = Episode([wood[1], wood[4]], wood[7])
    [prediction] = predict_episodes(adapter, [episode], max_new_tokens=6)
    batch = EpisodeAdapter(adapter).collate([episode], train=False)
    with torch.no_grad():
        logits = adapter.forward(batch)[0, -1]
    good, bad = (adapter.tokenizer.token_to_id[w] for w in ("good", "defective"))
    expected = torch.sigmoid(logits[bad] - logits[good])
    assert prediction.score == pytest.approx(float(expected), abs=1e-5)
    assert prediction.examples == [wood[1].image_id, wood[4].image_id]


def test_small_vlm_answers_parse_back_to_full_image_boxes(adapter):
    box = (10.0, 20.0, 30.0, 28.0)
    image = Image.new("RGB", (64, 64))
    query = inspection_sample(image, "tile", [box], ["crack"], image_id="q")
    tok = adapter.tokenizer
    for tiling in (None, TILING):
        text = tok.decode(tok.encode(answer_text(query, CODEC, tiling)))
        assert text.startswith("defective : crack")  # how the word tokenizer writes it back
        p = prediction_from_answer(query, [], text, 0.9, CODEC, tiling)
        assert p.defective and p.defect_type == "crack" and not p.malformed
        assert np.allclose(p.detections[0].box, box, atol=64 / 15 / 2 + 1e-6)


def _prediction(defective: bool, score: float, box=None) -> ICLPrediction:
    detections = [Detection("spot", box)] if box else []
    return ICLPrediction(
        "x", "", defective, score, "spot" if defective else "good", detections, False, 0, []
    )


def test_handcrafted_predictions_give_known_metrics():
    image = Image.new("RGB", (64, 64))
    truth = (10.0, 10.0, 20.0, 20.0)
    queries = [inspection_sample(image, "tile", image_id=f"g{i}") for i in range(2)] + [
        inspection_sample(image, "tile", [truth], ["spot"], image_id=f"d{i}") for i in range(3)
    ]
    predictions = [
        _prediction(False, 0.1),
        _prediction(True, 0.6, (30, 30, 40, 40)),  # false alarm
        _prediction(True, 0.9, (10, 10, 20, 21)),  # IoU 0.91: localised
        _prediction(True, 0.5, (15, 15, 35, 35)),  # IoU 0.05, centre (25, 25) outside: missed
        _prediction(False, 0.2),  # missed defect
    ]
    m = inspection_metrics(predictions, queries)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 2 / (3 + 3))
    # defective scores 0.9, 0.5, 0.2 vs good 0.1, 0.6: 4 of 6 pairs ranked right
    assert m["auroc"] == pytest.approx(4 / 6)
    assert m["loc_acc50"] == pytest.approx(1 / 3)
    assert m["loc_pointing"] == pytest.approx(1 / 3)
    predictions[3] = _prediction(True, 0.5, (12, 12, 40, 40))  # centre (26, 26): still outside
    assert inspection_metrics(predictions, queries)["loc_pointing"] == pytest.approx(1 / 3)
    predictions[3] = _prediction(True, 0.5, (0, 0, 30, 30))  # centre (15, 15) inside, IoU 0.11
    m = inspection_metrics(predictions, queries)
    assert (m["loc_acc50"], m["loc_pointing"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))


def test_patchcore_in_context_fits_on_the_good_examples_the_vlm_sees(adapter, pool):
    encoder = EncoderFeatures(adapter.model).eval()

    def make_detector():
        return PatchCore(encoder, input_size=16)

    chosen = select_examples(pool, k=2, seed=5)
    result = evaluate_patchcore_in_context(pool, k=2, make_detector=make_detector, seed=5)
    for prediction, examples in zip(result.predictions, chosen, strict=True):
        assert prediction.examples == [e.image_id for e in examples if not is_defective(e)]
        assert len(prediction.examples) == 2
    assert 0 <= result.metrics.pop("loc_peak") <= 1  # threshold-free pointing
    assert result.metrics == inspection_metrics(result.predictions, pool) | {
        "type_accuracy": pytest.approx(math.nan, nan_ok=True)
    }
    one = evaluate_patchcore_in_context(pool, k=1, make_detector=make_detector, seed=5)
    assert math.isnan(one.metrics["accuracy"]) and not math.isnan(one.metrics["auroc"])
    record = json.loads(json.dumps(one.predictions[0].to_json()))
    assert record["image_id"] == pool[0].image_id and record["text"] == ""
    assert record["examples"] == one.predictions[0].examples


def test_in_context_parts_lay_turns_out_as_the_small_vlm_was_trained(pool):
    wood = [s for s in pool if s.meta["product"] == "wood"]
    turns = build_prompt([wood[0], wood[5]], wood[6], CODEC, answer_query=True)
    parts = in_context_parts(turns, supervise_examples=False)
    image = [wood[0].load_image(), wood[5].load_image(), wood[6].load_image()]
    example_text = f"{answer_text(wood[0], CODEC)} <eos>"
    assert parts[:5] == ["<bos>", image[0], "<sep>", example_text, image[1]]
    assert parts[-1] == Answer(turns[-1].answer, turns[-1].boxes)  # the query's, supervised
    assert all(isinstance(p, Answer) for p in in_context_parts(turns, True)[3::3])
    with pytest.raises(ValueError, match="turn 0: only the last turn"):
        in_context_parts([Turn([image[0]]), *turns])


def test_in_context_choices_must_be_words_of_the_vocabulary(adapter, pool):
    turns = build_prompt([], pool[0], CODEC)
    with pytest.raises(ValueError, match=r"choices: the small VLM's vocabulary lacks \['maybe'\]"):
        adapter.generate_in_context([turns], ("good", "maybe"))
    [answer] = adapter.generate_in_context([turns], ("good", "defective"), max_new_tokens=0)
    assert answer.choice_logprobs == [pytest.approx(-math.log(2))] * 2  # nothing generated
    with pytest.raises(NotImplementedError, match="EpisodeAdapter cannot answer"):
        EpisodeAdapter(adapter).generate_in_context([turns])
