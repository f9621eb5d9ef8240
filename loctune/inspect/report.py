"""The inspection study's report: its tables, plots and the prose that says what they mean.

:mod:`loctune.inspect.study` runs the cells and gathers their rows, training
curves and times; this module only presents them, through the shared helpers
of :mod:`loctune.report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loctune import report
from loctune.inspect.synthetic import TEST_PRODUCTS, TRAIN_PRODUCTS
from loctune.types import Sample

#: row key -> name in the report, in report order
METHODS = {
    "vlm": "small VLM",
    "vlm_tiled": "small VLM + tiling",
    "patchcore_vlm": "PatchCore, VLM encoder",
    "patchcore_vlm_tiled": "PatchCore, VLM encoder + tiling",
    "patchcore_conv": "PatchCore, random conv",
    "patchcore_conv_tiled": "PatchCore, random conv + tiling",
    "patchcore_lite0": "PatchCore, pretrained Lite0",
    "patchcore_lite0_tiled": "PatchCore, pretrained Lite0 + tiling",
}
METRICS = {
    "accuracy": "accuracy",
    "f1": "F1",
    "auroc": "AUROC",
    "loc_acc50": "Acc@0.5",
    "loc_pointing": "pointing",
}


def brighter_defects(samples: Sequence[Sample]) -> float:
    """Share of defective samples whose defect (``meta["mask"]``) is brighter than the rest.

    The synthetic set draws each defect's polarity (near-white or near-black) per
    sample, so this should be near half on both splits; a large gap between training
    and test would mean the model could learn brightness instead of the examples.
    """
    brighter = []
    for s in samples:
        mask = np.asarray(s.meta.get("mask", ()), dtype=bool)
        if mask.any() and not mask.all():
            grey = np.asarray(s.load_image().convert("L"), dtype=np.float32)
            brighter.append(grey[mask].mean() > grey[~mask].mean())
    return float(np.mean(brighter)) if brighter else float("nan")


def write_study_report(
    cfg: Any,
    rows: list[dict[str, Any]],
    train_set: Sequence[Sample],
    test_set: Sequence[Sample],
    curves: dict[str, list[tuple[int, float]]],
    times: list[dict[str, float]],
    config_file: str,
) -> Path:
    """report.md, results.csv and the plots of an ``InspectStudyConfig`` run's ``rows``.

    ``curves`` are training-loss curves per seed; ``times`` the recorded
    training time and parameter count of each trained seed.
    """
    out = Path(cfg.out_dir)
    report.write_csv(rows, out / "results.csv")
    methods = {m: name for m, name in METHODS.items() if any(r["method"] == m for r in rows)}
    for metric, name in (("accuracy", "accuracy"), ("auroc", "AUROC")):
        report.plot_accuracy_vs_labels(
            rows,
            metric,
            list(methods),
            out / f"{name.lower()}_vs_examples.png",
            by="k",
            xlabel="in-context examples per class (k)",
            log_x=False,
            labels=methods,
        )
    if cfg.vlm:
        report.plot_learning_curves(curves, "training loss", out / "training_loss.png")
    per_seed = (
        f"{sum(t['seconds'] for t in times) / len(times) / 60:.1f} min of training per seed"
        if times
        else "training time not recorded"
    )
    params = f"{times[0]['parameters'] / 1e6:.2f} M parameters, " if times else ""
    crop = cfg.render_size // cfg.tile_rows
    small = cfg.small_config
    shown = small.image_size if cfg.vlm else (cfg.patchcore_size or small.image_size)
    vlm_methods = {m: n for m, n in methods.items() if m.startswith("vlm")}
    trained = (
        f"Trained on episodes of {', '.join(TRAIN_PRODUCTS)} ({cfg.n_train} good + {cfg.n_train} "
        f"defective images each); evaluated on the product types it never saw, "
        if cfg.vlm else
        "PatchCore alone (`vlm=false`: no VLM trained or asked), evaluated on the product "
        "types of the study's test split, "
    )
    lines = [
        "# loctune inspect-study: in-context inspection by the small VLM"
        if cfg.vlm else "# loctune inspect-study: few-shot PatchCore on unseen product types",
        "",
        f"{trained}{', '.join(TEST_PRODUCTS)}: each of their {len(test_set)} images "
        f"({cfg.n_test} good + "
        f"{cfg.n_test} defective per type) is a query, shown after k good and k defective "
        "examples drawn from the other images of its type (defect types cycled); every "
        "method sees the same examples at a given seed. Mean ± sample std over "
        f"{len(cfg.seeds)} seed(s) {cfg.seeds} (initialisation, training episodes, example draws).",
        "",
        f"Defects brighter than the rest of their image: {brighter_defects(train_set):.0%} of "
        f"the training defects, {brighter_defects(test_set):.0%} of the test defects (the "
        "synthetic set draws each defect near-white or near-black at random, per sample).",
        "",
        f"Images are rendered at {cfg.render_size} px (defects 1-4 px wide) and shown at "
        f"{shown} px; tiling adds {cfg.tile_rows}x{cfg.tile_cols} crops ({crop} px "
        f"each, also shown at {shown} px) to the global view." + (
            f" Small VLM: `{cfg.model.name}` with a {small.vision_width}-wide, "
            f"{small.vision_depth}-block vision encoder, {params}"
            f"{(small.image_size // small.patch_size // small.pixel_shuffle) ** 2} "
            f"tokens per image, boxes as `{cfg.model.codec}`. Training, each step "
            f"{cfg.group_images} images in episodes of one k: {cfg.single_image_steps} steps on "
            f"single images (k=0, untiled), then {cfg.train.steps} steps with k per class drawn "
            f"from {cfg.train_k}, {cfg.tiled_fraction:.0%} of them tiled, "
            f"{'every answer' if cfg.supervise_examples else 'the query answer'} supervised; "
            f"loss `{cfg.method}`, lr {cfg.train.lr}; {per_seed}." if cfg.vlm else ""
        ) + (f" PatchCore featurises at {cfg.patchcore_size} px."
             if cfg.patchcore_size and cfg.vlm else ""),
        "",
        "accuracy and F1 of the verdict (defective is the positive class; chance: accuracy "
        "0.5, F1 0.667 for always answering defective); AUROC of the score, averaged over "
        "product types (small VLM: P(defective) / (P(defective) + P(good)) at the first answer "
        "token; PatchCore: its anomaly score); localisation over defective queries, a query "
        "judged good counting as a miss: Acc@0.5, the first predicted box has IoU >= 0.5 "
        "with the true box, and pointing, its centre lies in the true box.",
        "",
        report.summary_table(rows, METRICS, methods, by="k"),
        "",
        "PatchCore fits its memory bank on the k good examples (the defective ones are not "
        "used), so it has no k=0 row; its threshold is calibrated leave-one-out on those "
        "good shots, which needs two: at k=1 only its threshold-free AUROC is given.",
        "",
        *([
            "### Small VLM answers",
            "",
            "type accuracy: the named defect type is the true one (over defective queries); "
            "malformed: no verdict could be read from the answer.",
            "",
            report.summary_table(
                rows,
                {"type_accuracy": "type accuracy", "malformed_rate": "malformed"},
                vlm_methods,
                by="k",
            ),
            "",
        ] if cfg.vlm else []),
        "![accuracy vs examples](accuracy_vs_examples.png)",
        "",
        "![AUROC vs examples](auroc_vs_examples.png)",
        "",
        *(["![training loss](training_loss.png)", ""] if cfg.vlm else []),
        f"Config: `{config_file}`; per-cell metrics and predictions: "
        "`s<seed>/<method>/k<k>/`; all rows: `results.csv`.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
