"""`loctune inspect-study` on a tiny config: report files with numbers, resumable, guarded."""

from __future__ import annotations

import csv
import json
import re

import pytest

from loctune.cli import main
from loctune.inspect.study import METHODS, InspectStudyConfig

TINY = [
    "seeds=[0,1]",
    "eval_k=[0,1,2]",
    "train_k=[0,1,2]",
    "n_train=3",
    "n_test=3",
    "render_size=64",
    "model_preset=tiny",
    "image_size=16",
    "pixel_shuffle=1",
    "vision_width=32",
    "vision_depth=1",
    "single_image_steps=2",
    "steps=3",
    "group_images=6",
    "warmup_steps=0",
    "save_every=2",
    "max_new_tokens=10",
]


def test_study_command_writes_a_report_with_numbers_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["inspect-study", "--out", str(out), *TINY]) == 0
    text = (out / "report.md").read_text()
    assert "| k | method | accuracy | F1 | AUROC | Acc@0.5 | pointing |" in text
    shares = re.search(
        r"Defects brighter than the rest of their image: (\d+)% of the training defects, "
        r"(\d+)% of the test defects",
        text,
    )
    assert shares and all(0 <= int(v) <= 100 for v in shares.groups())
    vlm_row = re.search(r"^\| 2 \| small VLM \+ tiling \| (\d\.\d{3}) ± \d\.\d{3} \|", text, re.M)
    assert vlm_row and 0 <= float(vlm_row[1]) <= 1
    assert re.search(r"^\| 2 \| PatchCore, random conv \| \d\.\d{3} ± ", text, re.M)
    assert "| 1 | PatchCore, VLM encoder | – | – | " in text  # no threshold from one good shot
    assert not re.search(r"^\| 0 \| PatchCore", text, re.M)  # no shots at all
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # per seed: 2 VLM cells per k, 4 PatchCore cells per k >= 1
    assert len(rows) == 2 * (3 * 2 + 2 * 4)
    assert {r["method"] for r in rows} == set(METHODS)
    for name in ("accuracy_vs_examples.png", "auroc_vs_examples.png", "training_loss.png"):
        assert (out / name).stat().st_size > 1000
    saved = json.loads((out / "inspect_study_config.json").read_text())
    assert saved["steps"] == 3 and saved["out_dir"] == str(out)
    assert (out / "s1" / "model" / "adapter.json").is_file()
    for phase in ("train_single", "train_episodes"):  # both phases went through loctune.train
        assert '"loss"' in (out / "s1" / phase / "metrics.jsonl").read_text()
    assert "| k | method |" in capsys.readouterr().out

    # the trained model answers `loctune inspect` like a chat VLM does, tiled too
    args = ["inspect", "--model", str(out / "s0" / "model"), "--data", "synthetic", "--eval"]
    args += ["--n", "3", "--k", "1", "--tile", "2x2", "--project", str(tmp_path), "--name", "ev"]
    assert main(args) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_queries"] == 3

    # a rerun reuses every finished part; a saved cell is not recomputed
    cell = out / "s0" / "vlm_tiled" / "k2" / "metrics.json"
    metrics = json.loads(cell.read_text())
    cell.write_text(json.dumps({**metrics, "accuracy": 0.123}))
    assert main(["inspect-study", "--out", str(out), *TINY, "seeds=[0]"]) == 0
    with open(out / "results.csv") as f:
        rerun = {(r["method"], r["k"]): r for r in csv.DictReader(f)}
    assert float(rerun[("vlm_tiled", "2")]["accuracy"]) == 0.123
    with pytest.raises(ValueError, match="other settings \\(steps\\)"):
        main(["inspect-study", "--out", str(out), *TINY, "steps=4"])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_test"):
        InspectStudyConfig(eval_k=[0, 8], n_test=8)
    with pytest.raises(ValueError, match="patchcore_features"):
        InspectStudyConfig(patchcore_features=["resnet"])
