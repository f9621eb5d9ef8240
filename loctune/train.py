"""One training loop for every model behind a :class:`~loctune.models.base.VLMAdapter`.

The loop runs on Accelerate, so the same code trains on a CPU, one GPU, or many
processes under ``accelerate launch`` (DDP, FSDP, DeepSpeed). Three properties
are worth knowing because experiments depend on them:

* **Data order is a pure function of (seed, global batch, step).** Micro-batches
  are cut from an endless stream of seeded per-epoch permutations, so a run
  resumed at step k sees exactly the batches an uninterrupted run would, and N
  processes with batch B see the same global batches as one process with batch
  N*B (or with B and N-step accumulation).
* **The loss is normalised by the number of supervised tokens in the whole
  optimizer step** (all accumulated micro-batches on all processes), so gradient
  accumulation and multi-process training give the gradient of the same mean.
* **Checkpoints resume exactly.** ``last/`` is a model folder ``load_model`` opens
  (``loctune eval --model runs/train/exp/last``), with the full training state beside
  it in ``last/state/``: safetensors weights plus optimizer, scheduler and RNG states
  (read back with ``weights_only=True``) and the step; killing a run and resuming it
  ends in the same weights.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from loctune.boxes import raster_order
from loctune.checkpointing import (
    STATE_DIR,
    WEIGHTS_FILE,
    ResumeError,
    check_manifest,
    check_same_data,
    check_same_recipe,
    find_checkpoint,
    publish,
    read_state,
    recipe,
    remove,
    save_full_state,
    save_model_folder,
    truncate_metrics,
)
from loctune.config import config_to_dict, save_config
from loctune.losses import LossConfig
from loctune.models.base import VLMAdapter
from loctune.report import read_jsonl
from loctune.types import IGNORE_INDEX, Sample

__all__ = ["ResumeError", "SampleDataset", "TrainConfig", "TrainResult", "load_weights", "train"]

logger = logging.getLogger(__name__)

EvalFn = Callable[[VLMAdapter], Mapping[str, float]]
LossFn = Callable[..., torch.Tensor]



MAX_AUTO_EVALS = 10  # eval_every=0: every epoch, but no more validations than this per run
#: ``best_metric="auto"``: the first of these an evaluation reports (detection, grounding)
MAIN_METRICS = ("ap", "acc50")


@dataclass
class TrainConfig:
    """Everything the loop needs; flat so that ``key=value`` overrides stay short.

    Length: ``steps`` optimizer steps when > 0, else ``epochs`` passes over the
    data (rounded up to whole steps). ``batch_size`` is per process and per
    micro-batch; one optimizer step sees ``batch_size * grad_accum * processes``
    samples. ``trainable``/``freeze`` are glob patterns over
    ``adapter.model.named_parameters()`` names (``trainable`` empty: all that
    the adapter leaves trainable), applied for this call only, so staged
    training is two calls, e.g. ``trainable=["projector.*"]`` then none.
    Validation (when ``train`` gets an ``eval_fn``): ``eval_every=0`` validates
    every epoch, spaced to at most :data:`MAX_AUTO_EVALS` evaluations in a run of
    many short epochs, and at the end; ``eval_every=N`` every N steps and at the
    end; ``-1`` at the end only. ``best_metric`` names a key of ``eval_fn``'s result,
    or ``"auto"`` for the task's main one (COCO AP for detection, else Acc@0.5);
    ``best/`` keeps the model of the best evaluation, a folder ``load_model``
    opens; ``""`` keeps none. ``patience=K`` stops after K evaluations without a
    better ``best_metric``. ``log_with`` names Accelerate trackers
    (``tensorboard``, ``wandb``, ``mlflow``, ``trackio``...), none by default;
    they log under ``run_dir``. ``cpu`` trains on CPU processes even where a GPU
    is visible (what ``accelerate launch --cpu`` asks for).
    """

    run_dir: str = "runs/train"
    steps: int = 0
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    best_metric: str = "auto"
    best_mode: Literal["max", "min"] = "max"
    patience: int = 0
    log_with: list[str] = field(default_factory=list)
    seed: int = 0
    num_workers: int = 0
    trainable: list[str] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)
    progress: bool = True
    cpu: bool = False
    object_order: Literal["given", "raster"] = "given"
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "warmup_steps", "save_every", "num_workers", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_every < -1:
            raise ValueError(
                f"TrainConfig.eval_every must be >= -1 (0: every epoch, -1: at the end only), "
                f"got {self.eval_every}"
            )
        for name in ("lr", "min_lr", "weight_decay", "max_grad_norm", "epochs"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"TrainConfig.{name} must be finite, got {getattr(self, name)}")
        if self.steps == 0 and not self.epochs > 0:
            raise ValueError(
                f"TrainConfig needs steps > 0 or epochs > 0, got steps=0, epochs={self.epochs}"
            )
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError(
                "TrainConfig.weight_decay and max_grad_norm must be >= 0 (0 disables clipping)"
            )
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(
                "TrainConfig.mixed_precision must be 'no', 'bf16' or 'fp16', "
                f"got {self.mixed_precision!r}"
            )
        if self.best_mode not in ("max", "min"):
            raise ValueError(
                f"TrainConfig.best_mode must be 'max' or 'min', got {self.best_mode!r}"
            )
        if self.object_order not in ("given", "raster"):
            raise ValueError(f"TrainConfig.object_order must be 'given' or 'raster', "
                             f"got {self.object_order!r}")

    def eval_interval(self, n_samples: int, global_batch: int) -> int:
        """Steps between validations (0: at the end only), see the class docstring."""
        if self.eval_every > 0:
            return self.eval_every
        if self.eval_every < 0:
            return 0
        total = self.total_steps(n_samples, global_batch)
        per_epoch = math.ceil(n_samples / global_batch)
        return max(per_epoch, math.ceil(total / MAX_AUTO_EVALS))

    def total_steps(self, n_samples: int, global_batch: int) -> int:
        """Optimizer steps of the whole run for a dataset of ``n_samples``."""
        return (
            self.steps
            if self.steps > 0
            else max(1, math.ceil(self.epochs * n_samples / global_batch))
        )


@dataclass
class TrainResult:
    """Outcome of :func:`train`: last logged and evaluated metrics and where the weights are."""

    metrics: dict[str, float]
    run_dir: Path
    step: int
    last_checkpoint: Path
    best_checkpoint: Path | None = None


class SampleDataset(Dataset):
    """A list of :class:`Sample` as a torch dataset; batches are made by ``adapter.collate``."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def loader(
        self, adapter: VLMAdapter, batch_sampler: Sampler[list[int]], num_workers: int = 0
    ) -> DataLoader:
        """DataLoader whose batches are ``adapter.collate(samples, train=True)``.

        Its own generator keeps worker seeding from consuming the global torch RNG,
        which would shift dropout between a resumed and an uninterrupted run.
        """
        return DataLoader(
            self,
            batch_sampler=batch_sampler,
            collate_fn=partial(adapter.collate, train=True),
            num_workers=num_workers,
            generator=torch.Generator(),
        )


