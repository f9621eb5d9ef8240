"""`loctune inspect-real`: few-shot PatchCore on real boards (DeepPCB crops), by k and seed.

Queries are balanced good/defective crops of the *test*-split boards
(:func:`~loctune.inspect.deeppcb.deeppcb_crops`: a window around a defect on
the tested board, and the same window on its defect-free template); examples
come from crops of the *trainval*-split boards. For every seed, ``k`` good and
``k`` defective example crops are drawn once (nested: the k=2 shots hold the
k=1 shots) and every query is scored against them, the usual few-shot anomaly
protocol. PatchCore fits its memory bank on the good shots only; the defective
ones are drawn (the VLM would see them) but not used. Two feature extractors
(:data:`~loctune.inspect.baseline.FEATURES`: fixed random convolutions, the
ImageNet-pretrained EfficientNet-Lite0's mid-level stages), each without and
with 2x2 tiling.

A second grid compares example *selection* for PatchCore: each query gets its
own ``k`` good shots from the example pool, drawn at random or the ``k``
nearest by pooled pretrained features under cosine, dot product or centred
cosine (:func:`~loctune.inspect.selection.similarity`).

The data is crops of real boards, so this is a separate command from
``inspect-study`` (whose config is about training the small VLM on synthetic
products). Cells are cached under ``s<seed>/<method>/k<k>/`` and skipped on
rerun; the config is saved beside the report.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from loctune import report
from loctune.cells import CellGrid
from loctune.config import require_choices
from loctune.inspect.baseline import FEATURES, PatchCore, patch_extractor
from loctune.inspect.deeppcb import GOOD_SOURCES, deeppcb_crops, has_colour_marks, load_deeppcb
from loctune.inspect.evaluation import (
    ICLEvaluation,
    evaluate_patchcore_fixed_shots,
    evaluate_patchcore_in_context,
)
from loctune.inspect.records import is_defective
from loctune.inspect.selection import SIMILARITIES, PooledFeatures
from loctune.types import Sample

CONFIG_FILE = "inspect_real_config.json"
RERUNNABLE = ("out_dir", "seeds", "eval_k")
DATASETS = ("deeppcb", "neu-det")
FEATURE_NAMES = {"random": "random conv", "lite0": "pretrained Lite0"}
METRICS = {
    "auroc": "AUROC",
    "f1": "F1",
    "accuracy": "accuracy",
    "loc_pointing": "pointing",
    "loc_peak": "peak pointing",
    "loc_acc50": "Acc@0.5",
}


@dataclass
class InspectRealConfig:
    """One real-set study; the DeepPCB defaults ran in 5.5 minutes on one CPU thread.

    ``data="deeppcb"``: PatchCore on balanced crops (below). ``data="neu-det"``:
    few-shot defect typing (:mod:`loctune.inspect.neu`) by the nearest of ``k``
    examples per type, on mean-pooled ``features`` at ``input_size`` px, under
    each of ``selection_metrics``, ``neu_queries_per_type`` queries per type.

    ``query_boards`` test boards and ``support_boards`` training boards each
    give ``per_board`` defective crops of ``crop`` px and as many good ones
    (``good_from``: the same windows on the template, or defect-free windows of
    the tested board). Every crop (or, tiled, each of its ``tile_rows x
    tile_cols`` tiles) is featurised at ``input_size`` px; ``bank_size`` caps
    the memory bank by greedy k-centre coreset (None keeps every patch).
    ``selection_metrics``: the nearest-example metrics compared with random
    per-query selection, on ``selection_features`` without tiling ([] skips
    that grid).
    """

    out_dir: str = "runs/inspect_real"
    data: str = "deeppcb"
    root: str = ""  # default: shared/data/deeppcb/PCBData (or neu-det) beside the checkout
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_k: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    data_seed: int = 0
    crop: int = 128
    query_boards: int = 32
    support_boards: int = 64
    per_board: int = 1
    good_from: str = "template"
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    tile_rows: int = 2
    tile_cols: int = 2
    input_size: int = 128
    bank_size: int | None = 2048
    ignore_border: int = 0  # px at a crop's border left out of its score (PatchCore.ignore_border)
    selection_metrics: list[str] = field(default_factory=lambda: list(SIMILARITIES))
    selection_features: str = "lite0"
    # data=neu-det: few-shot typing, k examples per type, this many queries per type
    neu_queries_per_type: int = 50

    def __post_init__(self):
        if self.data not in DATASETS:
            raise ValueError(
                f"InspectRealConfig.data: expected one of {DATASETS}, got {self.data!r}"
            )
        if self.good_from not in GOOD_SOURCES:
            raise ValueError(f"InspectRealConfig.good_from: expected one of {GOOD_SOURCES}")
        for name in ("seeds", "eval_k", "features"):
            if not getattr(self, name):
                raise ValueError(f"InspectRealConfig.{name} must not be empty")
        if min(self.eval_k) < 1:
            raise ValueError("InspectRealConfig.eval_k: PatchCore needs k >= 1 good shots")
        require_choices("InspectRealConfig.features", self.features, FEATURES)
        require_choices("InspectRealConfig.selection_features", [self.selection_features],
                        FEATURES)
        require_choices("InspectRealConfig.selection_metrics", self.selection_metrics,
                        SIMILARITIES)
        if self.support_boards * self.per_board < max(self.eval_k):
            raise ValueError(
                f"InspectRealConfig: support_boards x per_board must be >= max(eval_k) = "
                f"{max(self.eval_k)} (the pool holds that many crops of each class)"
            )


def _boards(cfg: InspectRealConfig, split: str, n: int) -> list[Sample]:
    tested = sorted(
        (s for s in load_deeppcb(cfg.root or None, split) if is_defective(s)),
        key=lambda s: s.image_id,
    )
    drawn = random.Random(f"{cfg.data_seed}:{split}").sample(tested, min(n, len(tested)))
    # boards with annotations drawn into the image are dropped after the draw, so that
    # the other boards of a draw stay the same
    return [s for s in drawn if not has_colour_marks(s.image)]


def crop_sets(cfg: InspectRealConfig) -> tuple[list[Sample], list[Sample]]:
    """(queries from test boards, example pool from trainval boards), balanced crops."""
    kwargs = {"crop": cfg.crop, "per_board": cfg.per_board, "good_from": cfg.good_from,
              "seed": cfg.data_seed}
    queries = deeppcb_crops(_boards(cfg, "test", cfg.query_boards), **kwargs)
    pool = deeppcb_crops(_boards(cfg, "trainval", cfg.support_boards), **kwargs)
    return queries, pool


def fixed_shots(pool: Sequence[Sample], k: int, data_seed: int, seed: int) -> list[Sample]:
    """``k`` good and ``k`` defective examples of the pool for one seed, nested in ``k``
    (the first ``k`` of one seeded order of each class), interleaved good first."""
    rng = random.Random(f"{data_seed}:{seed}:shots")
    good = [s for s in pool if not is_defective(s)]
    defective = [s for s in pool if is_defective(s)]
    good, defective = rng.sample(good, len(good)), rng.sample(defective, len(defective))
    if min(len(good), len(defective)) < k:
        raise ValueError(f"k={k}: the pool has {len(good)} good and {len(defective)} defective")
    return [s for pair in zip(good[:k], defective[:k], strict=True) for s in pair]


class CachedEmbedder:
    """An embedder that remembers each image's row (by the image object, which it holds)."""

    def __init__(self, embed: Callable[[Sequence[Image.Image]], torch.Tensor]) -> None:
        self.embed = embed
        self.rows: dict[int, tuple[Image.Image, torch.Tensor]] = {}

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        missing = [im for im in images if id(im) not in self.rows]
        if missing:
            for im, row in zip(missing, self.embed(missing), strict=True):
                self.rows[id(im)] = (im, row)
        return torch.stack([self.rows[id(im)][1] for im in images])


