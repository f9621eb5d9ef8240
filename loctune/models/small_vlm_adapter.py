"""The small VLM behind the :class:`VLMAdapter` interface: samples in, logits/generations out.

A sample's sequence is ``<image>*n <bos> prompt <sep> answer <eos>``, where
``answer`` is what the codec writes for the sample's boxes. Any interleaving
of images, text and answers (several images per sequence, e.g. in-context
examples each followed by its answer, then a query) goes through
:meth:`SmallVLMAdapter.collate_sequences`; samples are the one-image case.
Training batches are padded on the right; prompt-only batches for generation
on the left.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from loctune.codecs import Codec, get_codec
from loctune.config import ConfigError
from loctune.models.base import Generation, InContextAnswer, Turn, VLMAdapter
from loctune.models.padding import pad_with_mask
from loctune.models.small_vlm import (
    SmallVLM,
    SmallVLMConfig,
    init_location_rows,
    small_vlm_config,
)
from loctune.models.tokenizer import WordTokenizer
from loctune.types import IGNORE_INDEX, Box, DataError, Sample

ADAPTER_FILE = "adapter.json"


@dataclass
class Answer:
    """Supervised text of an interleaved sequence; an eos follows it.

    ``boxes`` are the boxes the text writes, in its order, each with the size
    (width, height) of the image it is written on (a crop's, for a tiled
    answer), so location tokens get their continuous positions and the text
    is checked against the codec.
    """

    text: str
    boxes: Sequence[tuple[Box, tuple[int, int]]] = ()


#: one piece of an interleaved sequence: an image, plain text (may hold ``<bos>``-style
#: special tokens) or an answer
Part = Image.Image | str | Answer


@dataclass
class _Encoded:
    """Ids of one sequence, its images in order, and (start, ids, continuous) per answer."""

    ids: list[int] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    answers: list[tuple[int, list[int], list[tuple[float, ...]]]] = field(default_factory=list)


def preprocess_image(
    image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``[3, size, size]`` float tensor: RGB, resized (aspect not kept), normalised per channel.

    Stretching is harmless for boxes: codecs quantise coordinates relative to
    the original width and height.
    """
    rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class SmallVLMAdapter(VLMAdapter):
    """:class:`SmallVLM` + :class:`WordTokenizer` + a codec (``rowcol``, ``patch``, ...).

    The codec's spec (``rowcol:grid=32``) is saved, with its location tokens, so
    that :meth:`from_pretrained` rebuilds the same codec and can tell when it does not.
    """

    is_encoder_decoder = False

    def __init__(
        self,
        model: SmallVLM,
        tokenizer: WordTokenizer,
        codec: Codec,
    ):
        missing = [t for t in codec.location_tokens if t not in tokenizer.token_to_id]
        if missing:
            raise ValueError(
                f"tokenizer lacks {len(missing)} location tokens of codec {codec.name!r}, "
                f"e.g. {missing[:3]}"
            )
        if model.config.vocab_size != len(tokenizer):
            raise ValueError(
                f"model vocab_size {model.config.vocab_size} != tokenizer size {len(tokenizer)}"
            )
        if model.config.image_token_id != tokenizer.image_id:
            raise ValueError(
                f"model image_token_id {model.config.image_token_id} != tokenizer "
                f"<image> id {tokenizer.image_id}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.codec = codec
        self._loc_ids = tokenizer.convert_tokens_to_ids(codec.location_tokens)
        self._loc_lookup = {token_id: k for k, token_id in enumerate(self._loc_ids)}

    @classmethod
    def build(
        cls,
        codec: str | Codec,
        texts: Iterable[str] = (),
        samples: Iterable[Sample] = (),
        config: SmallVLMConfig | str = "small",
        seed: int | None = None,
        **config_overrides: Any,
    ) -> SmallVLMAdapter:
        """A fresh model whose vocabulary covers ``texts`` and the prompts/answers of ``samples``.

        ``codec`` is a codec spec (``"rowcol:grid=16"``, see :func:`~loctune.codecs.get_codec`)
        or an instance; ``config`` a :class:`SmallVLMConfig` or a preset name.
        ``seed`` fixes the initial weights without touching the global RNG, so a
        run is reproducible from its config; None draws them from the global RNG.
        Pretrained parts named by the config (a timm backbone, a ``text_model``)
        are loaded with their weights; a ``text_model`` brings its own tokenizer,
        to which the codec's location tokens are added.
        """
        if isinstance(codec, str):
            codec = get_codec(codec)
        base = small_vlm_config(config) if isinstance(config, str) else config
        base = replace(base, **config_overrides)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            if base.text_model:
                from loctune.models.text_lm import (
                    LMTokenizer,
                    init_added_embeddings,
                    load_causal_lm,
                )

                lm, hf_tokenizer = load_causal_lm(base.text_model)
                tokenizer = LMTokenizer(hf_tokenizer, extra_tokens=codec.location_tokens)
                init_added_embeddings(lm, tokenizer, tokenizer.added)
                if codec.space is not None:  # digits plus position, before any LoRA wrapping
                    init_location_rows(
                        lm.get_input_embeddings().weight,
                        tokenizer.convert_tokens_to_ids(codec.location_tokens),
                        codec.space.coords(),
                        keep=0.5,
                    )
                base = replace(
                    base,
                    text_width=lm.config.hidden_size,
                    max_positions=lm.config.max_position_embeddings,
                    text_config=lm.config.to_dict(),
                    text_new_tokens=tuple(tokenizer.convert_tokens_to_ids(tokenizer.added)),
                )
            else:
                lm = None
                corpus = list(texts)
                for s in samples:
                    corpus.append(s.prompt)
                    corpus.append(_answer_text(s, codec))
                tokenizer = WordTokenizer.from_texts(corpus, extra_tokens=codec.location_tokens)
            model_config = replace(
                base, vocab_size=len(tokenizer), image_token_id=tokenizer.image_id
            )
            model = SmallVLM(model_config, text_lm=lm, pretrained_vision=True)
            if lm is None and codec.space is not None and base.location_init == "sincos":
                init_location_rows(
                    model.input_embeddings().weight,
                    tokenizer.convert_tokens_to_ids(codec.location_tokens),
                    codec.space.coords(),
                )
        return cls(model, tokenizer, codec)

    def extend_vocabulary(self, samples: Iterable[Sample], texts: Iterable[str] = ()) -> list[str]:
        """Add the words of ``samples``' prompts and answers that the vocabulary lacks.

        A pretrained checkpoint meets new words on a new task ("raccoon"); they start
        at the mean embedding. A ``text_model``'s tokenizer is open and needs none.
        Returns the added words.
        """
        if not isinstance(self.tokenizer, WordTokenizer):
            return []
        corpus = list(texts)
        for s in samples:
            corpus += [s.prompt, _answer_text(s, self.codec)]
        known = self.tokenizer.token_to_id
        new = sorted({p for text in corpus for p in WordTokenizer.split(text)} - set(known))
        if new:
            self.tokenizer = WordTokenizer([*self.tokenizer.vocab, *new])
            self.model.resize_token_embeddings(len(self.tokenizer))
        return new

    @property
    def config(self) -> SmallVLMConfig:
        return self.model.config

    @property
    def loc_token_ids(self) -> list[int]:
        return list(self._loc_ids)

    # -- batches ------------------------------------------------------------------------

    def sample_parts(
        self, sample: Sample, train: bool = True, image: Image.Image | None = None
    ) -> list[Part]:
        """A sample as a sequence: ``image <bos> prompt <sep>``, then its answer when ``train``.

        The answer is the codec's text for the boxes, or ``meta["answer"]`` for tasks
        answered in words (captions, counts). ``image`` stands in for the sample's
        own (which is then not loaded), e.g. to count positions.
        """
        parts: list[Part] = [
            sample.load_image() if image is None else image, "<bos>", sample.prompt, "<sep>"
        ]
        if train and "answer" in sample.meta:  # a text answer (caption, count): no boxes
            parts.append(Answer(sample.meta["answer"]))
        elif train:
            encoding = self.codec.encode_spans(sample.boxes, sample.labels, sample.image_size)
            boxes = [(sample.boxes[span.index], sample.image_size) for span in encoding.spans]
            parts.append(Answer(encoding.text, boxes))
        return parts

    def _answer_ids(self, answer: Answer, name: str) -> tuple[list[int], list[tuple[float, ...]]]:
        """Answer ids (with eos) and the continuous position of each location token in them."""
        ids = self.tokenizer.encode(answer.text) + [self.tokenizer.eos_id]
        if self.tokenizer.unk_id in ids:
            unknown = [
                p for p in self.tokenizer.split(answer.text) if p not in self.tokenizer.token_to_id
            ]
            raise ValueError(
                f"{name}: answer {answer.text!r} has words outside the "
                f"vocabulary {unknown}; build the adapter with these texts"
            )
        written = [self._loc_lookup[i] for i in ids if i in self._loc_lookup]
        expected = [k for box, size in answer.boxes for k in self.codec.box_to_locations(box, size)]
        if written != expected:
            raise ValueError(
                f"{name}: codec {self.codec.name!r} wrote locations "
                f"{written} but box_to_locations gives {expected}; the answer must write "
                "its boxes in the order of Answer.boxes"
            )
        continuous = [
            tuple(v) for box, size in answer.boxes for v in self.codec.box_to_continuous(box, size)
        ]
        return ids, continuous

    def _encode(self, parts: Sequence[Part], name: str) -> _Encoded:
        tok, n_image = self.tokenizer, self.config.n_image_tokens
        out = _Encoded()
        for part in parts:
            if isinstance(part, Image.Image):
                out.images.append(part)
                out.ids += [tok.image_id] * n_image
            elif isinstance(part, Answer):
                ids, continuous = self._answer_ids(part, name)
                out.answers.append((len(out.ids), ids, continuous))
                out.ids += ids
            elif isinstance(part, str):
                out.ids += tok.encode(part)
            else:
                raise TypeError(
                    f"{name}: a sequence part must be a PIL image, a str or an Answer, "
                    f"got {type(part).__name__}"
                )
        return out

    def collate(self, samples: list[Sample], train: bool = True) -> dict[str, torch.Tensor]:
        """Training batch (right-padded, with labels) or, with ``train=False``, left-padded
        prompts."""
        if not samples:
            raise ValueError("collate needs at least one sample")
        return self.collate_sequences(
            [self.sample_parts(s, train) for s in samples],
            train,
            names=[f"sample {s.image_id!r}" for s in samples],
        )

    def collate_sequences(
        self,
        sequences: Sequence[Sequence[Part]],
        train: bool = True,
        names: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch of interleaved sequences (images, text and answers in any order and number).

        Each image becomes ``n_image_tokens`` placeholders where it stands, and
        ``pixel_values`` holds the images row by row, in order, which is the order
        the model fills the placeholders in. With ``train``, rows are padded on the
        right and ``labels`` are -100 everywhere except the ids of every
        :class:`Answer` (its eos included), where ``loc_continuous`` also holds
        the location tokens' continuous positions. Without, rows are padded on
        the left for generation and answers are read as plain text.
        """
        if not sequences:
            raise ValueError("collate_sequences needs at least one sequence")
        names = (
            list(names) if names is not None else [f"sequence {i}" for i in range(len(sequences))]
        )
        encoded = [self._encode(parts, name) for parts, name in zip(sequences, names, strict=True)]
        cfg = self.config
        images = [im for e in encoded for im in e.images]
        if not images:
            raise ValueError(f"{names[0]}...: the batch has no image")
        pixel_values = torch.stack(
            [preprocess_image(im, cfg.image_size, cfg.image_mean, cfg.image_std) for im in images]
        )
        ids, mask = pad_with_mask([e.ids for e in encoded], self.tokenizer.pad_id, left=not train)
        self._check_length(names, ids.shape[1])
        batch = {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask}
        if not train:
            return batch
        labels = torch.full_like(ids, IGNORE_INDEX)
        dim = self.codec.space.dim if self.codec.space is not None else 1
        loc_continuous = torch.full((*ids.shape, dim), float("nan"))
        for row, e in enumerate(encoded):
            for start, answer_ids, continuous in e.answers:
                labels[row, start : start + len(answer_ids)] = torch.tensor(answer_ids)
                positions = [start + j for j, i in enumerate(answer_ids) if i in self._loc_lookup]
                if continuous:
                    loc_continuous[row, positions] = torch.tensor(continuous, dtype=torch.float32)
        return {**batch, "labels": labels, "loc_continuous": loc_continuous}

    def check_samples(self, samples: Sequence[Sample]) -> None:
        """Refuse, before training starts, the longest sample when it does not fit
        ``max_positions`` (an 80-class "detect ..." prompt needs about 290), instead of
        failing at whichever step first batches it."""
        placeholder = Image.new("RGB", (1, 1))
        longest, length = None, 0
        for sample in samples:
            n = len(self._encode(self.sample_parts(sample, True, placeholder), "").ids)
            if n > length:
                longest, length = sample, n
        if longest is not None and length > self.config.max_positions:
            prompt = self.tokenizer.encode(longest.prompt)
            raise DataError(
                f"sample {longest.image_id!r} needs {length} positions "
                f"({self.config.n_image_tokens}"
                f" image tokens, a {len(prompt)}-token prompt, its answer) but the model has "
                f"max_positions={self.config.max_positions}: shorten the prompt (a reader's "
                "prompt_fn, fewer classes), keep fewer boxes per image, or build the model with a "
                "larger max_positions"
            )

    def _check_length(self, names: Sequence[str], length: int) -> None:
        if length > self.config.max_positions:
            raise ValueError(
                f"batch of {list(names)[:4]} needs {length} positions, "
                f"the model has max_positions={self.config.max_positions}"
            )

    # -- model calls ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits for a collated batch, moved to the model's device (as the HF adapters do)."""
        inputs = (batch[k].to(self.device) for k in ("input_ids", "pixel_values", "attention_mask"))
        return self.model(*inputs).logits

    def generate(self, samples: list[Sample], max_new_tokens: int = 32) -> list[Generation]:
        return self.generate_sequences(
            [self.sample_parts(s, train=False) for s in samples],
            max_new_tokens,
            names=[f"sample {s.image_id!r}" for s in samples],
        )

    def generate_sequences(
        self,
        sequences: Sequence[Sequence[Part]],
        max_new_tokens: int = 32,
        names: Sequence[str] | None = None,
    ) -> list[Generation]:
        """Greedy continuations of interleaved sequences (each ends where the answer starts)."""
        device = self.device
        batch = {
            k: v.to(device) for k, v in self.collate_sequences(sequences, False, names).items()
        }
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                batch["input_ids"],
                batch["pixel_values"],
                batch["attention_mask"],
                eos_token_id=self.tokenizer.eos_id,
                pad_token_id=self.tokenizer.pad_id,
                max_new_tokens=max_new_tokens,
            )
        finally:
            self.model.train(was_training)
        loc_ids = torch.tensor(self._loc_ids, device=device)
        generations = []
        for row in range(len(sequences)):
            n = int(out.lengths[row])
            ids = out.sequences[row, :n]
            logprobs = out.logprobs[row, :n]
            text_ids = ids[:-1] if n and int(ids[-1]) == self.tokenizer.eos_id else ids
            generations.append(
                Generation(
                    text=self.tokenizer.decode(text_ids.tolist()),
                    token_ids=ids.tolist(),
                    token_logprobs=logprobs.gather(1, ids[:, None]).squeeze(1).tolist(),
                    loc_probs=logprobs[:, loc_ids].exp().cpu(),
                    first_logprobs=logprobs[0].cpu() if n else None,
                )
            )
        return generations

    # -- in-context prompts ----------------------------------------------------------------

    def generate_in_context(
        self,
        prompts: Sequence[Sequence[Turn]],
        choices: Sequence[str] = (),
        max_new_tokens: int = 64,
    ) -> list[InContextAnswer]:
        """Greedy answers to :func:`in_context_parts` sequences, all prompts in one batch.

        Each choice must be one word of the vocabulary, so the first step decides
        between them; with nothing generated the choices are equally likely.
        """
        ids = self.tokenizer.token_to_id
        missing = [c for c in choices if c not in ids]
        if missing:
            raise ValueError(
                f"choices: the small VLM's vocabulary lacks {missing}; build it with texts "
                "that hold them"
            )
        generations = self.generate_sequences(
            [in_context_parts(turns) for turns in prompts],
            max_new_tokens,
            names=[
                f"in-context prompt {i} ({len(turns)} turns)" for i, turns in enumerate(prompts)
            ],
        )
        uniform = [-math.log(len(choices))] * len(choices) if choices else []
        return [
            InContextAnswer(
                g.text,
                [float(g.first_logprobs[ids[c]]) for c in choices]
                if g.first_logprobs is not None
                else uniform,
            )
            for g in generations
        ]

    # -- persistence ----------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        """Model (config.json, model.safetensors), tokenizer.json and adapter.json (the codec)."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        with open(Path(path) / ADAPTER_FILE, "w") as f:
            json.dump({"codec": self.codec.spec, "location_tokens": self.codec.location_tokens}, f)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        codec: Codec | str | None = None,
        map_location: str | torch.device = "cpu",
    ) -> SmallVLMAdapter:
        """Reopen a saved adapter; ``codec`` (an instance or a spec) overrides the saved one.

        The codec must write the location tokens the model was trained with;
        anything else (another grid, another family) is refused.
        """
        path = Path(path)
        model = SmallVLM.from_pretrained(path, map_location=map_location)
        if model.config.text_model:
            from loctune.models.text_lm import LMTokenizer

            tokenizer = LMTokenizer.from_pretrained(path)
        else:
            tokenizer = WordTokenizer.from_pretrained(path)
        adapter_file = path / ADAPTER_FILE
        try:
            with open(adapter_file) as f:
                saved = json.load(f)
            trained_tokens = list(saved["location_tokens"])
            # a spec string; checkpoints before specs saved {"name": ..., **options}
            saved_codec = get_codec(saved["codec"]) if codec is None else None
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"cannot read {adapter_file}: expected {{'codec': 'name:key=value,...', "
                f"'location_tokens': [...]}} ({e})"
            ) from e
        if codec is None:
            codec = saved_codec
        elif isinstance(codec, str):
            codec = get_codec(codec)
        if codec.location_tokens != trained_tokens:
            raise ConfigError(
                f"codec {codec.spec!r} writes {len(codec.location_tokens)} location tokens "
                f"({codec.location_tokens[:2]}...), but {path} was trained with "
                f"{len(trained_tokens)} ({trained_tokens[:2]}...)"
            )
        return cls(model, tokenizer, codec)


