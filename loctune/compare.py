"""The experiment loctune exists for: supervision method x labelled-set size x seed.

Every cell trains the same small VLM (or fine-tunes one checkpoint) for the same number
of steps on the first ``size`` examples of a seed-shuffled training pool, then scores it
on one fixed, held-out test split. A method's main knob (``tune``) is chosen first, on the
validation split carved from the training pool, never on test. Finished cells write
``result.json`` and are skipped on rerun, so an interrupted comparison resumes where it
stopped.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loctune import report
from loctune.baselines import mean_box_scores
from loctune.cells import CellGrid
from loctune.config import ConfigError
from loctune.losses import LossConfig, loss_config
from loctune.models.spec import ModelConfig, open_model
from loctune.train import TrainConfig
from loctune.types import Sample


@dataclass
class CompareData:
    """What every cell trains and is tested on: ``synthetic`` scenes (referring expressions,
    ``image_size`` px, 2..``max_objects`` shapes, more :class:`SyntheticConfig` fields in
    ``scene``), or a named set (``raccoon``, ``bccd``, ``microcontroller``, ``neu-det``,
    ``synthetic-novel``: :data:`loctune.data.NAMED_SETS`) with its own train/test split,
    validation carved from the training pool's tail. ``seed`` draws the synthetic scenes."""

    name: str = "synthetic"
    root: str | None = None  # a named set's folder; default ../shared/data/<name>
    seed: int = 0
    n_val: int = 200
    n_test: int = 500  # synthetic only: a named set is tested on its whole test split
    image_size: int = 64
    max_objects: int = 5
    scene: dict[str, Any] = field(default_factory=dict)


def _cell_training() -> TrainConfig:
    # a cell reports its final model on the test split: no best/ per cell
    return TrainConfig(steps=1000, batch_size=32, lr=1e-3, warmup_steps=50, eval_every=250,
                       save_every=250, best_metric="")


@dataclass
class CompareConfig:
    """One comparison: ``methods`` x ``sizes`` x ``seeds`` cells, each ``train`` (its ``loss``
    set by the method) from ``model`` on ``data``. Sizes above the pool size are an error,
    not silently capped. ``metric`` ``auto`` is Acc@0.5 for grounding data, AP50 for
    detection. ``model.name`` a pretrained checkpoint: every cell fine-tunes it, and one
    that was trained on ``data.name`` is refused.

    ``tune`` maps a method to candidate settings of its main knob (``{"gaussian":
    ["sigma=0.5", "sigma=2"]}``); the preset's own value is always a candidate. Each is
    trained at ``tune_size`` (0: the smallest size) on the first ``tune_seeds`` seeds and
    scored on validation; the grid then runs the best one under the method's name."""

    out_dir: str = "runs/compare"
    # loss presets, or variants "preset:key=value,..." (e.g. "gem:beta=2")
    methods: list[str] = field(
        default_factory=lambda: [
            "ce", "distance_inverse", "gaussian", "gem", "gem_distance_inverse"
        ]
    )
    sizes: list[int] = field(default_factory=lambda: [100, 300, 1000, 3000])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    baseline: str = "ce"
    metric: str = "auto"
    n_draw: int = 6
    model: ModelConfig = field(
        # no codec named: a fresh small VLM takes DEFAULT_SMALL_CODEC, a checkpoint its own
        default_factory=lambda: ModelConfig("small", image_size=64)
    )
    data: CompareData = field(default_factory=CompareData)
    train: TrainConfig = field(default_factory=_cell_training)
    tune: dict[str, list[str]] = field(default_factory=dict)
    tune_size: int = 0
    tune_seeds: int = 2

    def __post_init__(self):
        if self.train.loss != LossConfig():
            raise ValueError("CompareConfig.train.loss is set per cell by methods; name the "
                             "variant there instead (e.g. methods=[ce, 'gem:beta=2'])")
        for m in self.methods:  # fail before the first cell trains, not at the twentieth
            try:
                loss_config(m)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"CompareConfig.methods: {m!r}: {err.args[0]}") from None
        for m, candidates in self.tune.items():
            if m not in self.methods:
                raise ValueError(f"CompareConfig.tune: {m!r} is not one of methods "
                                 f"{self.methods}")
            for c in candidates:
                try:
                    loss_config(with_options(m, c))
                except (KeyError, TypeError, ValueError) as err:
                    raise ValueError(f"CompareConfig.tune.{m}: {c!r}: {err.args[0]}") from None
        if self.tune and self.tune_size and self.tune_size not in self.sizes:
            raise ValueError(f"CompareConfig.tune_size {self.tune_size} is not one of sizes "
                             f"{self.sizes} (0: the smallest)")
        if self.tune and self.tune_seeds < 1:
            raise ValueError(f"CompareConfig.tune_seeds must be >= 1, got {self.tune_seeds}")


