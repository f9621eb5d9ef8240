"""Formats people export: Roboflow YOLO and COCO, Label Studio (JSON, JSON-MIN), CVAT XML."""

import json

import pytest
from PIL import Image

from loctune.data import load_dataset
from loctune.data.loaders import detect_format

SIZE = (80, 60)


def image(path, size=SIZE):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 60, 30)).save(path)
    return path


def test_roboflow_yolo_export_resolves_dot_dot_split_paths(tmp_path):
    root = tmp_path / "export"
    for split in ("train", "valid"):
        image(root / split / "images" / f"{split}.jpg")
        (root / split / "labels").mkdir(parents=True)
        (root / split / "labels" / f"{split}.txt").write_text("0 0.5 0.5 0.25 0.5\n")
    (root / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['cell']\n"
    )
    found = load_dataset(root)
    assert sorted(s.meta["split"] for s in found) == ["train", "val"]
    assert found[0].boxes == [pytest.approx((30.0, 15.0, 50.0, 45.0))]


def test_roboflow_coco_export_folder_and_its_grouping_category(tmp_path):
    root = tmp_path / "export"
    categories = [{"id": 0, "name": "cells", "supercategory": "none"},
                  {"id": 1, "name": "RBC", "supercategory": "cells"},
                  {"id": 2, "name": "WBC", "supercategory": "cells"}]
    for split in ("train", "valid", "test"):
        image(root / split / f"{split}.jpg")
        (root / split / "_annotations.coco.json").write_text(json.dumps({
            "images": [{"id": 0, "file_name": f"{split}.jpg", "width": 80, "height": 60}],
            "annotations": [{"id": 0, "image_id": 0, "category_id": 1, "bbox": [1, 2, 10, 10],
                             "area": 100, "iscrowd": 0}],
            "categories": categories,
        }))
    assert detect_format(root) == "coco"
    found = load_dataset(root)
    assert found.classes == ["RBC", "WBC"]  # "cells" only groups them: no class of its own
    assert sorted(s.meta["split"] for s in found) == ["test", "train", "val"]


def rectangle(x, y, w, h, label, rotation=0):
    return {"x": x, "y": y, "width": w, "height": h, "rotation": rotation,
            "rectanglelabels": [label], "original_width": SIZE[0], "original_height": SIZE[1]}


def test_label_studio_full_export(tmp_path):
    image(tmp_path / "images" / "dog.jpg")
    tasks = [{
        "id": 1,
        "data": {"image": "/data/upload/3/8f2c1a-dog.jpg"},
        "annotations": [{"result": [
            {"type": "rectanglelabels", "original_width": 80, "original_height": 60,
             "value": rectangle(10, 20, 50, 50, "dog")},
            {"type": "rectanglelabels", "original_width": 80, "original_height": 60,
             "value": rectangle(0, 0, 10, 10, "cat", rotation=30)},
            {"type": "polygonlabels", "original_width": 80, "original_height": 60,
             "value": {"points": [[0, 0], [1, 1]], "polygonlabels": ["cat"]}},
        ]}],
    }]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    assert detect_format(path) == "label_studio"  # a JSON list, but no RefCOCO refs
    found = load_dataset(path, image_root=tmp_path / "images")
    (sample,) = found.samples
    assert sample.boxes == [pytest.approx((8.0, 12.0, 48.0, 42.0))] and sample.labels == ["dog"]
    assert found.report.counts["rotated"] == 1 and found.report.counts["not_a_box"] == 1


def test_label_studio_json_min_export(tmp_path):
    image(tmp_path / "photos" / "a.png")
    path = tmp_path / "min.json"
    path.write_text(json.dumps([
        {"image": "/data/local-files/?d=photos/a.png", "id": 7,
         "label": [rectangle(50, 50, 25, 25, "cat")]},
    ]))
    assert detect_format(path) == "label_studio"
    (sample,) = load_dataset(path).samples
    assert sample.boxes == [pytest.approx((40.0, 30.0, 60.0, 45.0))] and sample.labels == ["cat"]


def test_label_studio_image_outside_the_root_is_refused(tmp_path):
    image(tmp_path / "secret.png")
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "tasks.json"
    path.write_text(json.dumps([{"image": "/data/local-files/?d=../secret.png",
                                 "label": [rectangle(0, 0, 50, 50, "x")]}]))
    found = load_dataset(path)
    assert len(found) == 0 and found.report.counts["outside_root"] == 1
    assert len(load_dataset(path, allow_outside_root=True)) == 1


CVAT = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta><task><labels>
    <label><name>chip</name></label><label><name>resistor</name></label>
  </labels></task></meta>
  <image id="0" name="board.png" width="80" height="60">
    <box label="chip" occluded="0" xtl="10.5" ytl="5" xbr="30" ybr="25"></box>
    <box label="resistor" occluded="0" xtl="40" ytl="30" xbr="60" ybr="50" rotation="45"></box>
    <polygon label="chip" points="1,1;2,2;3,1"></polygon>
  </image>
  <image id="1" name="empty.png" width="80" height="60"></image>
</annotations>
"""


def test_cvat_for_images_xml(tmp_path):
    image(tmp_path / "images" / "board.png")
    image(tmp_path / "images" / "empty.png")
    (tmp_path / "annotations.xml").write_text(CVAT)
    assert detect_format(tmp_path) == "cvat"  # a folder with XML, but not VOC
    assert detect_format(tmp_path / "annotations.xml") == "cvat"
    found = load_dataset(tmp_path)
    assert found.classes == ["chip", "resistor"]
    board, empty = found.samples
    assert board.boxes == [(10.5, 5.0, 30.0, 25.0)] and board.labels == ["chip"]
    assert empty.boxes == [] and found.report.counts["rotated"] == 1
    assert found.report.counts["not_a_box"] == 1
