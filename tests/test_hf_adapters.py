"""Hugging Face VLM adapters on tiny random checkpoints saved to a temp dir (no hub)."""

from __future__ import annotations

import importlib.util
import math
import os
import re

import pytest
import torch

from loctune.codecs.base import list_codecs
from loctune.losses import LocationLoss, LossConfig
from loctune.models.hf import adapter_class, detect_family, load_adapter
from loctune.targets import TargetSpec
from loctune.types import Sample

os.environ["HF_HUB_OFFLINE"] = "1"

hf_tiny = pytest.importorskip("hf_tiny")

FAMILIES = list(hf_tiny.TINY_BUILDERS)  # model types, one tiny checkpoint each


def _require(model_type: str) -> None:
    name = adapter_class(model_type).default_codec
    if name not in list_codecs():
        pytest.skip(f"codec {name!r} not available yet")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Lazily built tiny checkpoint per family, shared by the module's tests."""
    built: dict[str, str] = {}

    class Lazy(dict):
        def __missing__(self, family: str) -> str:
            _require(family)
            built[family] = hf_tiny.TINY_BUILDERS[family](tmp_path_factory.mktemp(family))
            self[family] = built[family]
            return built[family]

    return Lazy()


def _samples() -> list[Sample]:
    return [
        Sample(
            hf_tiny.tiny_image(40, 30, seed=0),
            "red circle",
            [(2.0, 3.0, 20.0, 25.0)],
            ["red circle"],
        ),
        Sample(
            hf_tiny.tiny_image(48, 36, seed=1),
            "dog ; cat",
            [(1.0, 1.0, 10.0, 12.0), (20.0, 18.0, 44.0, 35.0)],
            ["dog", "cat"],
            task="detection",
        ),
    ]


