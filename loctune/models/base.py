"""What the training loop and the evaluator need from any model, ours or a hub VLM.

An adapter owns a model, its tokenizer/processor and its codec. It turns
``Sample``s into tensors (``collate``), logits (``forward``) and, at
evaluation, generations with per-token probabilities (``generate``). The loop
and the evaluator never look inside a model family; neither does in-context
inspection, which hands an adapter :class:`Turn`s (``generate_in_context``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from loctune.codecs import Codec
from loctune.types import Box, Sample


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


@dataclass
class Turn:
    """One turn of a multi-image in-context prompt, in a form no model family owns.

    ``images`` are shown with ``text`` (an adapter may leave the text out, as
    loctune's small VLM does); ``answer`` is the example's answer, or None for
    the query the model answers. ``boxes`` are the boxes the answer writes, in
    its order, each with the size of the image it is written on, so that an
    adapter trained in context can supervise their location tokens.
    """

    images: list[Image.Image]
    text: str = ""
    answer: str | None = None
    boxes: Sequence[tuple[Box, tuple[int, int]]] = ()


@dataclass
class InContextAnswer:
    """The greedy answer to an in-context prompt and how likely each choice was to start it.

    ``choice_logprobs[i]`` is log p(answer starts with ``choices[i]``), read at
    the first token where the choices differ; the tokens they share are fed to
    the model first and begin ``text``.
    """

    text: str
    choice_logprobs: list[float]


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

    def check_samples(self, samples: Sequence[Sample]) -> None:
        """Raise a clear error, before training, for samples this model cannot take (e.g. too
        long for its positions); by default every sample is accepted here and checked when
        it is collated."""
        return None

    @abstractmethod
    def generate(self, samples: list[Sample], max_new_tokens: int = 32) -> list[Generation]:
        """Greedy answers for the samples' prompts, with token log-probabilities."""

    def generate_in_context(
        self,
        prompts: Sequence[Sequence[Turn]],
        choices: Sequence[str] = (),
        max_new_tokens: int = 64,
    ) -> list[InContextAnswer]:
        """Greedy answers to the last turn of each prompt, shown after the turns before it.

        Every turn but the last carries its answer. Families that cannot take
        several images in one prompt keep this default, which refuses.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot answer multi-image in-context prompts; use a chat "
            "VLM (SmolVLM/Idefics3, Qwen2-VL) or loctune's small VLM"
        )

    @abstractmethod
    def save_pretrained(self, path: str) -> None:
        """Write weights and configs so that the family's loader reopens them."""