class _StreamBatchSampler(Sampler[list[int]]):
    """Micro-batches ``start..stop-1`` of an endless stream of seeded per-epoch permutations.

    Batch ``i`` always holds the same indices for a given (dataset size, batch
    size, seed); a batch may straddle two epochs, so nothing is dropped and a
    dataset smaller than one batch still trains.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start * self.batch_size, self.n)
        order = self._permutation(epoch)
        for _ in range(self.start, self.stop):
            batch: list[int] = []
            while len(batch) < self.batch_size:
                take = min(self.batch_size - len(batch), self.n - offset)
                batch.extend(order[offset : offset + take])
                offset += take
                if offset == self.n:
                    epoch, offset = epoch + 1, 0
                    order = self._permutation(epoch)
            yield batch

    def _permutation(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n).tolist()


class _AdapterModule(nn.Module):
    """``adapter.forward`` as a module, so Accelerate can wrap it (DDP, FSDP, autocast).

    Its only submodule is ``adapter.model``; the adapter keeps using the same
    object, so the weights it generates with are the ones being trained.
    """

    def __init__(self, adapter: VLMAdapter):
        super().__init__()
        self.model = adapter.model
        self._adapter_forward = adapter.forward
        # FSDP's transformer auto-wrap reads the layer classes from the root module.
        self._no_split_modules = getattr(adapter.model, "_no_split_modules", None)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._adapter_forward(batch)


def train(
    adapter: VLMAdapter,
    train_samples: Sequence[Sample],
    config: TrainConfig,
    eval_fn: EvalFn | None = None,
    resume: bool = False,
    loss_fn: LossFn | None = None,
    run_record: Any = None,
) -> TrainResult:
    """Train ``adapter.model`` on ``train_samples``; returns metrics and checkpoint paths.

    ``run_record`` is the config saved as ``run_dir/config.yaml``: by default ``config``; a
    caller that knows more of the run (model, data: the CLI's
    :class:`~loctune.run_config.RunConfig`) passes that, so a run has one record.

    ``eval_fn(adapter) -> {metric: value}`` runs every ``config.eval_every`` steps
    and at the end, on every process (it must give the same answer on each; the
    main process's is used). ``resume=True`` continues from ``run_dir/last`` when
    it exists and starts fresh otherwise. ``loss_fn`` defaults to
    :class:`loctune.losses.LocationLoss` built from ``config.loss`` and is called
    as ``loss_fn(logits, labels, continuous=..., shift=..., num_items_in_batch=...)``.

    The call owns Accelerate's process-wide state: it builds its own ``Accelerator``
    and resets that state on return (so the next call may use other settings);
    make any ``Accelerator`` of your own after it, not before.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin, set_seed

    if not train_samples:
        raise ValueError("train() needs at least one training sample")
    adapter.check_samples(train_samples)
    if config.object_order == "raster":
        train_samples = [in_raster_order(s) for s in train_samples]
    run_dir = Path(config.run_dir)
    set_seed(config.seed)
    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=config.mixed_precision,
        # Each step's micro-batches are fetched up front (to count its tokens), so the
        # loader reaches its end before the last step's backward passes: sync on count only.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.grad_accum, sync_with_dataloader=False
        ),
        # one scheduler step per optimizer step, any process count
        step_scheduler_with_optimizer=False,
        log_with=list(config.log_with) or None,
        project_dir=str(run_dir),
    )
    restore_flags = _apply_freeze(adapter.model, config.trainable, config.freeze)
    try:
        return _run(accelerator, adapter, train_samples, config, run_dir, eval_fn, resume, loss_fn,
                    run_record)
    finally:
        restore_flags()
        accelerator.free_memory()
        # Accelerate's state is a process-wide singleton; a later train() call may
        # ask for other mixed-precision or accumulation settings.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def in_raster_order(sample: Sample) -> Sample:
    """``sample`` with its objects in :func:`~loctune.boxes.raster_order` (a copy; the
    caller's sample is left as it was)."""
    order = raster_order(sample.boxes)
    if order == list(range(len(order))):
        return sample
    return replace(sample, boxes=[sample.boxes[i] for i in order],
                   labels=[sample.labels[i] for i in order])