def with_options(method: str, options: str) -> str:
    """``method`` with ``options`` ("key=value,...") added: ``gem:h=linear`` + ``beta=2``
    is ``gem:h=linear,beta=2``."""
    if not options:
        return method
    return f"{method}{',' if ':' in method else ':'}{options}"


#: CompareConfig fields that may change between runs of one comparison (more methods,
#: seeds or sizes add cells; the others only change the report). A new tune candidate only
#: adds cells too: grid cells are stored under the variant they ran. Sizes are checked
#: further by :func:`_refuse_another_pool`.
RERUNNABLE = ("out_dir", "methods", "seeds", "sizes", "baseline", "metric", "n_draw",
              "train.progress", "tune")
CONFIG_FILE = "compare_config.json"


def _loaders(cfg: CompareConfig) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(training pool, validation, test) for the configured data source."""
    data = cfg.data
    if data.name == "synthetic":
        from loctune.data.synthetic import SyntheticConfig, make_grounding_split

        try:
            sc = SyntheticConfig(image_size=data.image_size, max_objects=data.max_objects,
                                 **data.scene)
        except TypeError as err:
            raise ValueError(
                f"CompareConfig.data.scene: {err} (fields of SyntheticConfig expected)"
            ) from None
        pool = make_grounding_split("train", max(cfg.sizes), seed=data.seed, config=sc)
        val = make_grounding_split("val", data.n_val, seed=data.seed, config=sc)
        test = make_grounding_split("test", data.n_test, seed=data.seed, config=sc)
        return pool, val, test
    from loctune.data import NAMED_SETS, named_set

    if data.name not in NAMED_SETS:
        raise ValueError(f"CompareConfig.data.name must be 'synthetic' or one of "
                         f"{sorted(NAMED_SETS)}, got {data.name!r}")
    pool = list(named_set(data.name, "train", root=data.root))
    test = list(named_set(data.name, "test", root=data.root))
    # validation is carved from the training pool's tail so test stays untouched
    n_val = min(data.n_val, len(pool) // 5)
    return pool[: len(pool) - n_val], pool[len(pool) - n_val :], test


def main_metric(cfg: CompareConfig, test: Sequence[Sample]) -> str:
    """``cfg.metric``, or for ``auto`` the task's own: AP50 for detection, else Acc@0.5."""
    if cfg.metric != "auto":
        return cfg.metric
    return "ap50" if any(s.task == "detection" for s in test) else "acc50"


def training_subset(pool: Sequence[Sample], size: int, seed: int) -> list[Sample]:
    """First ``size`` of the pool shuffled by ``seed``: seeds vary the labelled data too."""
    if size > len(pool):
        raise ValueError(
            f"training size {size} exceeds the {len(pool)} available training examples"
        )
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[i] for i in order[:size]]


def _make_adapter(cfg: CompareConfig, seed: int, pool: Sequence[Sample]):
    """The cell's start: a fresh small VLM (initialised from ``seed``) or the pretrained
    checkpoint, its vocabulary covering the task's words."""
    texts: list[str] = []
    if cfg.data.name == "synthetic":
        from loctune.data.synthetic import synthetic_vocabulary

        texts = [" ".join(synthetic_vocabulary())]
    return open_model(cfg.model, pool, texts, seed=seed, target=cfg.data.name, unseen=True)


