"""One entry point for every reader, and the named real sets of shared/data (raccoon, bccd, ...).

:func:`load_dataset` picks the reader from the path:

================================  =================================
path                              format
================================  =================================
``*.yaml`` / ``*.yml``            ``yolo`` (Ultralytics data.yaml)
``*.json`` holding an object      ``coco`` (instances)
``*.json``: Label Studio tasks    ``label_studio`` (JSON or JSON-MIN export)
``*.json`` holding another list   ``refcoco`` (refs; needs ``instances=``)
``*.jsonl``                       ``referring_jsonl``
``*.csv``                         ``csv``
``*.xml``: CVAT ``<annotations>`` ``cvat`` (CVAT for images 1.1)
folder with ``data.yaml``         ``yolo``
folder with ``annotations.xml``   ``cvat``
folder with ``*/_annotations``    ``coco`` (a Roboflow COCO export: one
``.coco.json``                    JSON per split folder)
folder of ``*.xml`` (or with an   ``voc``
``annotations/`` folder of them)
folder saved by ``datasets``      ``hf`` (``load_from_disk``)
``datasets.Dataset(Dict)``        ``hf``
================================  =================================

A mapping ``{split: path}`` reads each file with the same reader and records
the split in ``meta["split"]`` (e.g. raccoon's ``train_labels.csv`` and
``test_labels.csv``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loctune.data.coco import read_coco
from loctune.data.common import SampleSet, detection_prompt, load_json, read_text
from loctune.data.csv_boxes import read_csv_boxes
from loctune.data.cvat import is_cvat, read_cvat
from loctune.data.labelstudio import is_label_studio, read_label_studio
from loctune.data.refcoco import read_refcoco, read_referring_jsonl
from loctune.data.validate import DataError, ValidationReport, Validator
from loctune.data.voc import read_voc
from loctune.data.yolo import read_yolo

FORMATS = (
    "coco", "refcoco", "referring_jsonl", "yolo", "voc", "csv", "hf", "label_studio", "cvat",
)
ROBOFLOW_COCO = "_annotations.coco.json"  # one per split folder of a Roboflow COCO export
_ROBOFLOW_SPLITS = {"train": "train", "valid": "val", "val": "val", "test": "test"}
_HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def detect_format(path: str | os.PathLike) -> str:
    """The reader for a path (see the module table); a clear error when none fits."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yolo"
    if suffix == ".jsonl":
        return "referring_jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix == ".json":
        if _first_char(path) != "[":
            return "coco"
        return "label_studio" if is_label_studio(load_json(path)) else "refcoco"
    if suffix == ".xml" and is_cvat(path):
        return "cvat"
    if suffix in (".p", ".pkl", ".pickle"):
        return "refcoco"  # read_refcoco refuses it with the conversion recipe
    if path.is_dir():
        if (path / "data.yaml").is_file():
            return "yolo"
        if (path / "annotations.xml").is_file() and is_cvat(path / "annotations.xml"):
            return "cvat"
        if (path / ROBOFLOW_COCO).is_file() or any(path.glob(f"*/{ROBOFLOW_COCO}")):
            return "coco"
        if any(path.glob("*.xml")) or any((path / "annotations").glob("*.xml")):
            return "voc"
        if any((path / marker).is_file() for marker in _HF_MARKERS):
            return "hf"
    raise DataError(
        f"{path}: cannot tell the annotation format (expected data.yaml, .json, .jsonl, .csv, "
        f"a folder of VOC .xml or a saved datasets folder); pass format= one of {FORMATS}"
    )


