"""Adapters for Hugging Face VLMs: PaliGemma, Florence-2, Kosmos-2, SmolVLM/Idefics3, Qwen2-VL.

``load_adapter`` picks the family from the checkpoint's ``config.json``
(``model_type``), so one call opens a hub checkpoint, a local copy, or a
directory saved by an adapter (full weights or a LoRA adapter).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loctune.models.hf.base import HFAdapter, LoadOptions, LoraOptions
from loctune.models.hf.chat import ChatAdapter, Idefics3Adapter, Qwen2VLAdapter
from loctune.models.hf.florence2 import Florence2Adapter
from loctune.models.hf.kosmos2 import Kosmos2Adapter
from loctune.models.hf.paligemma import PaliGemmaAdapter

ADAPTERS: dict[str, type[HFAdapter]] = {
    cls.family: cls
    for cls in (
        PaliGemmaAdapter,
        Florence2Adapter,
        Kosmos2Adapter,
        Idefics3Adapter,
        Qwen2VLAdapter,
    )
}


def adapter_class(model_type_or_family: str) -> type[HFAdapter]:
    """Adapter class for a family name or a transformers ``model_type``."""
    if model_type_or_family in ADAPTERS:
        return ADAPTERS[model_type_or_family]
    for cls in ADAPTERS.values():
        if model_type_or_family in cls.model_classes:
            return cls
    known = sorted({*ADAPTERS, *(t for c in ADAPTERS.values() for t in c.model_classes)})
    raise ValueError(
        f"no adapter for {model_type_or_family!r}; known families/model types: {known}"
    )


def detect_family(path: str) -> str:
    """Family of a checkpoint, from loctune's metadata or the config's ``model_type``."""
    from transformers import AutoConfig

    local = Path(path)
    meta = local / "loctune_adapter.json"
    if meta.exists():
        return json.loads(meta.read_text())["family"]
    if (local / "adapter_config.json").exists() and not (local / "config.json").exists():
        base = json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"]
        return detect_family(base)
    return adapter_class(AutoConfig.from_pretrained(path).model_type).family


def load_adapter(family_or_model_id: str, path: str | None = None, **options: Any) -> HFAdapter:
    """Open a VLM behind its adapter.

    ``load_adapter("google/paligemma2-3b-pt-224")`` detects the family;
    ``load_adapter("paligemma", "/ckpt")`` names it. ``options`` are the
    fields of :class:`LoadOptions` (dtype, device, device_map,
    attn_implementation, codec (a spec: ``bins:n_bins=100``), lora, freeze_vision,
    gradient_checkpointing).
    """
    try:
        if path is None:
            path = family_or_model_id
            family = detect_family(path)
        else:
            family = family_or_model_id
        return adapter_class(family).from_pretrained(path, **options)
    except OSError as err:
        if Path(path).exists():
            raise
        # a hub id the hub could not serve (offline, private, mistyped): say so in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"model {path!r}: not a local folder, and the hub could not provide it: {first}"
        ) from None


__all__ = [
    "ADAPTERS",
    "ChatAdapter",
    "Florence2Adapter",
    "Idefics3Adapter",
    "HFAdapter",
    "Kosmos2Adapter",
    "LoadOptions",
    "LoraOptions",
    "PaliGemmaAdapter",
    "Qwen2VLAdapter",
    "adapter_class",
    "detect_family",
    "load_adapter",
]