def method_name(features: str, tiled: bool) -> str:
    return f"patchcore_{features}{'_tiled' if tiled else ''}"


def method_label(method: str) -> str:
    if method.startswith("select_"):
        strategy = method.removeprefix("select_")
        return "random shots per query" if strategy == "random" else f"nearest, {strategy}"
    features = method.removeprefix("patchcore_").removesuffix("_tiled")
    return f"PatchCore, {FEATURE_NAMES[features]}" + (" + tiling" if "_tiled" in method else "")


def _saved(run: Callable[[], ICLEvaluation]) -> Callable[[Path], dict[str, Any]]:
    def cell(directory: Path) -> dict[str, Any]:
        result = run()
        result.save(directory)
        return result.metrics

    return cell


def run_inspect_real(
    cfg: InspectRealConfig, progress: bool = True, log: Callable[[str], None] = print
) -> Path:
    """Run every missing cell, then (re)write the report; returns report.md."""
    from tqdm.auto import tqdm

    grid = CellGrid(cfg.out_dir, cfg, CONFIG_FILE, RERUNNABLE)
    if cfg.data == "neu-det":
        return run_neu_typing(cfg, grid, progress, log)
    queries, pool = crop_sets(cfg)
    log(f"DeepPCB crops: {len(queries)} queries from test boards, {len(pool)} examples "
        "from trainval boards")
    tiles = (cfg.tile_rows, cfg.tile_cols)
    lite0 = {}  # the pretrained extractor, built once

    def extractor(features: str, seed: int):
        if features == "random":
            return patch_extractor("random", seed=seed)
        if "lite0" not in lite0:
            lite0["lite0"] = patch_extractor(features)
        return lite0["lite0"]

    embed = None
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        cells = []
        for features in cfg.features:
            net = extractor(features, seed)
            for tiled in (False, True):
                cache: dict = {}  # one per extractor and tiling, shared by its k cells

                def make_detector(net=net, tiled=tiled, cache=cache) -> PatchCore:
                    return PatchCore(net, input_size=cfg.input_size,
                                     tiles=tiles if tiled else None,
                                     bank_size=cfg.bank_size, cache=cache,
                                     ignore_border=cfg.ignore_border)

                for k in cfg.eval_k:
                    shots = fixed_shots(pool, k, cfg.data_seed, seed)

                    def run(shots=shots, make=make_detector):
                        return evaluate_patchcore_fixed_shots(queries, shots, make)

                    cells.append((method_name(features, tiled), k, run))
        if cfg.selection_metrics:
            net = extractor(cfg.selection_features, seed)
            cache = {}

            def make_selected(net=net, cache=cache) -> PatchCore:
                return PatchCore(net, input_size=cfg.input_size, bank_size=cfg.bank_size,
                                 cache=cache, ignore_border=cfg.ignore_border)

            if embed is None:
                embed = CachedEmbedder(PooledFeatures(
                    cfg.input_size, extractor(cfg.selection_features, seed)))
            for k in cfg.eval_k:
                for strategy in ("random", *cfg.selection_metrics):

                    def run(k=k, strategy=strategy, embed=embed, seed=seed, make=make_selected):
                        nearest = strategy != "random"
                        return evaluate_patchcore_in_context(
                            queries, pool, k, make,
                            strategy="nearest" if nearest else "random",
                            metric=strategy if nearest else "cosine",
                            embed=embed, seed=seed)

                    cells.append((f"select_{strategy}", k, run))
        for method, k, run in tqdm(cells, desc=f"seed {seed}", disable=not progress):
            metrics = grid.cell((f"s{seed}", method, f"k{k}"), _saved(run), done="metrics.json")
            scalars = {m: v for m, v in metrics.items() if not isinstance(v, dict)}
            rows.append({"method": method, "k": k, "seed": seed, **scalars})
        grid.write_rows(rows)
    figure_k = 4 if 4 in cfg.eval_k else max(cfg.eval_k)
    detectors = {
        method_name(f, t): PatchCore(extractor(f, cfg.seeds[0]), input_size=cfg.input_size,
                                     tiles=tiles if t else None, bank_size=cfg.bank_size,
                                     ignore_border=cfg.ignore_border)
        for f in cfg.features for t in (False, True)
    }
    plot_score_maps(Path(cfg.out_dir) / "score_maps.png", queries,
                    fixed_shots(pool, figure_k, cfg.data_seed, cfg.seeds[0]), detectors)
    return write_real_report(cfg, rows, queries, pool, figure_k)


