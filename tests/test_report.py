import math

import pytest

from loctune import report


def rows():
    out = []
    for seed, noise in enumerate([-0.01, 0.0, 0.01]):
        for size, ce, di in [(100, 0.10, 0.20), (300, 0.20, 0.35), (1000, 0.40, 0.50)]:
            out.append({"method": "ce", "size": size, "seed": seed, "acc50": ce + noise})
            out.append({"method": "di", "size": size, "seed": seed, "acc50": di + noise})
    return out


def test_aggregate_mean_and_sample_std():
    agg = report.aggregate(rows(), "acc50")
    mean, std, n = agg[("ce", 300)]
    assert n == 3
    assert mean == pytest.approx(0.20)
    assert std == pytest.approx(0.01)


def test_labels_to_reach_interpolates_in_log_size():
    # di reaches 0.40 between 300 (0.35) and 1000 (0.50): one third of the way in log space.
    need = report.labels_to_reach([100, 300, 1000], [0.20, 0.35, 0.50], 0.40)
    expected = math.exp(math.log(300) + (1 / 3) * (math.log(1000) - math.log(300)))
    assert need == pytest.approx(expected)
    assert report.labels_to_reach([100, 300], [0.1, 0.2], 0.5) is None
    assert report.labels_to_reach([100, 300], [0.6, 0.7], 0.5) == 100


def test_table_bolds_best_per_size_and_efficiency():
    table = report.markdown_table(rows(), "acc50", ["ce", "di"])
    assert "**0.500 ± 0.010**" in table
    assert "| ce | 0.100 ± 0.010 |" in table
    eff = {e["method"]: e for e in report.data_efficiency(rows(), "acc50", ["ce", "di"], "ce")}
    assert eff["ce"]["labels_needed"] == pytest.approx(1000)
    assert eff["di"]["labels_needed"] < 1000


def test_csv_round_trip_and_plots(tmp_path):
    report.write_csv(rows(), tmp_path / "r.csv")
    back = report.read_csv(tmp_path / "r.csv")
    assert back[0]["size"] == 100 and isinstance(back[0]["acc50"], float)
    report.plot_accuracy_vs_labels(back, "acc50", ["ce", "di"], tmp_path / "a.png")
    report.plot_learning_curves({"ce": [(0, 1.0), (10, 0.5)]}, "loss", tmp_path / "l.png")
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_paired_differences_and_sign_test():
    # per-method spreads overlap (seed effects of ±0.1) but di is ahead on every seed
    out = []
    for seed, shift in enumerate([-0.1, 0.0, 0.1, 0.05, -0.05, 0.08]):
        out.append({"method": "ce", "size": 100, "seed": seed, "acc50": 0.3 + shift})
        out.append(
            {"method": "di", "size": 100, "seed": seed, "acc50": 0.32 + shift + 0.001 * seed}
        )
    out.append({"method": "di", "size": 100, "seed": 9, "acc50": 0.9})  # no ce on seed 9: unpaired
    table = report.paired_table(out, "acc50", ["ce", "di"], "ce")
    assert "| di | +0.023 ± 0.002 (6/6, p=0.03) |" in table and "| ce |" not in table
    assert report.sign_test_p(6, 0) == pytest.approx(2 / 64)
    assert report.sign_test_p(3, 3) == 1.0 and report.sign_test_p(0, 0) == 1.0
    assert report.sign_test_p(1, 4) == pytest.approx(2 * 6 / 32)
