"""What the training loop and the evaluator need from any model, ours or a hub VLM.

An adapter owns a model, its tokenizer/processor and its codec. It turns
``Sample``s into tensors (``collate``), logits (``forward``) and, at
evaluation, generations with per-token probabilities (``generate``). The loop
and the evaluator never look inside a model family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from loctune.codecs import Codec
from loctune.types import Sample


@dataclass
class Generation:
    """One generated answer with what scoring and expected-value decoding need.

    ``token_logprobs[i]`` is log p of ``token_ids[i]`` under the model;
    ``loc_probs[i]`` is the model's distribution restricted to the location
    tokens at step i (probabilities under the full-vocabulary softmax, so rows
    sum to the location mass), or None when not recorded. ``first_logprobs``
    is the full-vocabulary distribution of the first step, for scoring answers
    that one token decides (good vs defective), or None when not recorded.
    """

    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    loc_probs: torch.Tensor | None = None  # [len(token_ids), n_loc]
    first_logprobs: torch.Tensor | None = None  # [V]


class VLMAdapter(ABC):
    """Model + processor + codec behind one interface.

    ``collate`` returns model inputs plus ``labels`` ([B, S], -100 on prompt and
    padding, aligned with the input ids for causal models and with the decoder
    ids for encoder-decoders) and ``loc_continuous`` ([B, S, space.dim], NaN at
    non-location positions) for targets that use unquantised coordinates.
    ``forward`` returns logits ``[B, S, V]`` aligned with ``labels`` in the
    same convention: causal logits still need the one-position shift, which
    the loss applies when ``is_encoder_decoder`` is False.
    """

    codec: Codec
    model: nn.Module
    is_encoder_decoder: bool = False

    @property
    @abstractmethod
    def loc_token_ids(self) -> list[int]:
        """Vocabulary ids of ``codec.location_tokens``, in order."""

    @abstractmethod
    def collate(self, samples: list[Sample], train: bool = True) -> dict[str, torch.Tensor]:
        """Tensors for a batch; with ``train=False`` only the prompt (for generation)."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, S, V]`` for a collated training batch."""

    @abstractmethod
    def generate(self, samples: list[Sample], max_new_tokens: int = 32) -> list[Generation]:
        """Greedy answers for the samples' prompts, with token log-probabilities."""

    @abstractmethod
    def save_pretrained(self, path: str) -> None:
        """Write weights and configs so that the family's loader reopens them."""
