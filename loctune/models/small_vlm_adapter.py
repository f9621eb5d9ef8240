"""The small VLM behind the :class:`VLMAdapter` interface: samples in, logits/generations out.

A sequence is ``<image>*n <bos> prompt <sep> answer <eos>``, where ``answer``
is what the codec writes for the sample's boxes. Training batches are padded
on the right; prompt-only batches for generation on the left.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from loctune.codecs import Codec, get_codec
from loctune.models.base import Generation, VLMAdapter
from loctune.models.small_vlm import SmallVLM, SmallVLMConfig, small_vlm_config
from loctune.models.tokenizer import WordTokenizer
from loctune.types import Sample

ADAPTER_FILE = "adapter.json"
IGNORE_INDEX = -100


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

    ``codec_spec`` (``{"name": ..., **kwargs}``) is saved, with the codec's
    location tokens, so that :meth:`from_pretrained` rebuilds the same codec
    and can tell when it does not.
    """

    is_encoder_decoder = False

    def __init__(
        self,
        model: SmallVLM,
        tokenizer: WordTokenizer,
        codec: Codec,
        codec_spec: Mapping[str, Any] | None = None,
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
        self.codec_spec = dict(codec_spec) if codec_spec is not None else {"name": codec.name}
        self._loc_ids = tokenizer.convert_tokens_to_ids(codec.location_tokens)
        self._loc_lookup = {token_id: k for k, token_id in enumerate(self._loc_ids)}

    @classmethod
    def build(
        cls,
        codec: str | Codec,
        texts: Iterable[str] = (),
        samples: Iterable[Sample] = (),
        config: SmallVLMConfig | str = "small",
        codec_kwargs: Mapping[str, Any] | None = None,
        **config_overrides: Any,
    ) -> SmallVLMAdapter:
        """A fresh model whose vocabulary covers ``texts`` and the prompts/answers of ``samples``.

        ``codec`` is a registered name (built with ``codec_kwargs``) or an
        instance; ``config`` a :class:`SmallVLMConfig` or a preset name.
        """
        if isinstance(codec, str):
            spec = {"name": codec, **(codec_kwargs or {})}
            codec = get_codec(codec, **(codec_kwargs or {}))
        else:
            spec = {"name": codec.name, **(codec_kwargs or {})}
        corpus = list(texts)
        for s in samples:
            corpus.append(s.prompt)
            corpus.append(codec.encode(s.boxes, s.labels, s.image_size))
        tokenizer = WordTokenizer.from_texts(corpus, extra_tokens=codec.location_tokens)
        base = small_vlm_config(config) if isinstance(config, str) else config
        overrides = dict(
            config_overrides, vocab_size=len(tokenizer), image_token_id=tokenizer.image_id
        )
        return cls(SmallVLM(replace(base, **overrides)), tokenizer, codec, spec)

    @property
    def config(self) -> SmallVLMConfig:
        return self.model.config

    @property
    def loc_token_ids(self) -> list[int]:
        return list(self._loc_ids)

    # -- batches ------------------------------------------------------------------------

    def prompt_ids(self, sample: Sample) -> list[int]:
        tok = self.tokenizer
        return (
            [tok.image_id] * self.config.n_image_tokens
            + [tok.bos_id]
            + tok.encode(sample.prompt)
            + [tok.sep_id]
        )

    def answer(self, sample: Sample) -> tuple[list[int], list[tuple[float, ...]]]:
        """Answer ids (with eos) and the continuous position of each location token in them."""
        size = sample.image_size
        text = self.codec.encode(sample.boxes, sample.labels, size)
        ids = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
        if self.tokenizer.unk_id in ids:
            unknown = [p for p in self.tokenizer.split(text) if p not in self.tokenizer.token_to_id]
            raise ValueError(
                f"sample {sample.image_id!r}: answer {text!r} has words outside the "
                f"vocabulary {unknown}; build the adapter with these texts"
            )
        written = [self._loc_lookup[i] for i in ids if i in self._loc_lookup]
        expected = [k for box in sample.boxes for k in self.codec.box_to_locations(box, size)]
        if written != expected:
            raise ValueError(
                f"sample {sample.image_id!r}: codec {self.codec.name!r} wrote locations "
                f"{written} but box_to_locations gives {expected}; the codec must write "
                "boxes in the given order"
            )
        continuous = [
            tuple(v) for box in sample.boxes for v in self.codec.box_to_continuous(box, size)
        ]
        return ids, continuous

    def collate(self, samples: list[Sample], train: bool = True) -> dict[str, torch.Tensor]:
        """Training batch (right-padded, with labels) or, with ``train=False``, left-padded prompts."""
        if not samples:
            raise ValueError("collate needs at least one sample")
        cfg = self.config
        pixel_values = torch.stack(
            [
                preprocess_image(s.load_image(), cfg.image_size, cfg.image_mean, cfg.image_std)
                for s in samples
            ]
        )
        prompts = [self.prompt_ids(s) for s in samples]
        if not train:
            ids, mask = _pad(prompts, self.tokenizer.pad_id, left=True)
            self._check_length(samples, ids.shape[1])
            return {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask}
        answers = [self.answer(s) for s in samples]
        sequences = [p + a for p, (a, _) in zip(prompts, answers, strict=True)]
        ids, mask = _pad(sequences, self.tokenizer.pad_id, left=False)
        self._check_length(samples, ids.shape[1])
        labels = torch.full_like(ids, IGNORE_INDEX)
        dim = self.codec.space.dim if self.codec.space is not None else 1
        loc_continuous = torch.full((*ids.shape, dim), float("nan"))
        for row, (prompt, (answer_ids, continuous)) in enumerate(
            zip(prompts, answers, strict=True)
        ):
            start = len(prompt)
            labels[row, start : start + len(answer_ids)] = torch.tensor(answer_ids)
            loc_positions = [start + j for j, i in enumerate(answer_ids) if i in self._loc_lookup]
            if continuous:
                loc_continuous[row, loc_positions] = torch.tensor(continuous, dtype=torch.float32)
        return {
            "pixel_values": pixel_values,
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "loc_continuous": loc_continuous,
        }

    def _check_length(self, samples: list[Sample], length: int) -> None:
        if length > self.config.max_positions:
            raise ValueError(
                f"batch of {[s.image_id for s in samples][:4]} needs {length} positions, "
                f"the model has max_positions={self.config.max_positions}"
            )

    # -- model calls ----------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits

    def generate(self, samples: list[Sample], max_new_tokens: int = 32) -> list[Generation]:
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in self.collate(samples, train=False).items()}
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
        for row in range(len(samples)):
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
                )
            )
        return generations

    # -- persistence ----------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        """Model (config.json, model.safetensors), tokenizer.json and adapter.json (the codec)."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        with open(Path(path) / ADAPTER_FILE, "w") as f:
            json.dump({"codec": self.codec_spec, "location_tokens": self.codec.location_tokens}, f)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, codec: Codec | None = None, map_location: str | torch.device = "cpu"
    ) -> SmallVLMAdapter:
        """Reopen a saved adapter; ``codec`` overrides the saved codec spec.

        The codec must write the location tokens the model was trained with;
        anything else (another grid, another family) is refused.
        """
        path = Path(path)
        model = SmallVLM.from_pretrained(path, map_location=map_location)
        tokenizer = WordTokenizer.from_pretrained(path)
        adapter_file = path / ADAPTER_FILE
        try:
            with open(adapter_file) as f:
                saved = json.load(f)
            spec = dict(saved["codec"])
            trained_tokens = list(saved["location_tokens"])
            name = spec.pop("name")
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"cannot read {adapter_file}: expected {{'codec': {{'name': ..., **kwargs}}, "
                f"'location_tokens': [...]}} ({e!r})"
            ) from e
        if codec is None:
            codec = get_codec(name, **spec)
        else:
            spec, name = {}, codec.name
        if codec.location_tokens != trained_tokens:
            raise ValueError(
                f"codec {name!r} writes {len(codec.location_tokens)} location tokens "
                f"({codec.location_tokens[:2]}...), but {path} was trained with "
                f"{len(trained_tokens)} ({trained_tokens[:2]}...)"
            )
        return cls(model, tokenizer, codec, {"name": name, **spec})


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
