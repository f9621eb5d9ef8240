"""`loctune train | eval | predict` end to end, in-process, on tiny checkpoints and made datasets.

Each test runs the command line the way a user would (``loctune.cli.main([...])``)
against files written to a temp dir: tiny random Hugging Face VLMs saved with
``save_pretrained`` (tests/hf_tiny.py) or the small VLM, and a few 48x40 images
in every annotation format the CLI reads.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from loctune.cli import VAL_FRACTION, increment_run_dir, load_splits, main
from loctune.models import load_model
from loctune.models.hf import adapter_class
from loctune.models.small_vlm_adapter import SmallVLMAdapter
from loctune.train import MAX_AUTO_EVALS

os.environ["HF_HUB_OFFLINE"] = "1"

hf_tiny = pytest.importorskip("hf_tiny")

SIZE = (48, 40)
#: image stem -> (class, xyxy box); the shape drawn on each image
OBJECTS = {
    "a": ("square", (4, 6, 24, 30)),
    "b": ("circle", (20, 10, 44, 36)),
    "c": ("square", (10, 4, 30, 20)),
    "d": ("circle", (2, 18, 22, 38)),
}


def draw(path: Path, box: tuple[int, int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", SIZE, (30, 30, 30))
    ImageDraw.Draw(image).rectangle(box, fill=(230, 60, 40))
    image.save(path)
    return path


def write_images(folder: Path, stems=OBJECTS) -> None:
    for stem in stems:
        draw(folder / f"{stem}.png", OBJECTS[stem][1])


# ------------------------------------------------------------- dataset formats


def write_coco(root: Path) -> Path:
    """A COCO instances file (no split of its own) over four images."""
    write_images(root)
    categories = {"square": 1, "circle": 2}
    data = {
        "images": [
            {"id": i, "file_name": f"{stem}.png", "width": SIZE[0], "height": SIZE[1]}
            for i, stem in enumerate(OBJECTS)
        ],
        "categories": [{"id": cid, "name": name} for name, cid in categories.items()],
        "annotations": [
            {
                "id": i,
                "image_id": i,
                "category_id": categories[label],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
            }
            for i, (label, (x1, y1, x2, y2)) in enumerate(OBJECTS.values())
        ],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


def write_yolo(root: Path) -> Path:
    """An Ultralytics data.yaml with a train (a, b, c) and a val (d) split."""
    names = ["square", "circle"]
    for split, stems in {"train": "abc", "val": "d"}.items():
        write_images(root / "images" / split, stems)
        labels = root / "labels" / split
        labels.mkdir(parents=True)
        for stem in stems:
            label, (x1, y1, x2, y2) = OBJECTS[stem]
            w, h = SIZE
            line = f"{names.index(label)} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} "
            (labels / f"{stem}.txt").write_text(line + f"{(x2 - x1) / w} {(y2 - y1) / h}\n")
    path = root / "data.yaml"
    path.write_text(json.dumps({"path": ".", "train": "images/train", "val": "images/val",
                                "names": names}))
    return path


def write_voc(root: Path) -> Path:
    """A VOC folder: Annotations/*.xml beside JPEGImages/."""
    write_images(root / "JPEGImages")
    ann = root / "Annotations"
    ann.mkdir()
    for stem, (label, (x1, y1, x2, y2)) in OBJECTS.items():
        (ann / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.png</filename><size><width>{SIZE[0]}</width>"
            f"<height>{SIZE[1]}</height><depth>3</depth></size><object><name>{label}</name>"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
            "</bndbox></object></annotation>"
        )
    return ann


def write_csv(root: Path) -> Path:
    """A raccoon-style box table, one row per box."""
    write_images(root)
    rows = [
        f"{stem}.png,{SIZE[0]},{SIZE[1]},{label},{x1},{y1},{x2},{y2}"
        for stem, (label, (x1, y1, x2, y2)) in OBJECTS.items()
    ]
    path = root / "labels.csv"
    path.write_text("filename,width,height,class,xmin,ymin,xmax,ymax\n" + "\n".join(rows) + "\n")
    return path


def write_jsonl(root: Path, splits: str = "") -> Path:
    """Referring expressions, one per line; ``splits`` gives each line's split letter (t/v)."""
    write_images(root)
    lines = []
    for i, (stem, (label, box)) in enumerate(OBJECTS.items()):
        line = {"image": f"{stem}.png", "expression": f"red {label}", "box": list(box)}
        if splits:
            line["split"] = {"t": "train", "v": "val"}[splits[i]]
        lines.append(json.dumps(line))
    path = root / "refs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


WRITERS = {"coco": write_coco, "yolo": write_yolo, "voc": write_voc, "csv": write_csv,
           "jsonl": write_jsonl}


# --------------------------------------------------------------------- helpers


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in records(run / "metrics.jsonl") if "loss" in r]


def train(model: str, data: Path | str, project: Path, *extra: str) -> Path:
    """``loctune train`` with quiet, short defaults; returns the run folder."""
    argv = ["train", "--model", model, "--data", str(data), "--project", str(project),
            "--name", "exp", "--batch", "2", "progress=false", *extra]
    if "--steps" not in extra:
        argv += ["--steps", "3"]
    assert main(argv) == 0
    return project / "exp"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are overhead-bound: more threads only fight over a shared CPU (5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoint per family, built on first use and shared by the module."""

    class Lazy(dict):
        def __missing__(self, family: str) -> str:
            self[family] = hf_tiny.TINY_BUILDERS[family](tmp_path_factory.mktemp(family))
            return self[family]

    return Lazy()


# ----------------------------------------------------------- families, end to end

FAMILIES = {
    # family: (dataset format, method, predict prompt)
    "paligemma": ("yolo", "distance_inverse", "detect square ; circle"),
    "florence2": ("coco", "distance_inverse", "detect square ; circle"),
    "kosmos2": ("jsonl", "gem_distance_inverse", "red square"),
    "idefics3": ("voc", "distance_inverse", "detect square ; circle"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_train_eval_predict_on_a_hub_family(family, checkpoints, tmp_path, capsys):
    fmt, method, prompt = FAMILIES[family]
    data = WRITERS[fmt](tmp_path / "data")
    runs = tmp_path / "runs"
    run = train(checkpoints[family], data, runs, "--method", method, "log_every=1")

    config = (run / "config.yaml").read_text()
    assert "distance_inverse" in config and "steps: 3" in config
    logged = losses(run)
    assert len(logged) == 3 and all(math.isfinite(x) for x in logged)
    reopened = load_model(str(run / "model"))
    assert reopened.family == adapter_class(family).family

    assert main(["eval", "--model", str(run / "model"), "--data", str(data), "--split", "train",
                 "--project", str(tmp_path / "eval"), "--batch", "2",
                 "--max-new-tokens", "8"]) == 0
    metrics = json.loads((tmp_path / "eval" / "exp" / "metrics.json").read_text())
    predicted = records(tmp_path / "eval" / "exp" / "predictions.jsonl")
    assert {"acc50", "ap"} & set(metrics) and len(predicted) >= 2
    assert metrics["n_malformed"] == sum(r["n_malformed"] for r in predicted)

    image = tmp_path / "data" / "images" / "val" / "d.png" if fmt == "yolo" else None
    image = image or next((tmp_path / "data").rglob("a.png"))
    assert main(["predict", str(image), "--model", str(run / "model"), "--prompt", prompt,
                 "--project", str(tmp_path / "predict"), "--max-new-tokens", "8"]) == 0
    out = tmp_path / "predict" / "exp"
    drawn = Image.open(out / f"{image.stem}.png").size
    # small images are drawn enlarged (short side 320 px) so the tags stay readable
    assert min(drawn) == 320 and drawn[0] * SIZE[1] == drawn[1] * SIZE[0]
    (record,) = json.loads((out / "predictions.json").read_text())
    assert record["prompt"] == prompt
    # the text spells the generated tokens, so every object found is aligned, none extra counted
    decoded = reopened.codec.decode(record["text"], Image.open(image).size)
    assert record["n_malformed"] == decoded.n_malformed
    assert "drawn boxes and predictions.json saved" in capsys.readouterr().out


def test_train_lowers_the_loss(checkpoints, tmp_path):
    """Fifteen steps at lr 3e-3 on the same two images: the logged loss falls at every step."""
    data = write_jsonl(tmp_path / "data", splits="ttvv")
    run = train(checkpoints["paligemma"], data, tmp_path / "runs", "--steps", "15", "--lr",
                "3e-3", "--method", "distance_inverse", "log_every=1")
    logged = losses(run)
    assert len(logged) == 15 and logged[-1] < 0.9 * logged[0]
    assert all(b < a for a, b in itertools.pairwise(logged))  # one fixed batch, every step
    evals = [r for r in records(run / "metrics.jsonl") if "eval/acc50" in r]
    steps = [r["step"] for r in evals]  # eval_every=0: every epoch, at most MAX_AUTO_EVALS
    assert steps[-1] == 15 and len(steps) <= MAX_AUTO_EVALS and steps == sorted(set(steps))


# ------------------------------------------------------------- formats and splits


@pytest.mark.parametrize("fmt", WRITERS)
def test_every_format_trains_from_the_command_line(fmt, tmp_path, capsys):
    data = WRITERS[fmt](tmp_path / "data")
    run = train("small:tiny", data, tmp_path / "runs", "--steps", "2")
    assert (run / "config.yaml").is_file() and (run / "model").is_dir()
    assert len(losses(run)) == 1 and math.isfinite(losses(run)[0])
    n_train, n_val = {"yolo": (3, 1)}.get(fmt, (4, 0))  # 4 images: 10% rounds to no val
    assert f"{n_train} train / {n_val} val" in capsys.readouterr().out


def test_val_is_carved_from_train_by_image_when_the_data_has_none(tmp_path):
    root = tmp_path / "data"
    lines = []
    for i in range(20):  # 20 images, two expressions each
        label, box = OBJECTS["abcd"[i % 4]]
        draw(root / f"{i}.png", box)
        lines += [json.dumps({"image": f"{i}.png", "expression": f"{label} {j}", "box": box})
                  for j in range(2)]
    path = root / "refs.jsonl"
    path.write_text("\n".join(lines))

    parts = load_splits(str(path), {"train": None, "val": None})
    images = {split: {s.image for s in samples} for split, samples in parts.items()}
    assert len(images["val"]) == round(20 * VAL_FRACTION) and not images["val"] & images["train"]
    assert len(parts["train"]) + len(parts["val"]) == 40
    # asked for alone, a file without splits is that split whole (eval on a val file)
    assert len(load_splits(str(path), {"test": None})["test"]) == 40
    assert len(load_splits(str(path), {"train": 3, "val": 1})["val"]) == 1


RACCOON = Path(__file__).resolve().parents[2] / "shared" / "data" / "raccoon"


@pytest.mark.skipif(not RACCOON.is_dir(), reason=f"raccoon data not found at {RACCOON}")
def test_raccoon_keeps_its_test_split_and_carves_val_from_train():
    parts = load_splits("raccoon", {"train": None, "val": None})
    assert (len(parts["train"]), len(parts["val"])) == (144, 16)  # its 160 training images
    assert len(load_splits("raccoon", {"test": None})["test"]) == 40


def test_a_split_the_data_lacks_is_named(tmp_path, capsys):
    data = write_yolo(tmp_path / "data")
    code = main(["eval", "--model", "small:tiny", "--data", str(data), "--split", "test",
                 "--project", str(tmp_path / "eval")])
    assert code == 2
    assert "no 'test' split; it has ['train', 'val']" in capsys.readouterr().err


# ------------------------------------------------------------ synthetic and resume


def test_synthetic_run_resumes_under_the_same_name(tmp_path):
    runs = tmp_path / "runs"
    argv = ["--data", "synthetic", "--n-train", "16", "--n-val", "4", "--max-new-tokens", "8",
            "log_every=1"]
    run = train("small:tiny", "synthetic", runs, *argv[2:])
    assert [r["step"] for r in records(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    assert "eval/acc50" in records(run / "metrics.jsonl")[-1]

    train("small:tiny", "synthetic", runs, *argv[2:], "--steps", "5", "--resume")
    assert not (runs / "exp2").exists()  # continued, not a new run
    steps = [r["step"] for r in records(run / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]
    assert isinstance(load_model(str(run / "model")), SmallVLMAdapter)
    assert increment_run_dir(str(runs), "exp") == runs / "exp2"  # without --resume: a new run


# -------------------------------------------------------------------- bad input

def test_small_vlm_run_is_reproducible_from_its_seed(tmp_path):
    """The fresh model's weights come from the run's seed, not from the global RNG's state."""
    argv = ["--n-train", "16", "--n-val", "0", "--steps", "2", "log_every=1"]
    runs = [train("small:tiny", "synthetic", tmp_path / name, *argv, seed) for name, seed in
            (("a", "seed=3"), ("b", "seed=3"), ("c", "seed=4"))]
    assert losses(runs[0]) == losses(runs[1])
    assert losses(runs[0]) != losses(runs[2])


def test_missing_data_path_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "data.yaml"
    code = main(["train", "--model", "small:tiny", "--data", str(missing), "--steps", "1",
                 "--project", str(tmp_path / "runs")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--data {missing}: no such file or directory" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_unknown_method_lists_the_available_ones(tmp_path, capsys):
    from loctune.losses import list_losses

    code = main(["train", "--model", "small:tiny", "--data", "synthetic", "--method", "l2",
                 "--steps", "1", "--project", str(tmp_path / "runs")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--method 'l2': unknown loss 'l2'; available: " in err
    assert all(name in err for name in list_losses()) and "distance_inverse" in err


def test_method_variant_reaches_the_saved_config(tmp_path, capsys):
    code = main(["train", "--model", "small:tiny", "--data", "synthetic", "--method",
                 "gem_distance_inverse:beta=2,h=linear,power=3", "--steps", "1", "--n-train", "8",
                 "--project", str(tmp_path / "runs")])
    assert code == 0
    saved = next((tmp_path / "runs").rglob("config.yaml")).read_text()
    assert "beta: 2" in saved and "h: linear" in saved and "power: 3" in saved
    code = main(["train", "--model", "small:tiny", "--data", "synthetic", "--method",
                 "gem:beta", "--steps", "1", "--project", str(tmp_path / "runs2")])
    assert code == 2 and "expected name:key=value" in capsys.readouterr().err


def test_n_val_zero_trains_on_every_training_image(tmp_path, capsys):
    rows = []
    for i in range(20):  # no split field: by default val is carved from these
        Image.new("RGB", SIZE, (12 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "expression": "red circle",
                                "box": [2, 2, 20, 20]}))
    data = tmp_path / "refs.jsonl"
    data.write_text("\n".join(rows) + "\n")
    train("small:tiny", data, tmp_path / "runs", "--codec", "rowcol:grid=8", "--steps", "1",
          "--n-val", "0")
    assert "20 train / 0 val" in capsys.readouterr().out
    train("small:tiny", data, tmp_path / "runs2", "--codec", "rowcol:grid=8", "--steps", "1")
    assert "18 train / 2 val" in capsys.readouterr().out


def test_a_plain_train_validates_keeps_a_best_model_folder_that_eval_opens(tmp_path, capsys):
    """No eval_every / best_metric given: validation per epoch, best/ by the task's metric."""
    data = WRITERS["yolo"](tmp_path / "data")
    run = train("small:tiny", data, tmp_path / "runs", "--steps", "4", "--max-new-tokens", "8")
    rows = (run / "metrics.csv").read_text().splitlines()
    # 3 training images in batches of 2: an epoch is 2 steps, so validation at steps 2 and 4
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4"] and "eval/ap" in rows[0]
    assert (run / "best").is_dir()
    assert main(["eval", "--model", str(run / "best"), "--data", str(data), "--split", "val",
                 "--project", str(tmp_path / "eval"), "--max-new-tokens", "8"]) == 0
    assert json.loads((tmp_path / "eval" / "exp" / "metrics.json").read_text())["n_samples"] == 1


def test_every_checkpoint_folder_a_run_writes_opens_with_model(tmp_path, capsys):
    """best/, last/ and model/ each open with ``eval --model`` and ``predict --model``."""
    data = WRITERS["yolo"](tmp_path / "data")
    run = train("small:tiny", data, tmp_path / "runs", "--steps", "4", "--max-new-tokens", "8")
    assert (run / "last" / "state" / "optimizer.bin").is_file()  # --resume's state beside it
    # the run record names the codec it trained with, though none was given
    record = (run / "config.yaml").read_text()
    codec = json.loads((run / "last" / "adapter.json").read_text())["codec"]
    assert f"codec: {codec}" in record or f"codec: '{codec}'" in record
    for folder in ("best", "last", "model"):
        project = tmp_path / "eval" / folder
        assert main(["eval", "--model", str(run / folder), "--data", str(data), "--split", "val",
                     "--project", str(project), "--max-new-tokens", "8"]) == 0, folder
        assert json.loads((project / "exp" / "metrics.json").read_text())["n_samples"] == 1
        assert main(["predict", "--model", str(run / folder),
                     str(tmp_path / "data" / "images" / "val"),
                     "--prompt", "detect square ; circle", "--max-new-tokens", "8",
                     "--project", str(tmp_path / "predict" / folder)]) == 0, folder
    assert main(["eval", "--model", str(run / "last"), "--data", str(data), "--split", "val",
                 "--project", str(tmp_path / "conf"), "--max-new-tokens", "8",
                 "--conf", "0.5"]) == 0
    metrics = json.loads((tmp_path / "conf" / "exp" / "metrics.json").read_text())
    assert "recall@0.5" in metrics and "recall@0.25" not in metrics  # P/R at the chosen score
    assert train("small:tiny", data, tmp_path / "runs", "--steps", "5", "--max-new-tokens", "8",
                 "--resume").name == "exp"  # last/ still resumes
    assert records(run / "metrics.jsonl")[-1]["step"] == 5


def test_train_writes_the_final_validation_with_its_plots(tmp_path, capsys):
    """run/val holds what `loctune eval` writes: PR curves, confusion matrix (its counts are
    tested in test_metrics), truth | predicted images."""
    from loctune.visualize import TRUTH_COLOR

    data = WRITERS["yolo"](tmp_path / "data")
    run = train("small:tiny", data, tmp_path / "runs", "--steps", "2", "--max-new-tokens", "8")
    out = capsys.readouterr().out
    assert "NaN" not in out and f"final validation and its plots: {run / 'val'}" in out
    for name in ("results.png", "val/pr_curves.png", "val/confusion_matrix.png",
                 "val/examples.png"):
        with Image.open(run / name) as im:
            im.verify()  # a whole, valid PNG
            assert im.format == "PNG" and min(im.size) > 300, name
    pixels = torch.tensor(list(Image.open(run / "val" / "examples.png").convert("RGB").tobytes()))
    green = torch.tensor([int(TRUTH_COLOR[i : i + 2], 16) for i in (1, 3, 5)])
    assert (pixels.view(-1, 3) == green).all(1).sum() > 100  # the truth box and its tag
    for name in ("metrics.json", "per_class.csv", "predictions.jsonl", "coco_results.json"):
        assert (run / "val" / name).is_file(), name
