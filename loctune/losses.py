r"""Losses over ``[batch, seq, vocab]`` logits with geometry-aware location targets.

Every supervised position has a target: its label token (text positions) or a
distribution ``t`` over the location tokens (location positions, from
:mod:`loctune.targets`). Two per-position losses, both written for a target
``t`` (one-hot for text) and with ``\bar z = \sum_k t_k z_k``:

- cross-entropy: ``m * logsumexp(z) - \bar z`` with ``m = \sum_k t_k``
  (``m = 1`` except for mixed targets such as DIST2Loss), gradient ``m p - t``;
- GEM (Li et al., arXiv 2408.16673, official ``gem_loss``):
  ``q = softmax(z / beta)`` and weights ``w_v = 1`` (``h="linear"``) or
  ``sigmoid(0.01 (z_v - \bar z))`` (``h="logsigmoid"``), both detached, and

  .. math:: L = -\sum_v q_v w_v (\log p_{\bar y} - \log p_v) = \sum_v q_v w_v (z_v - \bar z)

  since ``log p_y - log p_v = z_y - z_v``. For a one-hot target this is the
  official loss term for term; its logit gradient is ``c - C t`` with
  ``c = q * w`` and ``C = \sum_v c_v``, i.e. ``q - t`` for linear ``h``.

Memory: a custom autograd function keeps per-row statistics (logsumexp, the
target logit) and recomputes the full-vocabulary quantities in backward, in
row chunks; no ``[tokens, vocab]`` target, softmax or weight tensor is stored
for backward, and the soft target only ever touches the location slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from loctune.codecs.base import LocationSpace
from loctune.targets import TargetSpec, make_targets

IGNORE = -100


@dataclass
class LossConfig:
    """Which loss, on which positions, with which location targets.

    ``name``: ``ce`` (one-hot everywhere), ``soft_ce`` (``targets`` at location
    positions, CE elsewhere) or ``gem`` (GEM at location positions, with
    ``targets``; text positions get CE, or GEM too with ``gem_scope="all"``).
    At location positions the target is ``hard_weight * one_hot +
    soft_weight * targets``: DIST2Loss is ``soft_ce`` with Gaussian targets,
    ``hard_weight=1, soft_weight=0.1``. GEM normalises that mixture.
    """

    name: str = "ce"
    targets: TargetSpec = field(default_factory=TargetSpec)
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    beta: float = 0.7
    h: str = "logsigmoid"
    gem_scope: str = "location"
    chunk_size: int = 1024

    def __post_init__(self):
        if self.name not in ("ce", "soft_ce", "gem"):
            raise ValueError(f"LossConfig.name must be 'ce', 'soft_ce' or 'gem', got {self.name!r}")
        if self.h not in ("linear", "logsigmoid"):
            raise ValueError(f"LossConfig.h must be 'linear' or 'logsigmoid', got {self.h!r}")
        if self.gem_scope not in ("location", "all"):
            raise ValueError(f"LossConfig.gem_scope must be 'location' or 'all', got {self.gem_scope!r}")
        if self.beta <= 0:
            raise ValueError(f"LossConfig.beta must be > 0, got {self.beta}")


# ---------------------------------------------------------------------------------------
# the row-wise kernel


def _target_logit(z: torch.Tensor, hard: torch.Tensor | None, soft: torch.Tensor | None, loc_ids) -> torch.Tensor:
    if soft is not None:
        return (z.index_select(1, loc_ids) * soft).sum(1)
    return z.gather(1, hard[:, None]).squeeze(1)


def _row_grad(z, hard, soft, loc_ids, mode, beta, h, stats):
    """Gradient of the per-row loss w.r.t. the row's logits (recomputed in backward)."""
    if mode == "ce":
        lse, mass = stats
        g = torch.exp(z - lse[:, None]) * mass[:, None]
    else:
        lse_b, zbar = stats
        g = torch.exp(z / beta - lse_b[:, None])
        if h == "logsigmoid":
            g = g * torch.sigmoid(0.01 * (z - zbar[:, None]))
        mass = g.sum(1)
    if soft is not None:
        g.index_add_(1, loc_ids, -(soft * mass[:, None]) if mode == "gem" else -soft)
    else:
        g.scatter_add_(1, hard[:, None], -mass[:, None] if mode == "gem" else -torch.ones_like(mass[:, None]))
    return g