def run_cell(cfg: CompareConfig, grid: CellGrid, method: str, size: int, seed: int, pool,
             val, scored_on, progress: bool = True, stage: str = "runs") -> dict:
    """Train one (method, size, seed) and score it on ``scored_on`` (test for the grid,
    validation when ``stage`` is ``tune``); reuse its result if already done."""
    from loctune.evaluate import evaluate
    from loctune.train import train

    def run(cell_dir: Path) -> dict:
        adapter = _make_adapter(cfg, seed, pool)
        progress_on = progress and cfg.train.progress  # train.progress=false: no bars at all
        tcfg = replace(cfg.train, run_dir=str(cell_dir), seed=seed, loss=loss_config(method),
                       progress=progress_on)
        t0 = time.time()
        train(
            adapter,
            training_subset(pool, size, seed),
            tcfg,
            # a tuning cell is scored on validation below: not validated twice
            eval_fn=None if scored_on is val else (
                lambda a: evaluate(a, val, progress=False).metrics
            ),
            resume=True,
        )
        result = evaluate(adapter, scored_on, progress=progress_on)
        result.save(cell_dir / ("test" if stage == "runs" else "val"))
        return {"method": method, "size": size, "seed": seed, **result.metrics,
                "train_seconds": time.time() - t0}

    return grid.cell((stage, method, f"n{size}", f"s{seed}"), run)


def tune_methods(cfg: CompareConfig, grid: CellGrid, pool, val, progress: bool = True,
                 log: Callable[[str], None] = print) -> tuple[dict[str, str], list[dict]]:
    """``({method: chosen variant}, tuning rows)``: every ``cfg.tune`` candidate trained at
    the tuning size on the first ``tune_seeds`` seeds, the best mean validation score wins
    (ties: the earlier candidate, the preset's own value first). Untuned methods map to
    themselves."""
    chosen = {m: m for m in cfg.methods}
    rows: list[dict] = []
    size = cfg.tune_size or min(cfg.sizes)
    metric = main_metric(cfg, val)
    seeds = cfg.seeds[: cfg.tune_seeds]
    for m, options in cfg.tune.items():
        best = None
        for variant in dict.fromkeys([m, *(with_options(m, o) for o in options)]):
            log(f"[tune {m}] {variant} size={size} seeds={seeds} on validation")
            scores = []
            for s in seeds:
                row = run_cell(cfg, grid, variant, size, s, pool, val, val, progress, "tune")
                rows.append({**row, "tuned": m})
                scores.append(row[metric])
            mean = sum(scores) / len(scores)
            if best is None or mean > best[0]:
                best = (mean, variant)
        chosen[m] = best[1]
    return chosen, rows


def _refuse_another_pool(cfg: CompareConfig) -> None:
    """A named set's pool is its own training split, so sizes may be added to a finished
    comparison; a synthetic pool is ``max(sizes)`` scenes, and a cell's labelled subset is
    drawn from it by seed, so a new largest size would change every cell's data."""
    path = Path(cfg.out_dir) / CONFIG_FILE
    if cfg.data.name != "synthetic" or not path.exists():
        return
    saved = json.loads(path.read_text()).get("sizes") or []
    if saved and max(saved) != max(cfg.sizes):
        raise ConfigError(
            f"{path}: this synthetic study's training pool is max(sizes) = {max(saved)} "
            f"scenes; sizes {cfg.sizes} would draw every cell from {max(cfg.sizes)}. Keep "
            f"the largest size {max(saved)}, or use another out_dir."
        )


def run_compare(
    cfg: CompareConfig, progress: bool = True, log: Callable[[str], None] = print
) -> Path:
    """Tune the methods' knobs, run every missing cell, then (re)write the report. Returns
    the report path."""
    _refuse_another_pool(cfg)
    grid = CellGrid(cfg.out_dir, cfg, CONFIG_FILE, RERUNNABLE)
    pool, val, test = _loaders(cfg)
    chosen, tuning = tune_methods(cfg, grid, pool, val, progress, log)
    rows = []
    cells = [(m, n, s) for n in cfg.sizes for s in cfg.seeds for m in cfg.methods]
    for i, (m, n, s) in enumerate(cells, 1):
        log(f"[{i}/{len(cells)}] method={chosen[m]} size={n} seed={s}")
        row = run_cell(cfg, grid, chosen[m], n, s, pool, val, test, progress=progress)
        rows.append({**row, "method": m, "variant": chosen[m]})
        grid.write_rows(rows)
    return write_report(cfg, rows, test, baseline_rows(cfg, pool, test), tuning, chosen)


#: the trivial baseline's rows in a report: the mean training box (and the class prior)
MEAN_BOX = "mean box"


def baseline_rows(cfg: CompareConfig, pool: Sequence[Sample], test: Sequence[Sample]) -> list[dict]:
    """The mean box of each cell's labelled subset, scored on the same test split."""
    return [
        {"method": MEAN_BOX, "size": n, "seed": s,
         **mean_box_scores(training_subset(pool, n, s), test)}
        for n in cfg.sizes for s in cfg.seeds
    ]


