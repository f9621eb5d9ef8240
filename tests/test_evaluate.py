"""Evaluation: hand-computed scores, confidences that rank, expected-value decoding."""

import json
import math

import pytest
import torch
from torch import nn

from loctune.codecs import get_codec
from loctune.evaluate import (
    GenerationDecoder,
    evaluate,
    evaluate_generations,
    expected_locations,
    suppress_duplicates,
)
from loctune.metrics import coco_detection_metrics, grounding_metrics, location_entropy
from loctune.models.base import Generation
from loctune.types import Detection, Sample

SIZE = (64, 64)
ROWCOL = get_codec("rowcol", grid=8)  # tokens <rc_k>, order y1 x1 y2 x2, bin k centred at 8k+4 px
LOC_BASE = 100  # token id of location k in these tests
WORD_IDS: dict[str, int] = {}


def make_generation(pieces, codec=ROWCOL, logprobs=None, loc_probs=None) -> Generation:
    """A generation whose text is the concatenated pieces, one token per piece."""
    index = {tok: k for k, tok in enumerate(codec.location_tokens)}
    ids = [
        LOC_BASE + index[p] if p in index else WORD_IDS.setdefault(p, 10_000 + len(WORD_IDS))
        for p in pieces
    ]
    if logprobs is None:
        logprobs = [math.log(0.9)] * len(pieces)
    return Generation("".join(pieces), ids, list(logprobs), loc_probs)


def loc_ids(codec=ROWCOL) -> list[int]:
    return [LOC_BASE + k for k in range(len(codec.location_tokens))]


def rc(*ks) -> list[str]:
    return [f"<rc_{k}>" for k in ks]


def sample(boxes, labels, task="grounding") -> Sample:
    return Sample("unused.png", "prompt", boxes, labels, task=task, meta={"image_size": SIZE})


# --- pure metrics -------------------------------------------------------------------------


def test_grounding_metrics_hand_computed():
    gt = [(0, 0, 10, 10)] * 4
    pred = [(0, 0, 10, 10), (0, 0, 10, 5), (0, 0, 5, 5), None]  # IoU 1, 0.5, 0.25, miss
    m = grounding_metrics(pred, gt)
    assert m["acc50"] == pytest.approx(2 / 4)
    assert m["miou"] == pytest.approx((1 + 0.5 + 0.25 + 0) / 4)


def test_grounding_metrics_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions for 1"):
        grounding_metrics([None, None], [(0, 0, 1, 1)])


GT = [[Detection("cat", (0, 0, 10, 10))], [Detection("cat", (20, 20, 40, 40))]]


def test_perfect_detections_give_ap_one():
    preds = [[Detection("Cat ", (0, 0, 10, 10), 0.7)], [Detection("cat", (20, 20, 40, 40), 0.2)]]
    m = coco_detection_metrics(preds, GT)
    assert (m["ap"], m["ap50"], m["ap75"]) == pytest.approx((1.0, 1.0, 1.0))


def test_confidence_ordering_changes_ap():
    """A true and a false positive per image: AP50 is 1 when the true one ranks first, and
    0.5 when the false one does (recall 1 is first reached at precision 1/2)."""

    def preds(tp_score, fp_score):
        return [
            [
                Detection("cat", (0, 0, 10, 10), tp_score),
                Detection("cat", (50, 50, 60, 60), fp_score),
            ],
            [
                Detection("cat", (20, 20, 40, 40), tp_score),
                Detection("cat", (0, 40, 9, 60), fp_score),
            ],
        ]

    assert coco_detection_metrics(preds(0.9, 0.1), GT)["ap50"] == pytest.approx(1.0)
    assert coco_detection_metrics(preds(0.1, 0.9), GT)["ap50"] == pytest.approx(0.5)


def test_coco_edge_cases_do_not_crash():
    assert coco_detection_metrics([[], []], GT)["ap"] == 0.0
    assert math.isnan(coco_detection_metrics([[Detection("cat", (0, 0, 1, 1))]], [[]])["ap"])
    unknown = coco_detection_metrics([[Detection("zebra", (0, 0, 10, 10))], []], GT)
    assert unknown["ap"] == 0.0 and unknown["unknown_label_rate"] == 1.0


def test_entropy_of_uniform_distribution_is_log_n():
    # rows need not sum to 1: entropy is over the renormalised location slice
    probs = torch.stack([torch.full((8,), 0.05), torch.eye(8)[3] * 0.4])
    assert location_entropy(probs).tolist() == pytest.approx([math.log(8), 0.0])


