"""Time and peak memory of loctune's losses against torch's F.cross_entropy (run by hand).

Logits of PaliGemma's vocabulary (257,152) for ``--tokens`` positions, 10% of
them location tokens (1,024 location ids), forward + backward, fp32 and bf16.
Cases marked ``[triton]`` use ``LossConfig(kernel="triton")`` (CUDA; the default
there, with ``--kernels torch,triton``). Every row is a ratio to
``F.cross_entropy`` on the same logits measured in the same run; fused-linear
rows are ratios to ``hidden @ W.T`` then ``F.cross_entropy``. Peak memory is
what the step allocates beyond its inputs (the gradient included).

CUDA: ``torch.cuda.max_memory_allocated``, synchronised timings, median of
``--reps`` after warm-up. CPU: wall time in this process; peak memory from
``getrusage`` in a fresh child process per case (Linux), so pass small
``--tokens`` (e.g. 256).

    python benchmarks/loss_bench.py --device cuda
    python benchmarks/loss_bench.py --device cpu --tokens 256 --reps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from loctune.codecs.base import LocationSpace
from loctune.losses import LocationLoss, loss_config

N_LOC = 1024
LOSSES = {  # case name -> loctune preset and overrides
    "ce (ours)": ("ce", {}),
    "soft_ce distance_inverse": ("distance_inverse", {}),
    "gem (all positions)": ("gem", {"gem_scope": "all"}),
    "gem + distance_inverse": ("gem_distance_inverse", {}),
}
TRITON = " [triton]"  # suffix of the cases run by loctune.triton_rows
FUSED = {
    "fused ce": "ce (ours)",
    "fused soft_ce": "soft_ce distance_inverse",
    "fused gem": "gem (all positions)",
}


def make_inputs(args, dtype: torch.dtype, device: str, fused: bool) -> dict[str, torch.Tensor]:
    """Random logits (or hidden states and a projection) and labels, 10% location tokens."""
    g = torch.Generator().manual_seed(0)
    loc0 = min(256_000, args.vocab - N_LOC)  # PaliGemma's <loc0000> is id 256000
    labels = torch.randint(0, loc0, (args.tokens,), generator=g)
    is_loc = torch.rand(args.tokens, generator=g) < args.loc_fraction
    labels[is_loc] = torch.randint(loc0, loc0 + N_LOC, (int(is_loc.sum()),), generator=g)
    out = {"labels": labels.to(device), "loc_ids": torch.arange(loc0, loc0 + N_LOC)}
    # made in place in their dtype, so that making them never peaks above the step itself
    torch.manual_seed(0)
    if fused:
        for name, rows in (("hidden", args.tokens), ("weight", args.vocab)):
            x = torch.randn(rows, args.hidden, device=device, dtype=dtype)
            out[name] = x.div_(args.hidden**0.25).requires_grad_()
    else:
        x = torch.randn(args.tokens, args.vocab, device=device, dtype=dtype)
        out["logits"] = x.mul_(2).requires_grad_()
    return out


def step_fn(case: str, inputs: dict[str, torch.Tensor], chunk_elements: int) -> Callable[[], None]:
    """One forward + backward of ``case`` on ``inputs``."""
    labels = inputs["labels"]
    if case == "F.cross_entropy":
        return lambda: F.cross_entropy(inputs["logits"], labels).backward()
    if case == "matmul + F.cross_entropy":
        return lambda: F.cross_entropy(inputs["hidden"] @ inputs["weight"].T, labels).backward()
    case, triton = case.removesuffix(TRITON), case.endswith(TRITON)
    preset, overrides = LOSSES[FUSED.get(case, case)]
    kernel = "triton" if triton else "torch"
    config = loss_config(preset, chunk_elements=chunk_elements, kernel=kernel, **overrides)
    loss = LocationLoss(config, inputs["loc_ids"].tolist(), LocationSpace("bins", N_LOC))
    if case in FUSED:
        return lambda: loss.fused_linear(inputs["hidden"], inputs["weight"], labels).backward()
    return lambda: loss(inputs["logits"][None], labels[None], shift=False).backward()


def clear_grads(inputs: dict[str, torch.Tensor]) -> None:
    for t in inputs.values():
        t.grad = None


def time_case(step, inputs, device: str, reps: int, warmup: int) -> float:
    """Median seconds of one step."""
    times = []
    for i in range(warmup + reps):
        clear_grads(inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def cuda_peak(step, inputs) -> int:
    """Bytes allocated at the peak of one step beyond what was allocated before it."""
    clear_grads(inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def cpu_peak_child(args, case: str, dtype: torch.dtype) -> int:
    """Run in a fresh process: peak resident memory of one step beyond its inputs."""
    fused = case.removesuffix(TRITON) in FUSED or case.startswith("matmul")
    inputs = make_inputs(args, dtype, "cpu", fused=fused)
    step = step_fn(case, inputs, args.chunk_elements)
    before = _rss_bytes()
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def cpu_peak(args, case: str, dtype_name: str) -> int:
    cmd = [
        sys.executable,
        __file__,
        "--device",
        "cpu",
        "--tokens",
        str(args.tokens),
        "--vocab",
        str(args.vocab),
        "--hidden",
        str(args.hidden),
        "--loc-fraction",
        str(args.loc_fraction),
        "--chunk-elements",
        str(args.chunk_elements),
        "--memory-child",
        json.dumps([case, dtype_name]),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=257_152)
    p.add_argument("--hidden", type=int, default=2048, help="hidden size of the fused-linear cases")
    p.add_argument("--loc-fraction", type=float, default=0.1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--chunk-elements", type=int, default=loss_config("ce").chunk_elements)
    p.add_argument("--no-fused", action="store_true", help="skip the fused-linear cases")
    p.add_argument(
        "--kernels",
        default="torch,triton" if torch.cuda.is_available() else "torch",
        help="loctune kernels to time (LossConfig.kernel); triton needs CUDA",
    )
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        case, dtype_name = json.loads(args.memory_child)
        print(cpu_peak_child(args, case, DTYPES[dtype_name]))
        return

    kernels = args.kernels.split(",")

    def with_kernels(cases):
        return [c for c in cases if "torch" in kernels] + [
            c + TRITON for c in cases if "triton" in kernels
        ]

    groups = [("F.cross_entropy", with_kernels(LOSSES))]
    if not args.no_fused:
        groups.append(("matmul + F.cross_entropy", with_kernels(FUSED)))
    print(
        f"device {args.device}, tokens {args.tokens}, vocab {args.vocab}, {N_LOC} location ids, "
        f"{args.loc_fraction:.0%} location positions, hidden {args.hidden} (fused), "
        f"median of {args.reps} reps; ratios to the baseline of each block"
    )
    print(f"{'dtype':5} {'case':37} {'ms':>9} {'peak MiB':>10} {'time x':>7} {'mem x':>7}")
    cpu_peaks = {}
    if not args.device.startswith("cuda"):
        # Before this process allocates anything: a child's ru_maxrss starts from its parent's
        # resident size at fork, so children must be spawned while that is small.
        for dtype_name in args.dtypes.split(","):
            for baseline, cases in groups:
                for case in [baseline, *cases]:
                    cpu_peaks[dtype_name, case] = cpu_peak(args, case, dtype_name)
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for baseline, cases in groups:
            inputs = make_inputs(args, dtype, args.device, fused=baseline.startswith("matmul"))
            rows = {}
            for case in [baseline, *cases]:
                step = step_fn(case, inputs, args.chunk_elements)
                seconds = time_case(step, inputs, args.device, args.reps, args.warmup)
                if args.device.startswith("cuda"):
                    peak = cuda_peak(step, inputs)
                else:
                    peak = cpu_peaks[dtype_name, case]
                rows[case] = (seconds, peak)
                base_s, base_m = rows[baseline]
                print(
                    f"{dtype_name:5} {case:37} {seconds * 1e3:9.2f} {peak / 2**20:10.1f} "
                    f"{seconds / base_s:7.2f} {peak / max(base_m, 1):7.2f}",
                    flush=True,
                )
            del inputs
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
