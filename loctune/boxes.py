"""Box arithmetic on ``[..., 4]`` tensors/arrays of ``(x1, y1, x2, y2)`` pixels."""

from __future__ import annotations

import numpy as np
import torch


def _as_tensor(boxes) -> torch.Tensor:
    t = torch.as_tensor(boxes, dtype=torch.float64)
    return t.reshape(-1, 4) if t.numel() else t.reshape(0, 4)


def area(boxes) -> torch.Tensor:
    b = _as_tensor(boxes)
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def clip(boxes, image_size: tuple[int, int]) -> torch.Tensor:
    """Clip to the image ``(width, height)``."""
    b = _as_tensor(boxes).clone()
    w, h = image_size
    b[:, 0::2] = b[:, 0::2].clamp(0, w)
    b[:, 1::2] = b[:, 1::2].clamp(0, h)
    return b


def iou_matrix(a, b) -> torch.Tensor:
    """Pairwise IoU, ``[len(a), len(b)]``; degenerate boxes give 0, never NaN."""
    a, b = _as_tensor(a), _as_tensor(b)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a)[:, None] + area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def iou(a, b) -> torch.Tensor:
    """Element-wise IoU of two equally long box lists."""
    a, b = _as_tensor(a), _as_tensor(b)
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def xywh_to_xyxy(boxes) -> np.ndarray:
    """``(x, y, width, height)`` (COCO's layout) to corners, keeping the ``[..., 4]`` shape."""
    b = np.array(boxes, dtype=np.float64)
    b[..., 2:] += b[..., :2]
    return b


def raster_order(boxes) -> list[int]:
    """Indices that put boxes in reading order: by top edge, then left edge, ties kept in
    their given order. One fixed order for the objects of an image spares a model from
    learning an annotator's arbitrary one (Pix2Seq's ordering study; Florence-2 writes
    regions this way)."""
    b = _as_tensor(boxes)
    return sorted(range(len(b)), key=lambda i: (float(b[i, 1]), float(b[i, 0])))
