"""DeepPCB: aligned template / tested printed-circuit-board pairs with tiny defects.

Layout (``<root>`` is the folder holding ``trainval.txt`` and ``test.txt``,
i.e. ``shared/data/deeppcb/PCBData``)::

    trainval.txt, test.txt         "groupG/G/ID.jpg groupG/G_not/ID.txt" per line
    groupG/G/ID_temp.jpg           defect-free template (640x640, binarised)
    groupG/G/ID_test.jpg           tested board
    groupG/G_not/ID.txt            "x1 y1 x2 y2 type" per defect, type 1..6

Each pair gives two samples: the template (good) and the tested board
(defective, with boxes). The product is the group (one board design), so a
few-shot episode shows templates of the same design. Split-file lines whose
group folder is absent are skipped (the shared copy is a subset).

Defects are 10-40 px in a 640 px board, so few-shot studies work on crops:
:func:`balanced_crop_windows` (pure) picks, on one tested board, windows that
each contain a defect (defective) and as many defect-free windows (the same
locations on the template, or places on the tested board that no defect box
touches); :func:`deeppcb_crops` cuts them into inspection samples.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from loctune.data.loaders import shared_data_dir
from loctune.data.validate import DataError
from loctune.inspect.records import inspection_sample
from loctune.inspect.tiling import Crop, image_to_crop
from loctune.types import Box, Sample

DEFECT_NAMES = {1: "open", 2: "short", 3: "mousebite", 4: "spur", 5: "copper", 6: "pin-hole"}
SPLIT_FILES = {"trainval": "trainval.txt", "test": "test.txt"}
GOOD_SOURCES = ("template", "test")


def deeppcb_root() -> Path:
    """Where the development checkout keeps DeepPCB: ``shared/data/deeppcb/PCBData``."""
    return shared_data_dir() / "deeppcb" / "PCBData"


def read_deeppcb_boxes(path: Path) -> tuple[list[Box], list[str]]:
    """Boxes and defect names of one annotation file; bad lines raise ``DataError``."""
    boxes, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        try:
            x1, y1, x2, y2, kind = (int(v) for v in fields)
        except ValueError:
            raise DataError(
                f"{path}:{number}: expected 'x1 y1 x2 y2 type' as integers, got {line!r}"
            ) from None
        if kind not in DEFECT_NAMES:
            raise DataError(f"{path}:{number}: type: expected 1-6, got {kind}")
        if not (x1 < x2 and y1 < y2):
            raise DataError(f"{path}:{number}: box: expected x1 < x2 and y1 < y2, got {line!r}")
        boxes.append((float(x1), float(y1), float(x2), float(y2)))
        labels.append(DEFECT_NAMES[kind])
    return boxes, labels


def load_deeppcb(root: str | os.PathLike | None = None, split: str = "all") -> list[Sample]:
    """Template and tested samples of the pairs in ``split`` (``"trainval"``, ``"test"``,
    ``"all"``).

    Samples come pair by pair, template first. ``meta`` holds ``split``,
    ``pair_id`` and, on the tested board, ``template`` (the path of its
    defect-free reference, for reference-based prompting).
    """
    root = Path(root) if root is not None else deeppcb_root()
    if split not in (*SPLIT_FILES, "all"):
        raise ValueError(f"split: expected 'trainval', 'test' or 'all', got {split!r}")
    names = list(SPLIT_FILES) if split == "all" else [split]
    samples = []
    for name in names:
        list_file = root / SPLIT_FILES[name]
        if not list_file.is_file():
            raise FileNotFoundError(f"{list_file}: DeepPCB split list not found under {root}")
        for number, line in enumerate(list_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise DataError(
                    f"{list_file}:{number}: expected 'image_path annotation_path', got {line!r}"
                )
            image_rel, annotation_rel = fields
            if not (root / Path(image_rel).parts[0]).is_dir():
                continue  # group not in this copy
            samples += _pair(root, Path(image_rel), root / annotation_rel, name)
    return samples


def _pair(root: Path, image_rel: Path, annotation: Path, split: str) -> list[Sample]:
    stem = image_rel.stem
    template = root / image_rel.parent / f"{stem}_temp.jpg"
    tested = root / image_rel.parent / f"{stem}_test.jpg"
    for path in (template, tested, annotation):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {split} split but missing")
    product = f"pcb_{image_rel.parts[0].removeprefix('group')}"
    boxes, labels = read_deeppcb_boxes(annotation)
    common = {"split": split, "pair_id": stem}
    good = inspection_sample(str(template), product, image_id=f"{stem}_temp", **common)
    defective = inspection_sample(
        str(tested),
        product,
        boxes=boxes,
        labels=labels,
        image_id=f"{stem}_test",
        template=str(template),
        **common,
    )
    return [good, defective]


def has_colour_marks(path: str | os.PathLike, tolerance: int = 60, max_pixels: int = 50) -> bool:
    """Whether a board image holds coloured pixels (channels differing by more than
    ``tolerance``; more than ``max_pixels`` of them). DeepPCB images are binarised grey,
    but one tested board of the test split (``44000020_test.jpg``) has its annotation
    drawn in: green boxes and the type names, which would give its defects away."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    return int((spread > tolerance).sum()) > max_pixels


