"""Bad input never trains wrong labels, never crashes without naming the file, never escapes
the dataset (issue 13): each malformed dataset ends as a DataError naming file, record and
field, or as a drop counted in the report and logged as a warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from loctune.data import (
    DataError,
    load_dataset,
    read_coco,
    read_csv_boxes,
    read_refcoco,
    read_referring_jsonl,
    read_voc,
    read_yolo,
)

W, H = 64, 48


def make_image(path: Path, size: tuple[int, int] = (W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path


def coco(tmp_path: Path, images=None, annotations=None, **extra) -> Path:
    """A COCO file beside ``a.png`` (one dog box) unless told otherwise."""
    make_image(tmp_path / "a.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H}]
        if images is None else images,
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [4, 6, 10, 20]}]
        if annotations is None else annotations,
        "categories": [{"id": 1, "name": "dog"}],
        **extra,
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def voc_xml(filename: str, width="64", height="48", box=(4, 6, 14, 26)) -> str:
    x1, y1, x2, y2 = box
    return (
        f"<annotation><filename>{filename}</filename>"
        f"<size><width>{width}</width><height>{height}</height></size>"
        f"<object><name>dog</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object></annotation>"
    )


def yolo(tmp_path: Path, train="images/train", labels=None) -> Path:
    """A YOLO set with ``images/train/a.png`` and its label file."""
    make_image(tmp_path / "images" / "train" / "a.png")
    (tmp_path / "labels" / "train").mkdir(parents=True, exist_ok=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text(labels or "0 0.5 0.5 0.25 0.25\n")
    path = tmp_path / "data.yaml"
    path.write_text(f"names: [dog]\ntrain: {train}\n")
    return path


CSV_HEADER = "filename,width,height,class,xmin,ymin,xmax,ymax\n"


# --------------------------------------------------------- 5. raw exceptions -> named errors


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = coco(tmp_path)
    path.write_bytes(path.read_bytes().replace(b'"dog"', b'"d\xe9g"').replace(b", ", b",\n", 1))
    with pytest.raises(DataError, match=r"instances\.json:2: not UTF-8 text: byte 0xe9"):
        read_coco(path)
    yaml_path = yolo(tmp_path / "y")
    yaml_path.write_bytes(b"names: [d\xe9g]\ntrain: images/train\n")
    with pytest.raises(DataError, match=r"data\.yaml:1: not UTF-8"):
        read_yolo(yaml_path)
    yaml_path = yolo(tmp_path / "z")
    (tmp_path / "z" / "labels" / "train" / "a.txt").write_bytes(b"0 0.5 0.5 0.2 0.2\n\xff\n")
    with pytest.raises(DataError, match=r"a\.txt:2: not UTF-8"):
        read_yolo(yaml_path)
    table = tmp_path / "boxes.csv"
    table.write_bytes(CSV_HEADER.encode() + b"a.png,64,48,d\xf6g,1,1,5,5\n")
    with pytest.raises(DataError, match=r"boxes\.csv:2: not UTF-8"):
        read_csv_boxes(table)
    jsonl = tmp_path / "refs.jsonl"
    jsonl.write_bytes(b'{"image": "img/a.png", "expression": "d\xe9g", "box": [1, 1, 5, 5]}\n')
    with pytest.raises(DataError, match=r"refs\.jsonl:1: not UTF-8"):
        read_referring_jsonl(jsonl)


def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    make_image(tmp_path / "a.png")
    table = tmp_path / "boxes.csv"
    table.write_bytes(b"\xef\xbb\xbf" + (CSV_HEADER + "a.png,64,48,dog,1,1,5,5\n").encode())
    (sample,) = load_dataset(table)  # detected as csv despite the mark
    assert sample.boxes == [(1.0, 1.0, 5.0, 5.0)]


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_coco_null_lists_raise_naming_the_key(tmp_path, key):
    path = coco(tmp_path)
    data = json.loads(path.read_text())
    data[key] = None
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"instances\.json: {key}: expected a list of objects"):
        read_coco(path)


def test_voc_non_finite_size_drops_the_sample_naming_the_field(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.xml").write_text(voc_xml("a.png", width="1e999"))
    data = read_voc(tmp_path)
    assert len(data) == 0 and data.report.counts["malformed"] == 1
    (issue,) = data.report.examples["malformed"]
    assert issue.where == f"{tmp_path / 'a.xml'}: size/width" and "'1e999'" in issue.message


def test_refcoco_non_list_sentences_is_a_malformed_record(tmp_path):
    instances = coco(tmp_path)
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps([{"ann_id": 10, "split": "train", "sentences": "the dog"}]))
    data = read_refcoco(refs, instances)
    assert len(data) == 0 and data.report.counts["malformed"] == 1
    assert data.report.examples["malformed"][0].where == f"{refs}: refs[0].sentences"


# ------------------------------------------------------------------------- 1. duplicates


def test_coco_repeated_image_id_raises_naming_both_positions(tmp_path):
    make_image(tmp_path / "b.png")
    images = [{"id": 1, "file_name": "a.png", "width": W, "height": H},
              {"id": 1, "file_name": "b.png", "width": W, "height": H}]
    with pytest.raises(DataError, match=r"instances\.json: images\[1\]: id 1 repeats images\[0\]"):
        read_coco(coco(tmp_path, images=images))


def test_coco_repeated_annotation_id_raises_naming_both_positions(tmp_path):
    annotations = [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [4, 6, 10, 20]},
                   {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    with pytest.raises(DataError, match=r"annotations\[1\]: id 10 repeats annotations\[0\]"):
        read_coco(coco(tmp_path, annotations=annotations))


def test_coco_unhashable_id_is_a_malformed_record(tmp_path):
    images = [{"id": [1], "file_name": "a.png"}]
    data = read_coco(coco(tmp_path, images=images, annotations=[]))
    assert len(data) == 0 and data.report.counts["malformed"] == 1


def test_yolo_image_listed_twice_is_dropped_as_duplicate(tmp_path):
    yaml_path = yolo(tmp_path, train="train.txt")
    (tmp_path / "train.txt").write_text("images/train/a.png\n./images/train/a.png\n")
    data = read_yolo(yaml_path)
    assert len(data) == 1 and data.report.counts["duplicate_image"] == 1
    (issue,) = data.report.examples["duplicate_image"]
    assert issue.where == f"{tmp_path / 'train.txt'}:2"
    assert f"already read at {tmp_path / 'train.txt'}:1" in issue.message


def test_voc_two_files_for_one_image_keep_the_first(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.xml").write_text(voc_xml("a.png"))
    (tmp_path / "a_copy.xml").write_text(voc_xml("a.png", box=(1, 1, 9, 9)))
    data = read_voc(tmp_path)
    assert [s.boxes for s in data] == [[(4.0, 6.0, 14.0, 26.0)]]
    (issue,) = data.report.examples["duplicate_image"]
    assert issue.where == str(tmp_path / "a_copy.xml") and str(tmp_path / "a.xml") in issue.message


# ------------------------------------------------------------------------- 3. clipping


def test_yolo_six_decimal_rounding_is_snapped_not_clipped(tmp_path):
    # x2 = (0.890860 + 0.218281 / 2) * 640 = 640.00032: rounding, not a box over the edge
    yaml_path = yolo(tmp_path, labels="0 0.890860 0.5 0.218281 0.5\n")
    make_image(tmp_path / "images" / "train" / "a.png", (640, 480))
    data = read_yolo(yaml_path)
    assert data[0].boxes[0][2] == 640.0 and data.report.n_clipped == 0


def test_clipped_boxes_are_logged_as_a_warning_with_counts(tmp_path, caplog):
    yaml_path = yolo(tmp_path, labels="0 0.95 0.5 0.2 0.2\n")  # over the right edge
    with caplog.at_level(logging.INFO, logger="loctune.data.validate"):
        data = read_yolo(yaml_path)
    assert data.report.n_clipped == 1 and data.report.n_dropped == 0
    assert caplog.records[-1].levelno == logging.WARNING
    assert "clipped 1" in caplog.records[-1].getMessage()


# ------------------------------------------------------------- 2. declared size vs the image


def only_issue(report, reason: str):
    (issue,) = report.examples[reason]
    return issue


def test_coco_declared_size_differing_from_the_image_drops_the_sample(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 640, "height": 480}]
    data = read_coco(coco(tmp_path, images=images))
    assert len(data) == 0 and data.report.counts["size_mismatch"] == 1
    issue = only_issue(data.report, "size_mismatch")
    assert issue.where.endswith("images[0]: width/height")
    assert "declared 640x480 but the image" in issue.message and "is 64x48" in issue.message
    trusted = read_coco(coco(tmp_path, images=images), check_images=False)
    assert trusted[0].meta["image_size"] == (640, 480)  # not opened: declared size taken


def test_voc_and_csv_and_jsonl_sizes_are_checked(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.xml").write_text(voc_xml("a.png", width="48", height="64"))
    assert read_voc(tmp_path).report.counts["size_mismatch"] == 1
    table = tmp_path / "boxes.csv"
    table.write_text(CSV_HEADER + "a.png,100,48,dog,1,1,5,5\na.png,100,48,dog,2,2,6,6\n")
    data = read_csv_boxes(table)
    assert len(data) == 0 and data.report.counts["size_mismatch"] == 1  # once per image
    assert only_issue(data.report, "size_mismatch").where == f"{table}:2: width/height"
    jsonl = tmp_path / "refs.jsonl"
    jsonl.write_text(json.dumps({"image": "a.png", "expression": "dog", "box": [1, 1, 5, 5],
                                 "width": 65, "height": 48}) + "\n")
    assert read_referring_jsonl(jsonl).report.counts["size_mismatch"] == 1


def test_size_mismatch_from_exif_rotation_says_so(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown turned a quarter
    Image.new("RGB", (W, H)).save(tmp_path / "a.jpg", exif=exif)
    images = [{"id": 1, "file_name": "a.jpg", "width": H, "height": W}]
    data = read_coco(coco(tmp_path, images=images))
    assert "after its EXIF rotation" in only_issue(data.report, "size_mismatch").message


# ----------------------------------------------------------- 4. corrupt or truncated images


def truncate(path: Path) -> Path:
    """Cut an image file short, as an interrupted download does."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_image_raises_naming_the_file_when_loaded(tmp_path):
    Image.effect_noise((W, H), 60).convert("RGB").save(tmp_path / "a.jpg")  # noise: a long scan
    truncate(tmp_path / "a.jpg")
    images = [{"id": 1, "file_name": "a.jpg", "width": W, "height": H}]
    (sample,) = read_coco(coco(tmp_path, images=images))  # the header is intact
    with pytest.raises(DataError, match=rf"{tmp_path / 'a.jpg'}: cannot read image: .*truncated"):
        sample.load_image()


