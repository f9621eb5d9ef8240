"""The real target sets of shared/data, each with its original split."""

import pytest

from loctune.data import load_dataset
from loctune.data.loaders import NAMED_SETS, named_set, shared_data_dir

# (name, train images, test images, classes): the figures of shared/data/README.md
EXPECTED = [
    ("raccoon", 160, 40, 1),
    ("bccd", 292, 72, 3),
    ("microcontroller", 142, 7, 4),
    ("neu-det", 1770, 30, 6),
    ("synthetic-novel", 500, 200, 3),
]


@pytest.mark.parametrize("name, n_train, n_test, n_classes", EXPECTED)
def test_named_set_has_its_original_split(name, n_train, n_test, n_classes):
    if name != "synthetic-novel" and not (shared_data_dir() / name).is_dir():
        pytest.skip(f"shared/data/{name} not present")
    both = named_set(name)
    splits = [s.meta["split"] for s in both]
    assert splits.count("train") == n_train and splits.count("test") == n_test
    assert len(both.classes) == n_classes
    train, test = named_set(name, "train"), named_set(name, "test")
    assert not {str(s.image) for s in train} & {str(s.image) for s in test}
    assert all(s.boxes for s in test)  # every test image of these sets has objects


def test_named_set_errors():
    with pytest.raises(ValueError, match="named sets are"):
        named_set("coco")
    with pytest.raises(ValueError, match="split must be one of"):
        named_set("bccd", "val")
    with pytest.raises(FileNotFoundError, match="pass root="):
        named_set("neu-det", root="/nonexistent")
    assert set(NAMED_SETS) == {name for name, *_ in EXPECTED}


def test_voc_filename_without_suffix_finds_the_image(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 10)).save(tmp_path / "a.jpg")
    (tmp_path / "a.xml").write_text(
        "<annotation><filename>a</filename><size><width>20</width><height>10</height></size>"
        "<object><name>dent</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"
        "</bndbox></object></annotation>"
    )
    (sample,) = load_dataset(tmp_path, "voc")
    assert str(sample.image).endswith("a.jpg") and sample.labels == ["dent"]


def test_the_held_out_synthetic_domain_shares_no_shape_or_background_with_pretraining():
    from loctune.data.synthetic import NOVEL_DOMAIN, SHAPES
    from loctune.pretrain import SourceConfig

    novel = named_set("synthetic-novel", "test")
    assert {label for s in novel for label in s.labels} <= set(NOVEL_DOMAIN.shapes)
    assert not set(NOVEL_DOMAIN.shapes) & set(SHAPES)
    assert not set(NOVEL_DOMAIN.backgrounds) & set(SourceConfig().backgrounds)
    again = named_set("synthetic-novel", "test")
    assert [s.boxes for s in again] == [s.boxes for s in novel]  # generated from a fixed seed
