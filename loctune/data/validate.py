"""Validation of annotations as they are read, with an auditable report.

Every reader funnels its boxes and image files through a :class:`Validator`.
Nothing is dropped silently: each dropped, skipped or clipped item is counted
by reason in a :class:`ValidationReport`, with the first few examples naming
the file and line (or the field path for JSON/XML), so that a result can be
traced back to the data it was trained on.

Reasons (``Issue.reason``):

==================  ========  ================================================
reason              kind      meaning
==================  ========  ================================================
``clipped``         clipped   box partly outside the image, clipped to it
``not_finite``      dropped   a coordinate is NaN or infinite
``empty_box``       dropped   zero or negative width or height
``outside_image``   dropped   box entirely (or mostly) outside the image
``unknown_class``   dropped   class id/name not in the dataset's class list
``missing_image``   dropped   image file not found: the whole sample is dropped
``size_mismatch``   dropped   declared width/height differ from the image file's
                              header (sizes as stored, before EXIF rotation)
``outside_root``    dropped   image path resolves outside the dataset root
                              (``../../x.jpg``, an absolute path elsewhere)
``duplicate_image`` dropped   an image read a second time (listed twice, two
                              annotation files): the repeat is dropped
``malformed``       dropped   a line/record/field that cannot be parsed
``no_valid_boxes``  dropped   every box of an image was invalid: image dropped
``crowd``           skipped   COCO ``iscrowd=1`` region (by policy, see coco.py)
``difficult``       skipped   VOC ``difficult=1`` object when asked to skip them
==================  ========  ================================================

With ``on_error="raise"`` the first *dropped* item raises :class:`DataError`
instead; clipping and policy skips never raise.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from loctune.types import Box, DataError, Sample

log = logging.getLogger(__name__)

OnError = Literal["drop", "raise"]
Kind = Literal["dropped", "skipped", "clipped"]

# Coordinates this close beyond an edge, as a fraction of the image side, are rounding
# noise, not annotation errors: snap them without counting. YOLO files write six decimals
# of cx, w (normalised), so x2 = cx + w/2 may overshoot by 7.5e-7 of the side (0.0005 px
# at 640 px); 1e-5 absorbs that and five-decimal files, and is 0.01 px at 1000 px.
_SNAP = 1e-5


@dataclass
class Issue:
    """One problem found while reading: where it is and what was wrong."""

    reason: str
    kind: Kind
    where: str  # "path:line" or "path: field.path"
    message: str
    unit: str = "box"  # what was dropped/skipped/clipped: "box" | "sample" | "record"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class ValidationReport:
    """Counts by reason and the first ``max_examples`` issues of each reason."""

    source: str
    on_error: str = "drop"
    max_examples: int = 5
    n_samples: int = 0
    n_boxes: int = 0
    counts: Counter = field(default_factory=Counter)
    kinds: dict[str, str] = field(default_factory=dict)
    examples: dict[str, list[Issue]] = field(default_factory=dict)
    parts: list[ValidationReport] = field(default_factory=list)  # one per file, once merged

    def add(self, issue: Issue) -> None:
        self.counts[issue.reason] += 1
        self.kinds[issue.reason] = issue.kind
        shown = self.examples.setdefault(issue.reason, [])
        if len(shown) < self.max_examples:
            shown.append(issue)

    def count(self, kind: Kind) -> int:
        """Total number of issues of one kind (``dropped``, ``skipped``, ``clipped``)."""
        return sum(n for reason, n in self.counts.items() if self.kinds[reason] == kind)

    @property
    def n_dropped(self) -> int:
        return self.count("dropped")

    @property
    def n_clipped(self) -> int:
        return self.count("clipped")

    @property
    def n_skipped(self) -> int:
        return self.count("skipped")

    def merge(self, other: ValidationReport) -> None:
        """Fold another report (e.g. of another split file) into this one; ``parts`` keeps
        each file's own report."""
        self.parts.extend(other.parts or [other])
        self.n_samples += other.n_samples
        self.n_boxes += other.n_boxes
        for reason, issues in other.examples.items():
            self.kinds[reason] = other.kinds[reason]
            shown = self.examples.setdefault(reason, [])
            shown.extend(issues[: max(0, self.max_examples - len(shown))])
        self.counts.update(other.counts)

    def summary(self) -> str:
        lines = [
            f"{self.source}: kept {self.n_samples} samples, {self.n_boxes} boxes; "
            f"dropped {self.n_dropped}, skipped {self.n_skipped}, clipped {self.n_clipped}"
        ]
        for reason, n in self.counts.most_common():
            lines.append(f"  {self.kinds[reason]} {reason}: {n}")
            lines.extend(f"    {issue}" for issue in self.examples[reason])
        return "\n".join(lines)

    def why_empty(self) -> str:
        """Why this file gave no samples: its main reasons, counted, and the first example."""
        if not self.counts:
            return (f"{self.source}: no samples, and nothing was dropped: it lists none (or "
                    f"none of the splits asked for, or only empty images left out)")
        main = self.counts.most_common(3)
        reasons = "; ".join(f"{n} {self.kinds[reason]}: {reason}" for reason, n in main)
        return f"{self.source}: no samples: {reasons} (e.g. {self.examples[main[0][0]][0]})"

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "on_error": self.on_error,
            "kept": {"samples": self.n_samples, "boxes": self.n_boxes},
            "totals": {k: self.count(k) for k in ("dropped", "skipped", "clipped")},
            "reasons": {
                reason: {
                    "kind": self.kinds[reason],
                    "count": n,
                    "examples": [
                        {"where": i.where, "message": i.message, "unit": i.unit}
                        for i in self.examples[reason]
                    ],
                }
                for reason, n in self.counts.most_common()
            },
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON (creating parent folders); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


