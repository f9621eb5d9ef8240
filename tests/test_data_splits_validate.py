"""Box validation policy, the report, splits by image, and format detection."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from loctune.data import (
    DataError,
    Validator,
    dataset_splits,
    detect_format,
    load_dataset,
    split_by_image,
    split_samples,
)
from loctune.types import Sample


def test_validator_clips_drops_and_snaps():
    v = Validator("toy")
    assert v.box((-2, 0, 30, 20), (64, 48), "f:1") == (0.0, 0.0, 30.0, 20.0)
    assert v.box((0, -1e-9, 64 + 1e-9, 48), (64, 48), "f:2") == (
        0.0,
        0.0,
        64.0,
        48.0,
    )  # float noise
    assert v.box((50, 0, 90, 10), (64, 48), "f:3") is None  # 65% outside
    assert v.box((70, 0, 90, 10), (64, 48), "f:4") is None
    assert v.box((0, 0, float("inf"), 10), (64, 48), "f:5") is None
    assert v.box((10, 10, 5, 20), (64, 48), "f:6") is None
    report = v.report
    assert dict(report.counts) == {
        "clipped": 1,
        "outside_image": 2,
        "not_finite": 1,
        "empty_box": 1,
    }
    assert str(report.examples["outside_image"][0]) == (
        "f:3: box [50, 0, 90, 10] is 65% outside the 64x48 image"
    )
    assert report.n_dropped == 4 and report.n_clipped == 1
    lenient = Validator("toy", min_inside=0.3)
    assert lenient.box((50, 0, 90, 10), (64, 48), "f:3") == (50.0, 0.0, 64.0, 10.0)


def test_raise_policy_raises_on_errors_but_not_on_clipping():
    v = Validator("toy", on_error="raise")
    assert v.box((-1, 0, 10, 10), (64, 48), "f:1") == (0.0, 0.0, 10.0, 10.0)
    with pytest.raises(DataError, match=r"^f:2: box \[1, 1, 1, 5\]"):
        v.box((1, 1, 1, 5), (64, 48), "f:2")
    with pytest.raises(ValueError, match="on_error"):
        Validator("toy", on_error="ignore")


def test_report_saves_json_and_logs_a_warning(tmp_path, caplog):
    v = Validator("toy", max_examples=2)
    for i in range(5):
        v.box((0, 0, 0, 0), (10, 10), f"f:{i}")
    sample = Sample("x.png", "p", [(0, 0, 1, 1)], ["a"], meta={"image_size": (10, 10)})
    with caplog.at_level(logging.INFO, logger="loctune.data.validate"):
        report = v.finish([sample])
    assert caplog.records[-1].levelno == logging.WARNING
    assert "dropped 5" in caplog.records[-1].getMessage()
    saved = json.loads(report.save(tmp_path / "out" / "data_report.json").read_text())
    assert saved["kept"] == {"samples": 1, "boxes": 1}
    assert saved["totals"]["dropped"] == 5
    assert saved["reasons"]["empty_box"]["count"] == 5
    assert [e["where"] for e in saved["reasons"]["empty_box"]["examples"]] == ["f:0", "f:1"]


def grounding_samples(n_images: int, per_image: int = 3) -> list[Sample]:
    return [
        Sample(f"img{i}.png", f"thing {j}", [(0, 0, 1, 1)], ["t"], image_id=f"img{i}")
        for i in range(n_images)
        for j in range(per_image)
    ]


@settings(max_examples=30, deadline=None)
@given(
    n_images=st.integers(0, 40),
    ratios=st.lists(st.floats(0.0, 5.0), min_size=1, max_size=4).filter(lambda r: sum(r) > 0),
    seed=st.integers(0, 10),
)
def test_split_by_image_partitions_images(n_images, ratios, seed):
    samples = grounding_samples(n_images, per_image=2)
    names = {f"s{i}": r for i, r in enumerate(ratios)}
    parts = split_by_image(samples, names, seed)
    assert sum(len(p) for p in parts.values()) == len(samples)
    owner: dict[str, str] = {}
    for name, part in parts.items():
        for s in part:
            assert owner.setdefault(s.image_id, name) == name  # never in two splits
    for name, ratio in names.items():
        n = len({s.image_id for s in parts[name]})
        assert abs(n - n_images * ratio / sum(ratios)) < 1 + 1e-9


def test_split_is_deterministic_and_order_independent():
    samples = grounding_samples(30)
    a = split_by_image(samples, seed=3)
    b = split_by_image(list(reversed(samples)), seed=3)
    ids = {name: sorted({s.image_id for s in part}) for name, part in a.items()}
    assert ids == {name: sorted({s.image_id for s in part}) for name, part in b.items()}
    assert [len({s.image_id for s in p}) for p in a.values()] == [24, 3, 3]
    other = split_by_image(samples, seed=4)
    assert ids != {name: sorted({s.image_id for s in part}) for name, part in other.items()}
    with pytest.raises(ValueError, match="non-negative"):
        split_by_image(samples, {"train": -1.0, "test": 2.0})


def test_dataset_split_is_used_and_checked():
    samples = grounding_samples(4, per_image=1)
    for s, split in zip(samples, ["train", "train", "val", "test"], strict=True):
        s.meta["split"] = split
    parts = split_samples(samples, seed=9)
    assert {k: len(v) for k, v in parts.items()} == {"train": 2, "val": 1, "test": 1}
    assert set(split_samples(samples, {"a": 1.0}, use_dataset_split=False)) == {"a"}
    leaked = samples + [
        Sample("img0.png", "again", [], [], image_id="img0", meta={"split": "test"})
    ]
    with pytest.raises(DataError, match="'img0' is in both the 'train' and the 'test' split"):
        dataset_splits(leaked)
    with pytest.raises(DataError, match="1 of 2 samples have meta"):
        dataset_splits([samples[0], Sample("z.png", "", [], [], image_id="z")])
    assert dataset_splits(grounding_samples(2)) is None


def test_detect_format(tmp_path):
    (tmp_path / "coco.json").write_text('  {"images": []}')
    (tmp_path / "refs.json").write_text('\n[{"ann_id": 1}]')
    assert detect_format(tmp_path / "coco.json") == "coco"
    assert detect_format(tmp_path / "refs.json") == "refcoco"
    assert detect_format(tmp_path / "data.yaml") == "yolo"
    assert detect_format(tmp_path / "x.jsonl") == "referring_jsonl"
    assert detect_format(tmp_path / "x.csv") == "csv"
    voc = tmp_path / "voc"
    (voc / "annotations").mkdir(parents=True)
    (voc / "annotations" / "a.xml").write_text("<annotation/>")
    assert detect_format(voc) == "voc"
    assert detect_format(voc / "annotations") == "voc"
    with pytest.raises(DataError, match="cannot tell the annotation format"):
        detect_format(tmp_path / "nothing.txt")
    with pytest.raises(DataError, match="pass instances="):
        load_dataset(tmp_path / "refs.json")


def test_load_dataset_split_spec_merges_classes_and_reports(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "b.png")
    header = "filename,width,height,class,xmin,ymin,xmax,ymax\n"
    (tmp_path / "train.csv").write_text(
        header + "a.png,64,48,cat,1,1,9,9\na.png,64,48,cat,1,1,1,9\n"
    )
    (tmp_path / "test.csv").write_text(header + "b.png,64,48,dog,1,1,9,9\n")
    data = load_dataset({"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"})
    assert data.classes == ["cat", "dog"]
    assert [s.prompt for s in data] == ["detect cat ; dog"] * 2
    assert [s.meta["split"] for s in data] == ["train", "test"]
    assert data.report.n_samples == 2 and data.report.counts["empty_box"] == 1
    assert str(tmp_path / "train.csv") + ":3" in str(data.report.examples["empty_box"][0])