# --- decoding -----------------------------------------------------------------------------


def test_expected_value_decoding_on_hand_made_distribution():
    pieces = ["thing ", *rc(2, 2, 5, 5)]
    probs = torch.zeros(5, 8)
    probs[1, 2] = probs[2, 2] = 0.9  # y1, x1: certain (mass 0.9 renormalises to 1)
    probs[3, [5, 6]] = 0.4  # y2: half at row 5, half at row 6 -> expectation 5.5
    probs[4, [4, 5, 6]] = torch.tensor([0.25, 0.5, 0.25])  # x2: symmetric -> 5
    out = GenerationDecoder(ROWCOL, loc_ids())(make_generation(pieces, loc_probs=probs), SIZE)
    assert out.n_malformed == 0
    assert out.detections[0].box == pytest.approx((20, 20, 44, 44))  # argmax: bin centres 8k+4
    assert out.ev_detections[0].box == pytest.approx((20, 20, 44, 48))  # y2 = 8 * 5.5 + 4
    assert out.loc_entropies == pytest.approx([0, 0, math.log(2), 1.5 * math.log(2)])


def test_expected_value_on_a_grid_is_the_expected_cell_not_the_expected_index():
    codec = get_codec("patch", grid=4)  # cell (r, c) centred at (16c + 8, 16r + 8)
    probs = torch.zeros(3, 16)
    probs[1, [5, 10]] = 0.5  # cells (1, 1) and (2, 2): expected (1.5, 1.5), not index 7.5
    probs[2, 15] = 1.0
    gen = make_generation(["a ", "<patch_5>", "<patch_15>"], codec, loc_probs=probs)
    out = GenerationDecoder(codec, loc_ids(codec))(gen, SIZE)
    assert out.detections[0].box == pytest.approx((24, 24, 56, 56))
    assert out.ev_detections[0].box == pytest.approx((32, 32, 56, 56))
    assert expected_locations(probs[1:2], codec.space.coords()).tolist() == [[1.5, 1.5]]


def test_confidence_modes_follow_the_models_probabilities():
    # two objects; rowcol writes the label before the box, so " ; dog " belongs to the second
    pieces = ["cat ", *rc(2, 2, 5, 5), " ; ", "dog ", *rc(0, 0, 1, 1)]
    lp = [math.log(p) for p in (0.8, 0.5, 0.5, 0.5, 0.5, 1.0, 0.2, 0.9, 0.9, 0.9, 0.9)]
    probs = torch.zeros(len(pieces), 8)
    probs[1:5, [1, 2, 3, 5]] = 0.2  # neighbours of the chosen bins 2 and 5
    probs[7:11, 0] = 0.9
    gen = make_generation(pieces, logprobs=lp, loc_probs=probs)

    def scores(mode):
        return [d.score for d in GenerationDecoder(ROWCOL, loc_ids(), mode)(gen, SIZE).detections]

    geo = math.exp
    assert scores("tokens") == pytest.approx(
        [geo((lp[0] + 4 * lp[1]) / 5), geo((lp[5] + lp[6] + 4 * lp[7]) / 6)]
    )
    assert scores("loc_tokens") == pytest.approx([0.5, 0.9])
    # mass within one bin of the choice: bins 1, 2, 3 around 2 (0.6); 5 alone around 5 (0.2)
    assert scores("loc_mass") == pytest.approx([math.sqrt(0.6 * 0.2), 0.9])


def test_label_after_the_box_is_read_on_the_right_side():
    codec = get_codec("paligemma")
    box = ["<loc0000>", "<loc0000>", "<loc0511>", "<loc0511>"]
    pieces = [*box, " cat", " ;", " ", *box, " dog"]
    lp = [math.log(0.5)] * 4 + [math.log(0.1), 0.0, 0.0] + [math.log(0.5)] * 4 + [0.0]
    out = GenerationDecoder(codec, loc_ids(codec))(make_generation(pieces, codec, lp), SIZE)
    assert [d.label for d in out.detections] == ["cat", "dog"]
    assert out.detections[0].score == pytest.approx(
        math.exp((4 * math.log(0.5) + math.log(0.1)) / 7)
    )
    assert out.detections[1].score == pytest.approx(math.exp(4 * math.log(0.5) / 5))