def write_report(cfg: CompareConfig, rows: list[dict], test: Sequence[Sample],
                 baselines: Sequence[dict] = (), tuning: Sequence[dict] = (),
                 chosen: dict[str, str] | None = None) -> Path:
    """report.md, results.csv, accuracy_vs_labels.png, learning_curves.png, predictions.png;
    ``baselines`` rows (the mean box) stand beside the methods in the tables and the plot;
    ``tuning`` rows (validation scores of each candidate) and the ``chosen`` variant of
    each method say which knob values won."""
    out = Path(cfg.out_dir)
    chosen = chosen or {m: m for m in cfg.methods}
    metric = main_metric(cfg, test)
    report.write_csv(rows, out / "results.csv")
    if tuning:
        report.write_csv(tuning, out / "tuning.csv")
    shown = [*cfg.methods, *dict.fromkeys(r["method"] for r in baselines)]
    rows = [*rows, *baselines]
    report.plot_accuracy_vs_labels(rows, metric, shown, out / "accuracy_vs_labels.png",
                                   ylabel=f"{metric}, {cfg.data.name} test ({len(test)})")
    report.plot_learning_curves(_curves(cfg, chosen, "loss"), "training loss",
                                out / "learning_curves.png")
    _draw_predictions(cfg, chosen, test, out / "predictions.png")
    eff = report.data_efficiency(rows, metric, cfg.methods, cfg.baseline)
    t, m = cfg.train, cfg.model
    lines = [
        f"# loctune compare: {cfg.data.name}",
        "",
        f"{metric} on {len(test)} held-out test examples; mean ± sample std over "
        f"{len(cfg.seeds)} seeds (seeds vary initialisation, data order and which examples "
        "are labelled); "
        f"best per size in bold. Every cell: {t.steps} steps, batch {t.batch_size}, lr {t.lr}, "
        f"model `{m.name}`, codec `{m.codec or 'its own'}`"
        + (f", {m.image_size} px." if m.image_size and m.is_fresh_small else "."),
        "",
        report.markdown_table(rows, metric, shown),
        "",
    ]
    if tuning:
        lines += _tuning_section(cfg, tuning, chosen, metric)
    if baselines:
        lines += [f"`{MEAN_BOX}`: every test image answered with the mean box of the cell's "
                  "labelled subset (detection: one box, the most frequent training class), "
                  "the trivial baseline every figure is read against.", ""]
    if cfg.baseline in cfg.methods and len(cfg.seeds) > 1:
        lines += [
            f"### {metric} minus {cfg.baseline}'s, paired by seed",
            "",
            "A seed fixes the initialisation and the labelled subset for every method. "
            "Cells: mean ± "
            f"std of the per-seed difference (seeds where the method beat {cfg.baseline} / seeds, "
            "two-sided sign-test p).",
            "",
            report.paired_table(rows, metric, cfg.methods, cfg.baseline),
            "",
        ]
    # suppressed_rate: the share of decoded boxes that repeated another (NMS at IoU 0.7)
    for extra, higher_is_better in (("miou", True), ("ev_acc50", True), ("ap", True),
                                    ("ap50", True), ("unparseable_rate", False),
                                    ("suppressed_rate", False), ("loc_entropy", False)):
        if extra != metric and any(extra in r for r in rows):
            table = report.markdown_table(rows, extra, shown, bold=higher_is_better)
            lines += [f"### {extra}", "", table, ""]
    if eff:
        target, largest = eff[0]["target"], eff[0]["baseline_size"]
        lines += [
            f"## Labels needed to reach {cfg.baseline} at n={largest} ({metric} {target:.3f})",
            "",
            "Interpolated in log(size) on the mean curve; '>' means not reached within the "
            "measured sizes.",
            "",
            "| method | labels needed | fraction of baseline |",
            "|---|---:|---:|",
        ]
        for e in eff:
            need = (
                f"{e['labels_needed']:.0f}" if e["labels_needed"] is not None
                else f"> {max(cfg.sizes)}"
            )
            ratio = f"{e['ratio']:.2f}" if e["ratio"] is not None else "–"
            lines.append(f"| {e['method']} | {need} | {ratio} |")
        lines.append("")
    lines += [
        "![accuracy vs labels](accuracy_vs_labels.png)",
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![predictions](predictions.png)",
        "",
        "Config: `compare_config.json`; per-run metrics: `results.csv` and "
        "`runs/<method>/n<size>/s<seed>/`.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _tuning_section(cfg: CompareConfig, tuning: Sequence[dict], chosen: dict[str, str],
                    metric: str) -> list[str]:
    """The knob search: each candidate's validation score, the winner marked."""
    size = tuning[0]["size"]
    lines = [
        f"### Knobs tuned on validation ({metric}, n={size}, seeds "
        f"{cfg.seeds[: cfg.tune_seeds]}; the winner, in bold, ran the grid)",
        "",
        "| method | candidate | validation " + metric + " |",
        "|---|---|---:|",
    ]
    for m in cfg.tune:
        for variant in dict.fromkeys(r["method"] for r in tuning if r["tuned"] == m):
            mean, std = report.mean_std(
                [r[metric] for r in tuning if r["tuned"] == m and r["method"] == variant]
            )
            cell = f"{mean:.3f} ± {std:.3f}"
            if variant == chosen[m]:
                variant, cell = f"**{variant}**", f"**{cell}**"
            lines.append(f"| {m} | {variant} | {cell} |")
    return [*lines, ""]


