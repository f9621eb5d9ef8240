"""loctune's location loss inside transformers' ``Trainer`` and TRL's ``SFTTrainer``.

For users whose training already runs on the Hugging Face stack. Everything the
loss needs comes from the adapter, so nothing is written by hand:

* the **collator** is the adapter's own collate (prompt masking, location labels,
  ``loc_continuous`` for two-bin targets);
* the **shift** follows the model: causal logits are shifted by one, an
  encoder-decoder's (Florence-2) are not; a wrong shift trains misaligned
  without any error, so it is never a user's choice here;
* ``loc_continuous`` goes to the loss, never into ``model(**inputs)``.

TRL 1.16 deprecates ``compute_loss_func`` (it runs an extra forward pass) and asks
to subclass and override ``compute_loss``: :func:`location_trainer` does that, for
``transformers.Trainer`` or ``trl.SFTTrainer`` alike. The micro-batch loss is a
mean over its tokens, and the trainer divides it by the accumulation steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from loctune.losses import LocationLoss, LossConfig, loss_config
from loctune.models.base import VLMAdapter
from loctune.types import Sample

SAMPLE_FIELDS = ("image", "prompt", "boxes", "labels", "task", "image_id")


def location_loss(adapter: VLMAdapter, config: LossConfig | str = "ce") -> LocationLoss:
    """The :class:`LocationLoss` of ``config`` (a preset spec such as ``"gem:beta=2"``)
    over ``adapter``'s location tokens and space."""
    config = loss_config(config) if isinstance(config, str) else config
    return LocationLoss(config, adapter.loc_token_ids, adapter.codec.space)


def compute_loss_func(adapter: VLMAdapter, config: LossConfig | str = "ce") -> Callable:
    """``transformers.Trainer(compute_loss_func=...)`` with the shift taken from the
    adapter (the one-hook path of plain ``Trainer``; see :func:`location_trainer` for
    two-bin targets and TRL)."""
    return location_loss(adapter, config).compute_loss_func(shift=not adapter.is_encoder_decoder)


def sample_record(sample: Sample) -> dict[str, Any]:
    """A :class:`Sample` as a plain record (``datasets``-friendly; the image a path or PIL)."""
    record = asdict(sample)
    record.pop("meta")
    record["boxes"] = [list(b) for b in sample.boxes]
    record["image"] = sample.image
    return record


def trl_record(adapter: VLMAdapter, sample: Sample) -> dict[str, Any]:
    """A TRL prompt/completion record: the family's prompt text, the codec's answer, the image.

    It is what the model is trained to read and write, for users who build a
    dataset for TRL's own processing; :class:`AdapterCollator` also accepts it back
    when the record keeps the sample fields (they are included).
    """
    return {
        "prompt": adapter.prompt_text(sample),
        "completion": adapter.answer_text(sample),
        "images": [sample.image],
        **sample_record(sample),
    }


def to_dataset(samples: Sequence[Sample], adapter: VLMAdapter | None = None):
    """A ``datasets.Dataset`` of :func:`sample_record` rows (TRL wants a Dataset), or of
    :func:`trl_record` rows when ``adapter`` is given. In-memory images are stored
    as ``datasets`` images and come back as PIL."""
    from datasets import Dataset

    rows = [trl_record(adapter, s) if adapter else sample_record(s) for s in samples]
    return Dataset.from_list(rows)


class AdapterCollator:
    """``data_collator`` for Trainer/TRL: records (or Samples) -> the adapter's training batch."""

    def __init__(self, adapter: VLMAdapter):
        self.adapter = adapter

    def __call__(self, features: Sequence[Sample | Mapping[str, Any]]) -> dict[str, Any]:
        samples = [f if isinstance(f, Sample) else _to_sample(f, i) for i, f in enumerate(features)]
        return self.adapter.collate(samples, train=True)


