r"""The two full-vocabulary passes of :mod:`loctune.losses` as Triton kernels.

Both losses see a row of logits ``z`` through ``x = (z - shift) / beta`` (CE:
``shift = 0, beta = 1``; GEM: ``shift = \bar z``) and need, per row,

- pass 1 (:func:`row_stats`): ``M = max x``, ``S = Σ e`` with ``e = exp(x - M)``,
  and for GEM ``A = Σ e w x`` and ``B = Σ e w`` (``w = sigmoid(k x)`` or 1),
  accumulated online over tiles of the row (rescaled when the running max grows);
- pass 2 (:func:`row_grad`): ``g = coef * exp(x - L) * w`` with ``L = M + log S``,
  written in the gradient's dtype.

That is two reads of the logits and one write of the gradient, with nothing of
vocabulary size stored in between: ``F.cross_entropy`` makes about eight such
passes (log-softmax forward and backward, the dense one-hot gradient). The
target terms touch only the label column and the location slice and stay in
PyTorch. Rows are read through an optional index, so a subset of rows (the
location positions) is processed without gathering copies of them.

With ``TRITON_INTERPRET=1`` set before import, the kernels run on CPU tensors in
Triton's interpreter; the tests use that to check them against the PyTorch path.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _row_of(rows_ptr, i, HAS_ROWS: tl.constexpr):
    """Row of ``z`` that program ``i`` handles, as int64 (``row * stride`` passes 2**31)."""
    if HAS_ROWS:
        row = tl.load(rows_ptr + i).to(tl.int64)
    else:
        row = i.to(tl.int64)
    return row


@triton.jit
def _load_x(z_row_ptr, offs, mask, shift, inv_beta):
    """Tile ``offs`` of ``(z - shift) / beta`` in fp32, -inf where masked."""
    z = tl.load(z_row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    return (z - shift) * inv_beta


@triton.jit
def _shift_of(shift_ptr, i, HAS_SHIFT: tl.constexpr):
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + i)
    else:
        shift = 0.0
    return shift


@triton.jit
def _stats_kernel(z_ptr, z_stride, rows_ptr, shift_ptr, m_ptr, s_ptr, a_ptr, b_ptr, V, inv_beta,
                  sig_k, HAS_ROWS: tl.constexpr, HAS_SHIFT: tl.constexpr, WEIGHTED: tl.constexpr,
                  NEED_AB: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    z_row_ptr = z_ptr + _row_of(rows_ptr, i, HAS_ROWS) * z_stride
    shift = _shift_of(shift_ptr, i, HAS_SHIFT)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    b = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        x = _load_x(z_row_ptr, offs, mask, shift, inv_beta)
        m_new = tl.maximum(m, tl.max(x, 0))
        # a row that is -inf so far has nothing to rescale: avoid exp(-inf - -inf)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - ref)
        e = tl.exp(x - ref)
        s = s * alpha + tl.sum(e, 0)
        if NEED_AB:
            if WEIGHTED:
                e = e * tl.sigmoid(sig_k * x)
            a = a * alpha + tl.sum(e * tl.where(e > 0, x, 0.0), 0)  # e = 0 where x = -inf
            b = b * alpha + tl.sum(e, 0)
        m = m_new
    tl.store(m_ptr + i, m)
    tl.store(s_ptr + i, s)
    if NEED_AB:
        tl.store(a_ptr + i, a)
        tl.store(b_ptr + i, b)


@triton.jit
def _grad_kernel(z_ptr, z_stride, g_ptr, g_stride, rows_ptr, shift_ptr, lse_ptr, coef_ptr, V,
                 inv_beta, sig_k, HAS_ROWS: tl.constexpr, HAS_SHIFT: tl.constexpr,
                 WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    row = _row_of(rows_ptr, i, HAS_ROWS)
    shift = _shift_of(shift_ptr, i, HAS_SHIFT)
    lse = tl.load(lse_ptr + i)
    coef = tl.load(coef_ptr + i)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        x = _load_x(z_ptr + row * z_stride, offs, mask, shift, inv_beta)
        g = tl.exp(x - lse) * coef
        if WEIGHTED:
            g = g * tl.sigmoid(sig_k * x)
        tl.store(g_ptr + row * g_stride + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


INTERPRETED = not isinstance(_stats_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1


def _check(z: torch.Tensor, rows: torch.Tensor | None) -> int:
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"expected [rows, vocab] logits with unit column stride, got {z.shape}")
    return z.shape[0] if rows is None else rows.numel()


def _on(z: torch.Tensor):
    """Launch on ``z``'s GPU: Triton launches on the current device, which need not be it."""
    return torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext()


def row_stats(
    z: torch.Tensor,
    rows: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    beta: float = 1.0,
    sig_k: float | None = None,
    need_ab: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Pass 1 over rows ``rows`` (all when None) of ``z``: fp32 ``M, S`` and, with
    ``need_ab``, ``A, B`` (else None). ``sig_k`` set means ``w = sigmoid(sig_k x)``."""
    n = _check(z, rows)
    m, s = (torch.empty(n, device=z.device, dtype=torch.float32) for _ in range(2))
    a, b = (torch.empty_like(m) for _ in range(2)) if need_ab else (m, m)
    if n:
        with _on(z):
            _stats_kernel[(n,)](
                z, z.stride(0), rows if rows is not None else z, shift if shift is not None else m,
                m, s, a, b, z.shape[1], 1.0 / beta, sig_k or 0.0,
                HAS_ROWS=rows is not None, HAS_SHIFT=shift is not None, WEIGHTED=sig_k is not None,
                NEED_AB=need_ab, BLOCK=BLOCK, num_warps=NUM_WARPS,
            )  # fmt: skip
    return (m, s, a, b) if need_ab else (m, s, None, None)


def row_grad(
    z: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    rows: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    beta: float = 1.0,
    sig_k: float | None = None,
) -> None:
    """Pass 2: ``out[r] = coef * exp(x - lse) * w`` for the rows ``rows`` of ``z``
    (``out`` has ``z``'s shape, any float dtype; it may be ``z`` itself)."""
    n = _check(z, rows)
    if out.shape != z.shape or out.stride(1) != 1:
        raise ValueError(f"gradient buffer {list(out.shape)} does not match logits {list(z.shape)}")
    if n:
        with _on(z):
            _grad_kernel[(n,)](
                z, z.stride(0), out, out.stride(0), rows if rows is not None else z,
                shift if shift is not None else lse, lse, coef, z.shape[1], 1.0 / beta,
                sig_k or 0.0,
                HAS_ROWS=rows is not None, HAS_SHIFT=shift is not None, WEIGHTED=sig_k is not None,
                BLOCK=BLOCK, num_warps=NUM_WARPS,
            )  # fmt: skip

