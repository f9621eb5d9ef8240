import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from loctune.codecs import get_codec
from loctune.data.synthetic import make_detection_split, make_grounding_split, synthetic_vocabulary
from loctune.models.small_vlm import SmallVLM, SmallVLMConfig, small_vlm_config
from loctune.models.small_vlm_adapter import SmallVLMAdapter, preprocess_image
from loctune.models.tokenizer import WordTokenizer

GRID = 8
CODECS = [f"rowcol:grid={GRID}", f"patch:grid={GRID}"]


@pytest.fixture(scope="module")
def samples():
    return make_grounding_split("train", 6, seed=0, image_size=64)


def build(codec=f"rowcol:grid={GRID}", samples=()) -> SmallVLMAdapter:
    torch.manual_seed(0)
    return SmallVLMAdapter.build(
        codec,
        texts=synthetic_vocabulary(),
        samples=samples,
        config="tiny",
    )


def test_tokenizer_round_trip_unknown_words_and_files(tmp_path):
    tok = WordTokenizer.from_texts(
        ["the red circle", "detect star ; 3"], extra_tokens=["<b_0>", "<b_1>"]
    )
    ids = tok.encode("The RED circle <b_1><b_0> zebra 3")
    assert ids[-2] == tok.unk_id and tok.vocab[ids[-1]] == "3"
    assert tok.decode(ids) == "the red circle <b_1><b_0> <unk> 3"
    assert tok.decode([tok.bos_id, *ids[:2], tok.eos_id, 10_000]) == "the red <unk>"
    assert tok.convert_tokens_to_ids(["<b_0>", "<b_1>"]) == [
        6,
        7,
    ]  # extras right after the specials
    tok.save_pretrained(tmp_path)
    assert WordTokenizer.from_pretrained(tmp_path).vocab == tok.vocab
    (tmp_path / "tokenizer.json").write_text(json.dumps({"vocab": "oops"}))
    with pytest.raises(ValueError, match="tokenizer.json"):
        WordTokenizer.from_pretrained(tmp_path)


def test_class_names_with_digits_and_hyphens_stay_one_word_and_decode_as_written():
    """Real datasets' names (microcontroller, NEU-DET): split at a digit or hyphen, they
    decode as "heltec_esp 32 lora" and match no class."""
    names = ["Heltec_ESP32_Lora", "ESP8266", "Raspberry_Pi_3", "rolled-in_scale"]
    text = "detect " + " ; ".join(names)
    assert WordTokenizer.split(text) == ["detect", "heltec_esp32_lora", ";", "esp8266", ";",
                                         "raspberry_pi_3", ";", "rolled-in_scale"]
    tok = WordTokenizer.from_texts([text], extra_tokens=["<b_0>"])
    assert tok.decode(tok.encode("ESP8266 <b_0> rolled-in_scale")) == (
        "esp8266 <b_0> rolled-in_scale")
    assert WordTokenizer.split("2 squares, x-") == ["2", "squares", ",", "x", "-"]


@pytest.mark.parametrize("codec", CODECS)
def test_collate_labels_and_continuous_locations(samples, codec):
    adapter = build(codec)
    batch = adapter.collate(samples[:3])
    ids, labels, cont = batch["input_ids"], batch["labels"], batch["loc_continuous"]
    b, s = ids.shape
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert labels.shape == (b, s) and cont.shape[:2] == (b, s)
    n_img = adapter.config.n_image_tokens
    assert (labels[:, : n_img + 1] == -100).all()  # image placeholders and bos never supervised
    loc_ids = torch.tensor(adapter.loc_token_ids)
    is_loc = torch.isin(labels, loc_ids)
    assert torch.equal(is_loc, ~cont.isnan().any(-1))
    assert (is_loc.sum(1) == adapter.codec.tokens_per_box).all()
    for row, sample in enumerate(samples[:3]):
        answer = labels[row][labels[row] != -100].tolist()
        assert answer[-1] == adapter.tokenizer.eos_id
        decoded = adapter.codec.decode(adapter.tokenizer.decode(answer), sample.image_size)
        assert len(decoded) == 1
        # labels sit on the ids (causal shift applied by the loss), padding is unsupervised
        supervised = labels[row] != -100
        assert torch.equal(ids[row][supervised], labels[row][supervised])
        assert (labels[row][batch["attention_mask"][row] == 0] == -100).all()
    logits = adapter.forward(batch)
    assert logits.shape == (b, s, len(adapter.tokenizer))


def test_detection_answers_hold_every_box():
    data = make_detection_split("train", 4, seed=0)
    adapter = build(samples=data)
    batch = adapter.collate(data)
    n_loc = torch.isin(batch["labels"], torch.tensor(adapter.loc_token_ids)).sum(1)
    assert n_loc.tolist() == [adapter.codec.tokens_per_box * len(s.boxes) for s in data]


