"""The small VLM on a pretrained timm backbone: features, cache, vocabulary, saving, pretraining."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from loctune.data.synthetic import make_split
from loctune.models.small_vlm import SmallVLM, sincos_features, sincos_positions_2d
from loctune.models.small_vlm_adapter import SmallVLMAdapter

# The pretrained preset at 64 px: a 4x4 stride-16 grid, 2x2 pixel shuffle -> 4 image tokens.
SMALL = dict(image_size=64, text_width=64, text_depth=1, text_heads=2, max_positions=96)


@pytest.fixture(scope="module")
def samples():
    return [
        *make_split("grounding", "train", 4, image_size=64),
        *make_split("detection", "train", 2, image_size=64),
        *make_split("caption", "train", 2, image_size=64),
        *make_split("counting", "train", 2, image_size=64),
    ]


@pytest.fixture(scope="module")
def adapter(samples):
    return SmallVLMAdapter.build(
        "rowcol:grid=8", samples=samples, config="pretrained", seed=0, **SMALL
    )


def test_backbone_holds_the_packaged_imagenet_weights(adapter):
    from loctune.models.backbones import packaged_state_dict

    stem = packaged_state_dict()["conv_stem.weight"]
    assert torch.equal(adapter.model.vision.backbone.conv_stem.weight, stem)
    # rebuilding without pretrained parts (what from_pretrained does) starts elsewhere
    fresh = SmallVLM(adapter.config)
    assert not torch.equal(fresh.vision.backbone.conv_stem.weight, stem)


def test_two_stages_merge_on_the_finest_grid(adapter):
    vision = adapter.model.vision
    assert vision.width == 112 + 320
    pixels = torch.randn(2, 3, 64, 64)
    tokens = vision.encode(pixels)
    assert tokens.shape == (2, 16, 432)  # 4x4 grid at stride 16
    s16, s32 = vision.backbone(pixels)
    # the stride-32 map (2x2) is repeated over the 2x2 stride-16 cells it covers
    assert torch.equal(tokens[0, 0, 112:], s32[0, :, 0, 0])
    assert torch.equal(tokens[0, 5, 112:], s32[0, :, 0, 0])
    assert torch.equal(tokens[0, 15, 112:], s32[0, :, 1, 1])
    assert torch.equal(tokens[0, 6, :112], s16[0, :, 1, 2])


def test_batch_norm_statistics_stay_pretrained_in_training_mode(adapter):
    model = adapter.model
    model.train()
    bn = model.vision.backbone.bn1
    before = bn.running_mean.clone()
    model.vision.requires_grad_(True)
    model.vision(torch.randn(4, 3, 64, 64) * 3)
    model.vision.requires_grad_(False)
    assert not bn.training and torch.equal(bn.running_mean, before)


def test_feature_cache_hits_misses_and_invalidation(adapter, samples):
    model = adapter.model
    vision = model.vision
    model.vision.requires_grad_(False)
    vision.cache.clear()
    vision.cache.hits = vision.cache.misses = 0
    batch = adapter.collate(samples[:4])
    first = vision(batch["pixel_values"])
    again = vision(batch["pixel_values"])
    assert (vision.cache.hits, vision.cache.misses) == (4, 4)
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(first, vision.encode(batch["pixel_values"]))
    # other pre-processing (another normalisation) of the same images misses
    vision(batch["pixel_values"] * 0.9)
    assert vision.cache.misses == 8
    # new weights invalidate every entry
    with torch.no_grad():
        vision.backbone.conv_stem.weight.mul_(1.01)
    changed = vision(batch["pixel_values"])
    assert vision.cache.misses == 12 and not torch.allclose(changed, first)
    # a trainable backbone bypasses the cache and gets gradients
    model.vision.requires_grad_(True)
    vision(batch["pixel_values"][:1]).sum().backward()
    assert vision.cache.misses == 12 and vision.backbone.conv_stem.weight.grad is not None
    model.zero_grad(set_to_none=True)
    model.vision.requires_grad_(False)


def test_features_cached_under_autocast_serve_a_float32_call(adapter, samples):
    model = adapter.model
    model.vision.requires_grad_(False)
    model.vision.cache.clear()
    model.vision.cache.hits = model.vision.cache.misses = 0
    batch = adapter.collate(samples[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.embed(batch["input_ids"], batch["pixel_values"])
    # a full-precision call neither fails on bf16 features nor reuses them
    full = model.embed(batch["input_ids"], batch["pixel_values"])
    assert full.dtype == torch.float32 and model.vision.cache.misses == 4
    model.vision.cache.clear()
    torch.testing.assert_close(model.embed(batch["input_ids"], batch["pixel_values"]), full)


def test_cache_is_bounded():
    from loctune.models.timm_encoder import FeatureCache

    cache = FeatureCache(max_mb=1)
    encode = lambda x: x.flatten(1)[:, None, :].repeat(1, 64, 1)  # noqa: E731  64 KiB per image
    cache(torch.randn(40, 1, 16, 16), encode, version=0)
    assert cache.bytes <= 2**20 and 0 < len(cache.entries) < 40


def test_location_tokens_start_as_a_smooth_code_of_their_position(adapter):
    loc = adapter.loc_token_ids
    emb = adapter.model.input_embeddings().weight.detach()[loc]
    sim = torch.nn.functional.cosine_similarity(emb[:1], emb, dim=1)
    assert sim[1] > sim[4] > sim[7]  # neighbouring bins closer than far ones
    assert sincos_positions_2d(4, 16).shape == (16, 16)
    torch.testing.assert_close(
        sincos_features(torch.tensor([[0.0, 0.0]]), 8)[0, :2], torch.zeros(2)
    )


def test_caption_and_counting_answers_are_supervised_text(adapter, samples):
    caption = next(s for s in samples if s.task == "caption")
    count = next(s for s in samples if s.task == "counting")
    assert caption.meta["answer"].startswith("a ") and not caption.boxes
    assert count.meta["answer"].isdigit() and count.prompt.startswith("count ")
    batch = adapter.collate([caption, count])
    supervised = batch["labels"][1][batch["labels"][1] != -100].tolist()
    tok = adapter.tokenizer
    assert tok.decode(supervised) == count.meta["answer"] and supervised[-1] == tok.eos_id


def test_save_reload_extend_vocabulary_and_record(adapter, samples, tmp_path):
    adapter.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["vision_stem"] == "timm" and config["vision_stages"] == [3, 4]
    again = SmallVLMAdapter.from_pretrained(tmp_path / "m")
    batch = adapter.collate(samples[:2])
    adapter.model.eval(), again.model.eval()
    torch.testing.assert_close(again.forward(batch), adapter.forward(batch))
    # a target set with new words: they join the vocabulary, old ids and logits stay
    new = replace(samples[0], prompt="the raccoon", labels=["raccoon"])
    added = again.extend_vocabulary([new])
    assert added == ["raccoon"]
    assert again.tokenizer.encode("the raccoon")[1] == len(again.tokenizer) - 1
    torch.testing.assert_close(again.forward(batch)[..., : len(adapter.tokenizer)],
                               adapter.forward(batch))
    again.collate([new])  # no longer outside the vocabulary
    assert again.extend_vocabulary([new]) == []


PRETRAIN_ARGS = [
    "model_overrides.image_size=64", "model_overrides.text_width=64",
    "model_overrides.text_depth=1", "model_overrides.text_heads=2",
    "model_overrides.max_positions=96", "codec=rowcol:grid=8", "source.image_size=64",
    "source.caption=16",
    "source.grounding=16", "source.detection=8", "source.counting=8", "source.n_test=4",
    "align.steps=2", "align.batch_size=8", "multitask.steps=3", "multitask.batch_size=8",
    "multitask.warmup_steps=0", "align.warmup_steps=0", "align.progress=false",
    "multitask.progress=false",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny ``loctune pretrain`` run (both stages, a few steps each)."""
    from loctune.cli import main

    out = tmp_path_factory.mktemp("pretrain") / "pt"
    assert main(["pretrain", "--out", str(out), *PRETRAIN_ARGS]) == 0
    return out


