"""One record of a ``loctune train`` run: model, data and training, saved once as its
``config.yaml`` (Ultralytics' ``args.yaml`` idea), so the run repeats from its folder alone:
``loctune train --config runs/train/exp/config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loctune.models.spec import ModelConfig
from loctune.train import TrainConfig


@dataclass
class RunConfig:
    """``data`` is a dataset spec (``raccoon``, ``synthetic``, a data.yaml / COCO / VOC / CSV /
    JSONL path); ``n_train``/``n_val`` cut its splits (None: all; ``n_val=0``: no validation,
    nothing carved from the training images); ``max_new_tokens`` bounds validation answers
    (None: room for the most boxes in the data)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: str = ""
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