def test_garbage_image_file_is_dropped_at_read_time(tmp_path):
    path = coco(tmp_path)
    (tmp_path / "a.png").write_bytes(b"not an image")
    data = read_coco(path)
    assert len(data) == 0
    assert "cannot read image header" in str(data.report.examples["malformed"][0])


def test_truncated_inspection_mask_names_the_file(tmp_path):
    from loctune.inspect.folder import load_inspection_folder

    make_image(tmp_path / "bottle/train/good/000.png")
    make_image(tmp_path / "bottle/test/crack/000.png")
    mask = tmp_path / "bottle/ground_truth/crack/000_mask.png"
    mask.parent.mkdir(parents=True)
    Image.effect_noise((W, H), 60).convert("L").save(mask)
    truncate(mask)
    with pytest.raises(DataError, match=rf"{mask}: cannot read image"):
        load_inspection_folder(tmp_path, "bottle")


def test_hf_image_bytes_that_fail_to_decode_name_the_row(tmp_path):
    import io

    import datasets

    from loctune.data import read_hf

    buffer = io.BytesIO()
    Image.effect_noise((W, H), 60).convert("RGB").save(buffer, format="PNG")
    cut = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    rows = datasets.Dataset.from_dict(
        {"image": [{"bytes": cut, "path": None}],
         "objects": [{"bbox": [[1, 1, 5, 5]], "category": ["dog"]}]},
        features=datasets.Features({
            "image": datasets.Image(),
            "objects": {"bbox": datasets.List(datasets.List(datasets.Value("float32"))),
                        "category": datasets.List(datasets.Value("string"))},
        }),
    )
    (sample,) = read_hf(rows, source="toy")
    with pytest.raises(DataError, match=r"toy\[0\]\.image \(image_id ':0'\): cannot read image"):
        sample.load_image()


