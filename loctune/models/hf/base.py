"""Shared machinery of the Hugging Face VLM adapters.

A family module says only what differs between families: which model class
loads the checkpoint, which codec writes its boxes, the prompt and answer
text, and how a prompt is turned into processor inputs. Everything else lives
here, once: loading (dtype, device, attention kernel, 4-bit quantisation),
LoRA/full fine-tuning, freezing the vision tower, adding location tokens to
vocabularies that lack them, collating prompt + answer into labels, greedy
generation with per-token probabilities, and saving.

Sequence layout. A prompt is encoded by the family's processor (which expands
image placeholders); the answer is tokenised on its own and appended, so a
prompt never changes how its answer tokenises. Causal models get
``prompt + answer`` as input and labels ``-100`` on the prompt; an
encoder-decoder (Florence-2) gets the prompt as encoder input and the answer
as decoder labels, with decoder inputs the labels shifted right.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoProcessor, PreTrainedModel

from loctune.codecs import Codec, get_codec
from loctune.models.base import Generation, VLMAdapter
from loctune.models.padding import pad_rows, pad_with_mask
from loctune.types import BOX_TASKS, IGNORE_INDEX, Sample

TASKS = (*BOX_TASKS, "inspection")  # what an HF adapter accepts: boxes, or an inspection verdict
METADATA_FILE = "loctune_adapter.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoraOptions:
    """LoRA on the language model's linear layers; ``qlora`` loads the base in 4 bit."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    qlora: bool = False


@dataclass
class LoadOptions:
    """How to load and prepare a checkpoint for fine-tuning.

    ``codec`` (a spec, ``"bins:n_bins=1000"``) overrides the family's default codec (e.g.
    the plain-text ``qwen2vl`` codec instead of added bin tokens for Qwen2-VL).
    """

    dtype: str | torch.dtype = "fp32"
    device: str | None = None
    device_map: str | dict | None = None
    attn_implementation: str | None = None
    codec: str | None = None
    lora: LoraOptions | dict[str, Any] | bool | None = None
    freeze_vision: bool = False
    gradient_checkpointing: bool = False


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}"
        ) from None


def split_class_names(sample: Sample) -> list[str]:
    """Class names a detection prompt asks for: the prompt's ``;``/``,`` list, else the labels."""
    names = [n.strip() for n in re.split(r"[;,]", sample.prompt) if n.strip()]
    return names or list(dict.fromkeys(sample.labels))


def _check_sample(sample: Sample, position: int) -> None:
    name = f"sample {sample.image_id or position}"
    if sample.task not in TASKS:
        raise ValueError(f"{name}: task must be one of {TASKS}, got {sample.task!r}")
    if sample.task == "grounding" and not sample.prompt.strip():
        raise ValueError(f"{name}: a grounding sample needs its referring expression in .prompt")
    if len(sample.boxes) != len(sample.labels):
        raise ValueError(f"{name}: {len(sample.boxes)} boxes but {len(sample.labels)} labels")