def test_malformed_generations_are_counted_not_fatal():
    decode = GenerationDecoder(ROWCOL, loc_ids())
    broken = decode(make_generation(["thing ", *rc(2, 2), " ; ", "junk ", *rc(3)]), SIZE)
    assert broken.detections == [] and broken.n_malformed == 2
    # a reversed box the codec rejects is skipped; the next object still finds its tokens
    pieces = ["a ", *rc(6, 6, 2, 2), " ; ", "b ", *rc(1, 1, 3, 3)]
    probs = torch.zeros(len(pieces), 8)
    probs[1:5, 7] = 1.0  # the rejected box's steps must not be used for b
    probs[[7, 8, 9, 10], [1, 1, 3, 3]] = 1.0
    probs[9, [3, 4]] = 0.5  # b's y2 at 3.5
    out = decode(make_generation(pieces, loc_probs=probs), SIZE)
    assert [d.label for d in out.detections] == ["b"] and out.n_malformed == 1
    assert out.ev_detections[0].box == pytest.approx((12, 12, 28, 32))
    # text and tokens disagree (location ids missing): the box is kept, scored by the whole
    # generation, and counted
    text_only = Generation("b <rc_1><rc_1><rc_3><rc_3>", [7, 8], [math.log(0.25), 0.0])
    out = decode(text_only, SIZE)
    assert out.detections[0].box == pytest.approx((12, 12, 28, 28)) and out.n_malformed == 1
    assert out.detections[0].score == pytest.approx(0.5)
    assert decode(Generation("", [], []), SIZE).detections == []


def test_decoder_rejects_bad_configuration_and_adapter_output():
    with pytest.raises(ValueError, match="confidence must be one of"):
        GenerationDecoder(ROWCOL, loc_ids(), "constant")
    with pytest.raises(ValueError, match="loc_token_ids has 3 ids"):
        GenerationDecoder(ROWCOL, [1, 2, 3])
    with pytest.raises(ValueError, match="token_logprobs has 1 entries for 2 token_ids"):
        GenerationDecoder(ROWCOL, loc_ids())(Generation("x", [1, 2], [0.0]), SIZE)


# --- the evaluator ------------------------------------------------------------------------


class ReplayAdapter:
    """Replays prepared generations: the evaluator's side of the adapter contract."""

    codec = ROWCOL
    loc_token_ids = loc_ids()

    def __init__(self, generations):
        self.generations = list(generations)
        self.model = nn.Linear(1, 1)
        self.batches: list[int] = []

    def generate(self, samples, max_new_tokens=32):
        assert not self.model.training and not torch.is_grad_enabled()
        self.batches.append(len(samples))
        return [self.generations.pop(0) for _ in samples]