def load_weights(adapter: VLMAdapter, checkpoint: str | Path) -> None:
    """Load the training-state weights of a ``last/`` checkpoint (``last/state/``), or an
    FSDP/DeepSpeed run's ``best/``, into ``adapter.model``; on a single device ``last/``
    and ``best/`` are model folders as well: ``load_model`` them."""
    from accelerate.utils import load_checkpoint_in_model

    path = Path(checkpoint)
    state = path / STATE_DIR
    if any(state.glob(f"{WEIGHTS_FILE}*")):  # FSDP keeps its gathered file at the top
        path = state
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if path.is_dir() and not file.exists():
        index = path / f"{WEIGHTS_FILE}.index.json"
        if not index.exists():
            raise FileNotFoundError(f"{path} holds neither {WEIGHTS_FILE} nor a sharded index")
        file = index
    load_checkpoint_in_model(_AdapterModule(adapter), str(file), strict=False)


def _run(
    accelerator, adapter, samples, config, run_dir, eval_fn, resume, loss_fn, run_record
) -> TrainResult:
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    global_batch = config.batch_size * config.grad_accum * world
    total = config.total_steps(len(samples), global_batch)
    last_dir, best_dir = run_dir / "last", run_dir / "best"
    metrics_file = run_dir / "metrics.jsonl"

    module = _AdapterModule(adapter)
    optimizer = torch.optim.AdamW(_param_groups(adapter.model, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        partial(
            _lr_factor, warmup=config.warmup_steps, total=total, floor=config.min_lr / config.lr
        ),
    )
    if loss_fn is None:
        loss_fn = _default_loss(config, adapter)
    if isinstance(loss_fn, nn.Module):
        loss_fn = loss_fn.to(accelerator.device)

    checkpoint = find_checkpoint(last_dir) if resume else None
    state = (
        read_state(checkpoint) if checkpoint else {"step": 0, "best_value": None, "metrics": {}}
    )
    run_recipe = recipe(config.loss, adapter)
    if checkpoint:
        check_manifest(checkpoint)
        check_same_data(state, checkpoint, len(samples), global_batch, config.seed)
        check_same_recipe(state, checkpoint, run_recipe)
    start = state["step"]
    record = config if run_record is None else run_record
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint:
            truncate_metrics(metrics_file, start)
        else:
            if resume:
                logger.info("no checkpoint in %s; starting from step 0", last_dir)
            for stale in (metrics_file, run_dir / "metrics.csv", last_dir, best_dir):
                remove(stale)
        save_config(record, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    if config.log_with:  # the trackers' hyperparameters are the run record too
        accelerator.init_trackers(run_dir.name, config=_flat(config_to_dict(record)))
    interval = config.eval_interval(len(samples), global_batch)

    micro_per_step = config.grad_accum * world
    sampler = _StreamBatchSampler(
        len(samples), config.batch_size, config.seed, start * micro_per_step, total * micro_per_step
    )
    loader = SampleDataset(samples).loader(adapter, sampler, config.num_workers)
    module, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)
    if accelerator.gradient_accumulation_steps != config.grad_accum:
        raise ValueError(
            f"the launcher's DeepSpeed config sets gradient_accumulation_steps="
            f"{accelerator.gradient_accumulation_steps} but "
            f"TrainConfig.grad_accum={config.grad_accum}; "
            'set it to "auto" in the DeepSpeed config'
        )
    if checkpoint:
        # checkpoints written before last/ was a model folder hold the state at their top
        state_dir = checkpoint / STATE_DIR if (checkpoint / STATE_DIR).is_dir() else checkpoint
        accelerator.load_state(str(state_dir), load_kwargs={"weights_only": True})
        logger.info("resumed from %s at step %d", checkpoint, start)

    shift = not adapter.is_encoder_decoder
    # accelerator.backward divides by grad_accum and DDP averages over processes;
    # the loss is already a mean over the whole step's tokens, so undo both.
    scale = config.grad_accum * world
    best_value, metrics = state["best_value"], dict(state["metrics"])
    stale_evals = state.get("stale_evals", 0)  # evaluations since the best one (patience)
    progress = _progress_bar(total, start, enabled=config.progress and is_main)
    loss_sum = torch.zeros((), device=accelerator.device)
    steps_since_log, clock = 0, time.perf_counter()
    grad_norm: float | None = None
    batches = iter(loader)
    module.train()
    step = start
    for step in range(start + 1, total + 1):
        micro = [next(batches) for _ in range(config.grad_accum)]
        local_items = sum(_supervised_tokens(b["labels"], shift) for b in micro)
        n_items = accelerator.reduce(local_items, reduction="sum").clamp_min(1)
        for batch in micro:
            # Explicit autocast of the forward only (not the loss): under FSDP2
            # Accelerate casts parameters but does not autocast, so models mixing
            # dtypes (float32 buffers) would fail in bf16.
            with accelerator.accumulate(module):
                with accelerator.autocast():
                    logits = module(batch)
                loss = loss_fn(
                    logits,
                    batch["labels"],
                    continuous=batch.get("loc_continuous"),
                    shift=shift,
                    num_items_in_batch=n_items,
                )
                accelerator.backward(loss * scale)
                loss_sum += loss.detach()
                if accelerator.sync_gradients:
                    if config.max_grad_norm > 0:
                        norm = accelerator.clip_grad_norm_(
                            module.parameters(), config.max_grad_norm
                        )
                        grad_norm = None if norm is None else float(norm)
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        steps_since_log += 1
        progress.update(1)

        events = []
        if step % config.log_every == 0 or step == total:
            elapsed = time.perf_counter() - clock
            record = {
                "step": step,
                "epoch": step * global_batch / len(samples),
                "loss": float(accelerator.reduce(loss_sum, reduction="sum")) / steps_since_log,
                "lr": lr,
                "samples_per_s": steps_since_log * global_batch / max(elapsed, 1e-9),
            }
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(
                    f"training loss is {record['loss']} at step {step} (lr {lr:g}); stopped "
                    f"before saving non-finite weights. Lower lr, or use mixed_precision=bf16 "
                    f"instead of fp16. The last good checkpoint is {last_dir}"
                )
            events.append(record)
            progress.set_postfix(
                loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}"
            )
            loss_sum.zero_()
            steps_since_log, clock = 0, time.perf_counter()
        evaluating = eval_fn is not None and ((interval and step % interval == 0) or step == total)
        improved = stop = False
        if evaluating:
            values = _evaluate(accelerator, module, adapter, eval_fn)
            events.append({"step": step, **{f"eval/{k}": v for k, v in values.items()}})
            improved, best_value = _improves(values, config, best_value)
            stale_evals = 0 if improved else stale_evals + 1
            stop = bool(config.patience) and stale_evals >= config.patience and step < total
            if is_main:
                progress.write(_eval_line(step, step * global_batch / len(samples), values))
        for record in events:
            metrics.update({k: v for k, v in record.items() if k != "step"})
            if is_main:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(_json_value(record)) + "\n")
            if config.log_with:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if improved:
            publish(
                accelerator, best_dir, partial(save_model_folder, accelerator, adapter, module)
            )
        if stop and is_main:
            progress.write(
                f"early stop at step {step}: {config.patience} evaluations without a better "
                f"{_resolve_metric(config.best_metric, values)} (best {best_value:.4g})"
            )
        if (config.save_every and step % config.save_every == 0) or step == total or stop:
            state = {
                "step": step,
                "total_steps": total,
                "global_batch": global_batch,
                "n_samples": len(samples),
                "seed": config.seed,
                "best_value": best_value,
                "stale_evals": stale_evals,
                "metrics": metrics,
                "recipe": run_recipe,
            }
            publish(accelerator, last_dir,
                     partial(save_full_state, accelerator, adapter, module, state))
        # Events fire after the step's clock was read; keep them out of the next throughput window.
        if events:
            clock = time.perf_counter()
        if stop:
            break
    progress.close()
    if is_main:
        _write_run_tables(metrics_file, run_dir)
    if config.log_with:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return TrainResult(
        metrics=metrics,
        run_dir=run_dir,
        step=step,
        last_checkpoint=last_dir,
        best_checkpoint=best_dir if best_dir.is_dir() and any(best_dir.iterdir()) else None,
    )