class Validator:
    """Checks boxes and image files for one reader run and fills a report.

    ``min_inside`` is the fraction of a box's area that must lie inside the
    image for the box to be clipped rather than dropped: a box hanging a few
    pixels over an edge is an annotation habit, one mostly outside the image is
    an error (wrong image size, swapped axes). ``allow_outside_root`` lets image
    paths leave the dataset root (see :meth:`inside_root`).
    """

    def __init__(
        self,
        source: str,
        on_error: OnError = "drop",
        min_inside: float = 0.5,
        max_examples: int = 5,
        allow_outside_root: bool = False,
    ) -> None:
        if on_error not in ("drop", "raise"):
            raise ValueError(f"on_error must be 'drop' or 'raise', got {on_error!r}")
        if not 0.0 < min_inside <= 1.0:
            raise ValueError(f"min_inside must be in (0, 1], got {min_inside!r}")
        self.on_error = on_error
        self.min_inside = min_inside
        self.allow_outside_root = allow_outside_root
        self.report = ValidationReport(source, on_error=on_error, max_examples=max_examples)

    def fail(self, reason: str, where: str, message: str, unit: str = "box") -> None:
        """A dropped item: raise under ``on_error="raise"``, else record it."""
        issue = Issue(reason, "dropped", where, message, unit)
        if self.on_error == "raise":
            raise DataError(str(issue))
        self.report.add(issue)

    def skip(self, reason: str, where: str, message: str, unit: str = "box") -> None:
        """An item left out by policy (not an error): recorded, never raised."""
        self.report.add(Issue(reason, "skipped", where, message, unit))

    def box(self, box: Sequence[float], image_size: tuple[int, int], where: str) -> Box | None:
        """The box clipped to the image, or None (recorded) when it is unusable."""
        x1, y1, x2, y2 = (float(v) for v in box)
        shown = f"[{x1:g}, {y1:g}, {x2:g}, {y2:g}]"
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            self.fail("not_finite", where, f"box {shown} has a non-finite coordinate")
            return None
        if x2 <= x1 or y2 <= y1:
            self.fail("empty_box", where, f"box {shown} (x1 y1 x2 y2) has zero or negative area")
            return None
        w, h = image_size
        x1, x2 = (_snap(v, w) for v in (x1, x2))
        y1, y2 = (_snap(v, h) for v in (y1, y2))
        cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
        inside = max(cx2 - cx1, 0.0) * max(cy2 - cy1, 0.0) / ((x2 - x1) * (y2 - y1))
        if inside < self.min_inside:
            share = "entirely" if inside == 0 else f"{1 - inside:.0%}"
            self.fail(
                "outside_image",
                where,
                f"box {shown} is {share} outside the {w}x{h} image",
            )
            return None
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            self.report.add(
                Issue("clipped", "clipped", where, f"box {shown} clipped to the {w}x{h} image")
            )
        return (cx1, cy1, cx2, cy2)

    def keeps_image(self, where: str, n_valid: int, n_invalid: int) -> bool:
        """False (recorded) when every annotated box of an image was invalid.

        Such an image would otherwise become a negative example that teaches
        "nothing here" where objects are. Images with some valid boxes are kept;
        readers note ``meta["n_invalid_boxes"]`` so they can be filtered.
        """
        if n_invalid and not n_valid:
            self.fail(
                "no_valid_boxes",
                where,
                f"all {n_invalid} annotated boxes are invalid; image dropped, "
                "not kept as a negative",
                unit="sample",
            )
            return False
        return True

    def image_file(
        self, path: str | os.PathLike, where: str, root: str | os.PathLike | None = None
    ) -> bool:
        """True if the image exists; otherwise the sample is dropped (recorded), the message
        naming ``root``, the folder images are looked up in, when the reader has one."""
        if os.path.isfile(path):
            return True
        hint = f" (images are looked up in {root}; pass image_root= to change it)" if root else ""
        self.fail("missing_image", where, f"image file not found: {path}{hint}", unit="sample")
        return False

    def usable_image(
        self, path: str | os.PathLike, root: str | os.PathLike, where: str, exists: bool = True
    ) -> bool:
        """True when the image path stays inside ``root`` and, with ``exists``, the file is
        there; otherwise the sample is dropped (recorded): every file reader's first check."""
        return self.inside_root(path, root, where) and (
            not exists or self.image_file(path, where, root)
        )

    def inside_root(self, path: str | os.PathLike, root: str | os.PathLike, where: str) -> bool:
        """False (recorded) when an image path leaves the dataset root, unless
        ``allow_outside_root``: an annotation file must not make training read other files
        of the machine (``../../x.jpg``, ``/home/...``)."""
        if self.allow_outside_root or inside(path, root):
            return True
        self.fail(
            "outside_root",
            where,
            f"image path {path} is outside the dataset root {root} "
            f"(pass allow_outside_root=True to read it)",
            unit="sample",
        )
        return False

    def unique_image(self, path: str | os.PathLike, where: str, seen: dict[Path, str]) -> bool:
        """False (recorded) when ``path`` was already read, at ``seen[path]``: a second sample
        of one image would weigh it twice, each time with other boxes."""
        key = Path(path).resolve()
        if key in seen:
            self.fail("duplicate_image", where,
                      f"image {path} was already read at {seen[key]}; the repeat is dropped",
                      unit="sample")
            return False
        seen[key] = where
        return True

    def finish(self, samples: Sequence[Sample]) -> ValidationReport:
        """Count what was kept and log the summary: a warning if anything was dropped or
        clipped (both change what is trained on), else info (policy skips only)."""
        self.report.n_samples = len(samples)
        self.report.n_boxes = sum(len(s.boxes) for s in samples)
        changed = self.report.n_dropped or self.report.n_clipped
        level = logging.WARNING if changed else logging.INFO
        log.log(level, "%s", self.report.summary())
        return self.report


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` lies under ``root`` once ``..`` is collapsed, or once both are
    resolved: a symlinked root, or images linked into it (git-annex, a hub cache), are in."""
    if Path(os.path.abspath(path)).is_relative_to(os.path.abspath(root)):
        return True
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def _snap(value: float, limit: float) -> float:
    if -_SNAP * limit < value < 0:
        return 0.0
    if limit < value < limit * (1 + _SNAP):
        return float(limit)
    return value
