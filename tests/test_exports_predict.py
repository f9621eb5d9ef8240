"""Exports (COCO results, YOLO txt, supervision) and prediction inputs (folders, globs, task)."""

import json

import pytest
from PIL import Image

from loctune.exports import coco_export, coco_image_ids, to_supervision, write_yolo_txt
from loctune.predict import expand_images, infer_task

RECORD = {
    "image_id": "frame_01",
    "image_size": [200, 100],
    "detections": [
        {"label": "Raccoon", "box": [10.0, 20.0, 110.0, 70.0], "score": 0.8},
        {"label": "cat", "box": [0.0, 0.0, 20.0, 10.0], "score": 0.3},
    ],
    "gt": {"boxes": [[10, 20, 110, 70]], "labels": ["raccoon"]},
}


def test_coco_export_maps_labels_to_category_ids_and_xywh():
    gt, results = coco_export([RECORD], ["raccoon"])
    assert gt["categories"] == [{"id": 1, "name": "raccoon"}]
    assert gt["images"] == [{"id": 1, "file_name": "frame_01", "width": 200, "height": 100}]
    assert gt["annotations"][0]["bbox"] == [10.0, 20.0, 100.0, 50.0]
    # the label is matched after normalisation; 'cat' is no class and is left out, as COCO does
    assert results == [{"image_id": 1, "category_id": 1, "bbox": [10.0, 20.0, 100.0, 50.0],
                        "score": 0.8}]
    assert coco_image_ids([{"image_id": "42"}, {"image_id": "7"}]) == [42, 7]
    assert coco_image_ids([{"image_id": "42"}, {"image_id": "42"}]) == [1, 2]


def test_yolo_txt_is_normalised_centre_size_with_score(tmp_path):
    left_out = write_yolo_txt([RECORD], ["raccoon"], tmp_path)
    (line,) = (tmp_path / "frame_01.txt").read_text().splitlines()
    assert [float(v) for v in line.split()] == pytest.approx([0, 0.3, 0.45, 0.5, 0.5, 0.8])
    assert left_out == 1 and (tmp_path / "classes.txt").read_text() == "raccoon\n"


def test_to_supervision_keeps_boxes_scores_and_names():
    dets = to_supervision(RECORD, ["raccoon"])
    assert dets.xyxy.tolist() == [[10, 20, 110, 70], [0, 0, 20, 10]]
    assert dets.class_id.tolist() == [0, -1]
    assert list(dets.data["class_name"]) == ["Raccoon", "cat"]


def test_expand_images_reads_files_folders_and_globs_and_names_what_is_missing(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.png").write_bytes(b"")
    assert [p.name for p in expand_images([tmp_path])] == ["a.jpg", "b.png"]
    assert [p.name for p in expand_images([str(tmp_path / "**" / "*.png")])] == ["b.png", "c.png"]
    assert [p.name for p in expand_images([tmp_path / "b.png", tmp_path])] == ["b.png", "a.jpg"]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        expand_images([tmp_path / "missing.png"])
    with pytest.raises(FileNotFoundError, match="matches no images"):
        expand_images([str(tmp_path / "*.gif")])
    with pytest.raises(FileNotFoundError, match="holds no images"):
        expand_images([_empty(tmp_path)])


def _empty(root):
    (root / "empty").mkdir()
    return root / "empty"


def test_task_is_inferred_from_the_prompt():
    assert infer_task("detect raccoon ; dog") == "detection"
    assert infer_task("  Detect cat") == "detection"
    assert infer_task("the detective on the left") == "grounding"


def test_predict_cli_on_a_folder_infers_detection_and_writes_txt_and_coco(tmp_path, capsys):
    from loctune.cli import main
    from loctune.models.small_vlm_adapter import SmallVLMAdapter

    model_dir = tmp_path / "model"
    SmallVLMAdapter.build("rowcol", texts=["detect circle"], config="tiny", seed=0).save_pretrained(
        model_dir
    )
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 40), (40 * i, 90, 20)).save(images / f"im{i}.png")
    assert main(["predict", str(images), "--model", str(model_dir), "--prompt", "detect circle",
                 "--project", str(tmp_path / "runs"), "--max-new-tokens", "12",
                 "--save-txt", "--save-coco"]) == 0
    out = tmp_path / "runs" / "exp"
    records = json.loads((out / "predictions.json").read_text())
    assert [r["task"] for r in records] == ["detection"] * 3
    assert sorted(p.name for p in out.glob("im*.png")) == ["im0.png", "im1.png", "im2.png"]
    assert sorted(p.name for p in (out / "labels").glob("im*.txt")) == ["im0.txt", "im1.txt",
                                                                        "im2.txt"]
    assert isinstance(json.loads((out / "coco_results.json").read_text()), list)
