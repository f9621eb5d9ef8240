"""Real-board inspection: DeepPCB crops, pretrained patch features, centred selection,
inspect-real."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from loctune.cli import main
from loctune.inspect.baseline import PatchCore, patch_extractor
from loctune.inspect.deeppcb import (
    balanced_crop_windows,
    deeppcb_crops,
    has_colour_marks,
    load_deeppcb,
)
from loctune.inspect.features import PretrainedPatchFeatures
from loctune.inspect.real import InspectRealConfig, fixed_shots
from loctune.inspect.records import inspection_sample, is_defective
from loctune.inspect.selection import ExampleSelector, similarity

DEEPPCB = Path(__file__).resolve().parents[2] / "shared" / "data" / "deeppcb" / "PCBData"


# --- balanced crops -------------------------------------------------------------------------


def _inside(box, window) -> bool:
    return (window[0] <= box[0] and window[1] <= box[1]
            and box[2] <= window[2] and box[3] <= window[3])


def test_crop_windows_are_balanced_and_hold_their_defects_in_crop_pixels():
    boxes = [(100.0, 100.0, 130.0, 120.0), (400.0, 300.0, 420.0, 340.0), (0.0, 0.0, 300.0, 10.0)]
    labels = ["open", "short", "spur"]
    windows = balanced_crop_windows((640, 640), boxes, labels, 128, 3, random.Random(0))
    # the 300 px box fits in no 128 px crop: two defective windows, two good ones
    assert [w.defective for w in windows] == [True, True, False, False]
    for w in windows[:2]:
        x1, y1, x2, y2 = w.window
        assert (x2 - x1, y2 - y1) == (128, 128) and w.source == "test"
        target = [b for b in boxes[:2] if _inside(b, w.window)]
        assert len(target) == 1  # the defect it was cut around lies entirely inside
        shifted = (target[0][0] - x1, target[0][1] - y1, target[0][2] - x1, target[0][3] - y1)
        assert shifted in w.boxes
        assert w.labels[w.boxes.index(shifted)] == labels[boxes.index(target[0])]
    # good windows: the same places on the template, no boxes
    assert [w.window for w in windows[2:]] == [w.window for w in windows[:2]]
    assert all(w.source == "template" and not w.boxes for w in windows[2:])


def test_good_windows_from_the_tested_board_touch_no_defect_and_positions_vary():
    boxes = [(300.0, 300.0, 330.0, 330.0)]
    lefts = set()
    for seed in range(20):
        windows = balanced_crop_windows(
            (640, 640), boxes, ["open"], 128, 1, random.Random(seed), good_from="test"
        )
        defective, good = windows
        assert defective.defective and not good.defective and good.source == "test"
        gx1, gy1, gx2, gy2 = good.window
        assert gx2 <= 300 or gx1 >= 330 or gy2 <= 300 or gy1 >= 330
        lefts.add(defective.window[0])
        dx1, dy1 = defective.window[:2]
        assert defective.boxes == [(300.0 - dx1, 300.0 - dy1, 330.0 - dx1, 330.0 - dy1)]
    assert len(lefts) > 5  # the defect is not always at the same place in its crop


def test_crop_windows_stay_balanced_when_no_clean_place_exists():
    # defects everywhere: no defect-free 128 px window of the tested board
    boxes = [(float(x), float(y), x + 4.0, y + 4.0)
             for x in range(0, 640, 60) for y in range(0, 640, 60)]
    windows = balanced_crop_windows(
        (640, 640), boxes, ["pin-hole"] * len(boxes), 128, 2, random.Random(0), good_from="test"
    )
    assert windows == []
    with pytest.raises(ValueError, match="good_from"):
        balanced_crop_windows((640, 640), boxes[:1], ["open"], 128, 1, random.Random(0), "other")
    with pytest.raises(ValueError, match="does not fit"):
        balanced_crop_windows((100, 100), boxes[:1], ["open"], 128, 1, random.Random(0))


def _fake_deeppcb(root: Path, boards: dict[str, int], seed: int = 0) -> Path:
    """A DeepPCB-layout folder of white traces on black, each tested board with two defects."""
    rng = random.Random(seed)
    lines = {"trainval": [], "test": []}
    group = root / "group90000"
    (group / "90000").mkdir(parents=True)
    (group / "90000_not").mkdir()
    number = 0
    for split, count in boards.items():
        for _ in range(count):
            stem = f"9000{number:04d}"
            number += 1
            template = Image.new("L", (640, 640))
            draw = ImageDraw.Draw(template)
            for _ in range(12):
                x, y = rng.randrange(0, 600), rng.randrange(0, 600)
                draw.rectangle((x, y, x + rng.randrange(10, 200), y + 12), fill=255)
            tested = template.copy()
            draw = ImageDraw.Draw(tested)
            annotation = []
            for kind in (1, 6):
                x, y = rng.randrange(20, 580), rng.randrange(20, 580)
                draw.ellipse((x, y, x + 20, y + 20), fill=128)
                annotation.append(f"{x} {y} {x + 20} {y + 20} {kind}")
            template.save(group / "90000" / f"{stem}_temp.jpg")
            tested.save(group / "90000" / f"{stem}_test.jpg")
            (group / "90000_not" / f"{stem}.txt").write_text("\n".join(annotation) + "\n")
            lines[split].append(f"group90000/90000/{stem}.jpg group90000/90000_not/{stem}.txt")
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def fake_pcb(tmp_path_factory) -> Path:
    return _fake_deeppcb(tmp_path_factory.mktemp("pcb"), {"trainval": 6, "test": 4})


def test_deeppcb_crops_cut_balanced_samples_with_their_boxes(fake_pcb):
    tested = [s for s in load_deeppcb(fake_pcb, "test") if is_defective(s)]
    crops = deeppcb_crops(tested, crop=96, per_board=2, seed=3)
    assert len(crops) == 4 * 4 and sum(map(is_defective, crops)) == 8
    for s in crops:
        assert s.image.size == (96, 96) and s.meta["product"] == "pcb"
        assert s.meta["source"] == ("test" if is_defective(s) else "template")
        if is_defective(s):  # the crop shows the defect's grey (128) pixels where its box is
            x1, y1, x2, y2 = (int(v) for v in s.boxes[0])
            patch = np.asarray(s.image.convert("L"))[y1:y2, x1:x2]
            assert ((patch > 90) & (patch < 170)).mean() > 0.3
    again = deeppcb_crops(tested, crop=96, per_board=2, seed=3)
    assert [s.image_id for s in again] == [s.image_id for s in crops]  # seeded
    with pytest.raises(ValueError, match="not a tested board"):
        deeppcb_crops([s for s in load_deeppcb(fake_pcb, "test") if not is_defective(s)])


@pytest.mark.skipif(not DEEPPCB.is_dir(), reason="shared/data/deeppcb not present")
def test_real_deeppcb_crops_pair_defects_with_their_template_window():
    tested = [s for s in load_deeppcb(DEEPPCB, "test") if is_defective(s)][:3]
    crops = deeppcb_crops(tested, crop=128)
    assert len(crops) == 6
    defective, good = crops[0], crops[1]
    assert defective.meta["pair_id"] == good.meta["pair_id"]
    assert defective.meta["window"] == good.meta["window"]
    # aligned pair: the crops differ, and mostly where the defect box is
    a = np.asarray(defective.image.convert("L"), dtype=np.float32)
    b = np.asarray(good.image.convert("L"), dtype=np.float32)
    diff = np.abs(a - b) > 128
    inside = np.zeros_like(diff)
    for x1, y1, x2, y2 in defective.boxes:
        inside[int(y1) : int(y2) + 1, int(x1) : int(x2) + 1] = True
    assert diff[inside].sum() > 0.5 * diff.sum()


def test_fixed_shots_are_nested_in_k_and_seeded():
    pool = [
        inspection_sample(Image.new("RGB", (8, 8)), "pcb", image_id=f"g{i}") for i in range(6)
    ] + [
        inspection_sample(Image.new("RGB", (8, 8)), "pcb", [(1, 1, 3, 3)], ["open"],
                          image_id=f"d{i}")
        for i in range(6)
    ]
    two, four = fixed_shots(pool, 2, 0, 1), fixed_shots(pool, 4, 0, 1)
    assert four[:4] == two and [is_defective(s) for s in two] == [False, True, False, True]
    assert [s.image_id for s in fixed_shots(pool, 4, 0, 2)] != [s.image_id for s in four]
    with pytest.raises(ValueError, match="k=7"):
        fixed_shots(pool, 7, 0, 1)


# --- pretrained patch features ----------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0() -> PretrainedPatchFeatures:
    return PretrainedPatchFeatures()


def test_lite0_patch_features_follow_patchcores_recipe(lite0):
    images = torch.rand(2, 3, 64, 96)
    out = lite0(images)
    assert out.shape == (2, 40 + 112, 8, 12) and lite0.stride == 8 and lite0.channels == 152
    lite0.train()
    assert not lite0.training and not lite0.backbone.training  # BatchNorm stays pretrained
    # by hand: normalise, two stages, 3x3 mean, coarse upsampled to fine, concatenated
    with torch.no_grad():
        fine, coarse = lite0.backbone((images - 0.5) / 0.5)
        fine = torch.nn.functional.avg_pool2d(fine, 3, 1, 1, count_include_pad=False)
        coarse = torch.nn.functional.avg_pool2d(coarse, 3, 1, 1, count_include_pad=False)
        coarse = torch.nn.functional.interpolate(coarse, size=(8, 12), mode="bilinear")
    assert torch.allclose(out, torch.cat([fine, coarse], 1), atol=1e-5)
    # pretrained weights: not the randomly initialised network
    random_init = PretrainedPatchFeatures(pretrained="none")
    assert not torch.allclose(random_init(images), out)


def test_patchcore_takes_named_features_and_caches_them(lite0):
    with pytest.raises(ValueError, match="features"):
        patch_extractor("dino")
    assert isinstance(PatchCore("lite0").extractor, PretrainedPatchFeatures)
    calls = []

    def counting(images):
        calls.append(len(images))
        return lite0(images)

    rng = np.random.default_rng(0)
    good = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    cache: dict = {}
    first = PatchCore(counting, input_size=64, cache=cache).fit(good)
    second = PatchCore(counting, input_size=64, cache=cache).fit(good)
    assert len(calls) == 3  # each image featurised once for both detectors
    assert torch.equal(first.bank, second.bank) and first.threshold == second.threshold
    defect = good[0].copy()
    ImageDraw.Draw(defect).rectangle((20, 20, 40, 40), fill=(255, 0, 0))
    assert first.predict(defect).score > first.predict(good[0]).score


# --- centred cosine ---------------------------------------------------------------------------


def test_centred_cosine_subtracts_the_pool_mean_first():
    keys = torch.tensor([[10.0, 10.0], [10.0, 11.0], [11.0, 10.0]])
    query = torch.tensor([[10.5, 11.5]])
    centre = keys.mean(0)
    expected = torch.nn.functional.cosine_similarity(query - centre, keys - centre)
    assert torch.allclose(similarity(query, keys, "centred")[0], expected)
    # raw cosines are all close to 1 (one cone); centred ones separate the keys
    assert similarity(query, keys, "cosine").min() > 0.99
    assert similarity(query, keys, "centred")[0].argmax() == 1


def test_nearest_selection_with_centred_cosine_can_differ_from_cosine():
    image = {i: Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(6)}
    vectors = {
        0: [10.0, 10.0], 1: [10.0, 11.0], 2: [11.0, 10.0],  # good
        3: [10.0, 10.0], 4: [10.0, 11.0], 5: [11.0, 10.0],  # defective
    }
    pool = [inspection_sample(image[i], "pcb", image_id=f"g{i}") for i in range(3)] + [
        inspection_sample(image[i], "pcb", [(1, 1, 3, 3)], ["open"], image_id=f"d{i}")
        for i in range(3, 6)
    ]
    by_image = {id(image[i]): torch.tensor(v) for i, v in vectors.items()}
    query_image = Image.new("RGB", (8, 8))
    by_image[id(query_image)] = torch.tensor([30.0, 29.0])
    query = inspection_sample(query_image, "pcb", image_id="q")

    def embed(images):
        return torch.stack([by_image[id(im)] for im in images])

    picks = {
        m: ExampleSelector(pool, 1, "nearest", m, embed).select(query)[0].image_id
        for m in ("cosine", "centred")
    }
    # cosine: g0 points nearly along the query (1 degree off); centred: g2, off the mean like it
    assert picks == {"cosine": "g0", "centred": "g2"}


# --- the inspect-real command -----------------------------------------------------------------

TINY = [
    "seeds=[0,1]",
    "eval_k=[1,2]",
    "query_boards=4",
    "support_boards=6",
    "crop=96",
    "input_size=64",
    "bank_size=300",
]


def test_inspect_real_writes_report_tables_plot_and_config(fake_pcb, tmp_path, capsys):
    out = tmp_path / "real"
    args = ["inspect-real", "--out", str(out), f"root={fake_pcb}", *TINY]
    assert main(args) == 0
    text = (out / "report.md").read_text()
    for name in ("PatchCore, random conv", "PatchCore, pretrained Lite0 + tiling",
                 "nearest, centred", "random shots per query"):
        assert f"| {name} |" in text
    assert "| 2 | PatchCore, pretrained Lite0 | " in text
    for png in ("auroc_vs_k.png", "selection_auroc_vs_k.png", "score_maps.png"):
        assert (out / png).stat().st_size > 1000
    saved = json.loads((out / "inspect_real_config.json").read_text())
    assert saved["root"] == str(fake_pcb) and saved["eval_k"] == [1, 2]
    metrics = json.loads((out / "s1" / "patchcore_lite0_tiled" / "k2" / "metrics.json").read_text())
    assert metrics["n_queries"] == 8 and 0 <= metrics["auroc"] <= 1
    predictions = json.loads(
        (out / "s0" / "patchcore_lite0" / "k2" / "predictions.json").read_text()
    )
    assert all(len(p["examples"]) == 2 for p in predictions)  # the good shots only
    # a rerun reads every cell back; changed data settings are refused
    stamp = (out / "s0" / "patchcore_random" / "k1" / "metrics.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "s0" / "patchcore_random" / "k1" / "metrics.json").stat().st_mtime_ns == stamp
    assert main([*args, "crop=64"]) == 2  # one line, naming the field
    assert "other settings (crop)" in capsys.readouterr().err


def test_inspect_real_config_is_checked():
    with pytest.raises(ValueError, match="data"):
        InspectRealConfig(data="mvtec")
    with pytest.raises(ValueError, match="k >= 1"):
        InspectRealConfig(eval_k=[0, 1])
    with pytest.raises(ValueError, match=r"selection_metrics: unknown \['euclid'\]; choose"):
        InspectRealConfig(selection_metrics=["euclid"])
    with pytest.raises(ValueError, match=r"selection_features: unknown \['sift'\]"):
        InspectRealConfig(selection_features="sift")


# --- NEU-DET few-shot typing ------------------------------------------------------------------

NEU = Path(__file__).resolve().parents[2] / "shared" / "data" / "neu-det"


def test_typing_split_is_disjoint_balanced_and_seeded():
    from loctune.inspect.neu import typing_split

    types = ["a"] * 10 + ["b"] * 10 + ["c"] * 6
    support, queries = typing_split(types, 2, 4, seed=0)
    assert not set(support) & set(queries)
    assert sorted(types[i] for i in support) == ["a", "a", "b", "b", "c", "c"]
    assert sorted(types[i] for i in queries) == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert typing_split(types, 2, 4, seed=0) == (support, queries)
    assert typing_split(types, 2, 4, seed=1) != (support, queries)
    with pytest.raises(ValueError, match="'c': 6 images"):
        typing_split(types, 2, 5, seed=0)


def test_nearest_example_typing_names_the_type_of_the_most_similar_example():
    from loctune.inspect.neu import nearest_example_typing

    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.2], [0.1, 0.8], [0.2, 0.9]])
    types = ["x", "y", "x", "y", "x"]  # the last is an x that looks like a y
    m = nearest_example_typing(embeddings, types, support=[0, 1], queries=[2, 3, 4])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2) and m["n_queries"] == 3


def test_patch_mask_marks_the_patches_whose_centre_lies_in_a_box():
    from loctune.inspect.neu import patch_mask

    mask = patch_mask([(0, 0, 50, 25)], (100, 100), (4, 4))  # 25 px patches, centres 12.5...
    assert mask.tolist() == [[True, True, False, False]] + [[False] * 4] * 3


def test_prototype_localisation_boxes_the_patches_that_look_like_the_examples_defects():
    """Features: channel 0 on defect patches, channel 1 on the surface; the query's defect
    sits elsewhere than the examples'. Its box is found; the mean example box misses it."""
    from loctune.inspect.neu import prototype_localisation

    def image(box):  # 8x8 grid of patches on an 80 px image, 10 px per patch
        f = torch.zeros(2, 8, 8)
        f[1] = 1.0
        x1, y1, x2, y2 = (int(v) // 10 for v in box)
        f[:, y1:y2, x1:x2] = torch.tensor([1.0, 0.1])[:, None, None]
        return f

    boxes = [[(0, 0, 30, 30)], [(10, 0, 40, 30)], [(50, 50, 80, 80)]]
    maps = torch.stack([image(b[0]) for b in boxes])
    m = prototype_localisation(maps, boxes, ["x", "x", "x"], [(80, 80)] * 3, support=[0, 1],
                               queries=[2])
    assert m["loc_acc50"] == 1.0 and m["loc_pointing"] == 1.0 and m["n_queries"] == 1
    assert m["mean_box_acc50"] == 0.0 and m["mean_box_pointing"] == 0.0


def test_score_map_box_scales_the_largest_positive_region_to_pixels():
    from loctune.inspect.neu import score_map_box

    score = -torch.ones(4, 4)
    score[1:3, 2:4] = 1.0  # 4 patches
    score[0, 0] = 1.0  # a smaller region
    assert score_map_box(score, (200, 100)) == (100.0, 25.0, 200.0, 75.0)
    assert score_map_box(-torch.ones(4, 4), (200, 100)) is None


@pytest.mark.skipif(not (NEU / "ANNOTATIONS").is_dir(), reason="shared/data/neu-det not present")
def test_inspect_real_neu_typing_writes_its_report(tmp_path):
    out = tmp_path / "neu"
    args = ["inspect-real", "data=neu-det", "--out", str(out), "seeds=[0]", "eval_k=[1,2]",
            "features=[random]", "neu_queries_per_type=2", "input_size=32"]
    assert main(args) == 0
    text = (out / "report.md").read_text()
    assert "| 2 | random conv, centred |" in text
    assert (out / "typing_accuracy_vs_k.png").stat().st_size > 1000
    metrics = json.loads((out / "s0" / "type_random_dot" / "k1" / "metrics.json").read_text())
    assert metrics["n_queries"] == 12 and 0 <= metrics["accuracy"] <= 1
    boxes = json.loads((out / "s0" / "box_random" / "k2" / "metrics.json").read_text())
    assert boxes["n_queries"] == 12 and 0 <= boxes["loc_acc50"] <= 1
    assert "### Boxes, given the type" in text
    assert re.search(r"^\| 2 \| mean box of the type's examples \| \d\.\d{3} ", text, re.M)


def test_ignore_border_leaves_the_crop_edge_out_of_score_peak_and_calibration():
    rng = np.random.default_rng(1)
    good = [Image.fromarray(rng.integers(100, 140, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    edge = good[0].copy()
    ImageDraw.Draw(edge).rectangle((0, 0, 5, 5), fill=(255, 255, 255))  # only at the border
    centre = good[0].copy()
    ImageDraw.Draw(centre).rectangle((30, 30, 36, 36), fill=(255, 255, 255))
    plain = PatchCore(input_size=64).fit(good)
    inner = PatchCore(input_size=64, ignore_border=12).fit(good)
    assert plain.predict(edge).defective  # the border defect counts without ignore_border
    assert not inner.predict(edge).defective and inner.predict(centre).defective
    peak = inner.predict(edge).peak
    assert 12 <= peak[0] <= 52 and 12 <= peak[1] <= 52
    assert inner.threshold <= plain.threshold  # calibrated on the interior too
    with pytest.raises(ValueError, match="leaves nothing"):
        PatchCore(input_size=64, ignore_border=32).fit(good)


def test_boards_with_annotations_drawn_in_are_recognised(fake_pcb, tmp_path):
    tested = [s for s in load_deeppcb(fake_pcb, "test") if is_defective(s)]
    assert not any(has_colour_marks(s.image) for s in tested)  # binarised grey boards
    marked = Image.open(tested[0].image).convert("RGB")
    ImageDraw.Draw(marked).rectangle((10, 10, 60, 40), outline=(0, 255, 0), width=3)
    marked.save(tmp_path / "marked.png")
    assert has_colour_marks(tmp_path / "marked.png")