def load_dataset(path_or_spec: Any, format: str | None = None, **options: Any) -> SampleSet:
    """Read annotations in any supported format; ``options`` go to the reader.

    ``path_or_spec`` is a path, a mapping ``{split: path}``, or a Hugging Face
    ``Dataset``/``DatasetDict``. ``datasets`` is imported only when needed: it
    takes about a second.

    Every file reader takes ``allow_outside_root=False``: an image path that resolves
    outside the dataset root (the image root or the dataset folder: ``../../x.jpg``, an
    absolute path elsewhere) drops its sample as ``outside_root``; pass True to read it.

    E.g. ``load_dataset("coco/instances_val.json", image_root="coco/val2017")``,
    ``load_dataset("refs.json", instances="instances.json", image_root=...)``,
    ``load_dataset({"train": "train.csv", "test": "test.csv"}, image_root="images")``.
    """
    if _is_hf_dataset(path_or_spec):
        from loctune.data.hf import read_hf

        return read_hf(path_or_spec, **options)
    if isinstance(path_or_spec, Mapping):
        return _load_splits(path_or_spec, format, options)
    path = Path(path_or_spec)
    if format is None:
        format = detect_format(path)
    if format not in FORMATS:
        raise DataError(f"{path}: unknown format {format!r}; expected one of {FORMATS}")
    if "instances" in options and format != "refcoco":
        raise DataError(f"{path}: instances= is for RefCOCO refs files; this one reads as {format}")
    if format == "coco" and path.is_dir():
        return _load_roboflow_coco(path, options)
    if format == "yolo":
        return read_yolo(path / "data.yaml" if path.is_dir() else path, **options)
    if format == "voc":
        nested = path / "annotations"
        return read_voc(
            nested if not any(path.glob("*.xml")) and nested.is_dir() else path, **options
        )
    if format == "hf":
        import datasets

        from loctune.data.hf import read_hf

        options.setdefault("source", str(path))
        return read_hf(datasets.load_from_disk(str(path)), **options)
    if format == "refcoco":
        if "instances" not in options:
            raise DataError(f"{path}: RefCOCO refs need the COCO instances file: pass instances=")
        return read_refcoco(path, options.pop("instances"), **options)
    reader = {
        "coco": read_coco,
        "referring_jsonl": read_referring_jsonl,
        "csv": read_csv_boxes,
        "label_studio": read_label_studio,
        "cvat": read_cvat,
    }
    return reader[format](path, **options)


def _load_roboflow_coco(root: Path, options: dict[str, Any]) -> SampleSet:
    """A Roboflow COCO export: ``train/``, ``valid/``, ``test/`` each with its images and
    ``_annotations.coco.json`` (``valid`` is loctune's ``val``); or one such folder."""
    if (root / ROBOFLOW_COCO).is_file():
        return read_coco(root / ROBOFLOW_COCO, **options)
    spec = {
        _ROBOFLOW_SPLITS.get(folder.name, folder.name): folder / ROBOFLOW_COCO
        for folder in sorted(root.iterdir())
        if (folder / ROBOFLOW_COCO).is_file()
    }
    return _load_splits(spec, "coco", options)


