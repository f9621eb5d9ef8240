from PIL import Image

from loctune.types import Detection
from loctune.visualize import draw_detections


def test_draws_prediction_and_truth_where_the_boxes_are(tmp_path):
    im = Image.new("RGB", (100, 80), "black")
    out = draw_detections(im, [Detection("cat", (10, 20, 50, 60), 0.9), {"label": "dog", "box": [60, 5, 90, 30]}],
                          tmp_path / "x.png", truth=[(5, 5, 20, 20)])
    assert (tmp_path / "x.png").exists()
    assert out.getpixel((10, 40)) != (0, 0, 0)  # left edge of the cat box
    assert out.getpixel((30, 40)) == (0, 0, 0)  # inside, not filled
    assert out.getpixel((5, 12)) == (0, 255, 0)  # truth in green
    assert im.getpixel((10, 40)) == (0, 0, 0)  # input untouched
