"""Every user error on the command line ends as one line and exit code 2, never a traceback.

A table of bad command lines, each with the words its message must contain; then the data
options (``--image-root``, ``--format``, ``--allow-outside-root``) that make the layouts
behind some of those errors readable, and an empty dataset that must leave no run folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_cli import OBJECTS, one_thread, write_coco, write_csv, write_voc  # noqa: F401

from loctune.cli import main
from loctune.models.small_vlm_adapter import SmallVLMAdapter

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A saved (untrained) tiny small VLM, a config with a YAML error, a non-image file,
    an empty folder and a folder that is not a checkpoint."""
    root = tmp_path_factory.mktemp("cli_errors")
    adapter = SmallVLMAdapter.build("rowcol:grid=8", texts=["red square"], config="tiny", seed=0)
    adapter.save_pretrained(str(root / "model"))
    (root / "bad.yaml").write_text("model: {name: small\n bad")
    (root / "notes.txt").write_text("hello\n")
    (root / "empty").mkdir()
    (root / "small_runs" / "exp").mkdir(parents=True)
    shutil.copytree(root / "model", root / "no_weights")
    (root / "no_weights" / "model.safetensors").unlink()
    return root


T = ["--model", "small:tiny", "--steps", "1", "--n-train", "2", "--n-val", "0"]
M = "{model}"

#: argv (``{dir}`` is the work folder, ``{model}`` the saved checkpoint) -> words of the message
BAD_COMMAND_LINES = [
    (["train", "--data", "{dir}/nosuch.json", *T], "no such file or directory"),
    (["train", "--data", "synthetic", "--model", "{dir}/nosuch/", "--steps", "1"],
     "no such checkpoint folder"),
    (["train", "--data", "synthetic", "--model", "{dir}/small_runs/exp", "--steps", "1"],
     "the folder holds no checkpoint"),
    (["train", "--data", "synthetic", "--model", "small:huge", "--steps", "1"],
     "unknown small VLM preset 'huge'"),
    (["train", "--data", "synthetic", *T, "--lr", "inf"], "lr must be finite"),
    (["train", "--data", "synthetic", *T, "--n-train", "-2"], "--n-train: expected 0 <= value"),
    (["train", "--data", "synthetic", *T, "--method", "gem:beta=abc"],
     "field 'beta' expects float, got 'abc'"),
    (["train", "--data", "synthetic", *T, "--method", "l2"], "unknown loss 'l2'"),
    (["train", "--data", "synthetic", *T, "--codec", "nosuch"], "unknown codec 'nosuch'"),
    (["train", "--data", "synthetic", *T, "--codec", "rowcol:grid=abc"],
     "field 'grid' expects int, got 'abc'"),
    (["train", "--data", "synthetic", *T, "lr=abc"], "field 'train.lr' expects float"),
    (["train", "--data", "synthetic", *T, "nosuch=1"], "unknown field 'train.nosuch'"),
    (["train", "--config", "{dir}/nosuch.yaml"], "does not exist"),
    (["train", "--config", "{dir}/bad.yaml"], "not valid YAML: line 2"),
    (["train", "--data", "synthetic", *T, "--batch", "0"], "--batch: expected 1 <= value"),
    (["train", "--data", "synthetic", *T, "--max-new-tokens", "-1"],
     "--max-new-tokens: expected 1 <= value"),
    (["train", "--data", "{dir}/notes.txt", *T], "cannot tell the annotation format"),
    (["train", "--data", "synthetic", *T, "--image-root", "x"], "takes no reader options"),
    (["train", "--data", "raccoon", *T, "--image-root", "x"], "knows its own layout"),
    (["train", "--data", "synthetic", *T, "--resume", "--name", "never"],
     "has no last/ checkpoint"),
    (["train", "--data", "synthetic", *T, "--model", M, "--codec", "rowcol:grid=4"],
     "writes 4 location tokens"),
    (["eval", "--model", "{dir}/nosuch", "--data", "synthetic"], "no such checkpoint folder"),
    (["eval", "--model", "{dir}/no_weights", "--data", "synthetic"],
     "missing weights file {dir}/no_weights/model.safetensors"),
    (["eval", "--model", "small:tiny", "--data", "synthetic"], "fresh, untrained small VLM"),
    (["eval", "--model", M, "--data", "synthetic", "--split", "nosuch"], "no 'nosuch' split"),
    (["eval", "--model", M, "--data", "synthetic", "--n", "-3"], "--n: expected 0 <= value"),
    (["eval", "--model", M, "--data", "synthetic", "--nms-iou", "2"],
     "--nms-iou: expected 0 <= value <= 1"),
    (["eval", "--model", M, "--data", "{dir}/notes.txt", "--format", "voc"],
     "not a folder of VOC .xml files"),
    (["predict", "--model", M, "{dir}/nosuch.jpg", "--prompt", "a"], "no such file or folder"),
    (["predict", "--model", M, "{dir}/notes.txt", "--prompt", "a"], "cannot read image"),
    (["predict", "--model", M, "{dir}/empty", "--prompt", "a"], "folder holds no images"),
    (["predict", "--model", M, "{dir}/notes.txt", "--prompt", "a", "--conf", "2"],
     "--conf: expected 0 <= value <= 1"),
    (["compare", "methods=[nosuch]"], "unknown loss 'nosuch'"),
    (["compare", "model.codec=nosuch"], "unknown codec 'nosuch'"),
    (["compare", "sizes=abc"], "field 'sizes' expects list[int]"),
    (["pretrain", "nosuch=1"], "unknown field 'nosuch' for PretrainConfig"),
    (["inspect-study", "nosuch=1"], "unknown field 'nosuch' for InspectStudyConfig"),
    (["demo", "nosuch=1"], "unknown field 'nosuch' for CompareConfig"),
    (["inspect", "--model", M, "--data", "{dir}/nosuch", "--eval"],
     "inspection folder not found"),
    (["inspect", "--model", M, "--data", "synthetic", "--eval", "--tile", "2y2"],
     "--tile: expected ROWSxCOLS"),
    (["inspect", "--model", M, "--data", "synthetic", "--eval", "--overlap", "1"],
     "--overlap: expected 0 <= value < 1"),
]