@pytest.mark.parametrize("codec", CODECS)
def test_continuous_locations_follow_the_codecs_spans(codec):
    one = make_detection_split("train", 1, seed=1)[0]
    w, h = one.image_size
    boxes = [
        (0.1 * w, 0.2 * h, 0.5 * w, 0.6 * h),
        (0.55 * w, 0.1 * h, 0.9 * w, 0.3 * h),
        one.boxes[0],
    ]
    many = replace(one, boxes=boxes, labels=[one.labels[0]] * 3)
    adapter = build(codec, samples=[many])
    batch = adapter.collate([many, one])
    loc = torch.isin(batch["labels"], torch.tensor(adapter.loc_token_ids))
    for row, s in enumerate([many, one]):
        spans = adapter.codec.encode_spans(s.boxes, s.labels, s.image_size).spans
        want = [
            v
            for sp in spans
            for v in adapter.codec.box_to_continuous(s.boxes[sp.index], s.image_size)
        ]
        assert len(want) == adapter.codec.tokens_per_box * len(s.boxes)
        torch.testing.assert_close(batch["loc_continuous"][row][loc[row]], torch.tensor(want))


def test_answer_with_unknown_words_is_a_clear_error(samples):
    adapter = build()
    bad = make_grounding_split("train", 1)[0]
    bad.labels = ["unicorn"]
    with pytest.raises(ValueError, match="unicorn"):
        adapter.collate([samples[0], bad])


def test_a_few_steps_lower_the_loss(samples):
    adapter = build()
    batch = adapter.collate(samples)
    opt = torch.optim.AdamW(adapter.model.parameters(), lr=5e-3)

    def loss_now():
        logits = adapter.forward(batch)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())

    first = loss_now().item()
    for _ in range(12):
        opt.zero_grad()
        loss = loss_now()
        loss.backward()
        opt.step()
    assert loss_now().item() < 0.5 * first


def test_save_load_gives_identical_logits_and_codec(tmp_path, samples):
    adapter = build()
    batch = adapter.collate(samples[:2])
    adapter.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json", "adapter.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    again = SmallVLMAdapter.from_pretrained(tmp_path)
    assert again.codec.location_tokens == adapter.codec.location_tokens
    adapter.model.eval()
    again.model.eval()
    assert torch.equal(adapter.forward(batch), again.forward(batch))
    tied = again.model.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert tied
    with pytest.raises(ValueError, match="location tokens"):
        SmallVLMAdapter.from_pretrained(tmp_path, codec=get_codec("rowcol", grid=GRID - 1))


def test_loading_a_mismatched_checkpoint_fails_clearly(tmp_path):
    model = SmallVLM(small_vlm_config("tiny", vocab_size=40))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "text_depth": 3}))
    with pytest.raises(ValueError, match="does not match"):
        SmallVLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "colour": 1}))
    with pytest.raises(ValueError, match="colour"):
        SmallVLM.from_pretrained(tmp_path)


