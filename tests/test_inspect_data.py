from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loctune.data.validate import DataError
from loctune.inspect.baseline import (
    PatchCore,
    RandomConvFeatures,
    greedy_coreset,
)
from loctune.inspect.deeppcb import load_deeppcb, read_deeppcb_boxes
from loctune.inspect.evaluation import evaluate_patchcore_in_context
from loctune.inspect.folder import load_inspection_folder
from loctune.inspect.metrics import accuracy, auroc, f1, point_in_boxes
from loctune.inspect.records import by_product, inspection_sample
from loctune.inspect.regions import label_components, largest_region, mask_to_boxes
from loctune.inspect.synthetic import (
    DEFECT_TYPES,
    TEST_PRODUCTS,
    TRAIN_PRODUCTS,
    render_synthetic,
    synthetic_inspection_set,
)

DEEPPCB = Path(__file__).resolve().parents[2] / "shared" / "data" / "deeppcb" / "PCBData"

# --- connected components -------------------------------------------------------------


def test_components_follow_connectivity():
    mask = np.zeros((6, 8), bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours
    mask[0:2, 5:8] = True
    mask[4:6, 0:3] = True
    mask[5, 3:7] = True  # an L joined to the block on row 5
    labels, n = label_components(mask, connectivity=8)
    assert n == 3
    # numbered in raster order of first pixel: the block starting on row 0 comes first
    assert labels[0, 5] == 1 and labels[1, 1] == labels[2, 2] == 2 and labels[5, 6] == labels[4, 0]
    assert label_components(mask, connectivity=4)[1] == 4


def test_u_shape_merges_into_one_component():
    mask = np.zeros((5, 5), bool)
    mask[0:4, 0] = mask[0:4, 4] = mask[4, :] = True  # two arms joined only at the bottom
    assert label_components(mask)[1] == 1


def test_boxes_cover_pixels_and_largest_region():
    mask = np.zeros((10, 10), bool)
    mask[2, 3] = True
    mask[5:8, 1:6] = True
    assert mask_to_boxes(mask) == [(3.0, 2.0, 4.0, 3.0), (1.0, 5.0, 6.0, 8.0)]
    assert mask_to_boxes(mask, min_area=2) == [(1.0, 5.0, 6.0, 8.0)]
    assert largest_region(mask).sum() == 15
    assert not largest_region(np.zeros((3, 3), bool)).any()


# --- records ----------------------------------------------------------------------------


def test_inspection_sample_fields_and_grouping():
    good = inspection_sample(Image.new("RGB", (4, 4)), "wood", image_id="g")
    bad = inspection_sample(Image.new("RGB", (4, 4)), "wood", [(0, 0, 1, 1)], ["crack"])
    assert good.task == "inspection" and good.meta["defective"] is False and good.labels == []
    assert bad.meta == {"product": "wood", "defective": True, "defect_type": "crack"}
    assert "wood" in good.prompt
    groups = by_product([good, bad])
    assert groups["wood"].good == [good] and groups["wood"].defective == [bad]
    with pytest.raises(ValueError, match="good image"):
        inspection_sample("x.png", "wood", [(0, 0, 1, 1)], ["crack"], defect_type="good")


# --- synthetic set ----------------------------------------------------------------------


def test_synthetic_set_is_deterministic_and_splits_products():
    a = synthetic_inspection_set("test", n_good=1, n_defective=2, seed=3, size=96)
    b = synthetic_inspection_set("test", n_good=1, n_defective=2, seed=3, size=96)
    assert [np.asarray(s.image).tobytes() for s in a] == [np.asarray(s.image).tobytes() for s in b]
    assert {s.meta["product"] for s in a} == set(TEST_PRODUCTS)
    assert not set(TRAIN_PRODUCTS) & set(TEST_PRODUCTS) and len(TRAIN_PRODUCTS + TEST_PRODUCTS) >= 6
    defective = [s for s in a if s.meta["defective"]]
    assert len(defective) == 2 * len(TEST_PRODUCTS)
    for s in defective:
        (x1, y1, x2, y2), mask = s.boxes[0], s.meta["mask"]
        assert mask[int(y1) : int(y2), int(x1) : int(x2)].sum() == mask.sum() > 0
        assert s.labels == [s.meta["defect_type"]]
    c = synthetic_inspection_set("test", n_good=1, n_defective=2, seed=4, size=96)
    assert np.asarray(c[0].image).tobytes() != np.asarray(a[0].image).tobytes()


def test_defects_are_small_and_lose_most_contrast_when_downscaled():
    ratios, sizes, fulls = [], [], []
    for product in TRAIN_PRODUCTS + TEST_PRODUCTS:
        for i, defect in enumerate(DEFECT_TYPES):
            good, _ = render_synthetic(product, i, None)
            bad, mask = render_synthetic(product, i, defect)
            full = np.abs(np.asarray(bad, float) - np.asarray(good, float)).mean(2).max()

            def small(im):
                return np.asarray(im.resize((64, 64), Image.BOX), float)

            ratios.append(np.abs(small(bad) - small(good)).mean(2).max() / full)
            sizes.append(mask.sum())
            fulls.append(full)
    # Most are plainly visible at full resolution; the polarity is random, so a near-white
    # defect on a bright surface (or near-black on a dark one) can be faint (down to ~16/255).
    assert np.median(fulls) > 60 and min(fulls) > 10
    assert max(sizes) < 0.002 * 256 * 256  # under 0.2% of the image
    assert np.median(ratios) < 0.5


def test_both_defect_polarities_occur_within_train_and_within_test_products():
    """Brightness alone must not separate defects: no polarity confound between the splits."""
    from loctune.inspect.report import brighter_defects

    for products in (TRAIN_PRODUCTS, TEST_PRODUCTS):
        defective = synthetic_inspection_set(products=products, n_good=0, n_defective=12, size=96)
        share = brighter_defects(defective)
        assert 0.25 < share < 0.75, (products, share)
        for product in products:  # every product type gets both polarities
            own = [s for s in defective if s.meta["product"] == product]
            assert 0 < brighter_defects(own) < 1, product
    # the polarity is drawn from the seeded rng: same seed, same defect
    a = render_synthetic("tile", 5, "spot", seed=2)[0]
    b = render_synthetic("tile", 5, "spot", seed=2)[0]
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_render_rejects_unknown_names():
    with pytest.raises(ValueError, match="product"):
        render_synthetic("glass", 0)
    with pytest.raises(ValueError, match="defect_type"):
        render_synthetic("wood", 0, "dent")


# --- folder reader ----------------------------------------------------------------------


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _mvtec(root: Path) -> None:
    img = np.zeros((32, 32, 3), np.uint8)
    _write(root / "bottle/train/good/000.png", img)
    _write(root / "bottle/test/good/000.png", img)
    _write(root / "bottle/test/crack/000.png", img)
    _write(root / "bottle/test/crack/001.png", img)  # no mask: defective without boxes
    mask = np.zeros((32, 32), np.uint8)
    mask[2:5, 3:9] = 255
    mask[20:22, 20:30] = 255
    _write(root / "bottle/ground_truth/crack/000_mask.png", mask)


def test_folder_reader_reads_mvtec_layout(tmp_path):
    _mvtec(tmp_path)
    test = load_inspection_folder(tmp_path, "bottle", split="test")
    by_id = {s.image_id: s for s in test}
    assert set(by_id) == {"bottle/test/good/000", "bottle/test/crack/000", "bottle/test/crack/001"}
    cracked = by_id["bottle/test/crack/000"]
    assert cracked.boxes == [(3.0, 2.0, 9.0, 5.0), (20.0, 20.0, 30.0, 22.0)]
    assert cracked.labels == ["crack", "crack"] and cracked.meta["defective"] is True
    unmasked = by_id["bottle/test/crack/001"]
    assert unmasked.boxes == [] and unmasked.meta["defect_type"] == "crack"
    assert not by_id["bottle/test/good/000"].meta["defective"]
    assert len(load_inspection_folder(tmp_path / "bottle", split="all")) == 4
    assert len(load_inspection_folder(tmp_path, split="train")) == 1


def test_folder_reader_names_the_wrong_folder(tmp_path):
    _mvtec(tmp_path)
    (tmp_path / "cable" / "test").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"cable.test: no image folders"):
        load_inspection_folder(tmp_path, "cable")
    with pytest.raises(FileNotFoundError, match=r"cable.train: missing 'train' folder"):
        load_inspection_folder(tmp_path, "cable", split="train")
    with pytest.raises(FileNotFoundError, match="no category folders"):
        load_inspection_folder(tmp_path / "bottle" / "test")
    _write(tmp_path / "bottle/ground_truth/crack/001_mask.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="001_mask.png: mask size"):
        load_inspection_folder(tmp_path, "bottle")


# --- DeepPCB ----------------------------------------------------------------------------


def test_deeppcb_annotation_errors_name_file_and_line(tmp_path):
    path = tmp_path / "1.txt"
    path.write_text("1 2 30 40 3\n5 5 4 9 1\n")
    with pytest.raises(DataError, match=r"1.txt:2: box"):
        read_deeppcb_boxes(path)
    path.write_text("1 2 30 40 9\n")
    with pytest.raises(DataError, match=r"1.txt:1: type"):
        read_deeppcb_boxes(path)
    path.write_text("1 2 30 40 3\n\n")
    assert read_deeppcb_boxes(path) == ([(1.0, 2.0, 30.0, 40.0)], ["mousebite"])


@pytest.mark.skipif(not DEEPPCB.is_dir(), reason="shared/data/deeppcb not present")
def test_deeppcb_pairs_templates_and_tested_boards():
    test = load_deeppcb(DEEPPCB, split="test")
    trainval = load_deeppcb(DEEPPCB, split="trainval")
    assert len(test) % 2 == 0 and len(trainval) > len(test) > 0
    assert not {s.meta["pair_id"] for s in test} & {s.meta["pair_id"] for s in trainval}
    template, tested = test[0], test[1]
    assert template.meta["pair_id"] == tested.meta["pair_id"]
    assert not template.meta["defective"] and template.boxes == []
    assert tested.meta["defective"] and tested.boxes and tested.meta["template"] == template.image
    assert tested.image_size == (640, 640)
    assert set(tested.labels) <= {"open", "short", "mousebite", "spur", "copper", "pin-hole"}
    # the defect is where the boards differ
    diff = np.abs(
        np.asarray(tested.load_image(), float) - np.asarray(template.load_image(), float)
    ).mean(2)
    x1, y1, x2, y2 = (int(v) for v in tested.boxes[0])
    assert diff[y1:y2, x1:x2].mean() > 5 * diff.mean()


# --- baseline and metrics ---------------------------------------------------------------


def test_auroc_rank_formula_with_ties():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.5)
    assert auroc([3, 2, 1], [1, 1, 0]) == 1.0
    assert np.isnan(auroc([0.1, 0.2], [1, 1]))
    with pytest.raises(ValueError, match="defective"):
        auroc([0.1], [2])


