"""Adversarial generations for every codec: what a broken or hostile model might write.

Shared by the decoder fuzz test and ``benchmarks/decoder_fuzz.py``. Every string
is built from the codec's own vocabulary (the pieces of its answers: markup,
numbers, words, location tokens) and from junk no codec writes, so each kind
probes the parser where it has state: runs, groups, open tags, numbers.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from loctune.codecs import Codec

LABELS = ["dog", "red car", "traffic light", "person", "a", "x"]
JUNK = [
    "<", ">", "(", ")", ",", ";", " ; ", " ", "\n", "\t", "-1", "1e9", "0x1f", "1_000", "٣", "１",
    "é", "\x00", "<unk>", "</s>", "<|im_end|>", "<>", "9" * 40,
]  # fmt: skip
_PIECE = re.compile(r"<[^<>]*>|[0-9]+|[^<0-9]+")
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")


def answer(codec: Codec, rng: random.Random, n_max: int = 4) -> str:
    """What the codec writes for a few random boxes (some on the image edges) on a random image."""
    w, h = rng.randint(1, 4000), rng.randint(1, 4000)
    boxes = []
    for _ in range(rng.randint(1, n_max)):
        x1, x2 = sorted(rng.choice([0.0, 1.0, rng.random()]) * w for _ in range(2))
        y1, y2 = sorted(rng.choice([0.0, 1.0, rng.random()]) * h for _ in range(2))
        boxes.append((x1, y1, x2, y2))
    return codec.encode(boxes, [rng.choice(LABELS) for _ in boxes], (w, h))


def vocabulary(codec: Codec, rng: random.Random) -> list[str]:
    """Pieces of the codec's answers, some of its location tokens, and junk."""
    pieces = {p for _ in range(20) for p in _PIECE.findall(answer(codec, rng))}
    tokens = codec.location_tokens
    return sorted(pieces) + rng.sample(tokens, min(len(tokens), 50)) + JUNK


def soup(codec: Codec, rng: random.Random, n_pieces: int) -> str:
    """Random pieces of the codec's vocabulary."""
    return "".join(rng.choices(vocabulary(codec, rng), k=n_pieces))


def truncated(codec: Codec, rng: random.Random) -> str:
    """An answer cut anywhere, a token or a number included."""
    text = answer(codec, rng)
    return text[: rng.randint(0, len(text))]


def spliced(codec: Codec, rng: random.Random) -> str:
    """Two answers, each cut, with the second's tail after the first's head."""
    a, b = answer(codec, rng), answer(codec, rng)
    return a[: rng.randint(0, len(a))] + b[rng.randint(0, len(b)) :]


def respelled_numbers(codec: Codec, rng: random.Random) -> str:
    """An answer whose numbers are huge, zero-padded or in non-ASCII digits."""
    spellings: list[Callable[[str], str]] = [
        lambda d: "9" * rng.choice([10, 4301, 20_000]),
        lambda d: "0" * rng.randint(1, 5000) + d,
        lambda d: d.translate(ARABIC_INDIC),
        lambda d: d.translate(FULLWIDTH),
        lambda d: d,
    ]
    return re.sub("[0-9]+", lambda m: rng.choice(spellings)(m.group()), answer(codec, rng))


def repeated(codec: Codec, rng: random.Random, n_chars: int) -> str:
    """One piece of the vocabulary (an open tag, say) repeated to ``n_chars``, then an answer."""
    piece = rng.choice(vocabulary(codec, rng)) or "<"
    return piece * (n_chars // len(piece) + 1) + answer(codec, rng)


def generation(codec: Codec, rng: random.Random) -> str:
    """One adversarial string of a random kind, at most some tens of kilobytes."""
    kind = rng.randrange(6)
    if kind == 0:
        return soup(codec, rng, rng.randint(0, 200))
    if kind == 1:
        return truncated(codec, rng)
    if kind == 2:
        return spliced(codec, rng)
    if kind == 3:
        return respelled_numbers(codec, rng)
    if kind == 4:
        return repeated(codec, rng, rng.randint(1, 5000))
    return "".join(answer(codec, rng) for _ in range(rng.randint(1, 50)))


def long_texts(codec: Codec, rng: random.Random, n: int = 1 << 20) -> dict[str, str]:
    """Generations of ``n`` characters (1 MB), by kind: the shapes whose cost could grow
    faster than the text (many objects, one tag repeated, endless digits, one as a location)."""
    one_answer = answer(codec, rng)
    locations = set(codec.location_tokens)
    markup = {p for p in _PIECE.findall(one_answer) if p.startswith("<") and p not in locations}
    tags = sorted(markup) + codec.location_tokens[:1]
    texts = {
        "soup": soup(codec, rng, n // 4),
        "answers": one_answer * (n // len(one_answer) + 1),
        "digits": "1" * n,
        "one number": re.sub("[0-9]+", "9" * n, one_answer, count=1),
    }
    texts |= {f"repeated {tag}": tag * (n // len(tag) + 1) for tag in tags}
    return {kind: text[:n] for kind, text in texts.items()}