def prompts(
    n: int, vocab: int, n_img: int, lengths: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch of ``<image>*n_img`` + random text of the given lengths."""
    g = torch.Generator().manual_seed(1)
    width = n_img + max(lengths)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, :n_img] = 5
        ids[i, n_img : n_img + length] = torch.randint(6, vocab, (length,), generator=g)
        mask[i, : n_img + length] = 1
    return ids, mask, torch.randn(n, 3, 32, 32, generator=g)


def test_cached_generation_equals_uncached_recomputation():
    torch.manual_seed(0)
    model = SmallVLM(small_vlm_config("tiny", vocab_size=30)).eval()
    ids, mask, pixels = prompts(3, 30, model.config.n_image_tokens, [2, 5, 3])
    kwargs = dict(eos_token_id=2, pad_token_id=0, max_new_tokens=12)
    cached = model.generate(ids, pixels, mask, **kwargs)
    plain = model.generate(ids, pixels, mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, plain.sequences)
    assert torch.allclose(cached.logprobs, plain.logprobs, atol=1e-5)


def test_padding_side_does_not_change_generation():
    torch.manual_seed(0)
    model = SmallVLM(small_vlm_config("tiny", vocab_size=30)).eval()
    lengths = [2, 6, 4]
    ids, mask, pixels = prompts(3, 30, model.config.n_image_tokens, lengths)
    kwargs = dict(eos_token_id=2, pad_token_id=0, max_new_tokens=8)
    right = model.generate(ids, pixels, mask, **kwargs)
    order = torch.argsort(mask, dim=1, stable=True)
    left = model.generate(ids.gather(1, order), pixels, mask.gather(1, order), **kwargs)
    assert torch.equal(right.sequences, left.sequences)
    for i, length in enumerate(lengths):
        n = model.config.n_image_tokens + length
        alone = model.generate(ids[i : i + 1, :n], pixels[i : i + 1], None, **kwargs)
        k = alone.sequences.shape[1]
        assert torch.equal(alone.sequences[0], right.sequences[i, :k])
        assert torch.allclose(alone.logprobs[0], right.logprobs[i, :k], atol=1e-4)


def test_generation_never_emits_an_image_placeholder():
    """A generated <image> would need pixel values; an untrained model may prefer it."""
    torch.manual_seed(0)
    model = SmallVLM(small_vlm_config("tiny", vocab_size=30)).eval()
    image_id = model.config.image_token_id

    def prefer_image(module, args, out):
        out.logits[..., image_id] += 1e4

    model.register_forward_hook(prefer_image)
    ids, mask, pixels = prompts(2, 30, model.config.n_image_tokens, [2, 4])
    for use_cache in (True, False):
        gen = model.generate(ids, pixels, mask, eos_token_id=2, pad_token_id=0,
                             max_new_tokens=5, use_cache=use_cache)
        assert gen.sequences.shape == (2, 5) and not (gen.sequences == image_id).any()
        assert torch.isfinite(gen.logprobs.gather(2, gen.sequences[..., None])).all()


def test_generate_fills_generation_fields(samples):
    adapter = build()
    gens = adapter.generate(samples[:3], max_new_tokens=6)
    assert len(gens) == 3
    n_loc = len(adapter.loc_token_ids)
    for g in gens:
        assert 1 <= len(g.token_ids) == len(g.token_logprobs) <= 6
        assert g.loc_probs.shape == (len(g.token_ids), n_loc)
        assert (g.loc_probs.sum(1) <= 1 + 1e-5).all()
        assert all(lp <= 0 for lp in g.token_logprobs)
        assert isinstance(g.text, str)
    assert adapter.model.training  # generate restores the mode it found


@pytest.mark.parametrize(
    "overrides",
    [
        dict(vision_stem="patch", vision_positions="learned"),
        dict(pixel_shuffle=2, projector="linear"),
        dict(image_size=64, patch_size=16, pixel_shuffle=2),
    ],
)
def test_variants_run_forward(overrides):
    cfg = small_vlm_config("tiny", vocab_size=20, **overrides)
    model = SmallVLM(cfg)
    n = cfg.n_image_tokens
    ids = torch.cat([torch.full((2, n), cfg.image_token_id), torch.randint(6, 20, (2, 4))], dim=1)
    logits = model(ids, torch.randn(2, 3, cfg.image_size, cfg.image_size)).logits
    assert logits.shape == (2, n + 4, 20) and logits.isfinite().all()


def test_image_placeholder_count_must_match_features():
    cfg = small_vlm_config("tiny", vocab_size=20)
    model = SmallVLM(cfg)
    ids = torch.full((1, cfg.n_image_tokens - 1), cfg.image_token_id)
    with pytest.raises(ValueError, match="<image>"):
        model(ids, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(patch_size=12), "patch_size"),
        (dict(vision_stem="vit"), "vision_stem"),
        (dict(text_width=66), "text_width"),
        (dict(max_positions=10), "max_positions"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        SmallVLMConfig(**overrides)
    with pytest.raises(ValueError, match="preset"):
        small_vlm_config("huge")


def test_default_preset_matches_the_calibrated_prototype():
    cfg = small_vlm_config()
    assert (cfg.vision_stem, cfg.vision_positions, cfg.grid_size) == ("conv", "sincos", 8)
    assert 1.0e6 < SmallVLM(small_vlm_config(vocab_size=100)).num_parameters() < 2.0e6
    assert 1.0e5 < SmallVLM(small_vlm_config("tiny", vocab_size=100)).num_parameters() < 5.0e5


def test_preprocess_image_is_pure_and_normalised(samples):
    image = samples[0].image
    before = image.tobytes()
    a = preprocess_image(image, 32, (0.5,) * 3, (0.5,) * 3)
    b = preprocess_image(image, 32, (0.5,) * 3, (0.5,) * 3)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert image.tobytes() == before and image.size == (64, 64)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_stem_content_is_not_drowned_by_positions_at_init(preset, samples):
    """Regression: with PyTorch's default conv init the stem's output varied ~40x less
    across images than the sin-cos positions, and the trained model ignored the image."""
    torch.manual_seed(0)
    model = SmallVLM(small_vlm_config(preset, vocab_size=100))
    cfg = model.config
    pixels = torch.stack(
        [preprocess_image(s.image, cfg.image_size, cfg.image_mean, cfg.image_std) for s in samples]
    )
    with torch.no_grad():
        content = model.vision.stem(pixels).flatten(2).transpose(1, 2)
    assert content.std(0).mean() > 0.25 * model.vision.positions.std()