def test_accuracy_f1_and_pointing():
    assert accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
    assert f1([1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx(0.8)
    assert f1([0, 0], [0, 0]) == 0.0
    assert point_in_boxes((5, 5), [(0, 0, 4, 4), (4, 4, 6, 6)])
    assert not point_in_boxes((5, 5), [(0, 0, 4, 4)])


def test_patchcore_separates_good_from_defective_on_unseen_products():
    queries = synthetic_inspection_set(
        products=("tile", "brushed_metal"), n_good=8, n_defective=8, size=128
    )
    result = evaluate_patchcore_in_context(
        queries, k=4, make_detector=lambda: PatchCore(RandomConvFeatures(stride=4), input_size=128)
    )
    assert result.metrics["n_queries"] == 2 * 16  # every query, fit on 4 of the others
    assert result.metrics["auroc"] > 0.65  # about 0.70 here (some defects faint); chance is 0.5
    assert result.metrics["loc_pointing"] > 0.15  # about 0.19; defects cover < 0.2% of an image


@pytest.mark.parametrize("tiles", [None, (2, 2)])
def test_patchcore_box_finds_a_large_defect(tiles):
    good = [render_synthetic("tile", i, None, size=64)[0] for i in range(3)]
    query, _ = render_synthetic("tile", 9, None, size=64)
    pixels = np.asarray(query).copy()
    pixels[20:30, 34:44] = (20, 200, 20)
    extractor = RandomConvFeatures(stride=2)
    detector = PatchCore(extractor, input_size=64, tiles=tiles, overlap=0.25).fit(good)
    prediction = detector.predict(Image.fromarray(pixels))
    assert prediction.defective and prediction.score_map.shape == (64, 64)
    assert point_in_boxes(prediction.peak, [(34, 20, 44, 30)])
    x1, y1, x2, y2 = prediction.box
    assert x1 <= 36 and y1 <= 22 and x2 >= 42 and y2 >= 28
    with pytest.raises(ValueError, match="two good images"):
        PatchCore().fit(good[:1])


def test_coreset_covers_every_cluster():
    clusters = torch.cat([torch.randn(50, 4) * 0.01 + c for c in (0.0, 5.0, -5.0)])
    chosen = greedy_coreset(clusters, 3)
    assert sorted((chosen // 50).tolist()) == [0, 1, 2]