def plot_score_maps(
    path: Path,
    queries: Sequence[Sample],
    shots: Sequence[Sample],
    detectors: dict[str, PatchCore],
    n_defective: int = 4,
    n_good: int = 2,
) -> None:
    """A grid: the first defective and good queries (true boxes in red), then each
    detector's score map (fit on the good ``shots``), one colour scale per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good_shots = [s.load_image() for s in shots if not is_defective(s)]
    for detector in detectors.values():
        detector.fit(good_shots, threshold=None if len(good_shots) >= 2 else float("inf"))
    chosen = ([q for q in queries if is_defective(q)][:n_defective]
              + [q for q in queries if not is_defective(q)][:n_good])
    columns = 1 + len(detectors)
    fig, axes = plt.subplots(len(chosen), columns, figsize=(2 * columns, 2 * len(chosen)),
                             squeeze=False)
    for row, query in zip(axes, chosen, strict=True):
        image = query.load_image()
        row[0].imshow(image)
        for x1, y1, x2, y2 in query.boxes:
            row[0].add_patch(matplotlib.patches.Rectangle(
                (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", linewidth=1.5))
        row[0].set_ylabel("defective" if is_defective(query) else "good", fontsize=8)
        for ax, detector in zip(row[1:], detectors.values(), strict=True):
            found = detector.predict(image)
            ax.imshow(found.score_map.numpy(), cmap="inferno")
            ax.plot(*found.peak, marker="+", color="cyan", markersize=8)
            ax.set_xlabel(f"score {found.score:.2f}", fontsize=7)
    axes[0][0].set_title("query + true box", fontsize=8)
    for ax, method in zip(axes[0][1:], detectors, strict=True):
        ax.set_title(method_label(method).removeprefix("PatchCore, "), fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"PatchCore score maps, k={len(good_shots)} good shots (cyan +: peak)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_real_report(
    cfg: InspectRealConfig,
    rows: list[dict[str, Any]],
    queries: Sequence[Sample],
    pool: Sequence[Sample],
    figure_k: int | None = None,
) -> Path:
    """report.md, results.csv and the AUROC-vs-k plots of an ``inspect-real`` run
    (``figure_k``: the k of ``score_maps.png``, when one was drawn)."""
    out = Path(cfg.out_dir)
    report.write_csv(rows, out / "results.csv")
    present = {r["method"] for r in rows}
    main = {m: method_label(m) for f in FEATURES for t in (False, True)
            if (m := method_name(f, t)) in present}
    selection = {m: method_label(m) for s in ("random", *SIMILARITIES)
                 if (m := f"select_{s}") in present}
    xlabel = "good example crops (k)"
    report.plot_accuracy_vs_labels(rows, "auroc", list(main), out / "auroc_vs_k.png", by="k",
                                   xlabel=xlabel, log_x=False, labels=main, ylabel="image AUROC")
    n_def = sum(is_defective(q) for q in queries)
    n_query_boards = len({q.meta["board"] for q in queries})
    n_pool_boards = len({s.meta["board"] for s in pool})
    sizes = sorted({d for q in queries for b in q.boxes for d in (b[2] - b[0], b[3] - b[1])})
    good_note = ("the same window on the board's defect-free template"
                 if cfg.good_from == "template"
                 else "a window of the tested board no defect touches")
    lines = [
        "# loctune inspect-real: few-shot PatchCore on DeepPCB crops",
        "",
        f"Queries: {len(queries)} crops of {cfg.crop} px ({n_def} defective, "
        f"{len(queries) - n_def} good) from {n_query_boards} boards of the DeepPCB test split. "
        f"A defective crop is a window holding a defect box at a random position; its good "
        f"counterpart is {good_note}. Examples: {len(pool)} crops built the same way from "
        f"{n_pool_boards} trainval boards. Defect boxes in the query crops are "
        f"{sizes[0]:.0f}-{sizes[-1]:.0f} px on a side."
        if sizes else "",
        "",
        f"Per seed, k good and k defective example crops are drawn once from the trainval pool "
        f"(nested in k) and every query is scored against them. PatchCore fits its memory bank "
        f"on the k good crops only (as it should: it is a one-class method; the defective "
        f"examples are not used). Crops (or, with tiling, each of their {cfg.tile_rows}x"
        f"{cfg.tile_cols} tiles) are featurised at {cfg.input_size} px; memory bank capped at "
        f"{cfg.bank_size} patches by greedy k-centre coreset"
        + (f"; the outer {cfg.ignore_border} px of every crop do not count towards its score, "
           "peak or box. " if cfg.ignore_border else ". ")
        + "Features: random conv = two fixed "
        "random 3x3 convolutions (seeded per seed); pretrained Lite0 = ImageNet EfficientNet-Lite0 "
        "stages at stride 8 and 16, each 3x3-averaged, upsampled and concatenated (152 "
        f"channels). Mean ± sample std over {len(cfg.seeds)} seed(s) {cfg.seeds} (the example "
        "draw, and the random convolutions).",
        "",
        "AUROC of the image score (max patch distance); accuracy and F1 of the verdict at the "
        "threshold calibrated leave-one-out on the good shots (needs k >= 2: no k=1 values); "
        "pointing: the centre of the flagged region's box lies in a true box; peak pointing "
        "(threshold-free): the score map's maximum lies in a true box; Acc@0.5: the box has IoU "
        ">= 0.5 with a true box. Localisation is over defective queries.",
        "",
        report.summary_table(rows, METRICS, main, by="k"),
        "",
        "![AUROC vs k](auroc_vs_k.png)",
        "",
    ]
    if figure_k is not None:
        lines += [
            f"Score maps of the first queries (seed {cfg.seeds[0]}, k={figure_k}); each map on "
            "its own colour scale, the score under it:",
            "",
            "![score maps](score_maps.png)",
            "",
        ]
    if selection:
        report.plot_accuracy_vs_labels(
            rows, "auroc", list(selection), out / "selection_auroc_vs_k.png", by="k",
            xlabel=xlabel, log_x=False, labels=selection, ylabel="image AUROC")
        lines += [
            "## Example selection",
            "",
            f"Each query gets its own k good shots from the pool: at random, or the k nearest by "
            f"mean-pooled {FEATURE_NAMES[cfg.selection_features]} features under cosine, dot "
            "product, or centred cosine (the pool's mean embedding subtracted first). PatchCore "
            f"on {FEATURE_NAMES[cfg.selection_features]} features, untiled. Nearest selection "
            "does not depend on the seed (std 0).",
            "",
            report.summary_table(rows, {"auroc": "AUROC", "f1": "F1", "loc_peak": "peak pointing"},
                                 selection, by="k"),
            "",
            "![selection AUROC vs k](selection_auroc_vs_k.png)",
            "",
        ]
    lines.append(f"Config: `{CONFIG_FILE}`; per-cell metrics and predictions: "
                 "`s<seed>/<method>/k<k>/`; all rows: `results.csv`.")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_neu_typing(
    cfg: InspectRealConfig, grid: CellGrid, progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """The ``data="neu-det"`` study, per seed: typing accuracy by k, features and metric, and
    localisation given the type (:func:`~loctune.inspect.neu.prototype_localisation`) by k
    and features."""
    from loctune.data import neu_det
    from loctune.inspect.neu import nearest_example_typing, prototype_localisation, typing_split

    samples = neu_det("train", root=cfg.root or None).samples
    types = [s.labels[0] for s in samples]
    boxes = [s.boxes for s in samples]
    sizes = [s.image_size for s in samples]
    log(f"NEU-DET: {len(samples)} images of {len(set(types))} types")
    splits = {(seed, k): typing_split(types, k, cfg.neu_queries_per_type, seed)
              for seed in cfg.seeds for k in cfg.eval_k}
    # only the images some split uses are loaded and featurised
    used = sorted({i for support, queries in splits.values() for i in (*support, *queries)})
    images = [samples[i].load_image().convert("RGB") for i in used]
    rows: list[dict[str, Any]] = []
    lite0_maps = None
    for seed in cfg.seeds:
        for features in cfg.features:
            if features == "lite0" and lite0_maps is not None:
                maps = lite0_maps  # pretrained: the same for every seed
            else:
                embed = PooledFeatures(cfg.input_size, patch_extractor(features, seed=seed))
                maps_used = torch.cat([embed.maps(images[i : i + 64])
                                       for i in range(0, len(images), 64)])
                maps = torch.zeros(len(samples), *maps_used.shape[1:])
                maps[used] = maps_used
                if features == "lite0":
                    lite0_maps = maps
            embeddings = maps.mean(dim=(2, 3))
            for k in cfg.eval_k:
                support, queries = splits[(seed, k)]
                cells = {f"type_{features}_{metric}": partial(
                    nearest_example_typing, embeddings, types, support, queries, metric)
                    for metric in cfg.selection_metrics or ["cosine"]}
                cells[f"box_{features}"] = partial(
                    prototype_localisation, maps, boxes, types, sizes, support, queries)
                for method, run in cells.items():
                    metrics = grid.cell((f"s{seed}", method, f"k{k}"), lambda _dir, run=run: run(),
                                        done="metrics.json")
                    rows.append({"method": method, "k": k, "seed": seed, **metrics})
        grid.write_rows(rows)
    return write_neu_report(cfg, rows)


def write_neu_report(cfg: InspectRealConfig, rows: list[dict[str, Any]]) -> Path:
    out = Path(cfg.out_dir)
    report.write_csv(rows, out / "results.csv")
    present = {r["method"] for r in rows}
    methods = {m: f"{FEATURE_NAMES[f]}, {metric}" for f in FEATURES for metric in SIMILARITIES
               if (m := f"type_{f}_{metric}") in present}
    report.plot_accuracy_vs_labels(
        rows, "accuracy", list(methods), out / "typing_accuracy_vs_k.png", by="k",
        xlabel="examples per defect type (k)", log_x=False, labels=methods,
        ylabel="typing accuracy (6 types, chance 1/6)")
    lines = [
        "# loctune inspect-real data=neu-det: few-shot defect typing and boxes on NEU-DET",
        "",
        f"Six steel defect types; per seed, k example images of each type and "
        f"{cfg.neu_queries_per_type} query images of each type are drawn (disjoint) from "
        "the 1,770 NEU-DET training images. A query is named as the type of its most similar "
        f"example (1-NN) on mean-pooled features of the image at {cfg.input_size} px: random "
        "conv (fixed random convolutions, seeded per seed) or pretrained Lite0 (ImageNet "
        "EfficientNet-Lite0 stride-8 and stride-16 stages). Similarity: cosine, dot product, or "
        "centred cosine (the examples' mean embedding subtracted first). Nothing is trained on "
        "NEU-DET, so every type is unseen by the features. Chance is 1/6 = 0.167. Mean ± "
        f"sample std over {len(cfg.seeds)} seed(s) {cfg.seeds}.",
        "",
        report.summary_table(rows, {"accuracy": "accuracy",
                                    "balanced_accuracy": "balanced accuracy"}, methods, by="k"),
        "",
        "![typing accuracy vs k](typing_accuracy_vs_k.png)",
        "",
        *_neu_localisation_section(cfg, rows),
        f"Config: `{CONFIG_FILE}`; per-cell metrics: `s<seed>/<method>/k<k>/`; rows: "
        "`results.csv`.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _neu_localisation_section(cfg: InspectRealConfig, rows: list[dict[str, Any]]) -> list[str]:
    """The localisation table, with the mean example box as its trivial baseline (one row per
    (k, seed): it depends on the examples only, not on the features)."""
    box_rows = [r for r in rows if r["method"].startswith("box_")]
    if not box_rows:
        return []
    baseline = {(r["k"], r["seed"]): {"method": "box_mean", "k": r["k"], "seed": r["seed"],
                                      "loc_acc50": r["mean_box_acc50"],
                                      "loc_pointing": r["mean_box_pointing"]} for r in box_rows}
    names = {f"box_{f}": FEATURE_NAMES[f] for f in FEATURES if f"box_{f}" in
             {r["method"] for r in box_rows}} | {"box_mean": "mean box of the type's examples"}
    return [
        "### Boxes, given the type",
        "",
        "Each query's defect type is given (\"where is the scratch?\"); its k examples of "
        "that type supply a defect bank (the patches whose centre lies in their boxes) and all "
        f"6k examples a background bank (the patches outside their boxes), at {cfg.input_size} "
        "px. A query patch scores its cosine to the nearest defect patch minus that to the "
        "nearest background patch; the box is the largest connected region scoring above 0. "
        "Acc@0.5: that box has IoU >= 0.5 with one of the image's true boxes; pointing: the "
        "highest-scoring patch lies in one (the baseline: its box's centre).",
        "",
        report.summary_table([*box_rows, *baseline.values()],
                             {"loc_acc50": "Acc@0.5", "loc_pointing": "pointing"}, names, by="k"),
        "",
    ]