def _to_sample(record: Mapping[str, Any], index: int) -> Sample:
    missing = [k for k in ("image", "prompt", "boxes", "labels") if k not in record]
    if missing:
        raise KeyError(
            f"record {index}: missing {missing}; records need {SAMPLE_FIELDS} "
            "(loctune.hf_trainer.sample_record makes them; keep remove_unused_columns=False)"
        )
    return Sample(
        image=record["image"],
        prompt=record["prompt"],
        boxes=[tuple(float(v) for v in b) for b in record["boxes"]],
        labels=list(record["labels"]),
        task=record.get("task") or "grounding",
        image_id=str(record.get("image_id") or index),
    )


class LocationLossMixin:
    """``compute_loss`` with loctune's location loss, for a Trainer subclass."""

    adapter: VLMAdapter
    location_loss: LocationLoss
    loss_is_scaled_for_ga = False  # a per-micro-batch mean: the trainer divides by GA steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        continuous = inputs.pop("loc_continuous", None)
        outputs = model(**self.adapter.model_inputs(inputs), use_cache=False)
        loss = self.location_loss(
            outputs.logits,
            labels.to(outputs.logits.device),
            shift=not self.adapter.is_encoder_decoder,
            continuous=None if continuous is None else continuous.to(outputs.logits.device),
        )
        return (loss, outputs) if return_outputs else loss


def location_trainer(
    adapter: VLMAdapter,
    loss: LossConfig | str = "ce",
    trainer_class: type | None = None,
    **trainer_kwargs: Any,
):
    """A ``trainer_class`` (default ``transformers.Trainer``; or ``trl.SFTTrainer``) that
    trains ``adapter.model`` under ``loss`` with the adapter's collator.

    ``trainer_kwargs`` go to the trainer (``args``, ``train_dataset`` of
    :func:`sample_record` / :func:`trl_record` records or Samples, callbacks...).
    ``remove_unused_columns`` must stay False so the records reach the collator;
    for TRL the dataset is used as given (``skip_prepare_dataset``).
    """
    from loctune.models.hf.base import HFAdapter

    if not isinstance(adapter, HFAdapter):
        raise TypeError(
            f"location_trainer needs a Hugging Face adapter, got {type(adapter).__name__}; "
            "train loctune's own VLM with loctune.train"
        )
    if trainer_class is None:
        from transformers import Trainer as trainer_class
    args = trainer_kwargs.get("args")
    if args is not None and getattr(args, "remove_unused_columns", False):
        raise ValueError("set remove_unused_columns=False: the collator reads the sample fields")
    if _is_trl(trainer_class) and args is not None:
        kwargs = dict(getattr(args, "dataset_kwargs", None) or {})
        args.dataset_kwargs = {**kwargs, "skip_prepare_dataset": True}
    cls = type(f"Location{trainer_class.__name__}", (LocationLossMixin, trainer_class), {})
    trainer = cls(model=adapter.model, data_collator=AdapterCollator(adapter), **trainer_kwargs)
    trainer.adapter = adapter
    trainer.location_loss = location_loss(adapter, loss)
    return trainer


def _is_trl(cls: type) -> bool:
    return any(base.__module__.startswith("trl") for base in cls.__mro__)


def detection_eval_callback(adapter: VLMAdapter, samples: Sequence[Sample], **evaluate_kwargs):
    """A ``TrainerCallback`` that decodes and scores ``samples`` with
    :func:`loctune.evaluate.evaluate` at every evaluation (AP, Acc@0.5, parse rate...),
    adding ``eval_<metric>`` to the trainer's metrics and its log history."""
    from transformers import TrainerCallback

    from loctune.evaluate import evaluate

    class DetectionEvalCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            result = evaluate(adapter, samples, progress=False, **evaluate_kwargs)
            scores = {f"eval_{k}": v for k, v in result.metrics.items()}
            if metrics is not None:
                metrics.update(scores)
            state.log_history.append({**scores, "step": state.global_step})

    return DetectionEvalCallback()


__all__ = [
    "AdapterCollator",
    "LocationLossMixin",
    "compute_loss_func",
    "detection_eval_callback",
    "location_loss",
    "location_trainer",
    "sample_record",
    "to_dataset",
    "trl_record",
]