def _apply_freeze(
    model: nn.Module, trainable: Sequence[str], freeze: Sequence[str]
) -> Callable[[], None]:
    """Turn off ``requires_grad`` per the patterns; return a function restoring the adapter's
    flags."""
    params = dict(model.named_parameters())
    for pattern in [*trainable, *freeze]:
        if not any(fnmatch(name, pattern) for name in params):
            raise ValueError(
                f"trainable/freeze pattern {pattern!r} matches no parameter of "
                f"{type(model).__name__}"
            )
    original = {name: p.requires_grad for name, p in params.items()}
    for name, p in params.items():
        kept = (not trainable or any(fnmatch(name, t) for t in trainable)) and not any(
            fnmatch(name, f) for f in freeze
        )
        if not kept:
            p.requires_grad_(False)
    if not any(p.requires_grad for p in params.values()):
        raise ValueError(
            "no trainable parameters left: the adapter froze them or trainable/freeze excluded all"
        )

    def restore() -> None:
        for name, p in params.items():
            p.requires_grad_(original[name])

    return restore


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices; spare biases, norm weights and embeddings (table or
    learned positions)."""
    embedding_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.Embedding)
        for p in m.parameters(recurse=False)
    }
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or id(p) in embedding_params or "embed" in name.rsplit(".", 1)[-1]
        (no_decay if exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak lr at 0-based ``step``: linear warmup, then cosine to ``floor``
    at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _default_loss(config: TrainConfig, adapter: VLMAdapter) -> LossFn:
    from loctune.losses import LocationLoss

    return LocationLoss(config.loss, adapter.loc_token_ids, adapter.codec.space)


def _supervised_tokens(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Label positions the loss counts (causal models predict token t+1 at t, so the first
    never is)."""
    return ((labels[:, 1:] if shift else labels) != IGNORE_INDEX).sum()