def in_context_parts(turns: Sequence[Turn], supervise_examples: bool = False) -> list[Part]:
    """Turns as one small-VLM sequence: ``<bos>``, then per turn its images, ``<sep>``, answer.

    Turn text is not shown: it would be the same in every prompt (see
    :mod:`loctune.inspect.episodes`). A last turn without an answer ends the
    sequence where its answer starts (a generation prompt); with one, that answer
    is supervised (an :class:`Answer`), as example answers are when
    ``supervise_examples``, which are otherwise plain text closed by ``<eos>``.
    """
    parts: list[Part] = ["<bos>"]
    for i, turn in enumerate(turns):
        parts += [*turn.images, "<sep>"]
        if turn.answer is None:
            if i != len(turns) - 1:
                raise ValueError(f"turn {i}: only the last turn (the query) may lack an answer")
        elif supervise_examples or i == len(turns) - 1:
            parts.append(Answer(turn.answer, turn.boxes))
        else:
            parts.append(f"{turn.answer} <eos>")
    return parts


def _answer_text(sample: Sample, codec: Codec) -> str:
    """What a sample's answer says: ``meta["answer"]`` (captions, counts) or its boxes' text."""
    if "answer" in sample.meta:
        return sample.meta["answer"]
    return codec.encode(sample.boxes, sample.labels, sample.image_size)

