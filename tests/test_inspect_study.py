"""`loctune inspect-study` on a tiny config: report files with numbers, resumable, guarded."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest

from loctune.cli import main
from loctune.inspect.report import METHODS, brighter_defects
from loctune.inspect.study import InspectStudyConfig
from loctune.inspect.synthetic import synthetic_inspection_set

TINY = [
    "seeds=[0,1]",
    "eval_k=[0,1,2]",
    "train_k=[0,1,2]",
    "n_train=3",
    "n_test=3",
    "render_size=64",
    "model.name=small:tiny",
    "model.image_size=16",
    "model.overrides={patch_size: 8, pixel_shuffle: 1, vision_width: 32, vision_depth: 1}",
    "single_image_steps=2",
    "train.steps=3",
    "group_images=6",
    "train.warmup_steps=0",
    "train.save_every=2",
    "max_new_tokens=10",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One tiny study, run once through the CLI; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("inspect") / "study"
    assert main(["inspect-study", "--out", str(out), *TINY]) == 0
    return out


def _rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_study_writes_a_report_with_the_numbers_of_its_cells(study):
    text = (study / "report.md").read_text()
    assert "| k | method | accuracy | F1 | AUROC | Acc@0.5 | pointing |" in text
    train = synthetic_inspection_set("train", 3, 3, seed=0, size=64)
    test = synthetic_inspection_set("test", 3, 3, seed=0, size=64)
    assert (
        f"Defects brighter than the rest of their image: {brighter_defects(train):.0%} of the "
        f"training defects, {brighter_defects(test):.0%} of the test defects"
    ) in text
    rows = _rows(study)
    vlm_row = re.search(r"^\| 2 \| small VLM \+ tiling \| (\d\.\d{3}) ± \d\.\d{3} \|", text, re.M)
    cells = [float(r["accuracy"]) for r in rows if (r["method"], r["k"]) == ("vlm_tiled", "2")]
    assert vlm_row and float(vlm_row[1]) == pytest.approx(np.mean(cells), abs=5e-4)
    assert re.search(r"^\| 2 \| PatchCore, random conv \| \d\.\d{3} ± ", text, re.M)
    assert "| 1 | PatchCore, VLM encoder | – | – | " in text  # no threshold from one good shot
    assert not re.search(r"^\| 0 \| PatchCore", text, re.M)  # no shots at all
    # per seed: 2 VLM cells per k, 4 PatchCore cells per k >= 1
    assert len(rows) == 2 * (3 * 2 + 2 * 4)
    assert {r["method"] for r in rows} == {m for m in METHODS if "lite0" not in m}
    for name in ("accuracy_vs_examples.png", "auroc_vs_examples.png", "training_loss.png"):
        assert (study / name).stat().st_size > 1000


def test_study_trains_each_seed_through_the_training_loop_and_saves_it(study):
    saved = json.loads((study / "inspect_study_config.json").read_text())
    assert saved["train"]["steps"] == 3 and saved["out_dir"] == str(study)
    assert (study / "s1" / "model" / "adapter.json").is_file()
    for phase in ("train_single", "train_episodes"):  # both phases went through loctune.train
        assert '"loss"' in (study / "s1" / phase / "metrics.jsonl").read_text()


def test_the_trained_model_answers_the_inspect_command_tiled(study, tmp_path):
    args = ["inspect", "--model", str(study / "s0" / "model"), "--data", "synthetic", "--eval"]
    args += ["--n", "3", "--k", "1", "--tile", "2x2", "--project", str(tmp_path), "--name", "ev"]
    assert main(args) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_queries"] == 3


def test_a_rerun_reuses_finished_cells_and_prints_the_report(study, tmp_path, capsys):
    out = tmp_path / "study"
    shutil.copytree(study, out)  # out_dir may change between runs of one study
    cell = out / "s0" / "vlm_tiled" / "k2" / "metrics.json"
    cell.write_text(json.dumps({**json.loads(cell.read_text()), "accuracy": 0.123}))
    assert main(["inspect-study", "--out", str(out), *TINY, "seeds=[0]"]) == 0
    rerun = {(r["method"], r["k"]): r for r in _rows(out)}
    assert float(rerun[("vlm_tiled", "2")]["accuracy"]) == 0.123
    assert "| k | method |" in capsys.readouterr().out


def test_a_rerun_with_other_settings_is_refused(study, capsys):
    """One line and exit code 2, naming the changed field."""
    for override in ("train.steps=4", "train.weight_decay=0.5"):
        assert main(["inspect-study", "--out", str(study), *TINY, override]) == 2
        err = capsys.readouterr().err
        assert f"other settings ({override.split('=')[0]})" in err and "Traceback" not in err


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_test"):
        InspectStudyConfig(eval_k=[0, 8], n_test=8)
    with pytest.raises(ValueError, match="patchcore_features"):
        InspectStudyConfig(patchcore_features=["resnet"])
    with pytest.raises(ValueError, match="vlm=false trains no VLM, so patchcore_features"):
        InspectStudyConfig(vlm=False, patchcore_features=["vlm", "lite0"])


def test_patchcore_alone_on_pretrained_lite0_trains_no_vlm(tmp_path):
    """vlm=false: PatchCore cells only, on the packaged ImageNet Lite0 at patchcore_size."""
    out = tmp_path / "patchcore"
    args = [*TINY, "seeds=[0]", "vlm=false", "patchcore_features=[lite0]", "patchcore_size=64"]
    assert main(["inspect-study", "--out", str(out), *args]) == 0
    rows = _rows(out)
    assert {r["method"] for r in rows} == {"patchcore_lite0", "patchcore_lite0_tiled"}
    assert sorted({r["k"] for r in rows}) == ["1", "2"]  # no k=0: PatchCore needs good shots
    assert all(0 <= float(r["auroc"]) <= 1 for r in rows)
    assert not (out / "s0" / "model").exists() and not (out / "training_loss.png").exists()
    text = (out / "report.md").read_text()
    assert text.startswith("# loctune inspect-study: few-shot PatchCore on unseen product types")
    assert "shown at 64 px" in text and "Small VLM" not in text
    assert re.search(r"^\| 2 \| PatchCore, pretrained Lite0 \+ tiling \| \d\.\d{3} ", text,
                     re.M)