@dataclass(frozen=True)
class CropWindow:
    """A square window on a board: ``window`` in board pixels, the image it is cut from
    (``"test"``: the tested board, ``"template"``: its defect-free template) and the
    defect boxes inside it in crop pixels (none for a good window)."""

    window: tuple[int, int, int, int]
    source: str
    boxes: list[Box] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    @property
    def defective(self) -> bool:
        return bool(self.boxes)


def _overlaps(window: tuple[int, int, int, int], box: Box) -> bool:
    x1, y1, x2, y2 = window
    return box[0] < x2 and box[2] > x1 and box[1] < y2 and box[3] > y1


def balanced_crop_windows(
    image_size: tuple[int, int],
    boxes: list[Box],
    labels: list[str],
    crop: int,
    n: int,
    rng: random.Random,
    good_from: str = "template",
    tries: int = 200,
) -> list[CropWindow]:
    """``n`` defective and ``n`` good ``crop``-px windows of one tested board, defective first.

    Each defective window holds one defect box (drawn without replacement
    among those that fit in a crop) entirely, at a uniformly random position,
    so the defect is not always central; its boxes are every defect inside it
    in crop pixels (slivers cut by the border dropped as in
    :func:`~loctune.inspect.tiling.image_to_crop`). Good windows, with
    ``good_from="template"``, are the defective windows' locations on the
    template (same layout, no defect: the cleanest contrast); with ``"test"``,
    random windows of the tested board that no defect box touches. When fewer
    than ``n`` of either can be found (few defects, or no clean place in
    ``tries`` draws), both lists are cut to the shorter, so the result stays
    balanced.
    """
    if good_from not in GOOD_SOURCES:
        raise ValueError(f"good_from: expected one of {GOOD_SOURCES}, got {good_from!r}")
    width, height = image_size
    if crop > min(width, height):
        raise ValueError(f"crop: {crop} px does not fit in a {width}x{height} board")
    fitting = [b for b in boxes if b[2] - b[0] <= crop and b[3] - b[1] <= crop]
    defective = []
    for x1, y1, x2, y2 in rng.sample(fitting, min(n, len(fitting))):
        # the window's left edge lies in [x2 - crop, x1], within the board
        left = rng.randint(max(0, int(x2 + 0.999) - crop), min(int(x1), width - crop))
        top = rng.randint(max(0, int(y2 + 0.999) - crop), min(int(y1), height - crop))
        window = (left, top, left + crop, top + crop)
        inside, names = image_to_crop(boxes, labels, Crop(0, 0, window))
        defective.append(CropWindow(window, "test", inside, names))
    if good_from == "template":
        good = [CropWindow(w.window, "template") for w in defective]
    else:
        good = []
        for _ in range(tries):
            if len(good) == len(defective):
                break
            left, top = rng.randint(0, width - crop), rng.randint(0, height - crop)
            window = (left, top, left + crop, top + crop)
            if not any(_overlaps(window, b) for b in boxes):
                good.append(CropWindow(window, "test"))
    count = min(len(defective), len(good))
    return defective[:count] + good[:count]


def deeppcb_crops(
    tested: list[Sample],
    crop: int = 128,
    per_board: int = 1,
    good_from: str = "template",
    seed: int = 0,
    product: str = "pcb",
) -> list[Sample]:
    """Balanced good/defective crop samples of tested boards (``load_deeppcb``'s defective
    samples), :func:`balanced_crop_windows` on each, seeded by ``seed`` and the board id.

    All crops are one ``product`` by default: the shared copy's group 12000 has
    test boards only, so training-split examples of the query's own group do
    not always exist. ``meta`` keeps the board (``board``), its group, the
    ``window`` and the image it was cut from (``source``); ``pair_id`` is the
    window, shared by a defective crop and its template crop.
    """
    from PIL import Image

    out = []
    for board in tested:
        if "template" not in board.meta:
            raise ValueError(f"{board.image_id}: not a tested board (no template in meta)")
        rng = random.Random(f"{seed}:{board.image_id}")
        with Image.open(board.image) as image:
            size = image.size
        windows = balanced_crop_windows(
            size, board.boxes, board.labels, crop, per_board, rng, good_from
        )
        images = {}
        for w in windows:
            if w.source not in images:
                path = board.image if w.source == "test" else board.meta["template"]
                images[w.source] = Image.open(path).convert("RGB")
            x1, y1, _, _ = w.window
            crop_id = f"{board.meta['pair_id']}@{x1},{y1}"
            out.append(
                inspection_sample(
                    images[w.source].crop(w.window),
                    product,
                    boxes=w.boxes,
                    labels=w.labels,
                    image_id=f"{crop_id}:{'defective' if w.defective else 'good'}",
                    pair_id=crop_id,
                    board=board.image_id,
                    group=board.meta["product"],
                    window=w.window,
                    source=w.source,
                    split=board.meta["split"],
                )
            )
    return out
