"""Checkpoints shipped inside the package, opened by name like a hub id (``--model NAME``).

A pretrained checkpoint takes longer to build (``loctune pretrain``, about 20 minutes
on two CPU cores) than a demo may take, so small ones ship with loctune, one per token
form of the transfer study. Each entry says how it was built (:func:`rebuild_command`);
its folder holds that run's ``pretrain_config.yaml`` and ``metrics.json`` beside the
weights, and a test checks that the config is today's default with those overrides, so
the shipped file and the command cannot drift.
"""

from __future__ import annotations

import re
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"

#: name -> (what it is, the ``loctune pretrain`` overrides that build it from the defaults)
SHIPPED: dict[str, tuple[str, tuple[str, ...]]] = {
    "shapes-rowcol32": (
        "ImageNet EfficientNet-Lite0 (frozen) + loctune's 4-block decoder, pretrained on the "
        "synthetic source corpus (captions, grounding, detection, counting); rowcol codec, "
        "32 bins (form A: four tokens per box)",
        (),
    ),
    "shapes-patch16": (
        "the same recipe with the patch-index codec on a 16 x 16 grid (form B: two tokens "
        "per box, distance on the 2-D grid)",
        ("codec=patch:grid=16",),
    ),
}


def rebuild_command(name: str) -> str:
    """The commands that rebuild shipped checkpoint ``name`` into ``loctune/assets``."""
    run = f"runs/pretrain-{name}"
    overrides = "".join(" " + o for o in SHIPPED[name][1])
    return (f"loctune pretrain --out {run}{overrides} && cp -r {run}/model loctune/assets/{name}"
            f" && cp {run}/pretrain_config.yaml {run}/metrics.json loctune/assets/{name}/")


#: a file that marks a folder as a checkpoint: loctune's small VLM, a HF model, a PEFT adapter
CHECKPOINT_MARKERS = ("adapter.json", "config.json", "adapter_config.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def resolve_checkpoint(name_or_path: str) -> str:
    """The folder of a shipped checkpoint's ``name``; a checkpoint folder or a hub id as given.

    Anything else is refused here, before a hub client turns a mistyped folder into a
    puzzling repo-id error: a fresh small VLM (``small:PRESET``) is not a trained
    checkpoint, a folder must hold one of :data:`CHECKPOINT_MARKERS`.
    """
    if name_or_path == "small" or name_or_path.startswith("small:"):
        raise FileNotFoundError(
            f"model {name_or_path!r} is a fresh, untrained small VLM; give a trained checkpoint "
            "folder (e.g. runs/train/exp/model), a shipped checkpoint "
            f"({', '.join(SHIPPED)}) or a hub id"
        )
    if name_or_path in SHIPPED:
        folder = ASSETS / name_or_path
        if not (folder / "adapter.json").is_file():
            raise FileNotFoundError(
                f"shipped checkpoint {name_or_path!r} is missing from {folder}; rebuild it: "
                f"{rebuild_command(name_or_path)}"
            )
        return str(folder)
    path = Path(name_or_path)
    if path.is_dir():
        if not any((path / marker).is_file() for marker in CHECKPOINT_MARKERS):
            raise FileNotFoundError(
                f"model {name_or_path!r}: the folder holds no checkpoint (expected one of "
                f"{', '.join(CHECKPOINT_MARKERS)})"
            )
        return name_or_path
    if path.exists() or not _HUB_ID.fullmatch(name_or_path):
        raise FileNotFoundError(
            f"model {name_or_path!r}: no such checkpoint folder, shipped checkpoint "
            f"({', '.join(SHIPPED)}) or hub id (a hub id looks like 'org/name')"
        )
    return name_or_path