class HFAdapter(VLMAdapter):
    """A transformers VLM behind :class:`VLMAdapter`; subclasses describe one family."""

    family: ClassVar[str] = ""
    #: model_type (from config.json) -> transformers model class name
    model_classes: ClassVar[dict[str, str]] = {}
    default_codec: ClassVar[str] = ""
    #: per-token processor outputs that must grow with the answer, and the value answer tokens get
    token_fields: ClassVar[dict[str, int]] = {}
    #: regex (full match on module names) of the language model's linear layers, for LoRA
    lora_target_modules: ClassVar[str] = ""
    #: attribute path of the vision tower, for freezing
    vision_tower_path: ClassVar[str] = ""

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        codec: Codec,
        *,
        base_model_path: str = "",
        added_tokens: Sequence[str] = (),
    ):
        """Wrap a loaded model; ``from_pretrained`` is the usual way in.

        ``base_model_path`` and ``added_tokens`` (tokens
        this package added to the base vocabulary) are saved with the weights
        so that a saved LoRA adapter can rebuild its base.
        """
        self.model = model
        self.processor = processor
        self.codec = codec
        self.base_model_path = base_model_path
        self.added_tokens = list(added_tokens)
        self.is_encoder_decoder = bool(getattr(self._unwrapped.config, "is_encoder_decoder", False))
        self.tokenizer.padding_side = "right"
        missing = [t for t in codec.location_tokens if t not in self.tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"{self.family}: tokenizer lacks {len(missing)} location tokens of codec "
                f"{codec.name!r} (first: {missing[0]!r}); load through "
                f"{type(self).__name__}.from_pretrained"
            )
        self._loc_ids = self.tokenizer.convert_tokens_to_ids(list(codec.location_tokens))

    # ------------------------------------------------------------------ family hooks

    def prompt_text(self, sample: Sample) -> str:
        """Text handed to the processor for this sample (image placeholders included)."""
        raise NotImplementedError

    def answer_text(self, sample: Sample) -> str:
        """What the model should write: the codec's box text by default."""
        return self.codec.encode(sample.boxes, sample.labels, sample.image_size)

    def encode_prompts(self, prompts: list[str], images: list) -> dict[str, Any]:
        """Processor outputs for a batch of prompts, right-padded tensors."""
        return self.processor(text=prompts, images=images, padding="longest", return_tensors="pt")

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an answer, ending with the token that stops generation."""
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.answer_end_id]

    @property
    def answer_end_id(self) -> int:
        return self.tokenizer.eos_token_id

    def generated_text(self, sample: Sample, text: str) -> str:
        """The text a codec decodes from a generation; families whose prompt holds part of
        the answer markup put it back here."""
        return text

    @classmethod
    def prepare_tokenizer(cls, processor: Any, codec: Codec) -> list[str]:
        """Add the codec's location tokens the tokenizer lacks; returns those added."""
        tokenizer = processor.tokenizer
        vocab = tokenizer.get_vocab()
        new = [t for t in codec.location_tokens if t not in vocab]
        if new:
            tokenizer.add_special_tokens(
                {"extra_special_tokens": new}, replace_extra_special_tokens=False
            )
        return new

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str, **options: Any) -> HFAdapter:
        """Load a checkpoint (hub id or local dir), or a directory this class saved.

        ``options`` are :class:`LoadOptions` fields; ``lora`` may be a
        :class:`LoraOptions`, a dict of its fields, or True for the defaults.
        A directory holding a PEFT adapter reopens its base model and the
        adapter weights (trainable again when ``lora`` is given).
        """
        opts = _load_options(options)
        saved = _read_metadata(path)
        codec = get_codec(opts.codec or saved.get("codec") or cls.default_codec)
        processor = AutoProcessor.from_pretrained(path)
        added = cls.prepare_tokenizer(processor, codec)
        is_peft_dir = (Path(path) / "adapter_config.json").exists()
        if is_peft_dir:
            # The saved tokenizer already holds them; the base model still needs their rows.
            added = list(saved.get("added_tokens", []))
        base_path = _peft_base_path(path, saved) if is_peft_dir else path
        model = cls._load_model(base_path, opts)
        if added:
            _add_embedding_rows(model, processor.tokenizer, added)
        if is_peft_dir:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path, is_trainable=opts.lora is not None)
        elif opts.lora is not None:
            model = cls._add_lora(
                model, opts.lora, processor.tokenizer.convert_tokens_to_ids(added)
            )
        adapter = cls(
            model,
            processor,
            codec,
            base_model_path=base_path,
            added_tokens=added,
        )
        if opts.freeze_vision:
            adapter.freeze_vision_tower()
        if opts.gradient_checkpointing:
            adapter.enable_gradient_checkpointing()
        return adapter

    @classmethod
    def _model_class(cls, model_type: str) -> type[PreTrainedModel]:
        import transformers

        try:
            return getattr(transformers, cls.model_classes[model_type])
        except KeyError:
            raise ValueError(
                f"{cls.family} adapter cannot load model_type {model_type!r}; "
                f"expected one of {sorted(cls.model_classes)}"
            ) from None

    @classmethod
    def _load_model(cls, path: str, opts: LoadOptions) -> PreTrainedModel:
        config = AutoConfig.from_pretrained(path)
        kwargs: dict[str, Any] = {"dtype": resolve_dtype(opts.dtype)}
        if opts.attn_implementation:
            kwargs["attn_implementation"] = opts.attn_implementation
        if opts.device_map is not None:
            kwargs["device_map"] = opts.device_map
        if opts.lora is not None and opts.lora.qlora:
            kwargs["quantization_config"] = _four_bit_config(kwargs["dtype"])
            kwargs.setdefault("device_map", {"": opts.device or "cuda:0"})
        model = cls._model_class(config.model_type).from_pretrained(path, **kwargs)
        if opts.device and "device_map" not in kwargs:
            model = model.to(opts.device)
        return model

    @classmethod
    def _add_lora(
        cls, model: PreTrainedModel, lora: LoraOptions, new_token_ids: list[int]
    ) -> nn.Module:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if lora.qlora:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=cls.lora_target_modules,
            # Added location tokens start untrained: train their embedding rows too.
            trainable_token_indices=new_token_ids or None,
        )
        return get_peft_model(model, config)

    # ------------------------------------------------------------------ properties

    @property
    def _unwrapped(self) -> PreTrainedModel:
        """The transformers model, under a PEFT wrapper if there is one."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def loc_token_ids(self) -> list[int]:
        return list(self._loc_ids)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._unwrapped.dtype

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward; with frozen embeddings (LoRA) inputs need grads."""
        model = self._unwrapped
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()

    def freeze_vision_tower(self) -> None:
        """Stop gradients into the image encoder (its weights stay as loaded)."""
        tower: nn.Module = self._unwrapped
        for part in self.vision_tower_path.split("."):
            tower = getattr(tower, part)
        tower.requires_grad_(False)

    # ------------------------------------------------------------------ batches

    def _prompt_rows(
        self, samples: list[Sample]
    ) -> tuple[list[list[int]], dict[str, list[list[int]]], dict]:
        """Unpadded prompt ids and per-token fields per sample, plus the image tensors."""
        return self._unpadded_rows(
            self.encode_prompts(
                [self.prompt_text(s) for s in samples], [s.load_image() for s in samples]
            )
        )

    def _unpadded_rows(
        self, enc: dict[str, Any]
    ) -> tuple[list[list[int]], dict[str, list[list[int]]], dict]:
        """Processor outputs split into unpadded ids, per-token fields and the image tensors."""
        mask = enc["attention_mask"].bool()
        ids = [row[m].tolist() for row, m in zip(enc["input_ids"], mask, strict=True)]
        fields = {
            k: [row[m].tolist() for row, m in zip(enc[k], mask, strict=True)]
            for k in self.token_fields
            if k in enc
        }
        # token_type_ids is passed on only by families that list it in token_fields
        skip = {"input_ids", "attention_mask", "labels", "token_type_ids", *self.token_fields}
        return ids, fields, {k: v for k, v in enc.items() if k not in skip}

    def collate(self, samples: list[Sample], train: bool = True) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("collate needs at least one sample")
        for i, sample in enumerate(samples):
            _check_sample(sample, i)
        ids, fields, batch = self._prompt_rows(samples)
        pad_id = self.tokenizer.pad_token_id
        if not train:
            # decoder-only generation continues from the right edge: pad on the left
            left = not self.is_encoder_decoder
            batch["input_ids"], batch["attention_mask"] = pad_with_mask(ids, pad_id, left)
            for key, rows in fields.items():
                batch[key] = pad_rows(rows, 0, left)
            return batch
        answers = [self.answer_ids(self.answer_text(s)) for s in samples]
        if self.is_encoder_decoder:
            batch["input_ids"], batch["attention_mask"] = pad_with_mask(ids, pad_id, left=False)
            labels = pad_rows(answers, IGNORE_INDEX, left=False)
            start = self._unwrapped.config.get_text_config().decoder_start_token_id
            batch["decoder_input_ids"], batch["decoder_attention_mask"] = pad_with_mask(
                [[start] + a[:-1] for a in answers], pad_id, left=False
            )
        else:
            rows = [p + a for p, a in zip(ids, answers, strict=True)]
            batch["input_ids"], batch["attention_mask"] = pad_with_mask(rows, pad_id, left=False)
            labels = pad_rows(
                [[IGNORE_INDEX] * len(p) + a for p, a in zip(ids, answers, strict=True)],
                IGNORE_INDEX,
                left=False,
            )
            for key, rows_k in fields.items():
                fill = self.token_fields[key]
                batch[key] = pad_rows(
                    [r + [fill] * len(a) for r, a in zip(rows_k, answers, strict=True)],
                    0,
                    left=False,
                )
        batch["labels"] = labels
        batch["loc_continuous"] = self._loc_continuous(samples, labels)
        return batch

    def _loc_continuous(self, samples: list[Sample], labels: torch.Tensor) -> torch.Tensor:
        """Unquantised coordinates at each location label, NaN elsewhere.

        The codec's spans say which box each location token of the answer
        writes (the k-th location token of the text is the k-th location label),
        so the codec may order objects as its family does.
        """
        dim = self.codec.space.dim if self.codec.space is not None else 1
        out = torch.full((*labels.shape, dim), float("nan"))
        if not self._loc_ids:
            return out
        index_of = {tok: k for k, tok in enumerate(self._loc_ids)}
        for b, sample in enumerate(samples):
            positions = [j for j, t in enumerate(labels[b].tolist()) if t in index_of]
            written = [index_of[int(labels[b, j])] for j in positions]
            encoding = self.codec.encode_spans(sample.boxes, sample.labels, sample.image_size)
            expected, values = [], []
            for span in encoding.spans:
                box = sample.boxes[span.index]
                expected += self.codec.box_to_locations(box, sample.image_size)
                values += self.codec.box_to_continuous(box, sample.image_size)
            if written != expected:
                raise ValueError(
                    f"sample {sample.image_id or b}: location tokens {written} in the encoded "
                    f"answer are not the {expected} its boxes encode to; codec "
                    f"{self.codec.name!r} and tokenizer disagree"
                )
            if positions:
                out[b, positions] = torch.tensor(values, dtype=out.dtype)
        return out

    def model_inputs(
        self, batch: dict[str, torch.Tensor], with_labels: bool = False
    ) -> dict[str, Any]:
        """Keyword arguments for the transformers model, on its device and dtype."""
        skip = {"loc_continuous"} | (set() if with_labels else {"labels"})
        out = {}
        for key, value in batch.items():
            if key in skip:
                continue
            if torch.is_tensor(value):
                value = value.to(self.device, self.dtype if value.is_floating_point() else None)
            out[key] = value
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**self.model_inputs(batch), use_cache=False).logits

    # ------------------------------------------------------------------ generation

    @property
    def stop_token_ids(self) -> list[int]:
        return sorted({self.tokenizer.eos_token_id, self.answer_end_id})

    def _hidden_token_ids(self) -> set[int]:
        """Ids removed from generated text: padding, sequence and turn markers."""
        tok = self.tokenizer
        ids = {tok.pad_token_id, tok.bos_token_id, *self.stop_token_ids}
        return {i for i in ids if i is not None}

    @torch.no_grad()
    def greedy(self, inputs: dict[str, Any], max_new_tokens: int):
        """``model.generate`` greedily with raw logits per step, in eval mode, restoring the
        mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                output_logits=True,
                return_dict_in_generate=True,
                eos_token_id=self.stop_token_ids,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def generate(self, samples: list[Sample], max_new_tokens: int = 32) -> list[Generation]:
        """Greedy answers; probabilities are the full-vocabulary softmax of the raw logits."""
        if not samples:
            return []
        out = self.greedy(self.model_inputs(self.collate(samples, train=False)), max_new_tokens)
        return [
            replace(g, text=self.generated_text(sample, g.text))
            for g, sample in zip(self._generations(out), samples, strict=True)
        ]

    def _generations(self, out: Any, prefix: Sequence[int] = ()) -> list[Generation]:
        """Each row of a :meth:`greedy` output up to its first stop token, with probabilities.

        The text is that of ``prefix`` (answer tokens fed with the prompt) and the
        new tokens, without padding, sequence and turn markers.
        """
        steps = len(out.logits)
        new_tokens = out.sequences[:, -steps:]
        stops = set(self.stop_token_ids)
        hidden = self._hidden_token_ids()
        results = []
        for b in range(len(new_tokens)):
            ids = new_tokens[b].tolist()
            end = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
            ids = ids[:end]
            # one row at a time: [steps, V] full-vocabulary rows, never [B, steps, V] in fp32
            rows = torch.stack([step[b] for step in out.logits[:end]]).float().log_softmax(-1)
            token_lp = rows.gather(1, new_tokens[b, :end, None])[:, 0].tolist()
            loc_probs = rows[:, self._loc_ids].exp().cpu() if self._loc_ids else None
            text = self.tokenizer.decode(
                [*prefix, *(t for t in ids if t not in hidden)],
                skip_special_tokens=False,
                clean_up_tokenization_spaces=False,
            )
            results.append(Generation(text.strip(), ids, token_lp, loc_probs))
        return results

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, path: str) -> None:
        """Weights (full model, or the PEFT adapter), processor and loctune metadata.

        ``load_adapter(path)`` reopens it; so does the family's transformers
        class for a full model, or ``PeftModel.from_pretrained`` on the base
        model for an adapter.
        """
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        meta = {
            "family": self.family,
            "model_type": self._unwrapped.config.model_type,
            "codec": self.codec.spec,
            "base_model_path": self.base_model_path,
            "added_tokens": self.added_tokens,
        }
        (Path(path) / METADATA_FILE).write_text(json.dumps(meta, indent=2))


def _load_options(options: dict[str, Any]) -> LoadOptions:
    known = set(LoadOptions.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown adapter options {unknown}; expected some of {sorted(known)}")
    opts = LoadOptions(**options)
    if opts.lora is True:
        opts.lora = LoraOptions()
    elif isinstance(opts.lora, dict):
        opts.lora = LoraOptions(**opts.lora)
    elif opts.lora is False:
        opts.lora = None
    return opts


def _peft_base_path(path: str, saved: dict[str, Any]) -> str:
    """Base checkpoint of a saved LoRA adapter: ours, else the one PEFT recorded."""
    if saved.get("base_model_path"):
        return saved["base_model_path"]
    file = Path(path) / "adapter_config.json"
    base = json.loads(file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{file}: no base_model_name_or_path; cannot tell which model it adapts")
    return base


def _read_metadata(path: str) -> dict[str, Any]:
    file = Path(path) / METADATA_FILE
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None


def _four_bit_config(compute_dtype: torch.dtype):
    """bitsandbytes NF4 config; only CUDA builds of bitsandbytes run it."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "QLoRA (4-bit base weights) needs a CUDA GPU; use lora without qlora on CPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RuntimeError("QLoRA needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _add_embedding_rows(model: PreTrainedModel, tokenizer, added: Sequence[str]) -> None:
    """Make room for added tokens and start each one near its meaning.

    A location token ``<loc_bin_512>`` begins as the mean embedding of the
    tokens of its number (``"512"``), in the input embeddings and, when untied,
    the output embeddings: new bins then start ordered and distinct rather than
    all equal or random. A token with several numbers (``<bin_3_7>``: row 3,
    column 7) takes a weighted mean of its numbers' piece means, weights
    ``k, k-1, ..., 1`` (2/3 row + 1/3 column), so it differs from ``<bin_7_3>`` and
    cells of one row start close. A token without a number gets the mean of the
    original rows. The rule is deterministic, so a base model reopened under a
    saved LoRA adapter gets the same rows back.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    rows = tokenizer.convert_tokens_to_ids(list(added))
    original = min([old, *rows])  # rows from here on are new or unused
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    with torch.no_grad():
        for weight in matrices:
            mean = weight[:original].float().mean(0)
            for token, row in zip(added, rows, strict=True):
                numbers = re.findall(r"\d+", token)
                total, weights = torch.zeros_like(mean), 0.0
                for j, number in enumerate(numbers):
                    pieces = tokenizer(number, add_special_tokens=False)["input_ids"]
                    pieces = [p for p in pieces if p < original]
                    if pieces:
                        total += (len(numbers) - j) * weight[pieces].float().mean(0)
                        weights += len(numbers) - j
                weight[row] = (total / weights if weights else mean).to(weight.dtype)
