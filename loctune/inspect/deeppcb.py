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
"""

from __future__ import annotations

import os
from pathlib import Path

from loctune.data.loaders import shared_data_dir
from loctune.data.validate import DataError
from loctune.inspect.records import inspection_sample
from loctune.types import Box, Sample

DEFECT_NAMES = {1: "open", 2: "short", 3: "mousebite", 4: "spur", 5: "copper", 6: "pin-hole"}
SPLIT_FILES = {"trainval": "trainval.txt", "test": "test.txt"}


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
    """Template and tested samples of the pairs in ``split`` (``"trainval"``, ``"test"``, ``"all"``).

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