def _evaluate(
    accelerator, module: nn.Module, adapter: VLMAdapter, eval_fn: EvalFn
) -> dict[str, float]:
    from accelerate.utils import broadcast_object_list

    module.eval()
    with torch.no_grad():
        values = {k: float(v) for k, v in eval_fn(adapter).items()}
    module.train()
    if accelerator.num_processes > 1:
        values = broadcast_object_list([values], from_process=0)[0]
    return values


def _resolve_metric(name: str, values: Mapping[str, float]) -> str | None:
    """``best_metric`` as a key of ``values``; ``"auto"``: the first of MAIN_METRICS there,
    or None (with a warning) when an ``eval_fn`` of its own reports none of them."""
    if name == "auto":
        found = [m for m in MAIN_METRICS if m in values]
        if not found:
            logger.warning(
                "best_metric='auto' finds none of %s among eval_fn's metrics %s: no best/ is "
                "kept; name one with best_metric=...", MAIN_METRICS, sorted(values)
            )
            return None
        return found[0]
    if name not in values:
        raise KeyError(
            f"TrainConfig.best_metric {name!r} is not among eval_fn's metrics {sorted(values)}"
        )
    return name


def _improves(
    values: Mapping[str, float], config: TrainConfig, best: float | None
) -> tuple[bool, float | None]:
    """Whether ``values`` beat ``best`` on ``config.best_metric``; the new best.

    A non-finite value never improves (an evaluation that decoded nothing is no best)."""
    key = _resolve_metric(config.best_metric, values) if config.best_metric else None
    if key is None:
        return False, best
    value = values[key]
    if not math.isfinite(value):
        return False, best
    better = best is None or (value > best if config.best_mode == "max" else value < best)
    return better, value if better else best


