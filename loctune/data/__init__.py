"""Annotation readers into :class:`loctune.types.Sample`, with validation and splits.

Every reader returns a :class:`SampleSet` (samples, class list and a
:class:`ValidationReport` of what was dropped, skipped or clipped and why).
``read_hf`` is loaded on first use, so that importing loctune does not pay for
importing ``datasets``.
"""

from typing import Any

from loctune.data.coco import read_coco
from loctune.data.common import SampleSet, detection_prompt
from loctune.data.csv_boxes import read_csv_boxes
from loctune.data.loaders import (
    FORMATS,
    NAMED_SETS,
    bccd,
    detect_format,
    load_dataset,
    microcontroller,
    named_set,
    neu_det,
    raccoon,
    shared_data_dir,
)
from loctune.data.refcoco import read_refcoco, read_referring_jsonl
from loctune.data.splits import dataset_splits, split_by_image, split_samples
from loctune.data.validate import DataError, Issue, ValidationReport, Validator
from loctune.data.voc import read_voc
from loctune.data.yolo import read_yolo

__all__ = [
    "FORMATS",
    "DataError",
    "Issue",
    "SampleSet",
    "ValidationReport",
    "Validator",
    "dataset_splits",
    "detect_format",
    "detection_prompt",
    "load_dataset",
    "raccoon",
    "bccd",
    "microcontroller",
    "neu_det",
    "named_set",
    "NAMED_SETS",
    "read_coco",
    "read_csv_boxes",
    "read_hf",
    "read_referring_jsonl",
    "read_refcoco",
    "read_voc",
    "read_yolo",
    "shared_data_dir",
    "split_by_image",
    "split_samples",
]


def __getattr__(name: str) -> Any:
    if name == "read_hf":
        from loctune.data.hf import read_hf

        return read_hf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