def test_pretrain_stages_resume_and_record_sources(pretrained):
    from loctune.cli import main
    from loctune.pretrain import SOURCE_NAME

    out = pretrained
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"grounding", "detection", "grounding_mean_box"}
    assert 0 <= metrics["grounding"]["acc50"] <= 1
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["trained_on"] == [SOURCE_NAME]
    # stage 1 trained the projector (and the own decoder), never the backbone
    stage1 = SmallVLMAdapter.from_pretrained(out / "align" / "model").model
    final = SmallVLMAdapter.from_pretrained(out / "model").model
    fresh = SmallVLMAdapter.build("rowcol:grid=8",
                                  samples=make_split("caption", "train", 2, image_size=64),
                                  config="pretrained", seed=0, **SMALL).model
    stem = fresh.vision.backbone.conv_stem.weight
    assert torch.equal(stage1.vision.backbone.conv_stem.weight, stem)
    assert torch.equal(final.vision.backbone.conv_stem.weight, stem)
    assert not torch.equal(stage1.projector.proj[0].weight, final.projector.proj[0].weight)
    # a rerun skips both finished stages and scores again
    mtime = (out / "model" / "model.safetensors").stat().st_mtime
    assert main(["pretrain", "--out", str(out), *PRETRAIN_ARGS]) == 0
    assert (out / "model" / "model.safetensors").stat().st_mtime == mtime
    assert "Acc@0.5" in (out / "report.md").read_text()


