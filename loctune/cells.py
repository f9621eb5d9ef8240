"""A study's grid of cells on disk, resumable and safe to rerun.

``compare``, the inspection study and the transfer study all run a grid (method x size x
seed, method x k x seed) that takes hours and is interrupted. :class:`CellGrid` owns what
makes a rerun safe: the study's config is checked against the one saved with its results
(a rerun with other ``steps`` would silently mix cells trained two ways), each finished
cell's result is cached, and ``results.csv`` is rewritten from the rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from loctune import report
from loctune.config import ConfigError, changed_fields, config_to_dict, save_config


class CellGrid:
    """The cells of one study under ``out_dir``; ``config_file`` holds its config.

    ``rerunnable`` names config fields (dotted, or a section) that may change between runs
    without invalidating finished cells, e.g. ``seeds`` (more cells) or ``out_dir``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        config: Any,
        config_file: str = "study_config.json",
        rerunnable: Iterable[str] = ("out_dir",),
    ):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.config_path = self.out / config_file
        self._check_and_save(config, tuple(rerunnable))

    def _check_and_save(self, config: Any, rerunnable: tuple[str, ...]) -> None:
        now = config_to_dict(config)
        if self.config_path.exists():
            saved = json.loads(self.config_path.read_text())
            changed = sorted(
                key for key in changed_fields(saved, now)
                if not any(key == r or key.startswith(r + ".") for r in rerunnable)
            )
            if changed:
                raise ConfigError(
                    f"{self.config_path}: this study was run with other settings "
                    f"({', '.join(changed)}); its finished cells would not match. "
                    "Use another out_dir, or the saved settings."
                )
        save_config(config, self.config_path)

    def cell_dir(self, *parts: Any) -> Path:
        return self.out.joinpath(*map(str, parts))

    def cell(
        self, parts: Sequence[Any], run: Callable[[Path], dict[str, Any]], done: str = "result.json"
    ) -> dict[str, Any]:
        """The cell's result: read back when finished, else ``run(cell_dir)`` and saved.

        The result file is written last and atomically, so a cell killed midway is rerun
        rather than read back half-written.
        """
        directory = self.cell_dir(*parts)
        path = directory / done
        if path.exists():
            return json.loads(path.read_text())
        result = run(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, path)
        return result

    def write_rows(self, rows: Sequence[dict[str, Any]]) -> Path:
        """``results.csv``: one row per finished cell."""
        path = self.out / "results.csv"
        report.write_csv(rows, path)
        return path
