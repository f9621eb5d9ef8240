"""The experiment loctune exists for: supervision method x labelled-set size x seed.

Every cell trains the same small VLM for the same number of steps on the first
``size`` examples of a seed-shuffled training pool, then scores it on one fixed,
held-out test split. Finished cells write ``result.json`` and are skipped on
rerun, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loctune import report
from loctune.losses import loss_config
from loctune.types import Sample


@dataclass
class CompareConfig:
    """One comparison. Sizes above the pool size are an error, not silently capped."""

    out_dir: str = "runs/compare"
    data: str = "synthetic"  # "synthetic" | "raccoon"
    data_root: str | None = None  # for real data; default ../shared/data
    # loss presets, or variants "preset:key=value,..." (e.g. "gem:beta=2")
    methods: list[str] = field(default_factory=lambda: ["ce", "distance_inverse", "gaussian", "gem", "gem_distance_inverse"])
    sizes: list[int] = field(default_factory=lambda: [100, 300, 1000, 3000])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    baseline: str = "ce"
    metric: str = "acc50"
    # model and optimisation: the same for every cell
    model_preset: str = "small"
    codec: str = "rowcol"
    grid: int = 32
    image_size: int = 64
    max_objects: int = 5  # synthetic scenes: 2..max_objects shapes
    scene: dict[str, Any] = field(default_factory=dict)  # more SyntheticConfig fields, e.g. noise_std
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    eval_every: int = 250
    # data
    data_seed: int = 0
    n_val: int = 200
    n_test: int = 500
    n_draw: int = 6


def _loaders(cfg: CompareConfig) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(training pool, validation, test) for the configured data source."""
    if cfg.data == "synthetic":
        from loctune.data.synthetic import SyntheticConfig, make_grounding_split

        try:
            sc = SyntheticConfig(image_size=cfg.image_size, max_objects=cfg.max_objects, **cfg.scene)
        except TypeError as err:
            raise ValueError(f"CompareConfig.scene: {err} (fields of SyntheticConfig expected)") from None
        pool = make_grounding_split("train", max(cfg.sizes), seed=cfg.data_seed, config=sc)
        val = make_grounding_split("val", cfg.n_val, seed=cfg.data_seed, config=sc)
        test = make_grounding_split("test", cfg.n_test, seed=cfg.data_seed, config=sc)
        return pool, val, test
    if cfg.data == "raccoon":
        from loctune.data import raccoon

        pool = raccoon("train", root=cfg.data_root)
        test = raccoon("test", root=cfg.data_root)
        # validation is carved from the training pool's tail so test stays untouched
        n_val = min(cfg.n_val, len(pool) // 5)
        return pool[: len(pool) - n_val], pool[len(pool) - n_val :], test
    raise ValueError(f"CompareConfig.data must be 'synthetic' or 'raccoon', got {cfg.data!r}")


def training_subset(pool: Sequence[Sample], size: int, seed: int) -> list[Sample]:
    """First ``size`` of the pool shuffled by ``seed``: seeds vary the labelled data too."""
    if size > len(pool):
        raise ValueError(f"training size {size} exceeds the {len(pool)} available training examples")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[i] for i in order[:size]]


def _make_adapter(cfg: CompareConfig, seed: int, pool: Sequence[Sample]):
    """A fresh small VLM (initialised from ``seed``) whose vocabulary covers the task's words."""
    from loctune.models.small_vlm_adapter import SmallVLMAdapter

    texts: list[str] = []
    if cfg.data == "synthetic":
        from loctune.data.synthetic import synthetic_vocabulary

        texts = [" ".join(synthetic_vocabulary())]
    return SmallVLMAdapter.build(
        f"{cfg.codec}:grid={cfg.grid}",
        texts=texts,
        samples=pool,
        config=cfg.model_preset,
        image_size=cfg.image_size,
        seed=seed,
    )


def run_cell(cfg: CompareConfig, method: str, size: int, seed: int, pool, val, test, progress: bool = True) -> dict:
    """Train and test one (method, size, seed); reuse its result if already done."""
    from loctune.evaluate import evaluate
    from loctune.train import TrainConfig, train

    cell_dir = Path(cfg.out_dir) / "runs" / method / f"n{size}" / f"s{seed}"
    done = cell_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    adapter = _make_adapter(cfg, seed, pool)
    tcfg = TrainConfig(
        run_dir=str(cell_dir),
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        eval_every=cfg.eval_every,
        save_every=cfg.eval_every,
        best_metric="",  # a cell reports its final model on the test split: no best/ per cell
        seed=seed,
        loss=loss_config(method),
        progress=progress,
    )
    t0 = time.time()
    train(
        adapter,
        training_subset(pool, size, seed),
        tcfg,
        eval_fn=lambda a: evaluate(a, val, progress=False).metrics,
        resume=True,
    )
    result = evaluate(adapter, test, progress=progress)
    result.save(cell_dir / "test")
    row = {"method": method, "size": size, "seed": seed, **result.metrics, "train_seconds": time.time() - t0}
    done.write_text(json.dumps(row, indent=2))
    return row