def _row_loss(z, hard, soft, loc_ids, mode, beta, h):
    zbar = _target_logit(z, hard, soft, loc_ids)
    if mode == "ce":
        lse = torch.logsumexp(z, 1)
        mass = soft.sum(1) if soft is not None else torch.ones_like(lse)
        return mass * lse - zbar, (lse, mass)
    lse_b = torch.logsumexp(z / beta, 1)
    c = torch.exp(z / beta - lse_b[:, None])
    if h == "logsigmoid":
        c = c * torch.sigmoid(0.01 * (z - zbar[:, None]))
    return (c * z).sum(1) - c.sum(1) * zbar, (lse_b, zbar)


class _RowLoss(torch.autograd.Function):
    """Per-row loss of ``logits[rows]`` against hard ids or soft location targets."""

    @staticmethod
    def forward(ctx, logits, rows, hard, soft, loc_ids, mode, beta, h, chunk):
        out = torch.empty(rows.numel(), device=logits.device, dtype=torch.float32)
        stats = []
        for i in range(0, rows.numel(), chunk):
            sl = slice(i, i + chunk)
            z = logits.index_select(0, rows[sl]).float()
            loss, st = _row_loss(z, _part(hard, sl), _part(soft, sl), loc_ids, mode, beta, h)
            out[sl] = loss
            stats.append(torch.stack(st))
        ctx.save_for_backward(logits, rows, hard if hard is not None else rows, soft if soft is not None else out,
                              loc_ids, torch.cat(stats, 1) if stats else out.new_zeros(2, 0))
        ctx.has = (hard is not None, soft is not None)
        ctx.cfg = (mode, beta, h, chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, rows, hard, soft, loc_ids, stats = ctx.saved_tensors
        hard = hard if ctx.has[0] else None
        soft = soft if ctx.has[1] else None
        mode, beta, h, chunk = ctx.cfg
        grad = torch.zeros_like(logits)
        for i in range(0, rows.numel(), chunk):
            sl = slice(i, i + chunk)
            z = logits.index_select(0, rows[sl]).float()
            g = _row_grad(z, _part(hard, sl), _part(soft, sl), loc_ids, mode, beta, h, stats[:, sl])
            grad.index_copy_(0, rows[sl], (g * grad_out[sl, None]).to(logits.dtype))
        return grad, None, None, None, None, None, None, None, None


def _part(t, sl):
    return None if t is None else t[sl]


def row_loss(logits2d, rows, *, hard=None, soft=None, loc_ids=None, mode="ce", beta=0.7, h="logsigmoid", chunk=1024):
    """Per-row losses for ``logits2d[rows]`` (``[N, V]``): hard ids ``[R]`` or soft ``[R, n_loc]``."""
    if loc_ids is None:
        loc_ids = rows.new_zeros(0)
    return _RowLoss.apply(logits2d, rows, hard, soft, loc_ids, mode, beta, h, chunk)


# ---------------------------------------------------------------------------------------
# the module


class LocationLoss:
    """A :class:`LossConfig` bound to a vocabulary's location tokens and their geometry.

    Call with logits ``[B, S, V]`` and labels ``[B, S]`` (-100 ignored). Causal
    models need ``shift=True`` (logit t predicts label t+1); encoder-decoders
    (Florence-2) pass their decoder labels unshifted. Returns the sum over
    supervised positions divided by ``num_items_in_batch`` when given (as
    transformers' Trainer does under gradient accumulation), else the mean.
    """

    def __init__(self, config: LossConfig, loc_token_ids: Sequence[int], space: LocationSpace | None):
        self.config = config
        self.loc_token_ids = torch.as_tensor(list(loc_token_ids), dtype=torch.long)
        self.space = space
        if config.name != "ce" and (space is None or not len(self.loc_token_ids)):
            raise ValueError(f"loss {config.name!r} needs location tokens; this codec writes coordinates as text")
        if space is not None and len(self.loc_token_ids) and len(self.loc_token_ids) != space.size:
            raise ValueError(f"{len(self.loc_token_ids)} location token ids for a location space of {space.size}")

    def __call__(self, logits, labels, continuous=None, shift: bool = True, num_items_in_batch=None):
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
            continuous = continuous[:, 1:] if continuous is not None else None
        flat = logits.reshape(-1, logits.shape[-1])
        labels = labels.reshape(-1).to(flat.device)
        total = self.per_position(flat, labels, continuous).sum()
        n = num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE).sum()
        return total / (n.to(total.device).clamp(min=1) if torch.is_tensor(n) else max(n, 1))

    def location_mask(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.isin(labels, self.loc_token_ids.to(labels.device))

    def per_position(self, flat: torch.Tensor, labels: torch.Tensor, continuous=None) -> torch.Tensor:
        """Losses of the supervised positions of ``flat`` (``[N, V]``), text then location."""
        cfg = self.config
        valid = labels != IGNORE
        if cfg.name == "ce":
            rows = valid.nonzero().squeeze(1)
            return row_loss(flat, rows, hard=labels[rows], chunk=cfg.chunk_size)
        loc_ids = self.loc_token_ids.to(flat.device)
        is_loc = self.location_mask(labels) & valid
        text_rows = (valid & ~is_loc).nonzero().squeeze(1)
        loc_rows = is_loc.nonzero().squeeze(1)
        gem = cfg.name == "gem"
        text_mode = "gem" if gem and cfg.gem_scope == "all" else "ce"
        parts = [row_loss(flat, text_rows, hard=labels[text_rows], mode=text_mode, beta=cfg.beta, h=cfg.h,
                          chunk=cfg.chunk_size)]
        if loc_rows.numel():
            soft = self.location_targets(labels[loc_rows], continuous, loc_rows)
            parts.append(row_loss(flat, loc_rows, soft=soft, loc_ids=loc_ids, mode="gem" if gem else "ce",
                                  beta=cfg.beta, h=cfg.h, chunk=cfg.chunk_size))
        return torch.cat(parts)

    def location_targets(self, loc_labels: torch.Tensor, continuous, loc_rows: torch.Tensor) -> torch.Tensor:
        """``[R, n_loc]`` targets for location positions (mixture of one-hot and the spec)."""
        cfg = self.config
        lookup = torch.full((int(self.loc_token_ids.max()) + 1,), -1, dtype=torch.long)
        lookup[self.loc_token_ids] = torch.arange(len(self.loc_token_ids))
        index = lookup.to(loc_labels.device)[loc_labels]
        cont = None
        if cfg.targets.needs_continuous:
            if continuous is None:
                raise ValueError("two_bin targets need batch['loc_continuous'] from the adapter's collate")
            cont = continuous.reshape(-1, continuous.shape[-1])[loc_rows]
        t = make_targets(cfg.targets, index, self.space, cont).to(loc_labels.device) * cfg.soft_weight
        if cfg.hard_weight:
            t = t + cfg.hard_weight * F.one_hot(index, self.space.size).to(t)
        if cfg.name == "gem":
            t = t / t.sum(1, keepdim=True)
        return t

    def compute_loss_func(self, shift: bool = True):
        """Drop-in for ``transformers.Trainer(compute_loss_func=...)``: ``fn(outputs, labels, num_items_in_batch)``."""

        def fn(outputs, labels, num_items_in_batch=None):
            return self(outputs.logits, labels, shift=shift, num_items_in_batch=num_items_in_batch)

        return fn


def fused_linear_loss(
    loss: LocationLoss,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    continuous: torch.Tensor | None = None,
    chunk_size: int = 1024,
    num_items_in_batch=None,
) -> torch.Tensor:
    """``loss`` of ``hidden @ weight.T (+ bias)`` without materialising all logits at once.

    ``hidden`` ``[N, H]`` and ``labels`` ``[N]`` are already aligned (shift
    before calling). Rows are processed in chunks; each chunk's logits are
    recomputed in backward (activation checkpointing), so peak memory holds
    one ``[chunk, V]`` block instead of ``[N, V]``.
    """
    from torch.utils.checkpoint import checkpoint

    labels = labels.reshape(-1)
    cont = continuous.reshape(labels.numel(), -1) if continuous is not None else None
    total = hidden.new_zeros((), dtype=torch.float32)

    def chunk_loss(h, lab, c):
        logits = F.linear(h, weight, bias)
        return loss.per_position(logits, lab, c).sum()

    for i in range(0, labels.numel(), chunk_size):
        sl = slice(i, i + chunk_size)
        if (labels[sl] != IGNORE).any():
            total = total + checkpoint(chunk_loss, hidden[sl], labels[sl], None if cont is None else cont[sl],
                                       use_reentrant=False)
    n = num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE).sum().clamp(min=1)
    return total / n


def build_loss(name: str, loc_token_ids: Sequence[int], space: LocationSpace | None, **kwargs) -> LocationLoss:
    """``build_loss("gem", ids, space, targets=TargetSpec("distance_inverse"))``."""
    return LocationLoss(LossConfig(name=name, **kwargs), loc_token_ids, space)
