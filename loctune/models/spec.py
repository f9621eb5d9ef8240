"""Which model a run trains, as data (:class:`ModelConfig`), and the one place that opens it.

``loctune train``, ``loctune compare`` and the inspection study name their model the same
way, so a pretrained checkpoint, a fresh small VLM and a hub VLM are one field apart:
``model.name=runs/pretrain/model``, ``model.name=small:pretrained``, ``model.name=google/...``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loctune.models.base import VLMAdapter
from loctune.types import Sample

#: the codec of a fresh small VLM when none is named
DEFAULT_SMALL_CODEC = "rowcol:grid=32"


@dataclass
class ModelConfig:
    """``name``: a checkpoint folder or shipped name (fine-tuned from its weights), ``small`` or
    ``small:PRESET`` (a fresh small VLM, see :data:`~loctune.models.small_vlm.PRESETS`), or a
    hub id. ``codec`` is a codec spec (``rowcol:grid=16``); None keeps the checkpoint's or the
    family's own. ``image_size`` and ``overrides`` (SmallVLMConfig fields) shape a fresh small
    VLM; ``dtype``, ``lora``/``qlora`` and ``freeze_vision`` apply to hub VLMs.
    """

    name: str = "small"
    codec: str | None = None
    image_size: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    lora: int = 0
    qlora: bool = False
    freeze_vision: bool = False

    def __post_init__(self):
        """Refuse an unknown preset or a codec spec that builds no codec before any work."""
        from loctune.codecs import get_codec
        from loctune.models.small_vlm import PRESETS

        if self.is_fresh_small and self.preset not in PRESETS:
            raise ValueError(f"name {self.name!r}: unknown small VLM preset {self.preset!r}; "
                             f"available: {', '.join('small:' + p for p in PRESETS)}")
        if self.codec is not None:
            try:
                get_codec(self.codec)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"codec {self.codec!r}: {err.args[0]}") from None

    @property
    def is_fresh_small(self) -> bool:
        return self.name == "small" or self.name.startswith("small:")

    @property
    def preset(self) -> str:
        """The SmallVLM preset a fresh small VLM starts from (``small:tiny`` -> ``tiny``)."""
        return self.name.partition(":")[2] or "small"


def open_model(
    cfg: ModelConfig,
    samples: Sequence[Sample] = (),
    texts: Iterable[str] = (),
    seed: int = 0,
    target: str | None = None,
    unseen: bool = False,
    log: Callable[[str], None] = lambda _: None,
    **small_overrides: Any,
) -> VLMAdapter:
    """The adapter ``cfg`` names, its vocabulary covering ``samples`` and ``texts``.

    A fresh small VLM starts from ``seed``. A pretrained small VLM learns the words it
    lacks, and ``target`` (the data it is about to train on) joins its record of training
    data (``config.trained_on``); with ``unseen`` a checkpoint that has seen ``target``
    is refused, so a study never reports transfer to data its start already knew.
    ``small_overrides`` are SmallVLMConfig fields a caller derives (``max_positions``).
    """
    from loctune.models.checkpoints import resolve_checkpoint
    from loctune.models.small_vlm_adapter import ADAPTER_FILE, SmallVLMAdapter

    if cfg.is_fresh_small:
        sizes = {"image_size": cfg.image_size} if cfg.image_size else {}
        return SmallVLMAdapter.build(
            cfg.codec or DEFAULT_SMALL_CODEC, texts=texts, samples=samples, config=cfg.preset,
            seed=seed, **sizes, **cfg.overrides, **small_overrides,
        )
    folder = resolve_checkpoint(cfg.name)
    if (Path(folder) / ADAPTER_FILE).is_file():
        adapter = SmallVLMAdapter.from_pretrained(folder, codec=cfg.codec)
        seen = adapter.model.config.trained_on
        if unseen and target in seen:
            raise ValueError(
                f"model {cfg.name!r} was trained on {target!r} (its config.json trained_on: "
                f"{list(seen)}); a study's target must be unseen: pretrain without it"
            )
        added = adapter.extend_vocabulary(samples, texts)
        if added:
            log(f"added {len(added)} words to the vocabulary: {' '.join(added[:10])}")
        if target is not None:
            adapter.model.config = replace(adapter.model.config, trained_on=(*seen, target))
        return adapter
    from loctune.models.hf import load_adapter

    options: dict[str, Any] = {"codec": cfg.codec, "freeze_vision": cfg.freeze_vision}
    if cfg.dtype:
        options["dtype"] = cfg.dtype
    if cfg.lora:
        options["lora"] = {"r": cfg.lora, "qlora": cfg.qlora}
    return load_adapter(folder, **options)