def shared_data_dir() -> Path:
    """``shared/data`` beside the repository checkout (absent outside the dev setup)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def raccoon(split: str = "all", root: str | os.PathLike | None = None, **options: Any) -> SampleSet:
    """The raccoon dataset (200 images, 217 boxes, one class) with its original 160/40 split.

    ``split`` is ``"train"``, ``"test"`` or ``"all"`` (both, split in
    ``meta["split"]``). ``root`` is the ``raccoon`` folder, by default
    ``shared/data/raccoon`` beside the checkout.
    """
    files = {"train": "train_labels.csv", "test": "test_labels.csv"}
    if split not in (*files, "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    root = Path(root) if root else shared_data_dir() / "raccoon"
    if not (root / "data").is_dir():
        raise FileNotFoundError(
            f"raccoon dataset not found at {root} (expected data/*.csv and images/); pass root="
        )
    wanted = files if split == "all" else {split: files[split]}
    spec = {name: root / "data" / file for name, file in wanted.items()}
    return load_dataset(spec, "csv", image_root=root / "images", classes=["raccoon"], **options)


def bccd(split: str = "all", root: str | os.PathLike | None = None, **options: Any) -> SampleSet:
    """BCCD blood cells (364 images, 3 classes, many small overlapping boxes), with the original
    split of ``ImageSets/Main``: ``train`` is its ``trainval`` (292 images), ``test`` 72."""
    root = _named_root("bccd", root, "Annotations")
    stems = {s: root / "ImageSets" / "Main" / f"{f}.txt" for s, f in
             (("train", "trainval"), ("test", "test"))}

    def read(name: str) -> SampleSet:
        names = read_text(stems[name]).split()
        files = [root / "Annotations" / f"{stem}.xml" for stem in names]
        return read_voc(files, root / "JPEGImages", classes=BCCD_CLASSES, **options)

    return _merge_splits({s: read(s) for s in _wanted(split, stems)}, str(root), options)


def microcontroller(
    split: str = "all", root: str | os.PathLike | None = None, **options: Any
) -> SampleSet:
    """Four kinds of development board (149 photos, fine-grained classes), with the original
    142/7 ``train``/``test`` split; the VOC files lie beside their images."""
    root = _named_root("microcontroller", root, "train")
    parts = {s: read_voc(root / s, classes=MICROCONTROLLER_CLASSES, **options)
             for s in _wanted(split, ("train", "test"))}
    return _merge_splits(parts, str(root), options)


def neu_det(split: str = "all", root: str | os.PathLike | None = None, **options: Any) -> SampleSet:
    """NEU-DET steel surface defects (1,800 grayscale 200 px images, 6 types, every image
    defective): ``train`` is ``IMAGES``/``ANNOTATIONS`` (1,770), ``test`` the held-aside
    ``Validation_*`` (30, five per type)."""
    root = _named_root("neu-det", root, "ANNOTATIONS")
    folders = {"train": ("ANNOTATIONS", "IMAGES"),
               "test": ("Validation_Annotations", "Validation_Images")}
    parts = {s: read_voc(root / folders[s][0], root / folders[s][1], classes=NEU_DET_CLASSES,
                         **options) for s in _wanted(split, folders)}
    return _merge_splits(parts, str(root), options)


def synthetic_novel(split: str = "all", root: None = None, **options: Any) -> SampleSet:
    """The held-out synthetic domain: detection of hexagons, diamonds and rings on coloured
    grain (``synthetic.NOVEL_DOMAIN``), none of which a pretraining source draws; 500 train
    and 200 test scenes, generated (``root`` is not used)."""
    from loctune.data.synthetic import NOVEL_DOMAIN, NOVEL_SHAPES, make_detection_split

    if root is not None or options:
        raise ValueError("synthetic-novel is generated: it takes no root or reader options")
    sizes = {"train": 500, "test": 200}
    parts = {}
    for name in _wanted(split, sizes):
        samples = make_detection_split(name, sizes[name], seed=0, config=NOVEL_DOMAIN)
        report = Validator(f"{SYNTHETIC_NOVEL}/{name}").finish(samples)
        parts[name] = SampleSet(samples, list(NOVEL_SHAPES), report)
    return _merge_splits(parts, SYNTHETIC_NOVEL, {})


SYNTHETIC_NOVEL = "synthetic-novel"
BCCD_CLASSES = ("RBC", "WBC", "Platelets")
MICROCONTROLLER_CLASSES = ("Arduino_Nano", "ESP8266", "Heltec_ESP32_Lora", "Raspberry_Pi_3")
NEU_DET_CLASSES = (
    "crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"
)
NAMED_SETS = {"raccoon": raccoon, "bccd": bccd, "microcontroller": microcontroller,
              "neu-det": neu_det, SYNTHETIC_NOVEL: synthetic_novel}


def named_set(name: str, split: str = "all", root: str | os.PathLike | None = None,
              **options: Any) -> SampleSet:
    """A real set of ``shared/data`` by name (:data:`NAMED_SETS`), with its original split."""
    if name not in NAMED_SETS:
        raise ValueError(f"unknown dataset {name!r}; named sets are {sorted(NAMED_SETS)}")
    return NAMED_SETS[name](split, root=root, **options)


def _named_root(name: str, root: str | os.PathLike | None, marker: str) -> Path:
    root = Path(root) if root else shared_data_dir() / name
    if not (root / marker).is_dir():
        raise FileNotFoundError(
            f"{name} dataset not found at {root} (expected {marker}/); pass root="
        )
    return root


def _wanted(split: str, splits) -> list[str]:
    if split not in (*splits, "all"):
        raise ValueError(f"split must be one of {[*splits, 'all']}, got {split!r}")
    return list(splits) if split == "all" else [split]


def _load_splits(
    spec: Mapping[str, str | os.PathLike], format: str | None, options: dict
) -> SampleSet:
    """Read one file per split and merge, tagging each sample with its split."""
    parts = {name: load_dataset(path, format, **options) for name, path in spec.items()}
    return _merge_splits(parts, ", ".join(f"{n}={p}" for n, p in spec.items()), options)


def _merge_splits(parts: Mapping[str, SampleSet], source: str, options: dict) -> SampleSet:
    """One set from per-split sets, each sample's split in ``meta["split"]``."""
    samples, classes = [], []
    report = ValidationReport(source)
    report.on_error = options.get("on_error", "drop")
    for name, part in parts.items():
        for sample in part:
            sample.meta["split"] = name
        samples.extend(part.samples)
        classes.extend(c for c in part.classes if c not in classes)
        report.merge(part.report)
    if any(part.classes != classes for part in parts.values()):
        # Class lists discovered per file differ: give every detection prompt the union.
        classes = sorted(classes)
        prompt = options.get("prompt_fn", detection_prompt)(classes)
        for sample in samples:
            if sample.task == "detection":
                sample.prompt = prompt
    return SampleSet(samples, classes, report)


def _is_hf_dataset(obj: Any) -> bool:
    # A datasets object can only exist if the module is already imported.
    hf = sys.modules.get("datasets")
    return hf is not None and isinstance(obj, (hf.Dataset, hf.DatasetDict))


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # the reader names bad bytes
        while chunk := f.read(256):
            if stripped := chunk.lstrip():
                return stripped[0]
    return ""
