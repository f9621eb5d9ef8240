"""Padding ragged rows of token ids into a batch, the one step both adapter kinds share."""

from __future__ import annotations

import torch


def pad_rows(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    """``[len(rows), longest]`` long tensor; ``left`` pads in front (for generation)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, slice(width - len(r), width) if left else slice(0, len(r))] = torch.tensor(
            r, dtype=torch.long
        )
    return out


def pad_with_mask(
    rows: list[list[int]], value: int, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pad_rows` and its attention mask (1 on the ids, 0 on the padding)."""
    return pad_rows(rows, value, left), pad_rows([[1] * len(r) for r in rows], 0, left)