def test_evaluate_grounding_known_scores_and_saved_files(tmp_path):
    samples = [sample([(16, 16, 48, 48)], ["thing"]) for _ in range(3)]
    probs = torch.zeros(5, 8)
    probs[[1, 2, 3, 4], [2, 2, 5, 5]] = 1.0  # argmax box (20, 20, 44, 44): IoU 0.5625
    probs[3, [5, 6]] = 0.5  # EV box (20, 20, 44, 48): IoU 24 * 28 / (32 * 32) = 0.65625
    hit = make_generation(["thing ", *rc(2, 2, 5, 5)], loc_probs=probs)
    miss = make_generation(["thing ", *rc(0, 0, 1, 1)], loc_probs=torch.eye(8)[[0, 0, 0, 1, 1]])
    garbage = make_generation(["no ", "box"])
    adapter = ReplayAdapter([hit, miss, garbage])
    adapter.model.train()
    result = evaluate(adapter, samples, batch_size=2, progress=False)

    assert adapter.batches == [2, 1] and adapter.model.training  # mode restored
    m = result.metrics
    assert m["acc50"] == pytest.approx(1 / 3) and m["ev_acc50"] == pytest.approx(1 / 3)
    assert m["miou"] == pytest.approx(0.5625 / 3)
    assert m["ev_miou"] == pytest.approx(0.65625 / 3)
    assert m["unparseable_rate"] == pytest.approx(1 / 3)
    assert m["loc_entropy"] == pytest.approx(math.log(2) / 8)  # 8 location steps, one split
    assert "ap" not in m

    result.save(tmp_path)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first["detections"][0]["box"] == pytest.approx([20, 20, 44, 44])
    assert first["gt"] == {"boxes": [[16, 16, 48, 48]], "labels": ["thing"], "crowd": []}
    assert json.loads((tmp_path / "metrics.json").read_text())["acc50"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(("tp_prob", "fp_prob", "ap50"), [(0.9, 0.3, 1.0), (0.3, 0.9, 0.5)])
def test_evaluate_detection_ap_ranks_by_token_probabilities(tp_prob, fp_prob, ap50):
    """The same boxes score AP50 1 or 0.5 depending only on which one the model was surer of."""
    samples = [sample([(16, 16, 48, 48)], ["thing"], task="detection")]
    pieces = ["thing ", *rc(2, 2, 5, 5), " ; ", "thing ", *rc(7, 7, 7, 7)]
    lp = [0.0] + [math.log(tp_prob)] * 4 + [0.0, 0.0] + [math.log(fp_prob)] * 4
    result = evaluate_generations(
        samples, [make_generation(pieces, logprobs=lp)], ROWCOL, loc_ids()
    )
    assert result.metrics["ap50"] == pytest.approx(ap50)
    assert result.metrics["ev_ap50"] == pytest.approx(ap50)  # no loc_probs: EV = argmax boxes
    assert math.isnan(result.metrics["loc_entropy"])


def test_evaluate_without_scoring_and_with_bad_samples():
    unlabelled = [Sample("unused.png", "find it", [], [], meta={"image_size": SIZE})]
    gen = make_generation(["it ", *rc(2, 2, 5, 5)])
    result = evaluate(ReplayAdapter([gen]), unlabelled, score=False, progress=False)
    assert result.metrics == {} and result.predictions[0]["detections"][0]["label"] == "it"
    with pytest.raises(ValueError, match="grounding sample needs a box"):
        evaluate(ReplayAdapter([gen]), unlabelled, progress=False)


# --- duplicates, crowd regions, the saved detection files -----------------------------------


def detection_pieces(*boxes, label="thing"):
    pieces = []
    for k, box in enumerate(boxes):
        pieces += ([" ; "] if k else []) + [f"{label} ", *rc(*box)]
    return pieces


def test_repeated_box_is_suppressed_for_detection_but_kept_for_grounding():
    """A box written twice is one false positive less after NMS: AP50 0.5 -> 1.0."""
    truth = [(16, 16, 48, 48)]
    gen = make_generation(detection_pieces((2, 2, 5, 5), (2, 2, 5, 5)))
    kept = evaluate_generations([sample(truth, ["thing"], "detection")], [gen], ROWCOL, loc_ids(),
                                nms_iou=None)
    suppressed = evaluate_generations([sample(truth, ["thing"], "detection")], [gen], ROWCOL,
                                      loc_ids())
    assert len(kept.predictions[0]["detections"]) == 2 and kept.metrics["ap50"] < 1
    assert len(suppressed.predictions[0]["detections"]) == 1
    assert suppressed.metrics["ap50"] == pytest.approx(1.0)
    assert suppressed.metrics["suppressed_rate"] == pytest.approx(0.5)
    assert suppressed.predictions[0]["n_suppressed"] == 1
    grounding = evaluate_generations([sample(truth, ["thing"])], [gen], ROWCOL, loc_ids())
    assert len(grounding.predictions[0]["detections"]) == 2  # a grounding answer is its first box


def test_suppression_keeps_the_better_box_and_other_labels():
    dets = [Detection("a", (0, 0, 10, 10), 0.4), Detection("a", (1, 0, 11, 10), 0.9),
            Detection("b", (0, 0, 10, 10), 0.1), Detection("a", (50, 50, 60, 60), 0.2)]
    assert suppress_duplicates(dets, 0.7) == [1, 2, 3]
    assert suppress_duplicates(dets, 0.95) == [0, 1, 2, 3]  # IoU 9/11 = 0.82 is kept at 0.95
    with pytest.raises(ValueError, match="nms_iou"):
        GenerationDecoder(ROWCOL, loc_ids(), nms_iou=1.5)


def test_detections_on_crowd_regions_are_ignored_not_false_positives():
    crowd_sample = sample([(16, 16, 48, 48)], ["thing"], "detection")
    crowd_sample.meta["crowd"] = [["thing", [56, 56, 64, 64]]]
    gen = make_generation(detection_pieces((2, 2, 5, 5), (7, 7, 7, 7)), logprobs=None)
    plain = evaluate_generations([sample([(16, 16, 48, 48)], ["thing"], "detection")], [gen],
                                 ROWCOL, loc_ids())
    crowd = evaluate_generations([crowd_sample], [gen], ROWCOL, loc_ids())
    assert plain.metrics["ap50"] < 1 and crowd.metrics["ap50"] == pytest.approx(1.0)


def test_coco_crowd_regions_reach_cocoeval_and_the_saved_files_as_crowd(tmp_path):
    """A detection exactly on a COCO crowd region (ranked first) leaves AP50 at 1, as
    pycocotools would score it, whether read_coco kept the region out of training or trained
    on it (include_crowd=True); dropped, the region makes that detection a false positive.
    The saved coco_gt.json keeps the region as iscrowd=1, so it scores the same."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from loctune.data import read_coco

    path = tmp_path / "instances.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 24, 24]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [44, 44, 16, 16], "iscrowd": 1},
        ],
    }))
    gen = make_generation(detection_pieces((5, 5, 7, 7), (0, 0, 3, 3)))  # crowd region first
    missed = make_generation(detection_pieces((0, 0, 3, 3)))  # a crowd region is no miss either
    (kept_out,) = read_coco(path, check_images=False).samples
    (trained_on,) = read_coco(path, check_images=False, include_crowd=True).samples
    assert ROWCOL.decode(gen.text, SIZE).detections[0].box == (44, 44, 60, 60)
    for crowd_sample in (kept_out, trained_on):
        result = evaluate_generations([crowd_sample] * 2, [missed, gen], ROWCOL, loc_ids())
        assert result.metrics["ap50"] == pytest.approx(1.0)
        assert result.predictions[0]["gt"]["crowd"] == [["thing", [44, 44, 60, 60]]]
    kept_out.meta["crowd"] = []
    assert evaluate_generations([kept_out], [gen], ROWCOL, loc_ids()).metrics["ap50"] < 1

    out = result.save(tmp_path / "eval")
    gt = COCO(str(out / "coco_gt.json"))
    assert [a["iscrowd"] for a in gt.dataset["annotations"]] == [0, 1] * 2
    evaluator = COCOeval(gt, gt.loadRes(str(out / "coco_results.json")), "bbox")
    evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert evaluator.stats[1] == pytest.approx(1.0)


def test_detection_eval_saves_per_class_coco_files_and_plots_that_pycocotools_reads(tmp_path):
    from PIL import Image
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    Image.new("RGB", SIZE, (40, 40, 40)).save(tmp_path / "im.png")
    samples = [Sample(str(tmp_path / "im.png"), "detect thing ; blob", [(16, 16, 48, 48),
                      (0, 0, 16, 16)], ["thing", "blob"], task="detection", image_id=str(i))
               for i in (7, 9)]
    gens = [make_generation(detection_pieces((2, 2, 5, 5)) + [" ; ", "blob ", *rc(0, 0, 1, 1)]),
            make_generation(detection_pieces((0, 0, 1, 1), (6, 6, 7, 7)))]
    result = evaluate_generations(samples, gens, ROWCOL, loc_ids())
    out = result.save(tmp_path / "eval", samples)
    for name in ("per_class.csv", "coco_results.json", "coco_gt.json", "pr_curves.png",
                 "confusion_matrix.png", "examples.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "per_class.csv").read_text().splitlines()[0] == "class,ap,ap50"
    gt = COCO(str(out / "coco_gt.json"))
    assert sorted(gt.getImgIds()) == [7, 9]  # the source's integer ids are kept
    evaluator = COCOeval(gt, gt.loadRes(str(out / "coco_results.json")), "bbox")
    evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert evaluator.stats[1] == pytest.approx(result.metrics["ap50"])
    assert Image.open(out / "examples.png").width > 2 * 320  # two truth|prediction pairs a row


def test_predict_drops_detections_under_conf_with_their_ev_twins(tmp_path):
    from PIL import Image

    from loctune.predict import predict

    for name in ("a", "b"):
        Image.new("RGB", SIZE).save(tmp_path / f"{name}.png")
    pieces = detection_pieces((2, 2, 5, 5), (6, 6, 7, 7))
    lp = [0.0] + [math.log(0.9)] * 4 + [0.0, 0.0] + [math.log(0.3)] * 4
    gens = [make_generation(pieces, logprobs=lp) for _ in range(2)]
    prediction = predict(ReplayAdapter(gens), [tmp_path], "detect thing", conf=0.5,
                         progress=False)
    for record in prediction.records:
        assert record["task"] == "detection"
        (kept,) = record["detections"]  # the 0.3 object goes, the 0.9 one stays
        assert kept["box"] == pytest.approx([20, 20, 44, 44]) and kept["score"] > 0.5
        assert len(record["ev_detections"]) == 1
    out = prediction.save(tmp_path / "out", save_txt=True)
    assert (out / "labels" / "a.txt").read_text().count("\n") == 1
