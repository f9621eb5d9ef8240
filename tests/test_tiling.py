import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from loctune.inspect.multiscale import MultiScaleEncoder
from loctune.inspect.records import inspection_sample
from loctune.inspect.tiling import (
    crop_samples,
    crop_to_image,
    detections_from_crops,
    image_to_crop,
    layout_description,
    nms,
    split_image,
    tile_grid,
    tile_views,
)
from loctune.types import Detection


def test_grid_covers_image_with_equal_crops_and_requested_overlap():
    grid = tile_grid((640, 480), rows=2, cols=3, overlap=0.25)
    assert len(grid.crops) == 6
    assert {c.size for c in grid.crops} == {grid.crops[0].size}
    xs = sorted({c.box[0] for c in grid.crops})
    w = grid.crops[0].size[0]
    assert xs[0] == 0 and xs[-1] + w == 640
    assert grid.crop(1, 2).box[2:] == (640, 480)
    # neighbours overlap by about a quarter of a crop
    assert xs[0] + w - xs[1] == pytest.approx(0.25 * w, abs=2)


def test_grid_without_overlap_partitions_the_image():
    grid = tile_grid((300, 200), rows=2, cols=3)
    covered = torch.zeros(200, 300, dtype=torch.int32)
    for c in grid.crops:
        x1, y1, x2, y2 = c.box
        covered[y1:y2, x1:x2] += 1
    assert (covered == 1).all()


@pytest.mark.parametrize("bad", [dict(rows=0, cols=2), dict(rows=2, cols=2, overlap=1.0)])
def test_grid_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        tile_grid((100, 100), **bad)


def test_box_in_crop_maps_back_exactly_and_round_trips():
    grid = tile_grid((640, 640), rows=3, cols=3, overlap=0.2)
    crop = grid.crop(1, 2)
    local = (10.0, 20.5, 30.0, 41.0)
    (full,) = crop_to_image([local], crop)
    assert full == (crop.box[0] + 10.0, crop.box[1] + 20.5, crop.box[0] + 30.0, crop.box[1] + 41.0)
    back, labels = image_to_crop([full], ["spur"], crop)
    assert back == [local] and labels == ["spur"]


@settings(max_examples=40, deadline=None)
@given(
    x=st.floats(0, 600),
    y=st.floats(0, 600),
    w=st.floats(1, 30),
    h=st.floats(1, 30),
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
)
def test_box_inside_some_crop_round_trips(x, y, w, h, rows, cols):
    grid = tile_grid((640, 640), rows, cols, overlap=0.3)
    box = (x, y, min(x + w, 640), min(y + h, 640))
    inside = [
        c
        for c in grid.crops
        if c.box[0] <= box[0] and c.box[1] <= box[1] and box[2] <= c.box[2] and box[3] <= c.box[3]
    ]
    for crop in inside:
        local, _ = image_to_crop([box], ["x"], crop)
        assert crop_to_image(local, crop)[0] == pytest.approx(box)


def test_straddling_box_is_clipped_and_slivers_dropped():
    grid = tile_grid((200, 100), rows=1, cols=2)  # crops x 0-100 and 100-200
    left, right = grid.crops
    box = (90.0, 10.0, 130.0, 30.0)  # 10 px in the left crop, 30 px in the right one
    boxes, _ = image_to_crop([box], ["crack"], right)
    assert boxes == [(0.0, 10.0, 30.0, 30.0)]
    assert image_to_crop([box], ["crack"], left, min_visible=0.3)[0] == []
    assert image_to_crop([box], ["crack"], left, min_visible=0.2)[0] == [(90.0, 10.0, 100.0, 30.0)]
    thin = (99.0, 10.0, 120.0, 30.0)  # 1 px wide in the left crop
    assert image_to_crop([thin], ["crack"], left, min_visible=0.0)[0] == []


def test_duplicate_detections_from_overlapping_crops_merge():
    grid = tile_grid((200, 100), rows=1, cols=2, overlap=0.5)
    left, right = grid.crops
    # one object at full-image (110, 40, 130, 60), seen by both crops
    in_left = Detection("spot", (110.0 - left.box[0], 40.0, 130.0 - left.box[0], 60.0), 0.6)
    in_right = Detection("spot", (110.0 - right.box[0], 40.0, 130.0 - right.box[0], 60.0), 0.9)
    other = Detection("scratch", (0.0, 0.0, 5.0, 5.0), 0.5)
    merged = detections_from_crops([[in_left, other], [in_right]], grid)
    assert len(merged) == 2
    spot = next(d for d in merged if d.label == "spot")
    assert spot.score == 0.9 and spot.box == (110.0, 40.0, 130.0, 60.0)


