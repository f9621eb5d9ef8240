"""One record of a ``loctune train`` run: model, data and training, saved once as its
``config.yaml`` (Ultralytics' ``args.yaml`` idea), so the run repeats from its folder alone:
``loctune train --config runs/train/exp/config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loctune.models.spec import ModelConfig
from loctune.train import TrainConfig


@dataclass
class DataOptions:
    """How ``data`` is read when the defaults do not fit (:func:`loctune.data.load_dataset`'s
    reader options): ``format`` when detection cannot tell (a VOC set in ``annots/``),
    ``image_root`` when the images are not beside the annotations (COCO's
    ``annotations/`` next to ``train2017/``), ``instances`` the COCO instances file of a
    RefCOCO refs file, ``allow_outside_root`` to accept image paths that leave the root."""

    format: str | None = None
    image_root: str | None = None
    instances: str | None = None
    allow_outside_root: bool = False

    def reader_options(self) -> dict[str, Any]:
        """The options set, as keyword arguments of ``load_dataset``."""
        options = {"image_root": self.image_root, "instances": self.instances}
        options = {k: v for k, v in options.items() if v is not None}
        return options | ({"allow_outside_root": True} if self.allow_outside_root else {})


@dataclass
class RunConfig:
    """``data`` is a dataset spec (``raccoon``, ``synthetic``, a data.yaml / COCO / VOC / CSV /
    JSONL path); ``n_train``/``n_val`` cut its splits (None: all; ``n_val=0``: no validation,
    nothing carved from the training images); ``max_new_tokens`` bounds validation answers
    (None: room for the most boxes in the data); ``data_options`` say how ``data`` is read."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: str = ""
    data_options: DataOptions = field(default_factory=DataOptions)
    n_train: int | None = None
    n_val: int | None = None
    max_new_tokens: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        for name in ("n_train", "n_val", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < (1 if name == "max_new_tokens" else 0):
                raise ValueError(f"RunConfig.{name} must be >= "
                                 f"{1 if name == 'max_new_tokens' else 0} or null, got {value}")
