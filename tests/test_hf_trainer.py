"""loctune's loss in transformers' Trainer and TRL's SFTTrainer, on tiny offline checkpoints."""

import math

import pytest
import torch

from loctune.hf_trainer import (
    AdapterCollator,
    compute_loss_func,
    detection_eval_callback,
    location_loss,
    location_trainer,
    sample_record,
    to_dataset,
    trl_record,
)
from loctune.models.hf import load_adapter
from loctune.types import Sample

hf_tiny = pytest.importorskip("hf_tiny")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {f: hf_tiny.TINY_BUILDERS[f](tmp_path_factory.mktemp(f))
            for f in ("paligemma", "florence2")}


def samples(n=4):
    return [Sample(hf_tiny.tiny_image(40, 30, seed=i), "red circle", [(2.0 + i, 3.0, 20.0, 25.0)],
                   ["red circle"]) for i in range(n)]


def test_compute_loss_func_takes_the_shift_from_the_adapter(tiny):
    """Florence-2's logits align with its labels: the adapter's loss must not shift them,
    PaliGemma's must; each equals the adapter's own one-hot CE on the same batch."""
    for family, causal in (("paligemma", True), ("florence2", False)):
        adapter = load_adapter(tiny[family])
        batch = adapter.collate(samples(2))
        logits = adapter.forward(batch).float()
        labels = batch["labels"]
        fn = compute_loss_func(adapter, "ce")
        got = fn({"logits": logits}, labels)
        ref_logits, ref_labels = (logits[:, :-1], labels[:, 1:]) if causal else (logits, labels)
        ref = torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), ref_labels.flatten(),
                                                ignore_index=-100)
        assert float(got) == pytest.approx(float(ref), rel=1e-5), family
        with pytest.raises(TypeError):
            location_loss(adapter).compute_loss_func()  # no default shift to get wrong


def test_collator_reads_records_back_into_the_adapters_batch(tiny):
    adapter = load_adapter(tiny["paligemma"])
    s = samples(2)
    direct = adapter.collate(s)
    from_records = AdapterCollator(adapter)([sample_record(x) for x in s])
    from_trl = AdapterCollator(adapter)([trl_record(adapter, x) for x in s])
    for batch in (from_records, from_trl):
        assert torch.equal(batch["labels"], direct["labels"])
        assert torch.equal(batch["loc_continuous"].isnan(), direct["loc_continuous"].isnan())
    record = trl_record(adapter, s[0])
    assert record["completion"] == adapter.answer_text(s[0]) and record["images"] == [s[0].image]
    with pytest.raises(KeyError, match="record 0: missing"):
        AdapterCollator(adapter)([{"prompt": "x"}])


@pytest.mark.parametrize("trainer", ["transformers", "trl"])
def test_two_bin_targets_train_through_trainer_and_sft_trainer(trainer, tiny, tmp_path):
    """two_bin needs loc_continuous, which must reach the loss and never the model."""
    from transformers import TrainingArguments

    adapter = load_adapter(tiny["paligemma"])
    before = [p.detach().clone() for p in adapter.model.parameters() if p.requires_grad]
    common = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                  learning_rate=1e-3, report_to=[], remove_unused_columns=False,
                  logging_steps=1, save_strategy="no", use_cpu=True)
    if trainer == "trl":
        from trl import SFTConfig, SFTTrainer

        args, cls = SFTConfig(**common, max_length=None), SFTTrainer
    else:
        args, cls = TrainingArguments(**common), None
    records = to_dataset(samples(4), adapter if trainer == "trl" else None)
    t = location_trainer(adapter, "two_bin", trainer_class=cls, args=args, train_dataset=records,
                         eval_dataset=records.select(range(2)),
                         callbacks=[detection_eval_callback(adapter, samples(2),
                                                            max_new_tokens=6)])
    t.train()
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    after = [p for p in adapter.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    metrics = t.evaluate()
    assert "eval_acc50" in metrics and "eval_unparseable_rate" in metrics


def test_location_trainer_refuses_what_would_silently_break(tiny, tmp_path):
    from transformers import TrainingArguments

    adapter = load_adapter(tiny["paligemma"])
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        location_trainer(adapter, "ce", args=args, train_dataset=[])
