"""Annotation readers on made files with edge cases, and on the real raccoon data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from loctune.boxes import xywh_to_xyxy
from loctune.data import (
    DataError,
    load_dataset,
    raccoon,
    read_coco,
    read_csv_boxes,
    read_refcoco,
    read_referring_jsonl,
    read_voc,
    read_yolo,
)

RACCOON = Path(__file__).resolve().parents[2] / "shared" / "data" / "raccoon"
needs_raccoon = pytest.mark.skipif(
    not (RACCOON / "annotations").is_dir(), reason=f"raccoon data not found at {RACCOON}"
)


def make_image(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path


def examples(report, reason: str) -> list[str]:
    return [str(issue) for issue in report.examples.get(reason, [])]


# --------------------------------------------------------------------------- COCO


def write_coco(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png", "empty.png"):
        make_image(tmp_path / "img" / name)
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.png", "width": 64, "height": 48},
            {"id": 3, "file_name": "missing.png", "width": 64, "height": 48},
            {"id": 4, "file_name": "empty.png"},  # no size: read from the header
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [4, 6, 10, 20]},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [58, 0, 8, 8]},  # clipped
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [0, 0, 9, 9], "iscrowd": 1},
            {"id": 13, "image_id": 1, "category_id": 99, "bbox": [0, 0, 5, 5]},
            {"id": 14, "image_id": 1, "category_id": 7, "bbox": [1, 2, 3]},
            {"id": 15, "image_id": 1, "category_id": 7, "bbox": [5, 5, 0, 4]},
            {"id": 16, "image_id": 1, "category_id": 7, "bbox": [float("nan"), 1, 2, 2]},
            {"id": 20, "image_id": 2, "category_id": 7, "bbox": [100, 100, 5, 5]},
            {"id": 30, "image_id": 3, "category_id": 7, "bbox": [1, 1, 5, 5]},
            {"id": 40, "image_id": 9, "category_id": 7, "bbox": [1, 1, 5, 5]},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_reads_boxes_as_xyxy_and_reports_every_problem(tmp_path):
    path = write_coco(tmp_path)
    data = read_coco(path, tmp_path / "img")
    assert data.classes == ["cat", "dog"]  # category id order
    by_id = {s.image_id: s for s in data}
    assert set(by_id) == {"1", "4"}  # 2: all boxes invalid, 3: image missing
    a = by_id["1"]
    assert a.task == "detection" and a.prompt == "detect cat ; dog"
    assert a.boxes == [(4.0, 6.0, 14.0, 26.0), (58.0, 0.0, 64.0, 8.0)]
    assert a.labels == ["dog", "cat"] and a.meta["ann_ids"] == [10, 11]
    assert a.meta["n_invalid_boxes"] == 4
    assert by_id["4"].boxes == [] and by_id["4"].meta["image_size"] == (64, 48)

    report = data.report
    assert dict(report.counts) == {
        "clipped": 1,
        "crowd": 1,
        "unknown_class": 1,
        "malformed": 2,
        "empty_box": 1,
        "not_finite": 1,
        "outside_image": 1,
        "no_valid_boxes": 1,
        "missing_image": 1,
    }
    assert report.n_samples == 2 and report.n_boxes == 2
    assert examples(report, "empty_box") == [
        f"{path}: annotations[5] (id=15) bbox: box [5, 5, 5, 9] (x1 y1 x2 y2) "
        "has zero or negative area"
    ]
    assert (
        "annotations[3] (id=13) category_id: 99 is not in categories"
        in examples(report, "unknown_class")[0]
    )
    assert "image file not found" in examples(report, "missing_image")[0]
    assert "images[2]" in examples(report, "missing_image")[0]
    assert "annotations[9] (id=40) image_id: 9 is not in images" in " ".join(
        examples(report, "malformed")
    )


def test_coco_options_and_raise_policy(tmp_path):
    path = write_coco(tmp_path)
    with_crowd = read_coco(path, tmp_path / "img", include_crowd=True, keep_empty=False)
    (a,) = with_crowd.samples
    assert a.meta["iscrowd"] == [False, False, True]
    # by default the crowd region is no training box but stays for evaluation (COCOeval crowd)
    (plain,) = read_coco(path, tmp_path / "img", keep_empty=False).samples
    assert len(plain.boxes) == 2 and plain.meta["crowd"] == [["cat", [0.0, 0.0, 9.0, 9.0]]]
    with pytest.raises(DataError, match=r"instances\.json: annotations\[3\] \(id=13\) category_id"):
        read_coco(path, tmp_path / "img", on_error="raise")


def test_coco_structure_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(DataError, match=r"bad\.json:2: invalid JSON"):
        read_coco(bad)
    bad.write_text('{"images": []}')
    with pytest.raises(DataError, match="expected a COCO instances object"):
        read_coco(bad)


# ------------------------------------------------------------------ referring


def test_refcoco_one_sample_per_sentence_with_split(tmp_path):
    instances = write_coco(tmp_path)
    refs = [
        {
            "ref_id": 0,
            "ann_id": 10,
            "image_id": 1,
            "split": "train",
            "sentences": [{"sent": "the dog", "sent_id": 0}, {"sent": "left animal", "sent_id": 1}],
        },
        {"ref_id": 1, "ann_id": 11, "split": "val", "sentences": [{"sent": "cat at edge"}]},
        {"ref_id": 2, "ann_id": 404, "split": "val", "sentences": [{"sent": "nothing"}]},
        {"ref_id": 3, "ann_id": 10, "split": "test", "sentences": [{"sent": ""}]},
    ]
    refs_path = tmp_path / "refs.json"
    refs_path.write_text(json.dumps(refs))
    data = read_refcoco(refs_path, instances, tmp_path / "img")
    assert [s.prompt for s in data] == ["the dog", "left animal", "cat at edge"]
    assert [s.meta["split"] for s in data] == ["train", "train", "val"]
    assert all(s.task == "grounding" and len(s.boxes) == 1 for s in data)
    assert data[0].boxes == [(4.0, 6.0, 14.0, 26.0)] and data[0].labels == ["the dog"]
    assert data[2].boxes == [(58.0, 0.0, 64.0, 8.0)]  # clipped, counted
    assert data.report.counts["clipped"] == 1
    malformed = " ".join(examples(data.report, "malformed"))
    assert "refs[2].ann_id: 404 is not in" in malformed
    assert "refs[3].sentences[0].sent: expected text" in malformed

    by_category = read_refcoco(
        refs_path, instances, tmp_path / "img", splits=["val"], label="category"
    )
    assert [s.labels for s in by_category] == [["cat"]]


def test_refcoco_refuses_pickles(tmp_path):
    pickle_path = tmp_path / "refs(unc).p"
    pickle_path.write_bytes(b"\x80\x04N.")
    with pytest.raises(DataError, match="refusing to unpickle"):
        read_refcoco(pickle_path, write_coco(tmp_path))
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_dataset(pickle_path, instances=tmp_path / "instances.json")


def test_referring_jsonl_lines_and_errors(tmp_path):
    make_image(tmp_path / "a.png")
    lines = [
        {"image": "a.png", "expression": "red square", "box": [1, 2, 30, 40], "split": "train"},
        "{not json",
        {"image": "a.png", "expression": "no box"},
        {"image": "a.png", "expression": "flat", "box": [5, 5, 20, 5]},
        {"image": "gone.png", "expression": "lost", "box": [1, 1, 2, 2]},
        {"image": "a.png", "expression": "far away", "box": [100, 100, 120, 130]},
        {"image": "a.png", "expression": "edge", "box": [50, 40, 70, 50], "category": "thing"},
    ]
    path = tmp_path / "refs.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    data = read_referring_jsonl(path)
    assert [s.prompt for s in data] == ["red square", "edge"]
    assert data[0].boxes == [(1.0, 2.0, 30.0, 40.0)] and data[0].meta["split"] == "train"
    assert data[1].boxes == [(50.0, 40.0, 64.0, 48.0)] and data[1].meta["category"] == "thing"
    assert data.classes == ["thing"]
    report = data.report
    assert examples(report, "malformed")[0].startswith(f"{path}:2: invalid JSON")
    assert examples(report, "malformed")[1] == f"{path}:3: missing field(s) ['box']"
    assert examples(report, "empty_box")[0].startswith(f"{path}:4: box: box [5, 5, 20, 5]")
    assert examples(report, "missing_image")[0].startswith(f"{path}:5: image: image file not found")
    assert "entirely outside the 64x48 image" in examples(report, "outside_image")[0]


def test_xywh_to_xyxy_keeps_the_shape_and_leaves_its_input_alone():
    one = [1, 2, 10, 20]
    assert xywh_to_xyxy(one).tolist() == [1.0, 2.0, 11.0, 22.0] and one == [1, 2, 10, 20]
    assert xywh_to_xyxy([[0, 0, 1, 1], [5, 5, 2, 3]]).tolist() == [[0, 0, 1, 1], [5, 5, 7, 8]]


def test_referring_jsonl_xywh_flag(tmp_path):
    make_image(tmp_path / "a.png")
    path = tmp_path / "refs.jsonl"
    path.write_text(json.dumps({"image": "a.png", "expression": "x", "bbox": [1, 2, 10, 20]}))
    assert read_referring_jsonl(path, box_format="xywh")[0].boxes == [(1.0, 2.0, 11.0, 22.0)]
    with pytest.raises(DataError, match=r"refs\.jsonl:1: missing field\(s\) \['box'\]"):
        read_referring_jsonl(path, on_error="raise")


# ----------------------------------------------------------------------- YOLO


def write_yolo(tmp_path: Path, names) -> Path:
    root = tmp_path / "ds"
    make_image(root / "images" / "train" / "a.png")
    make_image(root / "images" / "train" / "b.png", (100, 50))
    make_image(root / "images" / "train" / "background.png")
    make_image(root / "images" / "val" / "c.png")
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text(
        "0 0.5 0.5 0.5 0.5\n"
        "1 0.1 0.2 0.3 0.2 0.3 0.6\n"  # polygon -> its bounding box
        "0 0.5 0.5 0.5\n"  # malformed
        "5 0.5 0.5 0.1 0.1\n"  # unknown class
        "\n"
        "1 0.95 0.5 0.2 0.2\n"  # half outside on the right -> clipped
        "0 nan 0.5 0.1 0.1\n"
    )
    (root / "labels" / "train" / "b.txt").write_text("0 2.0 2.0 0.1 0.1\n")  # entirely outside
    (root / "labels" / "val" / "c.txt").write_text("1 0.25 0.25 0.5 0.5\n")
    (root / "val.txt").write_text("./images/val/c.png\nimages/val/missing.png\n")
    yaml_path = root / "data.yaml"
    yaml_path.write_text(
        json.dumps({"path": ".", "train": "images/train", "val": "val.txt", "names": names})
    )
    return yaml_path


@pytest.mark.parametrize("names", [["cat", "dog"], {0: "cat", 1: "dog"}])
def test_yolo_layout(tmp_path, names):
    yaml_path = write_yolo(tmp_path, names)
    data = read_yolo(yaml_path)
    assert data.classes == ["cat", "dog"]
    by_id = {s.image_id: s for s in data}
    assert set(by_id) == {"images/train/a.png", "images/train/background.png", "images/val/c.png"}
    a = by_id["images/train/a.png"]
    assert a.meta["split"] == "train" and a.meta["image_size"] == (64, 48)
    assert a.labels == ["cat", "dog", "dog"]
    expected = [(16, 12, 48, 36), (0.1 * 64, 0.2 * 48, 0.3 * 64, 0.6 * 48), (54.4, 19.2, 64, 28.8)]
    for box, want in zip(a.boxes, expected, strict=True):
        assert box == pytest.approx(want)
    assert by_id["images/train/background.png"].boxes == []
    assert by_id["images/val/c.png"].meta["split"] == "val"

    labels = tmp_path / "ds" / "labels" / "train" / "a.txt"
    report = data.report
    assert examples(report, "malformed")[0].startswith(f"{labels}:3: expected 'class cx cy w h'")
    assert examples(report, "unknown_class")[0].startswith(
        f"{labels}:4: class: '5' is not a class id"
    )
    assert examples(report, "clipped")[0].startswith(f"{labels}:6:")
    assert examples(report, "not_finite")[0].startswith(f"{labels}:7:")
    assert "entirely outside" in examples(report, "outside_image")[0]
    assert examples(report, "no_valid_boxes")[0].endswith("image dropped, not kept as a negative")
    missing = examples(report, "missing_image")[0]
    assert missing.startswith(f"{tmp_path / 'ds' / 'val.txt'}:2: image file not found")

    assert [s.meta["split"] for s in read_yolo(yaml_path, splits=["val"])] == ["val"]
    with pytest.raises(DataError, match="test: no such split"):
        read_yolo(yaml_path, splits=["test"])


def test_yolo_bad_yaml(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("train: images\nnames: 3\n")
    with pytest.raises(DataError, match=r"data\.yaml: names: expected a list"):
        read_yolo(path)


# ------------------------------------------------------------------------ VOC

VOC_OBJECT = (
    "<object><name>{name}</name><difficult>{difficult}</difficult>"
    "<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
)


def voc_xml(filename: str, objects: list[dict], size=(64, 48)) -> str:
    body = "".join(VOC_OBJECT.format(**{"difficult": 0, **o}) for o in objects)
    return (
        f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
        f"<height>{size[1]}</height><depth>3</depth></size>{body}</annotation>"
    )


def write_voc(tmp_path: Path) -> Path:
    ann = tmp_path / "Annotations"
    ann.mkdir()
    make_image(tmp_path / "JPEGImages" / "a.png")
    make_image(tmp_path / "JPEGImages" / "b.png")
    (ann / "a.xml").write_text(
        voc_xml(
            "a.png",
            [
                {"name": "cat", "x1": 1, "y1": 2, "x2": 30, "y2": 40},
                {"name": "dog", "x1": 10, "y1": 10, "x2": 70, "y2": 20, "difficult": 1},
                {"name": "bird", "x1": 1, "y1": 1, "x2": 5, "y2": 5},
                {"name": "cat", "x1": 1, "y1": 1, "x2": "abc", "y2": 5},
            ],
        )
    )
    (ann / "b.xml").write_text(voc_xml("b.png", [], size=(0, 0)))  # size from the header
    (ann / "c.xml").write_text(
        voc_xml("missing.png", [{"name": "cat", "x1": 1, "y1": 1, "x2": 5, "y2": 5}])
    )
    (ann / "d.xml").write_text("<annotation>\n<filename>a.png</filename>\n<object>\n</annotation>")
    return ann


def test_voc_folder(tmp_path):
    ann = write_voc(tmp_path)
    data = read_voc(ann, classes=["cat", "dog"])
    by_id = {s.image_id: s for s in data}
    assert set(by_id) == {"a.png", "b.png"}
    a = by_id["a.png"]
    assert a.boxes == [(1.0, 2.0, 30.0, 40.0), (10.0, 10.0, 64.0, 20.0)]
    assert a.labels == ["cat", "dog"] and a.meta["difficult"] == [False, True]
    assert a.prompt == "detect cat ; dog"
    assert by_id["b.png"].meta["image_size"] == (64, 48) and by_id["b.png"].boxes == []
    report = data.report
    assert examples(report, "unknown_class") == [
        f"{ann / 'a.xml'}: object[3]/name: 'bird' is not in ['cat', 'dog']"
    ]
    assert examples(report, "malformed")[0] == (
        f"{ann / 'a.xml'}: object[4]/bndbox/xmax: expected a number, got 'abc'"
    )
    assert examples(report, "malformed")[1].startswith(f"{ann / 'd.xml'}:4: invalid XML")
    assert examples(report, "missing_image")[0].startswith(f"{ann / 'c.xml'}: filename: image")
    assert examples(report, "clipped")[0].startswith(f"{ann / 'a.xml'}: object[2]/bndbox")


def test_voc_discovered_classes_and_skip_difficult(tmp_path):
    ann = write_voc(tmp_path)
    data = read_voc(ann, skip_difficult=True, keep_empty=False)
    assert data.classes == ["bird", "cat"]
    (a,) = data.samples
    assert a.labels == ["cat", "bird"]
    assert data.report.counts["difficult"] == 1 and data.report.kinds["difficult"] == "skipped"


# ------------------------------------------------------------------------ CSV


def test_csv_groups_rows_by_image(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    path = tmp_path / "labels.csv"
    path.write_text(
        "filename,width,height,class,xmin,ymin,xmax,ymax\n"
        "a.png,64,48,cat,1,2,30,40\n"
        "b.png,64,48,dog,5,5,20,20\n"
        "a.png,64,48,dog,10,10,abc,20\n"
        "a.png,64,48,cow,10,10,20,20\n"
        "gone.png,64,48,cat,1,1,5,5\n"
        "a.png,64,48,cat\n"
        "a.png,64,48,cat,40,30,70,50\n"
        "b.png,60,48,dog,5,5,20,20\n"
        "a.png,64,48,dog,8,8,8,20\n"
    )
    data = read_csv_boxes(path, classes=["cat", "dog"], split="train")
    a, b = data.samples
    assert (a.image_id, b.image_id) == ("a.png", "b.png")
    assert a.boxes == [(1.0, 2.0, 30.0, 40.0), (40.0, 30.0, 64.0, 48.0)]
    assert a.labels == ["cat", "cat"] and a.meta["lines"] == [2, 8]
    assert a.meta["split"] == "train" and b.boxes == [(5.0, 5.0, 20.0, 20.0)]
    report = data.report
    assert examples(report, "malformed") == [
        f"{path}:4: xmax: expected a number, got 'abc'",
        f"{path}:7: expected 8 fields like the header",
        f"{path}:9: width/height: (60, 48) differs from (64, 48) on line 3",
    ]
    assert examples(report, "unknown_class") == [f"{path}:5: class: 'cow' is not in ['cat', 'dog']"]
    assert examples(report, "missing_image")[0].startswith(
        f"{path}:6: filename: image file not found"
    )
    assert examples(report, "empty_box")[0].startswith(f"{path}:10: box [8, 8, 8, 20]")
    assert report.counts["clipped"] == 1


def test_csv_header_must_have_the_columns(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("file,class,xmin\n")
    with pytest.raises(DataError, match=r"labels\.csv:1: header lacks column\(s\) \['filename'"):
        read_csv_boxes(path)


# ------------------------------------------------------------ Hugging Face


def hf_rows(layout: str):
    import datasets

    cat = datasets.ClassLabel(names=["cat", "dog"])
    box = datasets.List(datasets.Value("float32"), length=4)
    if layout == "list_of_dicts":
        objects = datasets.List({"bbox": box, "category": cat})
        values = [
            [{"bbox": [1, 2, 10, 20], "category": 1}],
            [{"bbox": [0, 0, 5, 5], "category": 0}],
        ]
    else:
        objects = {"bbox": datasets.List(box), "category": datasets.List(cat)}
        values = [
            {"bbox": [[1, 2, 10, 20]], "category": [1]},
            {"bbox": [[0, 0, 5, 5]], "category": [0]},
        ]
    features = datasets.Features({"image": datasets.Image(), "objects": objects})
    images = [Image.new("RGB", (64, 48)), Image.new("RGB", (32, 32))]
    return datasets.Dataset.from_dict({"image": images, "objects": values}, features=features)


@pytest.mark.parametrize("layout", ["list_of_dicts", "dict_of_lists"])
def test_hf_objects_column(layout):
    from loctune.data import read_hf

    data = read_hf(hf_rows(layout))
    assert data.classes == ["cat", "dog"]
    first, second = data.samples
    assert first.boxes == [(1.0, 2.0, 11.0, 22.0)] and first.labels == ["dog"]
    assert first.image_size == (64, 48) and second.image_size == (32, 32)
    assert first.prompt == "detect cat ; dog" and first.task == "detection"
    xyxy = read_hf(hf_rows(layout), bbox_format="xyxy")
    assert xyxy[0].boxes == [(1.0, 2.0, 10.0, 20.0)]


def test_hf_dataset_dict_and_bad_rows(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "objects": {
                "bbox": datasets.List(datasets.List(datasets.Value("float32"))),
                "category": datasets.List(datasets.Value("int64")),  # no ClassLabel
            },
        }
    )
    train = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (20, 20))] * 2,
            "objects": [
                {"bbox": [[1, 1, 5, 5], [0, 0, 3]], "category": [0, 0]},
                {"bbox": [[1, 1, 5, 5]], "category": [3]},
            ],
        },
        features=features,
    )
    test = train.select([0])
    dd = datasets.DatasetDict({"train": train, "test": test})
    with pytest.raises(DataError, match=r"toy\[train\]\[0\]\.objects\[0\]\.category: integer"):
        load_dataset(dd, source="toy")
    data = load_dataset(dd, source="toy", classes=["cat"])
    assert [s.meta["split"] for s in data] == ["train", "test"]
    report = data.report
    assert examples(report, "malformed")[0] == (
        "toy[train][0].objects[1].bbox: expected 4 numbers, got [0.0, 0.0, 3.0]"
    )
    assert examples(report, "unknown_class")[0] == (
        "toy[train][1].objects[0].category: 3 is not a class id (0..0)"
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    assert len(load_dataset(tmp_path / "saved", classes=["cat"])) == 2


# --------------------------------------------------------------- raccoon (real)


@needs_raccoon
def test_raccoon_voc_and_csv_agree():
    voc = read_voc(RACCOON / "annotations", RACCOON / "images")
    csv = read_csv_boxes(RACCOON / "data" / "raccoon_labels.csv", RACCOON / "images")
    for data in (voc, csv):
        assert (len(data), data.n_boxes, data.classes) == (200, 217, ["raccoon"])
        assert data.report.n_dropped == 0 and data.report.n_clipped == 0
    voc_boxes = {s.image_id: sorted(s.boxes) for s in voc}
    csv_boxes = {s.image_id: sorted(s.boxes) for s in csv}
    assert voc_boxes == csv_boxes
    assert all(s.meta["image_size"] == Image.open(s.image).size for s in voc[:5])


@needs_raccoon
def test_raccoon_original_split():
    data = raccoon()
    train = [s.image_id for s in data if s.meta["split"] == "train"]
    test = [s.image_id for s in data if s.meta["split"] == "test"]
    assert (len(train), len(test), len(set(train) & set(test))) == (160, 40, 0)
    assert data.n_boxes == 217 and data.samples[0].prompt == "detect raccoon"
    assert [s.image_id for s in raccoon("test")] == test
    assert all(not math.isnan(c) for s in data for b in s.boxes for c in b)


def test_raccoon_missing_root_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="raccoon dataset not found"):
        raccoon(root=tmp_path)


@pytest.mark.parametrize("layout", ["list_of_dicts", "dict_of_lists"])
def test_hf_crowd_regions_are_kept_out_of_training_and_kept_for_ap(layout):
    """As read_coco: an ``iscrowd`` object is a region for evaluation, not a target."""
    import datasets

    from loctune.data import read_hf

    boxes, cats, crowd = [[1, 2, 10, 20], [20, 10, 30, 30]], [1, 0], [0, 1]
    if layout == "list_of_dicts":
        values = [[{"bbox": b, "category": c, "iscrowd": k}
                   for b, c, k in zip(boxes, cats, crowd, strict=True)]]
    else:
        values = [{"bbox": boxes, "category": cats, "iscrowd": crowd}]
    rows = datasets.Dataset.from_dict({"image": [Image.new("RGB", (64, 48))], "objects": values})
    data = read_hf(rows, classes=["cat", "dog"])
    (sample,) = data.samples
    assert sample.labels == ["dog"] and sample.boxes == [(1.0, 2.0, 11.0, 22.0)]
    assert sample.meta["crowd"] == [["cat", [20.0, 10.0, 50.0, 40.0]]]
    assert data.report.counts["crowd"] == 1