def test_stage_three_train_eval_predict_from_the_checkpoint(pretrained, tmp_path, capsys):
    """``loctune train --model DIR`` fine-tunes a pretrained checkpoint on a new task with new
    words, and ``eval`` / ``predict`` open the result."""
    from PIL import Image

    from loctune.cli import main

    data = tmp_path / "refs.jsonl"
    rows = []
    for i, split in enumerate(("train", "train", "val", "test")):
        image = tmp_path / f"{'abcd'[i]}.png"
        Image.new("RGB", (80, 60), ("white", "grey", "black", "red")[i]).save(image)
        rows.append({"image": str(image), "expression": "the zebra",
                     "box": [10 + i, 10, 40, 30], "split": split})
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    runs = tmp_path / "runs"
    # a folder whose name starts with "small" is still a checkpoint, not a preset
    checkpoint = tmp_path / "small_runs" / "exp"
    shutil.copytree(pretrained / "model", checkpoint)
    assert main(["train", "--model", str(checkpoint), "--data", str(data),
                 "--project", str(runs), "--steps", "2", "--batch", "2",
                 "--max-new-tokens", "6", "freeze=[vision.*]"]) == 0
    assert "added" in capsys.readouterr().out  # "zebra" is new
    model = runs / "exp" / "model"
    saved = json.loads((model / "config.json").read_text())
    assert saved["trained_on"][-1] == str(data) and len(saved["trained_on"]) == 2
    assert main(["eval", "--model", str(model), "--data", str(data), "--split", "test",
                 "--project", str(tmp_path / "eval"), "--max-new-tokens", "6"]) == 0
    assert "acc50" in json.loads((tmp_path / "eval" / "exp" / "metrics.json").read_text())
    assert main(["predict", str(image), "--model", str(model), "--prompt", "the zebra",
                 "--project", str(tmp_path / "pred"), "--max-new-tokens", "6"]) == 0
    assert (tmp_path / "pred" / "exp" / "d.png").is_file()


@pytest.mark.parametrize("codec", ["rowcol:grid=8", "patch:grid=4", "bins:n_bins=16"])
def test_every_codec_form_trains_and_decodes(samples, codec, tmp_path):
    from loctune.train import TrainConfig, train

    boxed = [s for s in samples if s.boxes]
    adapter = SmallVLMAdapter.build(codec, samples=boxed, config="pretrained",
                                    seed=0, **SMALL)
    result = train(adapter, boxed, TrainConfig(run_dir=str(tmp_path), steps=2, batch_size=4,
                                               lr=1e-3, freeze=["vision.*"], progress=False))
    assert result.metrics["loss"] > 0
    (g,) = adapter.generate(boxed[:1], max_new_tokens=12)
    assert isinstance(adapter.codec.decode(g.text, boxed[0].image_size).detections, list)


def test_mean_box_baseline_on_grounding_and_detection():
    from loctune.baselines import mean_box_scores
    from loctune.types import Sample

    def sample(box, task="grounding", label="dog"):
        return Sample(image="x.png", prompt="p", boxes=[box], labels=[label], task=task,
                      meta={"image_size": (100, 100)})

    train = [sample((0, 0, 50, 50)), sample((50, 50, 100, 100))]  # mean box (25, 25, 75, 75)
    test = [sample((25, 25, 75, 75)), sample((0, 0, 10, 10)),
            sample((25, 25, 75, 75), "detection"), sample((0, 0, 10, 10), "detection", "cat")]
    scores = mean_box_scores(train, test)
    assert scores["acc50"] == 0.5 and scores["miou"] == pytest.approx(0.5)
    # "dog" (the prior) hits its one box, AP 1; "cat" is never predicted, AP 0
    assert scores["ap50"] == pytest.approx(0.5)


def test_projector_positions_tell_identical_features_apart(adapter):
    projector = adapter.model.projector
    assert adapter.config.projector_positions
    same = torch.ones(1, 16, 432)  # every cell the same feature
    out = projector(same)[0]
    assert out.shape == (4, 64) and not torch.allclose(out[0], out[1])
    off = SmallVLM(replace(adapter.config, projector_positions=False)).projector
    off.load_state_dict(projector.state_dict())
    plain = off(same)[0]
    torch.testing.assert_close(plain[0], plain[3])