def test_nms_keeps_best_of_overlapping_and_separate_boxes():
    boxes = [(0, 0, 10, 10), (1, 1, 11, 11), (50, 50, 60, 60)]
    assert nms(boxes, [0.5, 0.9, 0.1], iou_threshold=0.5) == [1, 2]
    assert nms([], []) == []


def test_views_and_layout_text():
    image = Image.new("RGB", (640, 320))
    views = tile_views(image, rows=1, cols=2, global_size=224)
    assert len(views.images) == 3
    assert views.images[0].size == (224, 112)
    assert [im.size for im in views.images[1:]] == [(320, 320), (320, 320)]
    assert views.layout.startswith("image 1: the whole image")
    assert "image 3 row 1 col 2 (x 320-640, y 0-320)" in views.layout
    assert layout_description(views.grid, with_global=False).startswith("images 1-2")


def test_split_image_rejects_other_size():
    with pytest.raises(ValueError, match="does not match"):
        split_image(Image.new("RGB", (10, 10)), tile_grid((20, 20), 2, 2))


def test_crop_samples_move_targets_and_relabel_inspection_crops():
    image = Image.new("RGB", (200, 100))
    sample = inspection_sample(
        image, "board", [(120.0, 10.0, 140.0, 30.0)], ["short"], image_id="b1"
    )
    left, right = crop_samples(sample, rows=1, cols=2)
    assert (
        left.boxes == [] and left.meta["defective"] is False and left.meta["defect_type"] == "good"
    )
    assert right.boxes == [(20.0, 10.0, 40.0, 30.0)] and right.meta["defective"] is True
    assert right.meta["crop"] == (0, 1, (100, 0, 200, 100))
    assert right.image.size == (100, 100) and right.image_id == "b1@r1c2"
    assert sample.meta["defective"] is True  # the original is untouched


def test_crop_samples_move_crowd_regions_and_flags_with_the_boxes():
    """A COCO sample's crowd regions and per-box iscrowd flags stay in crop coordinates."""
    from loctune.types import Sample

    sample = Sample(Image.new("RGB", (200, 100)), "detect a ; b",
                    [(10.0, 10.0, 30.0, 30.0), (120.0, 10.0, 140.0, 30.0)], ["a", "b"],
                    task="detection", image_id="c1",
                    meta={"iscrowd": [False, True], "crowd": [["a", [90.0, 0.0, 150.0, 50.0]]]})
    left, right = crop_samples(sample, rows=1, cols=2)
    assert left.labels == ["a"] and left.meta["iscrowd"] == [False]
    assert right.labels == ["b"] and right.meta["iscrowd"] == [True]
    assert left.meta["crowd"] == [["a", [90.0, 0.0, 100.0, 50.0]]]  # its visible part
    assert right.meta["crowd"] == [["a", [0.0, 0.0, 50.0, 50.0]]]


# --- multi-scale features -------------------------------------------------------------


class Patchify(torch.nn.Module):
    """A non-overlapping patch embedding: its output on a crop equals its output on the image."""

    def __init__(self, patch: int = 4, channels: int = 5, tokens: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Conv2d(3, channels, patch, stride=patch)
        self.tokens = tokens

    def forward(self, x):
        out = self.proj(x)
        return out.flatten(2).transpose(1, 2) if self.tokens else out


def test_single_scale_equals_plain_encoder():
    encoder = Patchify()
    images = torch.rand(2, 3, 32, 32)
    wrapped = MultiScaleEncoder(encoder, base_size=32, scales=(1,))
    assert torch.equal(wrapped(images), encoder(images))


@pytest.mark.parametrize("tokens", [False, True])
def test_two_scales_stitch_crops_like_the_encoder_on_the_large_image(tokens):
    encoder = Patchify(tokens=tokens)
    images = torch.rand(2, 3, 64, 64)  # already at scale 2 of base 32: no resizing
    out = MultiScaleEncoder(encoder, base_size=32, scales=(1, 2))(images)
    if tokens:
        assert out.shape == (2, 8 * 8, 10)
        out = out.transpose(1, 2).reshape(2, 10, 8, 8)
    else:
        assert out.shape == (2, 10, 8, 8)
    full = Patchify(tokens=False)(images)  # [2, 5, 16, 16] on the whole 64 px image
    expected = torch.nn.functional.avg_pool2d(full, 2)
    assert torch.allclose(out[:, 5:], expected, atol=1e-5)


def test_multiscale_rejects_non_square_token_grid():
    encoder = lambda x: torch.zeros(x.shape[0], 6, 4)  # noqa: E731
    with pytest.raises(ValueError, match="token_grid"):
        MultiScaleEncoder(encoder, base_size=8, scales=(1,))(torch.rand(1, 3, 8, 8))
