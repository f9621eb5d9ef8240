"""A word-level tokenizer for the small VLM: a closed vocabulary, no network.

Text splits into ``<...>`` special/location tokens, lower-cased words (a word starts
with a letter and keeps its digits and inner ``_``/``-``, so class names such as
``missing_piece``, ``ESP8266``, ``Raspberry_Pi_3`` or ``rolled-in_scale`` stay one token
and decode as they were written), numbers and single punctuation marks. Words outside
the vocabulary become ``<unk>``. Decoding writes ``<...>`` tokens back to back and
spaces between words, the way codecs write them, so
``codec.decode(tokenizer.decode(ids))`` reads the boxes back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, BOS, EOS, UNK, SEP, IMAGE = "<pad>", "<bos>", "<eos>", "<unk>", "<sep>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, SEP, IMAGE)
_PIECE = re.compile(r"<[^<>\s]+>|[^\W\d_][^\W_]*(?:[_-][^\W_]+)*|\d+|[^\w\s]")


class WordTokenizer:
    """Closed-vocabulary tokenizer; ids 0..5 are the special tokens, in SPECIAL_TOKENS order."""

    def __init__(self, vocab: Sequence[str]):
        if list(vocab[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
            raise ValueError(f"vocab must start with the special tokens {list(SPECIAL_TOKENS)}")
        if len(set(vocab)) != len(vocab):
            seen: set[str] = set()
            duplicates = sorted({t for t in vocab if t in seen or seen.add(t)})
            raise ValueError(f"vocab has duplicate tokens: {duplicates[:10]}")
        self.vocab: list[str] = list(vocab)
        self.token_to_id: dict[str, int] = {t: i for i, t in enumerate(self.vocab)}

    @classmethod
    def from_texts(cls, texts: Iterable[str], extra_tokens: Sequence[str] = ()) -> WordTokenizer:
        """Vocabulary = specials + ``extra_tokens`` (in order, e.g. location tokens) + pieces
        of ``texts``.

        Pieces are sorted, so the same texts give the same ids whatever their order.
        """
        vocab = list(SPECIAL_TOKENS)
        vocab += [t for t in dict.fromkeys(extra_tokens) if t not in SPECIAL_TOKENS]
        known = set(vocab)
        pieces = {p for text in texts for p in cls.split(text)}
        vocab += sorted(pieces - known)
        return cls(vocab)

    @staticmethod
    def split(text: str) -> list[str]:
        """The token strings of ``text``: ``<...>`` kept verbatim, words lower-cased."""
        return [p if p.startswith("<") and len(p) > 1 else p.lower() for p in _PIECE.findall(text)]

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def pad_id(self) -> int:
        return self.token_to_id[PAD]

    @property
    def bos_id(self) -> int:
        return self.token_to_id[BOS]

    @property
    def eos_id(self) -> int:
        return self.token_to_id[EOS]

    @property
    def unk_id(self) -> int:
        return self.token_to_id[UNK]

    @property
    def sep_id(self) -> int:
        return self.token_to_id[SEP]

    @property
    def image_id(self) -> int:
        return self.token_to_id[IMAGE]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.token_to_id.get(t, self.unk_id) for t in tokens]

    def encode(self, text: str) -> list[int]:
        return self.convert_tokens_to_ids(self.split(text))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``; ids outside the vocabulary decode as ``<unk>``, never raise."""
        out: list[str] = []
        previous_bracketed = False
        for i in ids:
            i = int(i)
            token = self.vocab[i] if 0 <= i < len(self.vocab) else UNK
            if skip_special_tokens and token in SPECIAL_TOKENS and token != UNK:
                continue
            bracketed = token.startswith("<") and token != UNK
            if out and not (bracketed and previous_bracketed):
                out.append(" ")
            out.append(token)
            previous_bracketed = bracketed
        return "".join(out)

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        with open(Path(path) / "tokenizer.json", "w") as f:
            json.dump({"type": "word", "vocab": self.vocab}, f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> WordTokenizer:
        file = Path(path) / "tokenizer.json"
        try:
            with open(file) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read word tokenizer from {file}: {e}") from e
        if (
            not isinstance(data, dict)
            or data.get("type") != "word"
            or not isinstance(data.get("vocab"), list)
        ):
            raise ValueError(
                f"{file} is not a word tokenizer: expected {{'type': 'word', 'vocab': [...]}}"
            )
        return cls(data["vocab"])