def _curves(cfg: CompareConfig, chosen: dict[str, str],
            key: str) -> dict[str, list[tuple[int, float]]]:
    """Training curves of seed 0 at the largest size, one per method, from metrics.jsonl."""
    curves = {}
    size, seed = max(cfg.sizes), cfg.seeds[0]
    for m in cfg.methods:
        f = Path(cfg.out_dir) / "runs" / chosen[m] / f"n{size}" / f"s{seed}" / "metrics.jsonl"
        if f.exists():
            curves[f"{m} n={size}"] = [
                (p["step"], p[key]) for p in report.read_jsonl(f) if key in p
            ]
    return curves


def _draw_predictions(cfg: CompareConfig, chosen: dict[str, str], test: Sequence[Sample],
                      path: Path) -> None:
    """A grid: rows are methods (largest size, seed 0), columns the first test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    size, seed = max(cfg.sizes), cfg.seeds[0]
    n = min(cfg.n_draw, len(test))
    fig, axes = plt.subplots(
        len(cfg.methods), n, figsize=(2 * n, 2.1 * len(cfg.methods)), squeeze=False
    )
    for i, m in enumerate(cfg.methods):
        f = (Path(cfg.out_dir) / "runs" / chosen[m] / f"n{size}" / f"s{seed}" / "test"
             / "predictions.jsonl")
        preds = [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(test[j].load_image())
            ax.set_xticks([])
            ax.set_yticks([])
            for b in test[j].boxes:
                ax.add_patch(
                    Rectangle(b[:2], b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=1.5)
                )
            for d in preds[j]["detections"] if j < len(preds) else []:
                b = d["box"]
                ax.add_patch(Rectangle(
                    b[:2], b[2] - b[0], b[3] - b[1], fill=False, ec="magenta", lw=1.5, ls="--"
                ))
            if j == 0:
                ax.set_ylabel(m, fontsize=7)
            if i == 0:
                ax.set_title(test[j].prompt[:28], fontsize=6)
    fig.suptitle("green: truth, magenta dashed: prediction", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_config(out_dir: str = "runs/demo") -> CompareConfig:
    """The transfer experiment in miniature, `loctune demo`: <= 10 minutes on 2 CPU cores.

    Every cell fine-tunes the shipped pretrained checkpoint ``shapes-rowcol32`` (never
    trained on raccoon) on 16 or 64 labelled raccoon images, encoder frozen (its features
    are cached, so a step costs the decoder only), and is scored on raccoon's 40 test
    images beside the mean-box baseline. One-hot CE against distance-inverse targets,
    three seeds paired by seed, so the printed paired table can say 3/3 or not.
    """
    return CompareConfig(
        out_dir=out_dir,
        methods=["ce", "distance_inverse"],
        sizes=[16, 64],
        seeds=[0, 1, 2],
        model=ModelConfig("shapes-rowcol32", codec="rowcol:grid=32"),
        data=CompareData(name="raccoon", n_val=16),
        train=replace(_cell_training(), steps=100, batch_size=16, lr=5e-4, warmup_steps=10,
                      eval_every=0, save_every=0, freeze=["vision.*"]),
    )
