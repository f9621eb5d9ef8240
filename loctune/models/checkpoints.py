"""Checkpoints shipped inside the package, opened by name like a hub id (``--model NAME``).

A pretrained checkpoint takes longer to build (``loctune pretrain``, about 20 minutes
on two CPU cores) than a demo may take, so one small one ships with loctune. Each
entry says the command that rebuilds it; its folder holds that run's
``pretrain_config.yaml`` and ``metrics.json`` beside the weights, and a test checks
that the config is today's default, so the shipped file and the command cannot drift.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"

#: name -> (what it is, the command that rebuilds it)
SHIPPED: dict[str, tuple[str, str]] = {
    "shapes-rowcol32": (
        "ImageNet EfficientNet-Lite0 (frozen) + loctune's 4-block decoder, pretrained on the "
        "synthetic source corpus (captions, grounding, detection, counting); rowcol codec, 32 bins",
        "loctune pretrain --out runs/pretrain && cp -r runs/pretrain/model "
        "loctune/assets/shapes-rowcol32 && cp runs/pretrain/pretrain_config.yaml "
        "runs/pretrain/metrics.json loctune/assets/shapes-rowcol32/",
    ),
}


def resolve_checkpoint(name_or_path: str) -> str:
    """The folder of a shipped checkpoint's ``name``; anything else is returned unchanged."""
    if name_or_path in SHIPPED:
        folder = ASSETS / name_or_path
        if not (folder / "adapter.json").is_file():
            raise FileNotFoundError(
                f"shipped checkpoint {name_or_path!r} is missing from {folder}; rebuild it: "
                f"{SHIPPED[name_or_path][1]}"
            )
        return str(folder)
    return name_or_path
