from PIL import Image

from loctune.types import Detection
from loctune.visualize import TRUTH_COLOR, draw_detections


def test_draws_prediction_and_truth_where_the_boxes_are(tmp_path):
    im = Image.new("RGB", (100, 80), "black")
    dets = [Detection("cat", (10, 20, 50, 60), 0.9), {"label": "dog", "box": [60, 5, 90, 30]}]
    out = draw_detections(im, dets, tmp_path / "x.png", truth=[(5, 5, 20, 20)], min_side=0)
    assert (tmp_path / "x.png").exists()
    assert out.size == im.size
    assert out.getpixel((10, 40)) != (0, 0, 0)  # left edge of the cat box
    assert out.getpixel((30, 40)) == (0, 0, 0)  # inside, not filled
    assert out.getpixel((5, 12)) == (0, 255, 0)  # truth in green
    assert im.getpixel((10, 40)) == (0, 0, 0)  # input untouched


def _colored(im, color, region):
    x0, y0, x1, y1 = region
    return sum(im.getpixel((x, y)) == color for x in range(x0, x1) for y in range(y0, y1))


def test_small_images_are_enlarged_and_boxes_follow():
    out = draw_detections(Image.new("RGB", (64, 64), "black"),
                          [Detection("a", (16, 16, 48, 48), 1.0)], min_side=320)
    assert out.size == (320, 320)
    assert out.getpixel((80, 200)) == (255, 0, 255)  # left edge of the box, 5x
    assert out.getpixel((160, 200)) == (0, 0, 0)


def test_tags_sit_on_a_filled_background_above_the_box_and_scale_with_the_image():
    def tag_height(side):
        box = (side * 0.3, side * 0.5, side * 0.7, side * 0.9)
        out = draw_detections(Image.new("RGB", (side, side), "black"),
                              [Detection("raccoon", box, 0.87)])
        column = [out.getpixel((round(box[0]) + 1, y)) for y in range(round(box[1]))]
        # the tag: a run of the box colour (its filled background) directly above the box
        return sum(1 for p in column if p == (255, 0, 255)), out

    small, out = tag_height(400)
    large, _ = tag_height(1600)
    assert small >= 12  # a filled band, not a 1 px line
    assert large > 2.5 * small  # the tag grows with the image
    # the text is drawn in a contrasting ink inside the tag
    tag = (120, 170, 280, 200)
    assert _colored(out, (255, 255, 255), tag) + _colored(out, (0, 0, 0), tag) > 0


def test_truth_tags_are_drawn_below_the_truth_box():
    out = draw_detections(Image.new("RGB", (400, 400), "black"), [], truth=[(100, 100, 200, 200)],
                          truth_labels=["cell"])
    green = tuple(int(TRUTH_COLOR[i : i + 2], 16) for i in (1, 3, 5))
    assert _colored(out, green, (103, 203, 110, 210)) > 0  # filled tag just below the bottom edge
    assert _colored(out, green, (103, 80, 110, 97)) == 0  # nothing above the box


def test_no_box_line_crosses_another_boxes_tag():
    """Tags are written after every outline: a later box through an earlier tag stays under it."""
    im = Image.new("RGB", (400, 400), "black")
    # the first box's tag sits above it, at about y 80..100; the second box's top edge runs at y 90
    out = draw_detections(im, [Detection("cat", (100, 100, 300, 300), 0.9),
                               Detection("dog", (50, 90, 350, 350), 0.8)], min_side=0)
    first_tag = out.getpixel((102, 91))  # inside the first tag, on the second box's line
    assert first_tag != (0, 200, 255)  # the dog's colour (#00c8ff) does not cut through it
