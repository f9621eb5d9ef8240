import math

import pytest
import torch

from loctune.codecs import get_codec
from loctune.evaluate import coco_detection_metrics, evaluate, grounding_metrics, score_generation
from loctune.models.base import Generation
from loctune.types import Detection, Sample

CODEC = get_codec("rowcol", grid=8)
LOC_IDS = list(range(100, 108))  # token id of <rc_k> is 100 + k
SIZE = (64, 64)


def gen_for(text_tokens, logprobs, loc_probs=None):
    """A generation whose text is what the codec would print for these tokens."""
    text = " ".join(t if isinstance(t, str) else f"<rc_{t - 100}>" for t in text_tokens)
    ids = [t if isinstance(t, int) else 1 for t in text_tokens]
    return Generation(text=text, token_ids=ids, token_logprobs=logprobs, loc_probs=loc_probs)


def test_grounding_metrics_known_values():
    gt = [(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 10)]
    pred = [(0, 0, 10, 10), (0, 0, 10, 5), None]  # IoU 1, 0.5, miss
    m = grounding_metrics(pred, gt)
    assert m["acc50"] == pytest.approx(2 / 3)
    assert m["miou"] == pytest.approx(0.5)


def test_coco_ap_perfect_and_ranking_matters():
    truths = [([(0, 0, 10, 10)], ["a"]), ([(20, 20, 40, 40)], ["a"])]
    perfect = [[Detection("a", (0, 0, 10, 10), 0.9)], [Detection("a", (20, 20, 40, 40), 0.8)]]
    assert coco_detection_metrics(perfect, truths)["ap50"] == pytest.approx(1.0)
    # one true and one false positive per image: AP depends on which the scores rank first
    good = [[Detection("a", (0, 0, 10, 10), 0.9), Detection("a", (50, 50, 60, 60), 0.1)],
            [Detection("a", (20, 20, 40, 40), 0.9), Detection("a", (0, 0, 5, 5), 0.1)]]
    bad = [[Detection(d.label, d.box, 1 - d.score) for d in img] for img in good]
    ap_good = coco_detection_metrics(good, truths)["ap50"]
    ap_bad = coco_detection_metrics(bad, truths)["ap50"]
    assert ap_good == pytest.approx(1.0) and ap_bad < 0.6
    m = coco_detection_metrics([[Detection("zebra", (0, 0, 10, 10))], []], truths)
    assert m["unknown_label_rate"] == 1.0 and m["ap"] == 0.0


def test_confidence_and_expected_value_decoding():
    # label "dot" then four location tokens: rows/cols 2, 2, 5, 5 on an 8-grid of 64 px
    probs = torch.zeros(5, 8)
    probs[1, 2] = probs[2, 2] = 1.0
    probs[3, 5] = probs[3, 6] = 0.5  # bottom row: expectation 5.5
    probs[4, 5] = 1.0
    gen = gen_for(["dot", 102, 102, 105, 105], [-0.1, math.log(0.5), math.log(0.5), math.log(0.5), math.log(0.5)], probs)
    sc = score_generation(gen, CODEC, LOC_IDS, SIZE)
    assert len(sc.detections) == 1 and sc.n_malformed == 0
    assert sc.detections[0].box == pytest.approx((20, 20, 44, 44))  # bin centres
    assert sc.detections[0].score == pytest.approx(0.5)
    assert sc.ev_detections[0].box == pytest.approx((20, 20, 44, 48))  # y2 at row 5.5
    assert sc.loc_entropies == pytest.approx([0, 0, math.log(2), 0])


def test_malformed_generation_is_counted_not_fatal():
    gen = gen_for(["dot", 102, 102, ";", "junk", 103], [-1.0] * 6)
    sc = score_generation(gen, CODEC, LOC_IDS, SIZE)
    assert sc.detections == [] and sc.n_malformed == 2


class FixedAdapter:
    """Returns prepared generations: the evaluator's contract, without a model."""

    codec = CODEC
    loc_token_ids = LOC_IDS

    def __init__(self, gens):
        self.gens = list(gens)

    def generate(self, samples, max_new_tokens=32):
        return [self.gens.pop(0) for _ in samples]


def test_evaluate_end_to_end_known_score(tmp_path):
    img = "unused.png"
    samples = [Sample(img, "the dot", [(16, 16, 48, 48)], ["dot"], meta={"image_size": SIZE}) for _ in range(2)]
    good = gen_for(["dot", 102, 102, 105, 105], [-0.1] * 5)  # box (20,20,44,44): IoU 0.5625
    garbage = gen_for(["no", "box"], [-2.0, -2.0])
    res = evaluate(FixedAdapter([good, garbage]), samples, batch_size=1, progress=False)
    assert res.metrics["acc50"] == pytest.approx(0.5)
    assert res.metrics["miou"] == pytest.approx(0.5625 / 2)
    assert res.metrics["unparseable_rate"] == pytest.approx(0.5)
    res.save(tmp_path)
    assert (tmp_path / "predictions.jsonl").read_text().count("\n") == 2
    assert "acc50" in (tmp_path / "metrics.json").read_text()