# -------------------------------------------------------------- 6. paths outside the root


def test_paths_climbing_out_of_the_root_are_dropped_in_every_format(tmp_path):
    outside = make_image(tmp_path / "secret.png")
    root = tmp_path / "set"
    make_image(root / "a.png")
    images = [{"id": 1, "file_name": "../secret.png", "width": W, "height": H},
              {"id": 2, "file_name": str(make_image(tmp_path / "other.png")), "width": W,
               "height": H}]
    annotations = [{"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5]}
                   for i in (1, 2)]
    data = read_coco(coco(root, images=images, annotations=annotations))
    assert len(data) == 0 and data.report.counts["outside_root"] == 2
    issue = data.report.examples["outside_root"][0]
    assert issue.where.endswith("images[0]: file_name") and "../secret.png" in issue.message
    assert len(read_coco(root / "instances.json", allow_outside_root=True)) == 2

    (root / "a.xml").write_text(voc_xml(str(outside)))
    assert read_voc(root).report.counts["outside_root"] == 1
    table = root / "boxes.csv"
    table.write_text(CSV_HEADER + "../secret.png,64,48,dog,1,1,5,5\n")
    assert read_csv_boxes(table).report.counts["outside_root"] == 1
    jsonl = root / "refs.jsonl"
    jsonl.write_text(json.dumps({"image": str(outside), "expression": "x", "box": [1, 1, 5, 5]}))
    assert read_referring_jsonl(jsonl).report.counts["outside_root"] == 1
    assert len(load_dataset(jsonl, allow_outside_root=True)) == 1  # passed through


def test_yolo_list_file_entry_outside_the_root_is_dropped(tmp_path):
    make_image(tmp_path / "secret.png")
    yaml_path = yolo(tmp_path / "set", train="train.txt")
    (tmp_path / "set" / "train.txt").write_text("images/train/a.png\n../secret.png\n")
    data = read_yolo(yaml_path)
    assert len(data) == 1 and data.report.counts["outside_root"] == 1
    assert data.report.examples["outside_root"][0].where == f"{tmp_path / 'set' / 'train.txt'}:2"
    assert len(read_yolo(yaml_path, allow_outside_root=True)) == 2


def test_symlinked_root_and_images_linked_into_it_are_inside(tmp_path):
    real = tmp_path / "real"
    (real / "b.png").parent.mkdir()
    (real / "b.png").symlink_to(make_image(tmp_path / "store" / "blob.png"))  # git-annex style
    images = [{"id": 1, "file_name": str(real / "a.png"), "width": W, "height": H},
              {"id": 2, "file_name": "b.png", "width": W, "height": H}]
    coco(real, images=images, annotations=[])
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    data = read_coco(tmp_path / "link" / "instances.json")  # a.png: absolute, under the target
    assert len(data) == 2 and not data.report.counts


# ------------------------------------------------------------- 7. empty after filtering


def test_require_samples_names_the_empty_file_and_why(tmp_path):
    make_image(tmp_path / "images" / "a.png")
    table = tmp_path / "data" / "train.csv"
    table.parent.mkdir()
    table.write_text(CSV_HEADER + "".join(f"{n}.png,64,48,dog,1,1,5,5\n" for n in "abc"))
    data = read_csv_boxes(table)  # images looked up beside the table, not in images/
    with pytest.raises(DataError) as raised:
        data.require_samples()
    message = str(raised.value)
    assert message.startswith(f"{table}: no samples: 3 dropped: missing_image (e.g. {table}:2")
    assert f"images are looked up in {table.parent}; pass image_root=" in message
    good = read_csv_boxes(table, tmp_path / "images")
    assert good.require_samples() is good


def test_require_samples_names_the_empty_split_of_a_merged_set(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "train.csv").write_text(CSV_HEADER + "a.png,64,48,dog,1,1,5,5\n")
    (tmp_path / "test.csv").write_text(CSV_HEADER + "gone.png,64,48,dog,1,1,5,5\n")
    data = load_dataset({"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"})
    assert len(data) == 1
    with pytest.raises(DataError, match=rf"^{tmp_path / 'test.csv'}: no samples: 1 dropped"):
        data.require_samples()


def test_require_samples_on_a_file_without_records(tmp_path):
    path = coco(tmp_path, images=[], annotations=[])
    with pytest.raises(DataError, match="instances.json: no samples, and nothing was dropped"):
        read_coco(path).require_samples()


def test_cvat_and_label_studio_check_sizes_and_roots(tmp_path):
    from loctune.data.cvat import read_cvat
    from loctune.data.labelstudio import read_label_studio

    make_image(tmp_path / "images" / "a.png")
    make_image(tmp_path / "secret.png")
    (tmp_path / "annotations.xml").write_text(
        '<annotations><image id="0" name="a.png" width="80" height="60"/>'
        '<image id="1" name="../secret.png" width="64" height="48"/></annotations>'
    )
    counts = read_cvat(tmp_path).report.counts
    assert (counts["size_mismatch"], counts["outside_root"]) == (1, 1)
    region = {"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": ["dog"],
              "original_width": 64, "original_height": 64}
    tasks = tmp_path / "images" / "tasks.json"
    tasks.write_text(json.dumps([{"image": "/data/upload/1/a.png", "label": [region]}]))
    data = read_label_studio(tasks)
    assert len(data) == 0 and data.report.counts["size_mismatch"] == 1
    assert "original_width/original_height" in data.report.examples["size_mismatch"][0].where


def test_coco_two_image_records_for_one_file_keep_the_first(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": W, "height": H},
              {"id": 2, "file_name": "./a.png", "width": W, "height": H}]
    annotations = [{"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [i, i, 5, 5]}
                   for i in (1, 2)]
    data = read_coco(coco(tmp_path, images=images, annotations=annotations))
    assert [s.image_id for s in data] == ["1"] and data.report.counts["duplicate_image"] == 1
    assert "images (id=1)" in data.report.examples["duplicate_image"][0].message


def test_on_error_raise_turns_the_new_drops_into_errors(tmp_path):
    make_image(tmp_path / "a.png")
    table = tmp_path / "boxes.csv"
    table.write_text(CSV_HEADER + "/etc/hosts.png,64,48,dog,1,1,5,5\n")
    with pytest.raises(DataError, match=rf"{table}:2: filename: image path /etc/hosts.png is "
                                        rf"outside the dataset root"):
        read_csv_boxes(table, on_error="raise")
    table.write_text(CSV_HEADER + "a.png,60,48,dog,1,1,5,5\n")
    with pytest.raises(DataError, match=r"boxes\.csv:2: width/height: declared 60x48"):
        read_csv_boxes(table, on_error="raise")
