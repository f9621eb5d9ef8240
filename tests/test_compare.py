"""The comparison harness end to end on a model and budget too small to learn: files and numbers."""

import json
import re
from dataclasses import replace

import pytest

from loctune import report
from loctune.compare import CompareConfig, CompareData, run_compare, training_subset
from loctune.config import apply_overrides
from loctune.models.spec import ModelConfig
from loctune.train import TrainConfig


def tiny_config(out):
    return CompareConfig(
        out_dir=str(out), methods=["ce", "gem_distance_inverse:beta=2"], sizes=[4, 8], seeds=[0, 1],
        n_draw=2, model=ModelConfig("small:tiny", codec="rowcol:grid=8", image_size=32),
        data=CompareData(n_val=2, n_test=4, image_size=32, max_objects=3),
        train=TrainConfig(steps=2, batch_size=4, eval_every=2, save_every=2, best_metric=""),
    )


def test_compare_writes_report_and_resumes(tmp_path):
    cfg = tiny_config(tmp_path)
    path = run_compare(cfg, progress=False, log=lambda _: None)
    text = path.read_text()
    assert "| ce |" in text and "| gem_distance_inverse:beta=2 |" in text
    assert "Labels needed" in text
    # the trivial baseline on the same split, beside the methods (and not among the cells)
    assert re.search(r"^\| mean box \| \**\d\.\d{3} ± \d\.\d{3}\** \| ", text, re.M)
    for name in ("results.csv", "accuracy_vs_labels.png", "learning_curves.png", "predictions.png",
                 "compare_config.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = report.read_csv(tmp_path / "results.csv")
    assert len(rows) == 8
    assert "minus ce's, paired by seed" in text
    assert "| gem_distance_inverse:beta=2 | " in text.split("paired")[1]
    assert all(0.0 <= r["acc50"] <= 1.0 and 0.0 <= r["miou"] <= 1.0 for r in rows)
    # finished cells are reused, not retrained: their result files stay as they were
    cell = tmp_path / "runs" / "ce" / "n4" / "s0" / "result.json"
    before = json.loads(cell.read_text())
    mtime = cell.stat().st_mtime
    run_compare(cfg, progress=False, log=lambda _: None)
    assert cell.stat().st_mtime == mtime and json.loads(cell.read_text()) == before


def test_unknown_methods_fail_before_training(tmp_path):
    cfg = tiny_config(tmp_path)
    for bad, why in (("gem:bta=2", "unknown loss option"), ("l2", "unknown loss 'l2'"),
                     ("gem:beta=abc", "loss 'gem': field 'beta' expects float")):
        with pytest.raises(ValueError, match=f"CompareConfig.methods: '{bad}': {why}"):
            replace(cfg, methods=["ce", bad])
    assert not (tmp_path / "runs").exists()


def test_training_subsets_are_seeded_and_checked():
    pool = list(range(10))
    assert training_subset(pool, 4, 0) == training_subset(pool, 4, 0)
    assert training_subset(pool, 4, 0) != training_subset(pool, 4, 1)
    with pytest.raises(ValueError, match="exceeds"):
        training_subset(pool, 11, 0)


def test_scene_overrides_reach_the_synthetic_data(tmp_path):
    from loctune.compare import _loaders

    cfg = apply_overrides(tiny_config(tmp_path), ["data.scene={min_objects: 1, max_objects: 1}"])
    with pytest.raises(ValueError, match="max_objects"):
        # max_objects has its own field; duplicating it is an error, not a silent pick
        _loaders(cfg)
    cfg = apply_overrides(tiny_config(tmp_path), ["data.max_objects=1", "data.scene.min_objects=1"])
    pool, _, _ = _loaders(cfg)
    assert all(len(s.meta["objects"]) == 1 for s in pool)
    with pytest.raises(ValueError, match="CompareConfig.data.scene.*bogus"):
        _loaders(apply_overrides(cfg, ["data.scene.bogus=1"]))


def test_a_rerun_with_other_settings_is_refused_more_seeds_are_not(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.methods, cfg.sizes, cfg.seeds = ["ce"], [4], [0]
    run_compare(cfg, progress=False, log=lambda _: None)
    for override, field in (("train.steps=3", "train.steps"), ("train.weight_decay=0.1",
                            "train.weight_decay"), ("model.codec=patch:grid=4", "model.codec")):
        with pytest.raises(ValueError, match=f"other settings \\({field}\\)"):
            run_compare(apply_overrides(cfg, [override]), progress=False, log=lambda _: None)
    logged = []
    run_compare(apply_overrides(cfg, ["seeds=[0,1]"]), progress=False, log=logged.append)
    assert len(logged) == 2 and (tmp_path / "runs" / "ce" / "n4" / "s1" / "result.json").exists()
    # a smaller size draws from the same synthetic pool (max(sizes) scenes); a larger one not
    run_compare(apply_overrides(cfg, ["sizes=[2,4]"]), progress=False, log=lambda _: None)
    assert (tmp_path / "runs" / "ce" / "n2" / "s0" / "result.json").exists()
    with pytest.raises(ValueError, match="training pool is max\\(sizes\\) = 4 scenes"):
        run_compare(apply_overrides(cfg, ["sizes=[4,8]"]), progress=False, log=lambda _: None)


def test_every_training_field_reaches_the_cells_and_the_loss_only_through_methods(tmp_path):
    cfg = apply_overrides(tiny_config(tmp_path), ["train.weight_decay=0.3", "train.grad_accum=2",
                                                  "methods=[ce]", "sizes=[4]", "seeds=[0]"])
    run_compare(cfg, progress=False, log=lambda _: None)
    saved = (tmp_path / "runs" / "ce" / "n4" / "s0" / "config.yaml").read_text()
    assert "weight_decay: 0.3" in saved and "grad_accum: 2" in saved
    with pytest.raises(ValueError, match="train.loss is set per cell by methods"):
        apply_overrides(cfg, ["train.loss.name=gem"])


def test_demo_fine_tunes_the_shipped_checkpoint_on_an_unseen_real_target():
    """The demo is the transfer study in miniature: a packaged checkpoint that has not seen
    the demo's target set, paired seeds, and a frozen encoder (so its cells fit 10 minutes)."""
    import json
    from pathlib import Path

    from loctune.compare import demo_config
    from loctune.models.checkpoints import resolve_checkpoint

    cfg = demo_config("unused")
    folder = Path(resolve_checkpoint(cfg.model.name))
    trained_on = json.loads((folder / "config.json").read_text())["trained_on"]
    assert cfg.data.name not in trained_on
    assert "ce" in cfg.methods and len(cfg.methods) >= 2 and len(cfg.seeds) >= 3
    assert cfg.train.freeze == ["vision.*"]
    assert len(cfg.methods) * len(cfg.sizes) * len(cfg.seeds) * cfg.train.steps <= 1200


def test_knobs_are_tuned_on_validation_and_the_winner_runs_the_grid(tmp_path):
    cfg = apply_overrides(tiny_config(tmp_path), [
        "methods=[ce, gaussian]", "sizes=[4, 8]", "seeds=[0, 1]",
        "tune={gaussian: ['sigma=0.3', 'sigma=3']}", "tune_size=8", "tune_seeds=2",
    ])
    text = run_compare(cfg, progress=False, log=lambda _: None).read_text()
    tuning = report.read_csv(tmp_path / "tuning.csv")
    # three candidates (the preset's own sigma first) x two seeds, each scored on validation
    assert [r["method"] for r in tuning[::2]] == ["gaussian", "gaussian:sigma=0.3",
                                                  "gaussian:sigma=3"]
    assert all(r["size"] == 8 and r["n_samples"] == cfg.data.n_val for r in tuning)
    assert (tmp_path / "tune" / "gaussian:sigma=3" / "n8" / "s1" / "val").is_dir()
    mean = {v: sum(r["acc50"] for r in tuning if r["method"] == v) / 2 for v in
            dict.fromkeys(r["method"] for r in tuning)}
    winner = max(mean, key=mean.get)  # the first of equals, as tune_methods picks
    rows = report.read_csv(tmp_path / "results.csv")
    assert {r["variant"] for r in rows if r["method"] == "gaussian"} == {winner}
    assert {r["variant"] for r in rows if r["method"] == "ce"} == {"ce"}
    assert (tmp_path / "runs" / winner / "n4" / "s0" / "test").is_dir()
    assert "Knobs tuned on validation" in text and f"| gaussian | **{winner}** |" in text
    # the methods' tables keep the method's name, not the variant's
    assert re.search(r"^\| gaussian \| ", text, re.M)


def test_tuning_a_method_that_is_not_compared_or_a_bad_candidate_fails_early(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(ValueError, match="CompareConfig.tune: 'gem' is not one of methods"):
        replace(cfg, tune={"gem": ["beta=2"]})
    with pytest.raises(ValueError, match="CompareConfig.tune.ce: 'sigmaa=2': unknown loss option"):
        replace(cfg, tune={"ce": ["sigmaa=2"]})
    with pytest.raises(ValueError, match="tune_size 5 is not one of sizes"):
        replace(cfg, tune={"ce": ["smoothing=0.1"]}, tune_size=5)