@pytest.mark.parametrize("argv,words", BAD_COMMAND_LINES,
                         ids=[" ".join(a)[:60] for a, _ in BAD_COMMAND_LINES])
def test_a_bad_command_line_is_one_line_and_exit_code_2(argv, words, workdir, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(workdir)  # default run folders land in the work folder
    argv = [a.format(dir=workdir, model=workdir / "model") for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors: usage line, then the message
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith(("loctune ", "usage: loctune")), message
    assert words.format(dir=workdir) in message, message


def test_a_refused_compare_rerun_is_one_line(tmp_path, capsys):
    """A second compare into one out_dir with other settings names the changed field."""
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare_config.json").write_text(json.dumps({"train": {"steps": 1}}))
    code = main(["compare", "--out", str(out), "train.steps=2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "this study was run with other settings" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ data options


def _train(data: Path, project: Path, *extra: str) -> int:
    return main(["train", "--model", "small:tiny", "--data", str(data), "--project",
                 str(project), "--steps", "1", "--batch", "2", "--n-val", "0",
                 "progress=false", *extra])


def test_image_root_reads_the_standard_coco_layout(tmp_path, capsys):
    """``annotations/instances.json`` beside ``train2017/``: nothing without --image-root."""
    path = write_coco(tmp_path / "train2017")
    (tmp_path / "annotations").mkdir()
    coco = shutil.move(path, tmp_path / "annotations" / "instances.json")
    assert _train(coco, tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert "missing_image" in err and "image_root" in err
    assert not (tmp_path / "runs").exists()  # no empty run folder
    assert _train(coco, tmp_path / "runs", "--image-root", str(tmp_path / "train2017")) == 0
    record = (tmp_path / "runs" / "exp" / "config.yaml").read_text()
    assert f"image_root: {tmp_path / 'train2017'}" in record  # the run repeats from its record


def test_format_reads_a_voc_set_detection_cannot_tell(tmp_path, capsys):
    ann = write_voc(tmp_path / "voc")
    annots = ann.rename(tmp_path / "voc" / "annots")
    (annots.parent / "JPEGImages").rename(annots.parent / "images")
    for xml in annots.glob("*.xml"):  # the images sit elsewhere: name them from the xml's folder
        xml.write_text(xml.read_text().replace("<filename>", "<filename>../images/"))
    assert _train(annots.parent, tmp_path / "runs") == 2
    assert "cannot tell the annotation format" in capsys.readouterr().err
    assert _train(annots, tmp_path / "runs", "--format", "voc") == 0


def test_paths_outside_the_root_are_dropped_unless_allowed(tmp_path, capsys):
    data = write_csv(tmp_path / "inside")
    (tmp_path / "elsewhere").mkdir()
    for stem in OBJECTS:  # every row now names an image beside, not under, the table's folder
        (tmp_path / "inside" / f"{stem}.png").rename(tmp_path / "elsewhere" / f"{stem}.png")
    header, *rows = data.read_text().splitlines()
    data.write_text("\n".join([header, *(f"../elsewhere/{row}" for row in rows)]) + "\n")
    assert _train(data, tmp_path / "runs") == 2
    assert "outside_root" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert _train(data, tmp_path / "runs", "--allow-outside-root") == 0


def test_instances_makes_refcoco_usable_from_the_command_line(tmp_path, capsys):
    instances = write_coco(tmp_path)
    refs = [{"ref_id": i, "ann_id": i, "image_id": i, "split": "train",
             "sentences": [{"sent": f"the {label}"}]}
            for i, (label, _) in enumerate(OBJECTS.values())]
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    assert _train(tmp_path / "refs.json", tmp_path / "runs") == 2
    assert "RefCOCO refs need the COCO instances file" in capsys.readouterr().err
    assert _train(tmp_path / "refs.json", tmp_path / "runs", "--instances", str(instances)) == 0
    assert f"instances: {instances}" in (tmp_path / "runs" / "exp" / "config.yaml").read_text()


def test_resuming_with_another_codec_or_method_names_the_field(tmp_path, capsys):
    argv = ["train", "--model", "small:tiny", "--data", "synthetic", "--n-train", "4",
            "--n-val", "0", "--steps", "1", "--project", str(tmp_path), "progress=false"]
    assert main([*argv, "--codec", "rowcol:grid=8"]) == 0
    resume = [*argv, "--steps", "2", "--resume"]
    assert main([*resume, "--codec", "rowcol:grid=16"]) == 2
    err = capsys.readouterr().err
    assert "codec: 'rowcol:grid=8' then, 'rowcol:grid=16' now" in err and "Traceback" not in err
    assert main([*resume, "--codec", "rowcol:grid=8", "--method", "gem"]) == 2
    assert "loss.name: 'ce' then, 'gem' now" in capsys.readouterr().err
