"""A training run's checkpoints: how ``best/`` and ``last/`` are written, and what a resume
must find before it continues.

``last/`` is a model folder with Accelerate's full state in ``last/state/``; a
``manifest.json`` of sizes and SHA-256 hashes covers both, so a truncated, zeroed or
partly missing checkpoint is refused by name instead of resumed. The trainer state
records the data stream and the recipe (loss, codec): a resume that would continue on
other data or train another objective is refused, naming the field.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from loctune.config import ConfigError, changed_fields, config_to_dict
from loctune.losses import LossConfig
from loctune.models.base import VLMAdapter

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
#: subfolder of ``last/`` holding Accelerate's state (the model folder is ``last/`` itself)
STATE_DIR = "state"
#: LossConfig fields that choose how the loss is computed, not what it is: free to change on resume
KERNEL_FIELDS = ("kernel", "chunk_elements", "fused_chunk_rows")


class ResumeError(ConfigError):
    """A checkpoint this run cannot continue from: damaged, or trained another way."""


def save_model_folder(accelerator, adapter: VLMAdapter, module: nn.Module, directory: Path):
    """``best/`` and ``last/`` as folders ``load_model`` opens (the adapter's own save),
    except under FSDP/DeepSpeed, where only Accelerate can gather the sharded weights: there it
    holds ``model.safetensors`` for :func:`load_weights`."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        accelerator.save_model(module, directory)
    elif accelerator.is_main_process:
        adapter.save_pretrained(str(directory))


def save_full_state(
    accelerator, adapter: VLMAdapter, module: nn.Module, state: dict[str, Any], directory: Path
) -> None:
    """``last/``: the model folder (what ``best/`` holds) and, in ``state/``, Accelerate's
    full training state; ``trainer_state.json`` and the manifest cover both."""
    save_model_folder(accelerator, adapter, module, directory)
    accelerator.save_state(str(directory / STATE_DIR))
    accelerator.wait_for_everyone()  # every process's RNG state is on disk before the manifest
    if accelerator.is_main_process:
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
        write_manifest(directory)


def write_manifest(directory: Path) -> None:
    """``manifest.json``: size and SHA-256 of every file of the checkpoint, so a resume can
    tell a complete checkpoint from a truncated, zeroed or partly missing one."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
               for p in files}
    (directory / MANIFEST).write_text(json.dumps(entries, indent=1))


def check_manifest(checkpoint: Path) -> None:
    """Refuse to resume from a checkpoint whose files differ from what was saved."""
    file = checkpoint / MANIFEST
    if not file.is_file():
        raise ResumeError(
            f"cannot resume from {checkpoint}: no {MANIFEST} (written with every checkpoint; "
            "the save was interrupted or the folder comes from elsewhere). Use a new run_dir."
        )
    try:
        entries = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ResumeError(f"{file}: corrupt checkpoint manifest ({err})") from None
    for name, entry in entries.items():
        path = checkpoint / name
        problem = (
            "is missing" if not path.is_file()
            else f"has {path.stat().st_size} bytes, {entry['size']} were saved"
            if path.stat().st_size != entry["size"]
            else "differs from what was saved (SHA-256)" if _sha256(path) != entry["sha256"]
            else None
        )
        if problem:
            raise ResumeError(
                f"cannot resume from {checkpoint}: {name} {problem}; the checkpoint is damaged. "
                "Use a new run_dir, or resume=False."
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recipe(loss: LossConfig, adapter: VLMAdapter) -> dict[str, Any]:
    """What a resumed run must share with the saved one besides the data stream: the loss
    and the codec (their tensors may even fit, and train the wrong objective silently)."""
    fields = {k: v for k, v in config_to_dict(loss).items() if k not in KERNEL_FIELDS}
    return {"loss": fields, "codec": adapter.codec.spec}


def check_same_recipe(state: Mapping[str, Any], checkpoint: Path, recipe: dict) -> None:
    saved = state.get("recipe")
    if saved is None:
        return  # checkpoints written before the recipe was recorded
    changed = changed_fields(saved, recipe)
    if changed:
        detail = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
        raise ResumeError(
            f"cannot resume from {checkpoint}: the run was trained otherwise ({detail}). "
            "Resume with the same settings, or start a new run_dir."
        )


def publish(accelerator, final: Path, write: Callable[[Path], None]) -> None:
    """Write a checkpoint next to ``final`` and swap it in, so a kill never leaves a torn one.

    The previous checkpoint survives as ``<name>.old`` until the new one is in place;
    :func:`find_checkpoint` falls back to it.
    """
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if accelerator.is_main_process:
        remove(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove(old)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        remove(old)
    accelerator.wait_for_everyone()


def find_checkpoint(last_dir: Path) -> Path | None:
    for candidate in (last_dir, last_dir.with_name(last_dir.name + ".old")):
        if (candidate / STATE_FILE).exists():
            return candidate
    return None


def read_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ResumeError(f"{checkpoint / STATE_FILE}: corrupt trainer state ({err})") from None


def check_same_data(
    state: Mapping[str, Any], checkpoint: Path, n_samples: int, global_batch: int, seed: int
) -> None:
    """Resuming is only exact on the same data stream; refuse a silently different one."""
    now = {"n_samples": n_samples, "global_batch": global_batch, "seed": seed}
    changed = {k: (state[k], v) for k, v in now.items() if state.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {old} then, {new} now" for k, (old, new) in changed.items())
        raise ResumeError(
            f"cannot resume from {checkpoint}: the data stream differs ({detail}); global batch is "
            "batch_size x grad_accum x processes. Use a new run_dir or resume=False."
        )


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records an interrupted run wrote after its last checkpoint."""
    if path.exists():
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        path.write_text("".join(line + "\n" for line in kept))


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
