r"""Losses over ``[batch, seq, vocab]`` logits with geometry-aware location targets.

Every supervised position has a target ``τ``: its label token (text positions)
or, at location positions (label among ``loc_token_ids``), the mixture
``hard_weight * one_hot + soft_weight * t`` with ``t`` a row of
:func:`loctune.targets.make_targets` over the location tokens. Write
``p = softmax(z)``, ``m = Σ τ`` (1 except for mixtures such as DIST2Loss) and
``\bar z = Σ_k τ_k z_k``. Two per-position losses:

- cross-entropy: ``L = m logsumexp(z) - \bar z = -Σ_k τ_k log p_k``, gradient
  ``m p - τ``.
- GEM (Li et al., arXiv 2408.16673), as the official ``gem_loss``
  (github.com/liziniu/GEM): ``q = softmax(z / beta)`` and weights ``w_v = 1``
  (``h="linear"``) or ``sigmoid(0.01 (z_v - z_y))`` (``h="logsigmoid"``), both
  detached, and ``L = -Σ_v q_v w_v (log p_y - log p_v)``. Since
  ``log p_y - log p_v = z_y - z_v`` this is ``Σ_v c_v (z_v - z_y)`` with
  ``c = q * w``, and its logit gradient is ``c - C e_y`` with ``C = Σ_v c_v``
  (``q - e_y`` for linear ``h``; at ``beta = 1`` that is CE's ``p - e_y``).
  For a soft target ``τ`` (normalised to mass 1 for GEM) we take the
  expectation of the log-likelihood term over the target,

  .. math:: L = -Σ_v c_v \Big(Σ_k τ_k \log p_k - \log p_v\Big) = Σ_v c_v (z_v - \bar z),

  with ``w_v = sigmoid(0.01 (z_v - \bar z))``, whose gradient is
  ``c - C τ``: ``q - τ`` for linear ``h``. A one-hot ``τ`` gives the official loss.

Cost. Neither loss stores a full-vocabulary intermediate: the logits are
processed in row chunks and each chunk's gradient is computed in the same pass
that computes its loss (it is needed anyway, and this halves the passes over
the logits compared with recomputing in backward); what is kept for backward
is the gradient itself, in the logits' dtype, which is what backward returns.
The soft part touches only the ``[rows, n_loc]`` location slice; no
``[tokens, vocab]`` target is ever built. :meth:`LocationLoss.fused_linear`
goes further and never holds more than one chunk of logits.

Two kernels compute the full-vocabulary part. ``kernel="torch"`` (reference,
any device) runs PyTorch ops on row chunks. ``kernel="triton"`` (CUDA) runs
:mod:`loctune.triton_rows`: one pass for per-row statistics, one that writes the
gradient, no chunking and no full-vocabulary intermediate; the entries the
target touches are then rewritten from fp32 values, so bf16 gradients are
rounded once. ``kernel="auto"`` (the default) takes Triton for CUDA logits when
it is installed and PyTorch otherwise: on one H100 the Triton kernel takes
0.4-0.6x the time of ``F.cross_entropy`` on fp32 logits and 0.5-0.9x on bf16,
the PyTorch kernel 1.1-2.6x and 3-6x (``benchmarks/loss_bench.py``; README).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from loctune.codecs.base import LocationSpace
from loctune.config import coerce_options, parse_spec
from loctune.targets import TargetSpec, make_targets
from loctune.types import IGNORE_INDEX

LOSS_NAMES = ("ce", "soft_ce", "gem")
KERNELS = ("torch", "triton", "auto")


@dataclass
class LossConfig:
    """Which loss, on which positions, with which location targets.

    ``name``: ``ce`` (one-hot everywhere), ``soft_ce`` (``targets`` at location
    positions, CE elsewhere) or ``gem`` (GEM at location positions, with
    ``targets``; text positions get CE, or GEM too with ``gem_scope="all"``).
    At location positions the target is ``hard_weight * one_hot + soft_weight *
    targets``: DIST2Loss (arXiv 2503.02379) is ``soft_ce`` with Gaussian targets,
    ``hard_weight=1, soft_weight=0.1`` and ``soft_kl=True`` (preset ``"dist2"``): the
    soft part is then reported as ``soft_weight * KL(t || p)``, CE's ``-Σ t log p``
    less the target's entropy, a constant, so the gradient is the same. GEM normalises
    that mixture. ``emd_weight`` adds, at location positions, that weight times the
    earth-mover (Wasserstein-1) distance between the model's location distribution
    (the softmax over the location tokens only) and the true location, a Dirac, for
    which it is the expected distance ``Σ_k p_k d(k, y)`` under any ground metric: on
    the 2-D grid of patch-index codecs too (``d`` from :meth:`LocationSpace.distance`,
    divided by the axis length ``n``). That is the number-token-loss idea (arXiv
    2411.02083, NTL-WAS) over location bins, preset ``"wasserstein"``.
    ``chunk_elements`` bounds the logits processed at once (rows x vocab; 2**26 is
    256 MiB of fp32); ``fused_chunk_rows`` is the least number of rows per chunk of
    :meth:`LocationLoss.fused_linear`, whose every chunk also reads and writes the
    ``[V, H]`` weight gradient. ``kernel`` computes the full-vocabulary passes:
    ``torch``, ``triton`` or ``auto`` (see the module docstring).
    """

    name: str = "ce"
    targets: TargetSpec = field(default_factory=TargetSpec)
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    beta: float = 0.7
    h: str = "logsigmoid"
    gem_scope: str = "location"
    chunk_elements: int = 1 << 26
    fused_chunk_rows: int = 1024
    kernel: str = "auto"
    soft_kl: bool = False
    emd_weight: float = 0.0

    def __post_init__(self):
        if self.name not in LOSS_NAMES:
            raise ValueError(f"LossConfig.name must be one of {LOSS_NAMES}, got {self.name!r}")
        if self.h not in ("linear", "logsigmoid"):
            raise ValueError(f"LossConfig.h must be 'linear' or 'logsigmoid', got {self.h!r}")
        if self.gem_scope not in ("location", "all"):
            raise ValueError(
                f"LossConfig.gem_scope must be 'location' or 'all', got {self.gem_scope!r}"
            )
        if self.kernel not in KERNELS:
            raise ValueError(f"LossConfig.kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.beta <= 0:
            raise ValueError(f"LossConfig.beta must be > 0, got {self.beta}")
        if self.hard_weight < 0 or self.soft_weight < 0 or self.hard_weight + self.soft_weight <= 0:
            raise ValueError(
                "LossConfig.hard_weight and soft_weight must be >= 0 with a positive sum, got "
                f"{self.hard_weight} and {self.soft_weight}"
            )
        if self.soft_kl and self.name != "soft_ce":
            raise ValueError(f"LossConfig.soft_kl is a soft_ce option, got name {self.name!r}")
        if not self.emd_weight >= 0:
            raise ValueError(f"LossConfig.emd_weight must be >= 0, got {self.emd_weight}")
        for name in ("chunk_elements", "fused_chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"LossConfig.{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------
# per-chunk kernel


@dataclass
class _Group:
    """Supervised rows sharing one loss (``mode``), with their targets.

    ``rows`` indexes the flat ``[N, V]`` logits, or is ``None`` for all N rows (then
    chunks are views, not copies). Row r's target is ``hard[r] * e_{label[r]}`` plus
    ``soft[soft_ptr[r]]`` on the location ids when ``soft_ptr[r] >= 0``; ``mass[r]``
    is its total mass.
    """

    mode: str
    rows: torch.Tensor | None
    label: torch.Tensor
    hard: torch.Tensor
    mass: torch.Tensor
    soft: torch.Tensor | None = None
    soft_ptr: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.label.numel()


@dataclass
class _Plan:
    """Everything the autograd functions need besides the differentiable inputs."""

    groups: list[_Group]
    ignored: torch.Tensor  # rows in no group: their gradient is zero
    scale: float  # 1 / denominator of the mean
    loc_ids: torch.Tensor
    beta: float
    h: str
    chunk_elements: int
    fused_chunk_rows: int
    kernel: str
    offset: float = 0.0  # constant added to the summed loss: -entropy of KL targets
    loc_rows: torch.Tensor | None = None  # rows at location positions (for emd_weight)
    loc_index: torch.Tensor | None = None  # their true location

    @property
    def sig_k(self) -> float | None:
        """GEM's ``w = sigmoid(sig_k x)`` on ``x = (z - zbar) / beta``; None for linear ``h``."""
        return 0.01 * self.beta if self.h == "logsigmoid" else None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 logits; fp64 stays fp64 (reference tests)."""
    return torch.promote_types(dtype, torch.float32)


def _index(x: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor) -> tuple:
    """Advanced index of ``x[rows][:, cols]`` for ``cols`` ``[K]``, or of row-wise picks for
    ``cols`` ``[R, 1]``, without copying whole rows (``rows=None``: every row of ``x``)."""
    r = torch.arange(x.shape[0], device=x.device) if rows is None else rows
    return r[:, None], cols


def _at(x: torch.Tensor, rows, cols: torch.Tensor) -> torch.Tensor:
    return x[_index(x, rows, cols)]


def _put_at(x: torch.Tensor, rows, cols: torch.Tensor, values: torch.Tensor) -> None:
    """The write of :func:`_at`: ``x[rows][:, cols] = values`` in place."""
    x.index_put_(_index(x, rows, cols), values)


def _target_dot(x: torch.Tensor, label, hard, soft, loc_ids) -> torch.Tensor:
    """``Σ_k τ_k x_k`` per row, touching only the label column and the location slice."""
    acc = _compute_dtype(x.dtype)
    out = hard * x.gather(1, label[:, None]).squeeze(1).to(acc)
    if soft is not None:
        out = out + (x.index_select(1, loc_ids).to(acc) * soft).sum(1)
    return out


def _subtract_target(grad: torch.Tensor, label, hard, soft, loc_ids, coef: torch.Tensor) -> None:
    """``grad -= coef[:, None] * τ`` in place."""
    grad.scatter_add_(1, label[:, None], -(coef * hard)[:, None].to(grad.dtype))
    if soft is not None:
        grad.index_add_(1, loc_ids, (soft * coef[:, None]).to(grad.dtype), alpha=-1)


def _chunk_loss(z, mode, label, hard, mass, soft, plan: _Plan, want_grad: bool, dest=None):
    """Per-row losses of ``z`` (``[C, V]``, any float dtype; fp32 inside) and, when
    ``want_grad``, ``plan.scale`` times their gradient, written into ``dest`` (any float
    dtype) when given, else returned as a new tensor.

    Each full-vocabulary pass costs as much as the whole soft part, so the scaling is
    the last pass and writes straight into ``dest``.
    """
    if plan.kernel == "triton":
        dest = z if dest is None else dest  # z is a chunk made for this call: overwrite it
        loss = _rows_loss_triton(z, None, mode, label, hard, mass, soft, plan, want_grad, dest)
        return loss, dest if want_grad else None
    if mode == "ce":
        logp = torch.log_softmax(z, 1, dtype=_compute_dtype(z.dtype))
        loss = -_target_dot(logp, label, hard, soft, plan.loc_ids)
        if not want_grad:
            return loss, None
        p = logp.exp_()
        _subtract_target(p, label, hard, soft, plan.loc_ids, 1.0 / mass)  # p - τ/m
        row_scale = plan.scale * mass
    else:
        zbar = _target_dot(z, label, hard, soft, plan.loc_ids)
        # (z - zbar) / beta in one pass, promoted to the compute dtype
        sb = torch.addcmul((-zbar / plan.beta)[:, None], z, z.new_ones(()), value=1.0 / plan.beta)
        p = torch.softmax(sb, 1)  # q, then c = q * w
        if plan.sig_k is not None:
            p.mul_(torch.mul(sb, plan.sig_k).sigmoid_())  # one temporary, not two
        loss = plan.beta * torch.linalg.vecdot(p, sb)
        if not want_grad:
            return loss, None
        _subtract_target(p, label, hard, soft, plan.loc_ids, p.sum(1))  # c - C τ
        row_scale = torch.full_like(loss, plan.scale)
    if dest is None:
        return loss, p.mul_(row_scale[:, None])
    if dest.dtype != p.dtype:  # a mul with a narrower out= would allocate a wide temporary
        return loss, dest.copy_(p.mul_(row_scale[:, None]))
    return loss, torch.mul(p, row_scale[:, None], out=dest)


def _rows_loss_triton(z, rows, mode, label, hard, mass, soft, plan: _Plan, want_grad, dest):
    """Per-row losses of rows ``rows`` of ``z`` (all when None) by :mod:`loctune.triton_rows`
    and, when ``want_grad``, ``plan.scale`` times their gradient in the same rows of ``dest``.

    CE is the ``shift = 0, beta = 1`` case of the kernels' ``x = (z - shift) / beta``:
    ``L = m lse - zbar``, gradient ``scale (m p - τ)``. GEM: ``L = beta A / S``,
    gradient ``scale (c - C τ)`` with ``C = B / S``.
    """
    triton_rows = _triton_rows(z)
    # the logits τ touches, read before the gradient may overwrite them (fused_linear)
    acc = _compute_dtype(z.dtype)
    z_label = _at(z, rows, label[:, None]).squeeze(1).to(acc)
    z_loc = _at(z, rows, plan.loc_ids).to(acc) if soft is not None else None
    zbar = hard * z_label + ((z_loc * soft).sum(1) if soft is not None else 0.0)
    if mode == "ce":
        shift, beta, sig_k = None, 1.0, None
        m, s, _, _ = triton_rows.row_stats(z, rows)
        lse = m + s.log()
        loss = mass * lse - zbar
        coef, target_coef = plan.scale * mass, torch.full_like(lse, plan.scale)
    else:
        shift, beta, sig_k = zbar, plan.beta, plan.sig_k
        m, s, a, b = triton_rows.row_stats(z, rows, shift, beta, sig_k, need_ab=True)
        lse = m + s.log()
        loss = beta * a / s
        coef, target_coef = torch.full_like(lse, plan.scale), plan.scale * b / s
    if want_grad:
        triton_rows.row_grad(z, dest, lse, coef, rows, shift, beta, sig_k)

        def grad_at(x):  # the kernel's value at logits x [R, K], in fp32
            x = (x - shift[:, None]) / beta if shift is not None else x
            g = coef[:, None] * torch.exp(x - lse[:, None])
            return g * torch.sigmoid(sig_k * x) if sig_k is not None else g

        # rewrite the entries τ touches (loc slice, then the label column) from fp32
        label_target = hard
        if soft is not None:
            loc = grad_at(z_loc) - target_coef[:, None] * soft
            _put_at(dest, rows, plan.loc_ids, loc.to(dest.dtype))
            label_target = hard + (soft * (plan.loc_ids == label[:, None])).sum(1)
        col = grad_at(z_label[:, None]) - (target_coef * label_target)[:, None]
        _put_at(dest, rows, label[:, None], col.to(dest.dtype))
    return loss


def _triton_rows(z: torch.Tensor):
    """:mod:`loctune.triton_rows`, once checked that it can run on ``z``."""
    try:
        from loctune import triton_rows
    except ImportError as e:
        raise ImportError("LossConfig.kernel='triton' needs the triton package") from e
    if z.device.type != "cuda" and not triton_rows.INTERPRETED:
        raise ValueError(
            f"LossConfig.kernel='triton' runs on CUDA tensors, got logits on {z.device} "
            "(use kernel='torch' or 'auto'; TRITON_INTERPRET=1 runs it on CPU, slowly, for tests)"
        )
    return triton_rows


def _resolve_kernel(kernel: str, device: torch.device) -> str:
    """``auto``: Triton for CUDA tensors when it is installed, else the PyTorch kernel."""
    if kernel != "auto":
        return kernel
    if device.type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


def _soft_rows(g: _Group, sl: slice) -> torch.Tensor | None:
    """The ``[rows, n_loc]`` soft target part of rows ``sl`` of group ``g`` (zero where none)."""
    if g.soft is None:
        return None
    ptr = g.soft_ptr[sl]
    return g.soft[ptr.clamp(min=0)] * (ptr >= 0)[:, None]


def _run_chunks(
    plan: _Plan, vocab: int, logits_of, take_grad, want_grad: bool, dest_of=None, min_rows: int = 1
) -> torch.Tensor:
    """Sum of row losses over all groups, divided by the plan's denominator.

    ``logits_of(rows)`` gives a chunk's ``[C, V]`` logits (``rows`` is a slice or an
    index tensor); ``take_grad(rows, grad)`` receives each chunk's scaled gradient,
    unless ``dest_of(rows)`` gave a view to write it into. Chunks hold
    ``plan.chunk_elements`` logits, and at least ``min_rows`` rows.
    """
    per_chunk = max(min_rows, plan.chunk_elements // vocab, 1)
    total = torch.zeros((), dtype=torch.float64, device=plan.loc_ids.device)
    for g in plan.groups:
        for start in range(0, len(g), per_chunk):
            sl = slice(start, start + per_chunk)
            rows = sl if g.rows is None else g.rows[sl]
            dest = dest_of(rows) if want_grad and dest_of is not None else None
            loss, grad = _chunk_loss(
                logits_of(rows),
                g.mode,
                g.label[sl],
                g.hard[sl],
                g.mass[sl],
                _soft_rows(g, sl),
                plan,
                want_grad,
                dest,
            )
            total += loss.sum()
            if grad is not None and dest is None:
                take_grad(rows, grad)
    return total * plan.scale


def _rows_of(x: torch.Tensor, rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _put_rows(dst: torch.Tensor, rows, src: torch.Tensor) -> None:
    if isinstance(rows, slice):
        dst[rows].copy_(src)
    else:
        dst.index_copy_(0, rows, src.to(dst.dtype))


def _scale_saved(ctx, grad_out: torch.Tensor) -> list[torch.Tensor | None]:
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(
            "loctune losses compute their gradient in forward and release it in backward; "
            "backward through the same loss twice (retain_graph) is not supported"
        )
    ctx.grads = None
    if not bool(grad_out == 1):
        for g in grads:
            if g is not None:
                g.mul_(grad_out.to(g.dtype))
    return grads


class _LogitsLoss(torch.autograd.Function):
    """Mean loss of flat logits ``[N, V]``; the gradient is computed in forward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, plan: _Plan) -> torch.Tensor:
        want = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if want else None
        if plan.kernel == "triton":  # whole groups: the kernels hold nothing of vocabulary size
            total = sum(
                _rows_loss_triton(
                    logits, g.rows, g.mode, g.label, g.hard, g.mass, _soft_rows(g, slice(None)),
                    plan, want, grad,
                ).sum(dtype=torch.float64)
                for g in plan.groups
            )  # fmt: skip
            loss = torch.as_tensor(total, device=logits.device) * plan.scale
        else:
            loss = _run_chunks(
                plan,
                logits.shape[1],
                lambda rows: _rows_of(logits, rows),
                lambda rows, g: _put_rows(grad, rows, g),
                want,
                dest_of=lambda rows: grad[rows] if isinstance(rows, slice) else None,
            )
        if want and plan.ignored.numel():
            grad.index_fill_(0, plan.ignored, 0)
        ctx.grads = [grad]
        return loss.to(_compute_dtype(logits.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = _scale_saved(ctx, grad_out)
        return grad, None


class _FusedLinearLoss(torch.autograd.Function):
    """Mean loss of ``hidden @ weight.T + bias`` without holding more than a chunk of logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _Plan) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None

        def take(rows, g):
            h = _rows_of(hidden, rows)
            g = g.to(weight.dtype)
            if grad_h is not None:
                _put_rows(grad_h, rows, g @ weight)
            if grad_w is not None:
                grad_w.addmm_(g.t(), h)
            if grad_b is not None:
                grad_b.add_(g.sum(0).to(grad_b.dtype))

        loss = _run_chunks(
            plan,
            weight.shape[0],
            lambda rows: F.linear(_rows_of(hidden, rows), weight, bias),
            take,
            any((need_h, need_w, need_b)),
            min_rows=plan.fused_chunk_rows,
        )
        ctx.grads = [grad_h, grad_w, grad_b]
        return loss.to(_compute_dtype(hidden.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        return (*_scale_saved(ctx, grad_out), None)


# ---------------------------------------------------------------------------------------
# the module


class LocationLoss:
    """A :class:`LossConfig` bound to a vocabulary's location tokens and their geometry.

    ``loc_token_ids`` are the vocabulary ids of the codec's location tokens, in
    location order (id ``k`` is location ``k`` of ``space``). ``space`` may be
    ``None`` (a codec writing coordinates as plain text) for ``ce`` only.
    """

    def __init__(
        self, config: LossConfig, loc_token_ids: Sequence[int], space: LocationSpace | None
    ):
        self.config = config
        self.loc_token_ids = torch.as_tensor(list(loc_token_ids), dtype=torch.long)
        self.space = space
        ids = self.loc_token_ids
        if ids.numel() and (int(ids.min()) < 0 or ids.unique().numel() != ids.numel()):
            raise ValueError("loc_token_ids must be distinct, non-negative vocabulary ids")
        if (config.name != "ce" or config.emd_weight) and (space is None or not ids.numel()):
            raise ValueError(
                f"loss {config.name!r} needs location tokens; this codec writes coordinates "
                "as text "
                "(use name='ce' without emd_weight)"
            )
        if space is not None and ids.numel() and ids.numel() != space.size:
            raise ValueError(
                f"{ids.numel()} location token ids for a location space of {space.size}"
            )
        self._lookup: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        continuous: torch.Tensor | None = None,
        shift: bool = True,
        num_items_in_batch=None,
    ) -> torch.Tensor:
        """Mean loss of ``logits`` ``[B, S, V]`` against ``labels`` ``[B, S]`` (-100 ignored).

        ``shift=True`` for causal models (logit t predicts label t+1; the labels are
        shifted, the logits are not copied); encoder-decoders (Florence-2) pass
        ``shift=False``. ``continuous`` (``[B, S, dim]``, NaN at non-location
        positions) feeds ``two_bin`` targets. The result is the summed loss divided
        by ``num_items_in_batch`` when given (Trainer's gradient accumulation), else
        by the number of supervised positions.
        """
        if logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"logits {list(logits.shape)} and labels {list(labels.shape)} disagree: "
                "expected logits [*labels.shape, vocab]"
            )
        labels, continuous = self._align(labels.to(logits.device), continuous, shift)
        flat = logits.reshape(-1, logits.shape[-1])
        plan = self._plan(flat.shape[1], labels.reshape(-1), continuous, num_items_in_batch)
        if plan.kernel == "triton":  # the kernels walk rows with unit column stride
            flat = flat.contiguous()
        loss = _LogitsLoss.apply(flat, plan)
        if plan.loc_rows is not None:
            loc_logits = flat.index_select(0, plan.loc_rows)[:, plan.loc_ids]
            loss = loss + self._emd(loc_logits, plan)
        return loss + plan.offset * plan.scale

    def fused_linear(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        continuous: torch.Tensor | None = None,
        shift: bool = False,
        num_items_in_batch=None,
    ) -> torch.Tensor:
        """The same loss of ``hidden @ weight.T (+ bias)``, never materialising all logits.

        ``hidden`` is ``[*labels.shape, H]``, ``weight`` the output projection
        ``[V, H]``. Each chunk's logits are made, turned into gradients for
        ``hidden``, ``weight`` and ``bias`` and dropped; peak memory holds one
        ``[chunk, V]`` block instead of ``[N, V]``.
        """
        if hidden.shape[:-1] != labels.shape or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"fused_linear: hidden {list(hidden.shape)}, weight {list(weight.shape)} "
                "and labels "
                f"{list(labels.shape)} disagree: expected hidden [*labels.shape, H], weight [V, H]"
            )
        labels, continuous = self._align(labels.to(hidden.device), continuous, shift)
        flat = hidden.reshape(-1, hidden.shape[-1])
        plan = self._plan(weight.shape[0], labels.reshape(-1), continuous, num_items_in_batch)
        loss = _FusedLinearLoss.apply(flat, weight, bias, plan)
        if plan.loc_rows is not None:
            ids = plan.loc_ids
            loc_logits = F.linear(
                flat.index_select(0, plan.loc_rows),
                weight[ids],
                None if bias is None else bias[ids],
            )
            loss = loss + self._emd(loc_logits, plan)
        return loss + plan.offset * plan.scale

    def compute_loss_func(self, *, shift: bool) -> Callable:
        """Drop-in for ``transformers.Trainer(compute_loss_func=...)``.

        Returns ``fn(outputs, labels, num_items_in_batch=None)``; ``outputs`` has
        ``.logits`` (or a ``"logits"`` key). ``shift=True`` for causal models,
        ``False`` for encoder-decoders whose logits align with their labels; there
        is no default, since a wrong one trains misaligned without an error
        (:func:`loctune.hf_trainer.compute_loss_func` takes it from the adapter).
        """

        def fn(outputs, labels, num_items_in_batch=None):
            logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
            return self(logits, labels, shift=shift, num_items_in_batch=num_items_in_batch)

        return fn

    def location_index(self, labels: torch.Tensor, vocab: int) -> torch.Tensor:
        """Location index (0..n_loc-1) of each label id, -1 for other ids and -100."""
        key = (str(labels.device), vocab)
        if key not in self._lookup:
            if self.loc_token_ids.numel() and int(self.loc_token_ids.max()) >= vocab:
                raise ValueError(
                    f"loc_token_ids reach {int(self.loc_token_ids.max())} but vocab is {vocab}"
                )
            lookup = torch.full((vocab,), -1, dtype=torch.long)
            lookup[self.loc_token_ids] = torch.arange(self.loc_token_ids.numel())
            self._lookup[key] = lookup.to(labels.device)
        return torch.where(labels >= 0, self._lookup[key][labels.clamp(min=0)], -1)

    # -- internals -----------------------------------------------------------------------

    def _emd(self, loc_logits: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """``emd_weight`` times the summed W1 to the true location, over the plan's denominator."""
        p = torch.softmax(loc_logits.to(_compute_dtype(loc_logits.dtype)), dim=-1)
        d = self.space.distance(plan.loc_index).to(p.dtype) / self.space.n
        return self.config.emd_weight * plan.scale * torch.linalg.vecdot(p, d).sum()

    @staticmethod
    def _align(labels, continuous, shift: bool):
        if continuous is not None:
            continuous = torch.as_tensor(continuous, device=labels.device)
            if continuous.shape[:-1] != labels.shape:
                raise ValueError(
                    f"continuous {list(continuous.shape)} must be [*labels.shape, dim] "
                    f"with labels {list(labels.shape)}"
                )
        if not shift:
            return labels, continuous
        labels = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
        if continuous is not None:
            continuous = F.pad(continuous[..., 1:, :], (0, 0, 0, 1), value=float("nan"))
        return labels, continuous

    def _plan(self, vocab: int, labels: torch.Tensor, continuous, num_items_in_batch) -> _Plan:
        cfg = self.config
        valid = labels != IGNORE_INDEX
        bad = valid & ((labels < 0) | (labels >= vocab))
        if bad.any():
            raise ValueError(
                f"labels must be -100 or in [0, {vocab}); got {labels[bad][:5].tolist()}"
            )
        denominator = (
            float(num_items_in_batch) if num_items_in_batch is not None else float(valid.sum())
        )
        n = labels.numel()
        device = labels.device
        hard = torch.ones(n, device=device)
        mass = torch.ones(n, device=device)
        soft = soft_ptr = None
        loc_mode = "gem" if cfg.name == "gem" else "ce"
        text_mode = "gem" if cfg.name == "gem" and cfg.gem_scope == "all" else "ce"
        is_loc = torch.zeros_like(valid)
        offset, emd_rows, emd_index = 0.0, None, None
        if cfg.name != "ce" or cfg.emd_weight:
            loc_index = self.location_index(labels, vocab)
            is_loc = valid & (loc_index >= 0)
            loc_rows = is_loc.nonzero().squeeze(1)
            if cfg.emd_weight and loc_rows.numel():
                emd_rows, emd_index = loc_rows, loc_index[loc_rows]
        if cfg.name != "ce":
            a, t = self._location_targets(loc_index[loc_rows], continuous, loc_rows)
            if cfg.soft_kl and t is not None:  # Σ t log(t / w) = w Σ t' log t' for t = w t'
                offset = float(torch.special.xlogy(t, t / cfg.soft_weight).sum())
            hard[loc_rows] = a
            mass[loc_rows] = a + (t.sum(1) if t is not None else 0.0)
            if loc_mode == "gem":  # GEM matches a distribution: normalise the mixture
                hard[loc_rows] = a / mass[loc_rows]
                t = t / mass[loc_rows, None] if t is not None else None
                mass[loc_rows] = 1.0
            if t is not None and t.shape[0]:
                soft = t
                soft_ptr = torch.full((n,), -1, dtype=torch.long, device=device)
                soft_ptr[loc_rows] = torch.arange(loc_rows.numel(), device=device)
        masks = {loc_mode: valid & is_loc}
        masks[text_mode] = masks.get(text_mode, torch.zeros_like(valid)) | (valid & ~is_loc)
        groups = []
        for mode, mask in masks.items():
            rows = None if bool(mask.all()) else mask.nonzero().squeeze(1)
            if rows is not None and not rows.numel():
                continue
            per_row = [labels.clamp(min=0), hard, mass, soft_ptr]
            if rows is not None:
                per_row = [None if x is None else x[rows] for x in per_row]
            label, row_hard, row_mass, row_ptr = per_row
            groups.append(_Group(mode, rows, label, row_hard, row_mass, soft, row_ptr))
        return _Plan(
            groups,
            (~valid).nonzero().squeeze(1),
            1.0 / max(denominator, 1.0),
            self.loc_token_ids.to(device),
            cfg.beta,
            cfg.h,
            cfg.chunk_elements,
            cfg.fused_chunk_rows,
            _resolve_kernel(cfg.kernel, device),
            offset,
            emd_rows,
            emd_index,
        )

    def _location_targets(self, index, continuous, loc_rows):
        """One-hot coefficient and ``[R, n_loc]`` soft part (or None) at location rows."""
        cfg = self.config
        if cfg.targets.kind == "one_hot":
            return cfg.hard_weight + cfg.soft_weight, None
        cont = None
        if cfg.targets.needs_continuous:
            if continuous is None:
                raise ValueError(
                    f"targets {cfg.targets.kind!r} need the unquantised coordinates: pass "
                    "continuous= (batch['loc_continuous'] from the adapter's collate)"
                )
            cont = continuous.reshape(-1, continuous.shape[-1])[loc_rows]
        t = make_targets(cfg.targets, index, self.space, cont).to(index.device)
        return cfg.hard_weight, t * cfg.soft_weight


# ---------------------------------------------------------------------------------------
# registry: presets chosen by name from configs and the command line

_PRESETS: dict[str, LossConfig] = {}


def register_loss(name: str, config: LossConfig) -> None:
    """Make ``config`` available to :func:`loss_config` / :func:`build_loss` as ``name``."""
    _PRESETS[name] = config


for _name, _config in {
    "ce": LossConfig("ce"),
    "soft_ce": LossConfig("soft_ce", TargetSpec("distance_inverse")),
    "distance_inverse": LossConfig("soft_ce", TargetSpec("distance_inverse")),
    "gaussian": LossConfig("soft_ce", TargetSpec("gaussian")),
    "label_smoothing": LossConfig("soft_ce", TargetSpec("label_smoothing")),
    "two_bin": LossConfig("soft_ce", TargetSpec("two_bin")),
    "dist2": LossConfig(
        "soft_ce", TargetSpec("gaussian"), hard_weight=1.0, soft_weight=0.1, soft_kl=True
    ),
    "wasserstein": LossConfig("ce", emd_weight=1.0),
    "gem": LossConfig("gem"),
    "gem_linear": LossConfig("gem", h="linear"),  # the paper's linear h, beside its logsigmoid
    "gem_distance_inverse": LossConfig("gem", TargetSpec("distance_inverse")),
}.items():
    register_loss(_name, _config)


def list_losses() -> list[str]:
    return sorted(_PRESETS)


def loss_config(name: str, **overrides) -> LossConfig:
    """Preset ``name`` with ``overrides``: LossConfig fields, or TargetSpec fields
    (``power=3``) applied to its targets, e.g.
    ``loss_config("gem_distance_inverse", beta=0.5, power=4)``.

    ``name`` may carry overrides itself, ``"gem_distance_inverse:beta=2,h=linear"``, so that a
    variant is one string wherever methods are named (compare's ``methods``, ``--method``);
    its values are read as YAML scalars, and keyword ``overrides`` win over them.
    """
    name, parsed = parse_spec(name, "loss spec")
    overrides = {**parsed, **overrides}
    if name not in _PRESETS:
        raise KeyError(f"unknown loss {name!r}; available: {list_losses()}")
    config = _PRESETS[name]
    loss_fields = {f.name for f in fields(LossConfig)}
    target_fields = {f.name for f in fields(TargetSpec)}
    unknown = set(overrides) - loss_fields - target_fields
    if unknown:
        raise TypeError(
            f"unknown loss option(s) {sorted(unknown)}; LossConfig/TargetSpec fields only"
        )
    what = f"loss {name!r}"
    target_overrides = coerce_options(
        TargetSpec, {k: v for k, v in overrides.items() if k in target_fields}, what
    )
    loss_overrides = coerce_options(
        LossConfig, {k: v for k, v in overrides.items() if k in loss_fields}, what
    )
    config = replace(config, **loss_overrides)
    if target_overrides:
        config = replace(config, targets=replace(config.targets, **target_overrides))
    return config


def build_loss(
    name: str, loc_token_ids: Sequence[int], space: LocationSpace | None, **overrides
) -> LocationLoss:
    """``build_loss("gem_distance_inverse", ids, space, power=3)``: a preset bound to a
    vocabulary."""
    return LocationLoss(loss_config(name, **overrides), loc_token_ids, space)