def _ce(adapter, batch) -> torch.Tensor:
    """Cross-entropy of the adapter's logits against its labels, shifted for causal models."""
    logits, labels = adapter.forward(batch).float(), batch["labels"].to(adapter.device)
    if not adapter.is_encoder_decoder:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_mask_prompt_and_mark_location_tokens(family, checkpoints):
    adapter = load_adapter(checkpoints[family])
    assert type(adapter) is adapter_class(family)
    samples = _samples()
    batch = adapter.collate(samples)
    labels, loc_cont = batch["labels"], batch["loc_continuous"]
    loc_ids = torch.tensor(adapter.loc_token_ids)
    assert len(adapter.loc_token_ids) == len(adapter.codec.location_tokens)
    for b, sample in enumerate(samples):
        row = labels[b]
        supervised = (row != -100).nonzero()[:, 0]
        answer = adapter.answer_ids(adapter.answer_text(sample))
        assert row[supervised].tolist() == answer  # one contiguous answer, nothing of the prompt
        assert supervised.tolist() == list(range(supervised[0], supervised[0] + len(answer)))
        if not adapter.is_encoder_decoder:
            assert batch["input_ids"][b, supervised].tolist() == answer
            assert (batch["attention_mask"][b, : supervised[0]] == 1).all()
        is_loc = torch.isin(row, loc_ids)
        assert int(is_loc.sum()) == adapter.codec.tokens_per_box * len(sample.boxes)
        assert torch.equal(is_loc, ~loc_cont[b].isnan().any(-1))
        # the continuous targets round to the very tokens written
        index = {t: k for k, t in enumerate(adapter.loc_token_ids)}
        expected = [
            k
            for box in sample.boxes
            for k in adapter.codec.box_to_locations(box, sample.image_size)
        ]
        assert sorted(index[int(t)] for t in row[is_loc]) == sorted(expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_loctune_one_hot_loss_equals_model_cross_entropy(family, checkpoints):
    adapter = load_adapter(checkpoints[family])
    batch = adapter.collate(_samples())
    with torch.no_grad():
        model_loss = adapter.model(**adapter.model_inputs(batch, with_labels=True)).loss
        ours = _ce(adapter, batch)
    assert torch.allclose(ours, model_loss, atol=1e-5)
    logits, shift = adapter.forward(batch).detach(), not adapter.is_encoder_decoder

    def loctune_loss(config: LossConfig) -> torch.Tensor:
        loss_fn = LocationLoss(config, adapter.loc_token_ids, adapter.codec.space)
        return loss_fn(logits, batch["labels"], continuous=batch["loc_continuous"], shift=shift)

    # plain CE, and the location-slice path with one-hot targets, are the model's CE
    assert torch.allclose(loctune_loss(LossConfig("ce")), model_loss, atol=1e-4)
    one_hot = LossConfig("soft_ce", targets=TargetSpec("one_hot"))
    assert torch.allclose(loctune_loss(one_hot), model_loss, atol=1e-4)
    # targets built from the unquantised coordinates find them at every location label
    two_bin = loctune_loss(LossConfig("soft_ce", targets=TargetSpec("two_bin")))
    assert torch.isfinite(two_bin) and not torch.allclose(two_bin, model_loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_adamw_steps_lower_the_loss(family, checkpoints):
    torch.manual_seed(0)
    adapter = load_adapter(checkpoints[family])
    adapter.model.train()
    batch = adapter.collate(_samples())
    optimiser = torch.optim.AdamW(
        [p for p in adapter.model.parameters() if p.requires_grad], lr=3e-3
    )
    losses = []
    for _ in range(4):
        loss = _ce(adapter, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_returns_decodable_generations(family, checkpoints):
    adapter = load_adapter(checkpoints[family])
    samples = _samples()
    gens = adapter.generate(samples, max_new_tokens=5)
    assert len(gens) == len(samples)
    for gen, sample in zip(gens, samples, strict=True):
        assert 1 <= len(gen.token_ids) <= 5
        assert len(gen.token_logprobs) == len(gen.token_ids)
        assert all(lp <= 0 and math.isfinite(lp) for lp in gen.token_logprobs)
        assert gen.loc_probs.shape == (len(gen.token_ids), len(adapter.loc_token_ids))
        assert (gen.loc_probs.sum(-1) <= 1 + 1e-5).all()
        # random weights write garbage: the text still spells the location tokens generated,
        # which is what the evaluator aligns objects by
        index = {t: k for k, t in enumerate(adapter.loc_token_ids)}
        generated = [index[t] for t in gen.token_ids if t in index]
        assert adapter.codec.location_indices(gen.text) == generated
        result = adapter.codec.decode(gen.text, sample.image_size)
        assert len(result.spans) == len(result.detections)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_logprobs_are_the_models(family, checkpoints):
    """Teacher-forcing the generated tokens gives back the recorded log-probabilities."""
    adapter = load_adapter(checkpoints[family])
    sample = _samples()[0]
    gen = adapter.generate([sample], max_new_tokens=4)[0]
    ids = torch.tensor([gen.token_ids])
    batch = adapter.collate([sample], train=False)
    if adapter.is_encoder_decoder:
        start = adapter.model.config.get_text_config().decoder_start_token_id
        batch["decoder_input_ids"] = torch.cat([torch.tensor([[start]]), ids[:, :-1]], dim=1)
        first = 0
    else:
        first = batch["input_ids"].shape[1] - 1
        batch["input_ids"] = torch.cat([batch["input_ids"], ids], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(ids)], dim=1)
        for key, fill in adapter.token_fields.items():
            batch[key] = torch.cat([batch[key], torch.full_like(ids, fill)], dim=1)
    with torch.no_grad():
        logprobs = adapter.forward(batch).float().log_softmax(-1)[0]
    rescored = [logprobs[first + i, t].item() for i, t in enumerate(gen.token_ids)]
    assert rescored == pytest.approx(gen.token_logprobs, abs=1e-4)
    loc = logprobs[first : first + len(gen.token_ids)][:, adapter.loc_token_ids].exp()
    assert torch.allclose(loc, gen.loc_probs, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_full_model(family, checkpoints, tmp_path):
    adapter = load_adapter(checkpoints[family])
    batch = adapter.collate(_samples())
    with torch.no_grad():
        for p in adapter.model.parameters():  # make the weights differ from the checkpoint's
            p.add_(0.01 * torch.randn_like(p))
        embeddings = adapter.model.get_input_embeddings()
        if embeddings.padding_idx is not None:  # some loaders re-zero the padding row
            embeddings.weight[embeddings.padding_idx] = 0
        before = adapter.forward(batch)
    adapter.save_pretrained(str(tmp_path))
    assert detect_family(str(tmp_path)) == adapter_class(family).family
    reloaded = load_adapter(str(tmp_path))
    with torch.no_grad():
        after = reloaded.forward(reloaded.collate(_samples()))
    assert torch.allclose(before, after, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_saves_and_reloads(family, checkpoints, tmp_path):
    torch.manual_seed(0)
    adapter = load_adapter(checkpoints[family], lora={"r": 4, "alpha": 8, "dropout": 0.0})
    trainable = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    vision = adapter.vision_tower_path
    assert not any(f"{vision}." in n and "lora_" in n for n in trainable)  # language model only
    batch = adapter.collate(_samples())
    optimiser = torch.optim.AdamW(
        [p for p in adapter.model.parameters() if p.requires_grad], lr=1e-2
    )
    losses = []
    for _ in range(4):
        loss = _ce(adapter, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    adapter.model.eval()
    with torch.no_grad():
        before = adapter.forward(batch)
    adapter.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_config.json").exists()
    reloaded = load_adapter(str(tmp_path))
    reloaded.model.eval()
    with torch.no_grad():
        after = reloaded.forward(reloaded.collate(_samples()))
    assert torch.allclose(before, after, atol=1e-5)


def test_freeze_vision_and_gradient_checkpointing(checkpoints):
    adapter = load_adapter(
        checkpoints["paligemma"], freeze_vision=True, gradient_checkpointing=True
    )
    frozen = [p.requires_grad for n, p in adapter.model.named_parameters() if "vision_tower" in n]
    assert frozen and not any(frozen)
    model = adapter.model
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    adapter.model.train()
    _ce(adapter, adapter.collate(_samples())).backward()
    assert adapter.model.lm_head.weight.grad is not None


def test_paligemma_collate_agrees_with_processor_suffix(checkpoints):
    """Our prompt + answer layout is what PaliGemma's processor builds from ``suffix=``."""
    adapter = load_adapter(checkpoints["paligemma"])
    samples = _samples()
    ours = adapter.collate(samples)
    theirs = adapter.processor(
        text=[adapter.prompt_text(s) for s in samples],
        images=[s.load_image() for s in samples],
        suffix=[adapter.answer_text(s) for s in samples],
        padding="longest",
        return_tensors="pt",
    )
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    theirs_labels = torch.where(theirs["attention_mask"].bool(), theirs["labels"], -100)
    assert torch.equal(ours["labels"], theirs_labels)


def test_qlora_is_gated_on_cuda_and_bitsandbytes(checkpoints):
    path = checkpoints["paligemma"]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            load_adapter(path, lora={"qlora": True})
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(RuntimeError, match="bitsandbytes"):
            load_adapter(path, lora={"qlora": True})
        return
    adapter = load_adapter(path, lora={"qlora": True}, dtype="bf16")
    assert any(type(m).__name__ == "Linear4bit" for m in adapter.model.modules())
    _ce(adapter, adapter.collate(_samples())).backward()


def test_bad_options_and_unknown_families_are_named(checkpoints):
    with pytest.raises(TypeError, match="unknown adapter options"):
        load_adapter(checkpoints["paligemma"], learning_rate=1.0)
    with pytest.raises(ValueError, match="no adapter for 'llama'"):
        load_adapter("llama", checkpoints["paligemma"])
    with pytest.raises(ValueError, match="dtype"):
        load_adapter(checkpoints["paligemma"], dtype="fp8")
    adapter = load_adapter(checkpoints["paligemma"])
    bad = _samples()
    bad[1].task = "segmentation"
    with pytest.raises(ValueError, match="sample 1: task must be one of"):
        adapter.collate(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["paligemma", "florence2"])
def test_bf16_on_cuda_trains_and_generates(family, checkpoints):
    adapter = load_adapter(checkpoints[family], dtype="bf16", device="cuda", lora=True)
    assert adapter.device.type == "cuda" and adapter.dtype == torch.bfloat16
    batch = adapter.collate(_samples())
    _ce(adapter, batch).backward()
    gens = adapter.generate(_samples(), max_new_tokens=3)
    assert all(len(g.token_ids) == len(g.token_logprobs) for g in gens)


def test_added_location_tokens_start_at_their_numbers_embedding(checkpoints):
    """A new bin token begins as the mean embedding of the digits of its number."""
    adapter = load_adapter(checkpoints["idefics3"])
    tok = adapter.tokenizer
    assert len(adapter.added_tokens) == len(adapter.codec.location_tokens)
    embeddings = adapter.model.get_input_embeddings().weight
    assert embeddings.shape[0] >= len(tok)
    for token in (adapter.added_tokens[7], adapter.added_tokens[512]):
        number = re.findall(r"\d+", token)[-1]
        pieces = tok(number, add_special_tokens=False)["input_ids"]
        expected = embeddings[pieces].mean(0)
        assert torch.allclose(embeddings[tok.convert_tokens_to_ids(token)], expected, atol=1e-6)
    near, far = (embeddings[tok.convert_tokens_to_ids(adapter.added_tokens[k])] for k in (7, 512))
    assert not torch.allclose(near, far)


def test_qwen2vl_plain_text_codec_has_no_location_tokens(checkpoints):
    if "qwen2vl" not in list_codecs():
        pytest.skip("codec 'qwen2vl' not available yet")
    adapter = load_adapter(checkpoints["qwen2_vl"], codec="qwen2vl")
    assert adapter.loc_token_ids == [] and adapter.added_tokens == []
    batch = adapter.collate(_samples())
    assert batch["loc_continuous"].isnan().all()  # soft targets do not apply
    assert (batch["labels"] != -100).any()
    gens = adapter.generate(_samples()[:1], max_new_tokens=3)
    assert gens[0].loc_probs is None


@pytest.mark.parametrize(("family", "lora"), [("paligemma", False), ("kosmos2", True)])
def test_train_loop_and_evaluation_run_on_hf_adapters(family, lora, checkpoints, tmp_path):
    """loctune's loop trains a hub VLM with soft targets; the evaluator scores its answers."""
    from loctune.evaluate import evaluate
    from loctune.train import TrainConfig, train

    adapter = load_adapter(checkpoints[family], lora=lora)
    config = TrainConfig(
        run_dir=str(tmp_path / "run"),
        steps=3,
        batch_size=2,
        lr=1e-3,
        progress=False,
        loss=LossConfig("soft_ce", targets=TargetSpec("distance_inverse")),
    )
    result = train(adapter, _samples() * 2, config)
    assert result.step == 3 and math.isfinite(result.metrics["loss"])
    scored = evaluate(adapter, _samples(), batch_size=2, max_new_tokens=6, progress=False)
    assert len(scored.predictions) == 2 and scored.metrics
