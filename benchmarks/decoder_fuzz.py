"""Fuzz every codec's decode with adversarial generations and time it (run by hand).

For each registered codec (its defaults): ``--n`` random generations of
``tests/fuzz_texts.py`` (token soup from the codec's vocabulary, truncated and
spliced answers, huge / zero-padded / non-ASCII numbers, repeated tags), then
the 1 MB generations of each shape. Prints codec, strings, crashes (decode
raised), the slowest random string in ms, and ms per MB of the slowest 1 MB
shape (named). Exit code 1 when anything raised.

    python benchmarks/decoder_fuzz.py
    python benchmarks/decoder_fuzz.py --n 100000 --seed 1
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzz_texts  # noqa: E402

from loctune.codecs import Codec, get_codec, list_codecs  # noqa: E402

SIZE = (640, 480)


def timed_decode(codec: Codec, text: str) -> tuple[float, str | None]:
    """Seconds ``decode`` took, and the traceback when it raised."""
    start = time.perf_counter()
    try:
        codec.decode(text, SIZE)
    except Exception:
        return time.perf_counter() - start, traceback.format_exc(limit=3)
    return time.perf_counter() - start, None


def fuzz(codec: Codec, n: int, seed: int) -> dict:
    """One table row: random strings, then every 1 MB shape."""
    rng = random.Random(seed)
    crashes, slowest, first_crash = 0, 0.0, None
    for _ in range(n):
        seconds, error = timed_decode(codec, fuzz_texts.generation(codec, rng))
        slowest = max(slowest, seconds)
        if error:
            crashes += 1
            first_crash = first_crash or error
    worst, worst_kind = 0.0, ""
    for kind, text in fuzz_texts.long_texts(codec, rng).items():
        seconds, error = timed_decode(codec, text)
        if error:
            crashes += 1
            first_crash = first_crash or error
        per_mb = seconds / (len(text) / (1 << 20))
        if per_mb > worst:
            worst, worst_kind = per_mb, kind
    return {
        "crashes": crashes,
        "max_ms": slowest * 1000,
        "ms_per_mb": worst * 1000,
        "worst_1mb": worst_kind,
        "first_crash": first_crash,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="random strings per codec")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(
        f"{'codec':<10} {'strings':>8} {'crashes':>8} {'max ms':>8} {'ms per MB':>10}  slowest 1 MB"
    )
    failed = False
    for name in list_codecs():
        row = fuzz(get_codec(name), args.n, args.seed)
        print(
            f"{name:<10} {args.n:>8} {row['crashes']:>8} {row['max_ms']:>8.1f} "
            f"{row['ms_per_mb']:>10.0f}  {row['worst_1mb']}"
        )
        if row["first_crash"]:
            failed = True
            print(row["first_crash"], file=sys.stderr)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
