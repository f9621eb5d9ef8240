import pytest
from PIL import Image

from loctune.metrics import evaluate_detections
from loctune.plots import plot_confusion_matrix, plot_pr_curves, plot_results
from loctune.types import Detection as D


def test_results_plot_has_a_panel_per_numeric_column(tmp_path):
    rows = [{"step": s, "loss": 1 / (s + 1), "split": "train"} for s in range(5)]
    rows += [{"step": 4, "val/ap50": 0.3, "val/ap": float("nan")}]
    assert plot_results(rows, tmp_path / "results.png") == ["loss", "val/ap", "val/ap50"]
    assert Image.open(tmp_path / "results.png").size[0] > 600
    with pytest.raises(ValueError, match="no numeric columns"):
        plot_results([{"step": 1, "split": "train"}], tmp_path / "x.png")


def test_detection_plots_are_written(tmp_path):
    gts = [[D("cat", (0, 0, 10, 10)), D("dog", (20, 20, 40, 40))]]
    ev = evaluate_detections(
        [[D("cat", (0, 0, 10, 10), 0.9), D("cat", (20, 20, 40, 40), 0.6)]], gts
    )
    plot_pr_curves(ev, tmp_path / "pr.png")
    plot_confusion_matrix(ev, tmp_path / "confusion.png")
    for name in ("pr.png", "confusion.png"):
        assert Image.open(tmp_path / name).size[0] > 300
