"""Connected regions of a binary mask and their boxes, in plain numpy.

Defect masks (MVTec ``ground_truth``) and thresholded anomaly maps both need
"which pixels form one blob, and what is its box". scipy is not a dependency,
so components are found with a run-length union-find: each row is split into
runs of foreground pixels, runs that touch runs in the row above are merged.
The Python work is per run, not per pixel, so a 1024 px mask costs little.

Box convention: a region covering pixel columns ``x0..x1`` (inclusive) has the
box ``(x0, y0, x1 + 1, y1 + 1)``, so a single pixel is a 1x1 box and boxes
of adjacent pixels share an edge, matching ``loctune.types.Box`` in pixels.
"""

from __future__ import annotations

import numpy as np

from loctune.types import Box


def _row_runs(row: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of True in a 1-D boolean row (stop exclusive)."""
    padded = np.concatenate(([False], row, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Label the connected foreground regions of a 2-D mask.

    Returns ``(labels, n)``: an int32 array, 0 for background and ``1..n`` for
    regions numbered in raster order of their first pixel. ``connectivity`` is
    4 (edge neighbours) or 8 (edges and corners).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask: expected a 2-D array, got shape {mask.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity: expected 4 or 8, got {connectivity}")
    mask = mask.astype(bool)
    reach = 1 if connectivity == 8 else 0  # how far a run reaches diagonally into the next row
    parent: list[int] = []

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    runs: list[tuple[int, int, int]] = []  # (row, start, stop); run id = index
    previous: list[int] = []  # run ids in the row above
    for y in range(mask.shape[0]):
        current = []
        for start, stop in _row_runs(mask[y]):
            run_id = len(runs)
            runs.append((y, start, stop))
            parent.append(run_id)
            for above in previous:
                _, a_start, a_stop = runs[above]
                if a_start < stop + reach and start < a_stop + reach:
                    ra, rb = find(above), find(run_id)
                    parent[max(ra, rb)] = min(ra, rb)
            current.append(run_id)
        previous = current

    labels = np.zeros(mask.shape, dtype=np.int32)
    root_label: dict[int, int] = {}
    for run_id, (y, start, stop) in enumerate(runs):
        root = find(run_id)
        if root not in root_label:
            root_label[root] = len(root_label) + 1
        labels[y, start:stop] = root_label[root]
    return labels, len(root_label)


def _box_of(ys: np.ndarray, xs: np.ndarray) -> Box:
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def mask_box(mask: np.ndarray) -> Box | None:
    """The box around all foreground pixels, or None for an empty mask."""
    ys, xs = np.nonzero(np.asarray(mask))
    return _box_of(ys, xs) if len(ys) else None


def mask_to_boxes(mask: np.ndarray, min_area: int = 1, connectivity: int = 8) -> list[Box]:
    """One box per connected region with at least ``min_area`` pixels, raster order."""
    labels, n = label_components(mask, connectivity)
    boxes = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        if len(ys) >= min_area:
            boxes.append(_box_of(ys, xs))
    return boxes


def largest_region(mask: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """Boolean mask of the largest connected region (all False when the mask is empty)."""
    labels, n = label_components(mask, connectivity)
    if n == 0:
        return np.zeros(labels.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return labels == int(sizes.argmax())