def _eval_line(step: int, epoch: float, values: Mapping[str, float]) -> str:
    """One line per validation: the task's numbers, then the parse failures."""
    shown = [k for k in ("ap", "ap50", "acc50", "miou", "unparseable_rate") if k in values]
    shown = shown or sorted(values)[:6]
    cells = " ".join(f"{k} {values[k]:.4f}" for k in shown)
    return f"val step {step} epoch {epoch:.2f} | {cells}"


def _write_run_tables(jsonl: Path, run_dir: Path) -> None:
    """``metrics.csv``, one row per validation (with the training numbers last logged
    before it; every logged step when nothing was validated), and ``results.png``."""
    from loctune.plots import plot_results

    by_step: dict[int, dict[str, Any]] = {}
    for row in read_jsonl(jsonl):
        by_step.setdefault(row["step"], {}).update(row)
    steps = [by_step[k] for k in sorted(by_step)]
    rows, latest = [], {}
    validated = any(k.startswith("eval/") for r in steps for k in r)
    for row in steps:
        latest.update({k: v for k, v in row.items() if not k.startswith("eval/")})
        if not validated or any(k.startswith("eval/") for k in row):
            rows.append({**latest, **row})
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    if steps:
        plot_results(steps, run_dir / "results.png")


def _json_value(record: Mapping[str, Any]) -> dict[str, Any]:
    """NaN/inf as null, so metrics.jsonl is valid JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config as ``a.b`` keys of scalars, the form trackers accept as hyperparameters."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


def _progress_bar(total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=start,
        disable=not enabled,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
