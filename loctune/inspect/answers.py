"""The inspection answer codec: what a model answers about one image, and reading it back.

::

    good
    defective: scratch <bin_120><bin_40><bin_180><bin_52> scratch
    defective: scratch image 3: <bin_..>x4 scratch          (tiled)

The boxes are written by the adapter's box codec, so the tokens are whatever
that codec writes (added ``<bin_k>`` tokens, Qwen2-VL's plain-text corners
...). Tiled (:class:`~loctune.inspect.tiling.Tiling`), each box is given on
the crop that holds it, in that crop's pixels, and parsing maps boxes back to
the full image (merged by NMS where crops overlap).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from loctune.codecs import Codec
from loctune.codecs.parsing import DIGITS, read_index
from loctune.inspect.records import GOOD, is_defective
from loctune.inspect.tiling import Tiling, crop_to_image, image_to_crop, merge_detections
from loctune.types import Box, Detection, Sample

DEFECTIVE = "defective"
#: the words an answer starts with, in the order their probabilities are read
VERDICTS = (GOOD, DEFECTIVE)

_VERDICT = re.compile(rf"\s*({GOOD}|{DEFECTIVE})\b\s*:?", re.IGNORECASE)
_IMAGE_REF = re.compile(rf"\bimage\s+({DIGITS})\s*:", re.IGNORECASE)
#: where a defect type ends: the first box markup or image reference
_TYPE_END = re.compile(rf"<|\(|\[|\{{|\bimage\s+{DIGITS}\s*:", re.IGNORECASE)


def answer_text(sample: Sample, codec: Codec, tiling: Tiling | None = None) -> str:
    """What the model should answer for an inspection sample (see the module docstring)."""
    return answer_target(sample, codec, tiling)[0]


def answer_target(
    sample: Sample, codec: Codec, tiling: Tiling | None = None
) -> tuple[str, list[tuple[Box, tuple[int, int]]]]:
    """:func:`answer_text` and the boxes it writes, in text order, each with the size of
    the image it is written on (the crop's, when tiled): what location targets need."""
    if not is_defective(sample):
        return GOOD, []
    text = f"{DEFECTIVE}: {sample.meta['defect_type']}"
    if not sample.boxes:
        return text, []
    if tiling is None:
        size = sample.image_size
        encoded = codec.encode(sample.boxes, sample.labels, size)
        return f"{text} {encoded}", [(box, size) for box in sample.boxes]
    written = []
    grid = tiling.grid(sample.image_size)
    for number, crop in enumerate(grid.crops, start=tiling.first_crop):
        boxes, labels = image_to_crop(sample.boxes, sample.labels, crop)
        if boxes:
            text += f" image {number}: {codec.encode(boxes, labels, crop.size)}"
            written += [(box, crop.size) for box in boxes]
    return text, written


@dataclass
class ParsedAnswer:
    """What could be read from an answer; ``defective`` is None when it names no verdict."""

    defective: bool | None
    defect_type: str = ""
    detections: list[Detection] = field(default_factory=list)
    n_malformed_boxes: int = 0

    @property
    def malformed(self) -> bool:
        return self.defective is None


def parse_answer(
    text: str, codec: Codec, image_size: tuple[int, int], tiling: Tiling | None = None
) -> ParsedAnswer:
    """Verdict, defect type and full-image boxes of an answer; never raises on model output.

    With ``tiling``, boxes after ``image N:`` are decoded on crop N (or on the
    whole image for the global view) and mapped back; a reference to an image
    that the turn did not have counts as a malformed box, as do the fragments
    the codec could not read. Boxes after a "good" verdict are ignored.
    """
    match = _VERDICT.match(text)
    if match is None:
        return ParsedAnswer(None)
    if match[1].lower() == GOOD:
        return ParsedAnswer(False, GOOD)
    rest = text[match.end() :]
    end = _TYPE_END.search(rest)
    defect_type = rest[: end.start() if end else len(rest)].strip(" \t\n;,.")
    if tiling is None:
        decoded = codec.decode(rest, image_size)
        return ParsedAnswer(True, defect_type, list(decoded), decoded.n_malformed)
    grid = tiling.grid(image_size)
    refs = list(_IMAGE_REF.finditer(rest))
    # text before the first reference is read on the whole image, as the global view is
    whole = codec.decode(rest[: refs[0].start() if refs else len(rest)], image_size)
    found, bad = list(whole), whole.n_malformed
    for i, ref in enumerate(refs):
        segment = rest[ref.end() : refs[i + 1].start() if i + 1 < len(refs) else len(rest)]
        number = read_index(ref[1])  # a number no crop has is an image the turn did not show
        index = number - tiling.first_crop
        if number == 1 and tiling.global_size is not None:
            decoded = codec.decode(segment, image_size)
            found += list(decoded)
        elif 0 <= index < len(grid.crops):
            crop = grid.crops[index]
            decoded = codec.decode(segment, crop.size)
            found += [Detection(d.label, crop_to_image([d.box], crop)[0], d.score) for d in decoded]
        else:
            bad += 1  # an image the turn did not show
            continue
        bad += decoded.n_malformed
    return ParsedAnswer(True, defect_type, merge_detections(found), bad)
