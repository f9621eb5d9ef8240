"""Detection evaluation beyond AP: crowd regions, per-class AP, PR curves, confusion, P/R at a
confidence."""

import math

import pytest

from loctune.metrics import COCO_STATS, coco_detection_metrics, evaluate_detections
from loctune.types import Detection as D

GT = [[D("cat", (10, 10, 50, 50)), D("dog", (60, 60, 90, 90))], [D("cat", (0, 0, 20, 20))]]


def test_all_twelve_coco_numbers_are_kept():
    preds = [
        [D("cat", (10, 10, 50, 50), 0.9), D("dog", (60, 60, 90, 90), 0.8)],
        [D("cat", (0, 0, 20, 20), 0.7)],
    ]
    m = coco_detection_metrics(preds, GT)
    assert set(COCO_STATS) <= set(m)
    assert m["ap"] == pytest.approx(1.0) and m["ar100"] == pytest.approx(1.0)
    assert m["ap_small"] == pytest.approx(1.0)  # every box is under 32^2 px
    assert math.isnan(m["ap_large"])  # no large objects: undefined, not 0


def test_detections_on_a_crowd_region_are_ignored_as_pycocotools_does():
    truth = [[D("person", (0, 0, 10, 10))]]
    region = [[D("person", (50, 50, 100, 100))]]
    # the highest-scoring detection lies on the crowd region
    preds = [[D("person", (60, 60, 90, 90), 0.9), D("person", (0, 0, 10, 10), 0.5)]]
    with_crowd = coco_detection_metrics(preds, truth, crowd=region)
    without = coco_detection_metrics(preds, truth)
    assert with_crowd["ap50"] == pytest.approx(1.0)
    assert without["ap50"] == pytest.approx(0.5, abs=0.01)  # a false positive ranked first
    assert with_crowd["precision@0.25"] == pytest.approx(1.0)
    assert without["precision@0.25"] == pytest.approx(0.5)


def test_per_class_ap_and_pr_curves():
    preds = [
        [D("cat", (10, 10, 50, 50), 0.9), D("dog", (0, 0, 5, 5), 0.8)],
        [D("cat", (0, 0, 20, 20), 0.7)],
    ]
    ev = evaluate_detections(preds, GT)
    assert ev.classes == ["cat", "dog"]
    assert ev.per_class["cat"]["ap50"] == pytest.approx(1.0)
    assert ev.per_class["dog"]["ap50"] == pytest.approx(0.0)
    assert len(ev.pr_curves["cat"]) == 101 and ev.pr_curves["cat"][100] == pytest.approx(1.0)
    assert ev.stats["ap50"] == pytest.approx(0.5)  # the mean of the two classes


def test_confusion_counts_wrong_class_missed_and_false_detections():
    preds = [
        [
            D("dog", (10, 10, 50, 50), 0.9),
            D("cat", (200, 200, 220, 220), 0.9),
            D("dog", (60, 60, 90, 90), 0.1),
        ],
        [D("cat", (0, 0, 20, 20), 0.7)],
    ]
    ev = evaluate_detections(preds, GT, conf=0.25)
    cat, dog, bg = 0, 1, 2
    assert ev.confusion[cat][dog] == 1  # the first cat, called a dog
    assert ev.confusion[cat][cat] == 1  # the second image's cat
    assert ev.confusion[dog][bg] == 1  # the dog scored under conf: missed
    assert ev.confusion[bg][cat] == 1  # a cat where there is nothing
    assert sum(map(sum, ev.confusion)) == 4
    assert ev.precision == pytest.approx(1 / 3) and ev.recall == pytest.approx(1 / 3)


def test_no_detections_and_no_truth():
    ev = evaluate_detections([[], []], GT)
    assert ev.stats["ap"] == 0.0 and math.isnan(ev.precision) and ev.recall == 0.0
    assert math.isnan(evaluate_detections([[D("cat", (0, 0, 1, 1), 0.5)]], [[]]).stats["ap"])
    with pytest.raises(ValueError, match="crowd lists"):
        evaluate_detections([[]], [[]], crowd=[[], []])


def test_duplicate_box_rate_counts_boxes_that_repeat_an_earlier_one():
    from loctune.metrics import duplicate_box_rate

    answer = [
        D("cat", (0, 0, 10, 10)),
        D("cat", (0, 0, 10, 10)),
        D("dog", (0, 0, 10, 10.2)),
        D("cat", (50, 50, 60, 60)),
    ]
    assert duplicate_box_rate([answer, [D("cat", (0, 0, 10, 10))]]) == pytest.approx(2 / 5)
    assert duplicate_box_rate([[D("a", (0, 0, 10, 10)), D("a", (5, 0, 15, 10))]]) == 0.0
    assert duplicate_box_rate([[], []]) == 0.0
