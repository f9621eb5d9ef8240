"""The Triton kernels (loctune.triton_rows) against the PyTorch kernel of the same losses.

On a machine without CUDA they run in Triton's interpreter (tests/conftest.py); a
subprocess also compiles them for sm_80 and sm_90, so a kernel that only the
interpreter accepts fails here too.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from loctune import triton_rows  # noqa: E402
from loctune.codecs import LocationSpace  # noqa: E402
from loctune.losses import LocationLoss, _resolve_kernel, loss_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V, N_LOC, LOC0 = 300, 24, 200  # location tokens at ids 200..223
LOC_IDS = list(range(LOC0, LOC0 + N_LOC))
SPACE = LocationSpace("bins", N_LOC)
CASES = [
    ("ce", {}),
    ("distance_inverse", {}),
    ("gaussian", {}),
    ("dist2", {}),
    ("gem", {}),
    ("gem", {"gem_scope": "all", "h": "linear"}),
    ("gem_distance_inverse", {}),
    ("gem_distance_inverse", {"h": "linear", "beta": 0.5}),
]


BLOCK = triton_rows.BLOCK


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """64-wide tiles: every row spans five, so the online rescaling is exercised."""
    monkeypatch.setattr(triton_rows, "BLOCK", 64)


def batch(seed, b=3, s=9, ignored=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, V, generator=g) * 3
    logits[..., 250:] += 4  # the running max grows in the last tiles
    labels = torch.randint(0, LOC0, (b, s), generator=g)
    loc = torch.rand(b, s, generator=g) < 0.5
    labels[loc] = torch.randint(LOC0, LOC0 + N_LOC, (int(loc.sum()),), generator=g)
    if ignored:
        labels[:, :2] = -100
    return logits.to(DEVICE), labels.to(DEVICE)


def loss_and_grad(name, overrides, kernel, logits, labels, **call):
    loss = LocationLoss(loss_config(name, kernel=kernel, **overrides), LOC_IDS, SPACE)
    x = logits.detach().clone().requires_grad_()
    value = loss(x, labels, **call)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("name, overrides", CASES)
@pytest.mark.parametrize("ignored", [True, False])  # row subsets / every row in one group
def test_triton_matches_torch_kernel(name, overrides, ignored):
    logits, labels = batch(0, ignored=ignored)
    l1, g1 = loss_and_grad(name, overrides, "triton", logits, labels, num_items_in_batch=11)
    l2, g2 = loss_and_grad(name, overrides, "torch", logits.double(), labels, num_items_in_batch=11)
    torch.testing.assert_close(l1.double(), l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1.double(), g2, rtol=1e-4, atol=1e-7)
    if ignored:  # the last position of each row (shift) and the two ignored labels
        assert not g1[:, :1].any() and not g1[:, -1].any()


@pytest.mark.parametrize("name", ["distance_inverse", "gem_distance_inverse"])
def test_triton_bf16_rounds_the_gradient_once(name):
    """bf16 logits: the target entries (p - τ, a difference of near-equal numbers at a
    confident label) are rewritten from fp32, so they match the fp32 result rounded once."""
    logits, labels = batch(1)
    logits[..., LOC0 : LOC0 + N_LOC] += 6  # confident at the location tokens
    lb = logits.to(torch.bfloat16)
    l1, g1 = loss_and_grad(name, {}, "triton", lb, labels)
    l2, g2 = loss_and_grad(name, {}, "torch", lb.double(), labels)
    assert g1.dtype == torch.bfloat16 and l1.dtype == torch.float32
    torch.testing.assert_close(l1.double(), l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2.to(torch.bfloat16), rtol=1e-2, atol=1e-6)
    label_grad = g1.double().gather(-1, labels.clamp(min=0)[..., None].roll(-1, 1))
    ref_label_grad = g2.gather(-1, labels.clamp(min=0)[..., None].roll(-1, 1))
    torch.testing.assert_close(label_grad, ref_label_grad, rtol=8e-3, atol=1e-9)


def test_triton_real_tile_width_and_strided_logits(monkeypatch):
    """The shipped BLOCK over a vocabulary of three tiles, logits not contiguous in vocab."""
    monkeypatch.setattr(triton_rows, "BLOCK", BLOCK)
    g = torch.Generator().manual_seed(5)
    vocab = 2 * BLOCK + 100
    logits = (torch.randn(vocab, 6, generator=g) * 3).to(DEVICE).T[None]  # [1, 6, vocab], strided
    labels = torch.tensor([[-100, 5, LOC0 + 3, 7, LOC0 + 20, vocab - 1]], device=DEVICE)
    l1, g1 = loss_and_grad("gem_distance_inverse", {}, "triton", logits, labels)
    l2, g2 = loss_and_grad("gem_distance_inverse", {}, "torch", logits, labels)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)


def test_triton_ce_handles_masked_vocabulary():
    logits, labels = batch(2)
    logits[..., 280:] = float("-inf")  # e.g. tokens a generation config forbids
    logits[0, 3, :70] = float("-inf")  # the first tile of a row entirely -inf
    l1, g1 = loss_and_grad("ce", {}, "triton", logits, labels)
    l2, g2 = loss_and_grad("ce", {}, "torch", logits, labels)
    assert torch.isfinite(l1) and torch.isfinite(g1).all()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fused_linear_matches_torch_kernel(dtype):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 16, generator=g).to(DEVICE, dtype)
    weight = torch.randn(V, 16, generator=g).div(2).to(DEVICE, dtype)
    _, labels = batch(3, b=2, s=9)
    grads = {}
    for kernel in ("triton", "torch"):
        loss = LocationLoss(
            loss_config(
                "gem_distance_inverse", kernel=kernel, fused_chunk_rows=5, chunk_elements=1
            ),
            LOC_IDS,
            SPACE,
        )
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        value = loss.fused_linear(h, w, labels, shift=True)
        value.backward()
        grads[kernel] = (value.detach(), h.grad, w.grad)
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    for a, b in zip(grads["triton"], grads["torch"], strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_auto_kernel_and_refusals(monkeypatch):
    logits, labels = batch(4)
    assert loss_config("ce").kernel == "auto"  # the default: Triton on CUDA, PyTorch elsewhere
    assert _resolve_kernel("auto", logits.device) == ("triton" if DEVICE == "cuda" else "torch")
    assert _resolve_kernel("auto", torch.device("cpu")) == "torch"
    l1, g1 = loss_and_grad("gem_distance_inverse", {}, "auto", logits, labels)
    l2, g2 = loss_and_grad("gem_distance_inverse", {}, "torch", logits, labels)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    with pytest.raises(ValueError, match="kernel must be one of"):
        loss_config("ce", kernel="cuda")
    if DEVICE == "cpu":
        monkeypatch.setattr(triton_rows, "INTERPRETED", False)
        with pytest.raises(ValueError, match="runs on CUDA tensors"):
            loss_and_grad("ce", {}, "triton", logits, labels)


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from loctune import triton_rows as tr

common = {"V": "i32", "inv_beta": "fp32", "sig_k": "fp32", "rows_ptr": "*i64", "shift_ptr": "*fp32"}
for arch in (80, 90):
    for dt in ("fp32", "bf16"):
        for flag in (True, False):
            stats = {"z_ptr": f"*{dt}", "z_stride": "i64", **{f"{k}_ptr": "*fp32" for k in "msab"}}
            grad = {"z_ptr": f"*{dt}", "z_stride": "i64", "g_ptr": f"*{dt}", "g_stride": "i64",
                    "lse_ptr": "*fp32", "coef_ptr": "*fp32"}
            flags = {"HAS_ROWS": flag, "HAS_SHIFT": flag, "WEIGHTED": flag, "BLOCK": tr.BLOCK}
            for kernel, sig, extra in ((tr._stats_kernel, stats, {"NEED_AB": flag}),
                                       (tr._grad_kernel, grad, {})):
                consts = {**flags, **extra}
                names = kernel.arg_names
                full = {**sig, **common, **{k: "constexpr" for k in consts}}
                src = ASTSource(kernel, {n: full[n] for n in names}, constexprs=consts)
                out = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                     options={"num_warps": tr.NUM_WARPS})
                assert out.asm["cubin"], (kernel, arch, dt, flag)
print("compiled")
"""


def test_kernels_compile_for_ampere_and_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