def run_compare(cfg: CompareConfig, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Run every missing cell, then (re)write the report. Returns the report path."""
    for m in cfg.methods:  # fail before the first cell trains, not at the twentieth
        try:
            loss_config(m)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"CompareConfig.methods: {m!r}: {err.args[0]}") from None
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    pool, val, test = _loaders(cfg)
    rows = []
    cells = [(m, n, s) for n in cfg.sizes for s in cfg.seeds for m in cfg.methods]
    for i, (m, n, s) in enumerate(cells, 1):
        log(f"[{i}/{len(cells)}] method={m} size={n} seed={s}")
        rows.append(run_cell(cfg, m, n, s, pool, val, test, progress=progress))
        report.write_csv(rows, out / "results.csv")
    return write_report(cfg, rows, test)


def write_report(cfg: CompareConfig, rows: list[dict], test: Sequence[Sample]) -> Path:
    """report.md, results.csv, accuracy_vs_labels.png, learning_curves.png, predictions.png."""
    out = Path(cfg.out_dir)
    report.write_csv(rows, out / "results.csv")
    report.plot_accuracy_vs_labels(rows, cfg.metric, cfg.methods, out / "accuracy_vs_labels.png")
    report.plot_learning_curves(_curves(cfg, "loss"), "training loss", out / "learning_curves.png")
    _draw_predictions(cfg, test, out / "predictions.png")
    eff = report.data_efficiency(rows, cfg.metric, cfg.methods, cfg.baseline)
    lines = [
        f"# loctune compare: {cfg.data}",
        "",
        f"{cfg.metric} on {len(test)} held-out test examples; mean ± sample std over "
        f"{len(cfg.seeds)} seeds (seeds vary initialisation, data order and which examples are labelled); "
        f"best per size in bold. Every cell: {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr}, "
        f"model preset `{cfg.model_preset}`, codec `{cfg.codec}` on a {cfg.grid}-grid, {cfg.image_size} px.",
        "",
        report.markdown_table(rows, cfg.metric, cfg.methods),
        "",
    ]
    if cfg.baseline in cfg.methods and len(cfg.seeds) > 1:
        lines += [
            f"### {cfg.metric} minus {cfg.baseline}'s, paired by seed",
            "",
            "A seed fixes the initialisation and the labelled subset for every method. Cells: mean ± "
            f"std of the per-seed difference (seeds where the method beat {cfg.baseline} / seeds, "
            "two-sided sign-test p).",
            "",
            report.paired_table(rows, cfg.metric, cfg.methods, cfg.baseline),
            "",
        ]
    for extra, higher_is_better in (("miou", True), ("ev_acc50", True), ("ap50", True),
                                    ("unparseable_rate", False), ("loc_entropy", False)):
        if extra != cfg.metric and any(extra in r for r in rows):
            lines += [f"### {extra}", "", report.markdown_table(rows, extra, cfg.methods, bold=higher_is_better), ""]
    if eff:
        target, largest = eff[0]["target"], eff[0]["baseline_size"]
        lines += [
            f"## Labels needed to reach {cfg.baseline} at n={largest} ({cfg.metric} {target:.3f})",
            "",
            "Interpolated in log(size) on the mean curve; '>' means not reached within the measured sizes.",
            "",
            "| method | labels needed | fraction of baseline |",
            "|---|---:|---:|",
        ]
        for e in eff:
            need = f"{e['labels_needed']:.0f}" if e["labels_needed"] is not None else f"> {max(cfg.sizes)}"
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
        "Config: `compare_config.json`; per-run metrics: `results.csv` and `runs/<method>/n<size>/s<seed>/`.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _curves(cfg: CompareConfig, key: str) -> dict[str, list[tuple[int, float]]]:
    """Training curves of seed 0 at the largest size, one per method, from metrics.jsonl."""
    curves = {}
    size, seed = max(cfg.sizes), cfg.seeds[0]
    for m in cfg.methods:
        f = Path(cfg.out_dir) / "runs" / m / f"n{size}" / f"s{seed}" / "metrics.jsonl"
        if f.exists():
            curves[f"{m} n={size}"] = [(p["step"], p[key]) for p in report.read_jsonl(f) if key in p]
    return curves


def _draw_predictions(cfg: CompareConfig, test: Sequence[Sample], path: Path) -> None:
    """A grid: rows are methods (largest size, seed 0), columns the first test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    size, seed = max(cfg.sizes), cfg.seeds[0]
    n = min(cfg.n_draw, len(test))
    fig, axes = plt.subplots(len(cfg.methods), n, figsize=(2 * n, 2.1 * len(cfg.methods)), squeeze=False)
    for i, m in enumerate(cfg.methods):
        f = Path(cfg.out_dir) / "runs" / m / f"n{size}" / f"s{seed}" / "test" / "predictions.jsonl"
        preds = [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(test[j].load_image())
            ax.set_xticks([])
            ax.set_yticks([])
            for b in test[j].boxes:
                ax.add_patch(Rectangle(b[:2], b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=1.5))
            for d in preds[j]["detections"] if j < len(preds) else []:
                b = d["box"]
                ax.add_patch(Rectangle(b[:2], b[2] - b[0], b[3] - b[1], fill=False, ec="magenta", lw=1.5, ls="--"))
            if j == 0:
                ax.set_ylabel(m, fontsize=7)
            if i == 0:
                ax.set_title(test[j].prompt[:28], fontsize=6)
    fig.suptitle("green: truth, magenta dashed: prediction", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_config(out_dir: str = "runs/demo") -> CompareConfig:
    """The reduced comparison `loctune demo` runs: <= 10 minutes on 2 CPU cores.

    The ``tiny`` model on 32 px scenes of one or two shapes with a 16-bin
    row/column codec: small enough to train in seconds, and with two shapes
    half the scenes need the referring expression. Three methods, two
    labelled-set sizes, two seeds.
    """
    return replace(
        CompareConfig(out_dir=out_dir),
        methods=["ce", "distance_inverse", "gem_distance_inverse"],
        sizes=[250, 1000],
        seeds=[0, 1],
        model_preset="tiny",
        image_size=32,
        grid=16,
        max_objects=2,
        scene={"min_objects": 1},
        steps=600,
        eval_every=300,
        n_val=100,
        n_test=300,
    )
