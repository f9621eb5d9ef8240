import math

import pytest
import torch

from loctune.codecs import LocationSpace
from loctune.targets import TargetSpec, make_targets

BINS = LocationSpace("bins", 32)
GRID = LocationSpace("grid", 10)


@pytest.mark.parametrize(
    "spec", [TargetSpec(k) for k in ("one_hot", "distance_inverse", "gaussian", "label_smoothing")]
)
@pytest.mark.parametrize("space", [BINS, GRID])
def test_rows_sum_to_one_and_peak_at_truth(spec, space):
    idx = torch.tensor([0, 5, space.size - 1])
    t = make_targets(spec, idx, space)
    assert t.shape == (3, space.size)
    torch.testing.assert_close(t.sum(1), torch.ones(3))
    assert (t.argmax(1) == idx).all()


def test_distance_inverse_formula_on_bins():
    t = make_targets(
        TargetSpec("distance_inverse", power=2, scale=1),
        torch.tensor([3]),
        LocationSpace("bins", 6),
    )[0]
    w = torch.tensor([(1 + abs(k - 3)) ** -2.0 for k in range(6)])
    torch.testing.assert_close(t, w / w.sum())


def test_grid_distance_is_two_dimensional():
    """On a 10-wide grid cell 60 is row 6, col 0: 50, 61, 70 are nearest; 59 is far away."""
    t = make_targets(TargetSpec("distance_inverse"), torch.tensor([60]), GRID)[0]
    nearest = set(t.topk(4).indices.tolist())
    assert nearest == {60, 50, 61, 70}
    assert t[59] < t[50] / 10
    torch.testing.assert_close(
        GRID.distance(torch.tensor([60]))[0, 59], torch.tensor(math.hypot(1, 9))
    )


def test_large_power_approaches_one_hot_and_inf_is_exact():
    idx = torch.tensor([7])
    assert make_targets(TargetSpec("distance_inverse", power=60), idx, BINS)[0, 7] > 0.999
    torch.testing.assert_close(
        make_targets(TargetSpec("distance_inverse", power=math.inf), idx, BINS),
        make_targets(TargetSpec("one_hot"), idx, BINS),
    )


def test_radius_truncates():
    t = make_targets(TargetSpec("distance_inverse", radius=2), torch.tensor([10]), BINS)[0]
    assert (t[:8] == 0).all() and (t[13:] == 0).all() and (t[8:13] > 0).all()


def test_gaussian_and_smoothing_values():
    g = make_targets(
        TargetSpec("gaussian", sigma=1.0), torch.tensor([4]), LocationSpace("bins", 9)
    )[0]
    assert g[5] / g[4] == pytest.approx(math.exp(-0.5))
    s = make_targets(
        TargetSpec("label_smoothing", smoothing=0.2), torch.tensor([1]), LocationSpace("bins", 4)
    )[0]
    torch.testing.assert_close(s, torch.tensor([0.05, 0.85, 0.05, 0.05]))


def test_two_bin_splits_linearly_and_bilinearly():
    t = make_targets(
        TargetSpec("two_bin"), torch.tensor([3]), LocationSpace("bins", 8), torch.tensor([[3.25]])
    )[0]
    assert (
        t[3] == pytest.approx(0.75) and t[4] == pytest.approx(0.25) and t.sum() == pytest.approx(1)
    )
    g = make_targets(
        TargetSpec("two_bin"),
        torch.tensor([0]),
        LocationSpace("grid", 3),
        torch.tensor([[0.5, 0.25]]),
    )[0]
    assert g[0] == pytest.approx(0.375) and g[1] == pytest.approx(0.125)
    assert g[3] == pytest.approx(0.375) and g[4] == pytest.approx(0.125)
    edge = make_targets(
        TargetSpec("two_bin"), torch.tensor([7]), LocationSpace("bins", 8), torch.tensor([[7.0]])
    )[0]
    assert edge[7] == pytest.approx(1.0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="kind"):
        TargetSpec("nope")
    with pytest.raises(ValueError, match="continuous"):
        make_targets(TargetSpec("two_bin"), torch.tensor([1]), BINS)
    with pytest.raises(ValueError, match="out of range"):
        make_targets(TargetSpec("one_hot"), torch.tensor([32]), BINS)
