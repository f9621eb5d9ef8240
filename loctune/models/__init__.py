"""Models behind one interface (:class:`VLMAdapter`): loctune's small VLM and hub VLMs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loctune.models.base import Generation, VLMAdapter


def load_model(name_or_path: str, **options: Any) -> VLMAdapter:
    """Open any checkpoint loctune can train: a saved small VLM or a Hugging Face VLM.

    A name in :data:`loctune.models.checkpoints.SHIPPED` opens the checkpoint shipped
    in the package.
    A directory written by :class:`~loctune.models.small_vlm_adapter.SmallVLMAdapter`
    is recognised by its ``adapter.json``; anything else (hub id or local path)
    goes to :func:`loctune.models.hf.load_adapter`, which detects the family.
    """
    from loctune.models.checkpoints import resolve_checkpoint
    from loctune.models.small_vlm_adapter import ADAPTER_FILE, SmallVLMAdapter

    name_or_path = resolve_checkpoint(name_or_path)
    if (Path(name_or_path) / ADAPTER_FILE).is_file():
        return SmallVLMAdapter.from_pretrained(name_or_path, **options)
    from loctune.models.hf import load_adapter

    return load_adapter(name_or_path, **options)


__all__ = ["Generation", "VLMAdapter", "load_model"]
