"""`loctune train | eval | predict | pretrain | compare | demo | inspect | inspect-study |
inspect-real`: a thin CLI.

Every subcommand accepts trailing ``key=value`` overrides of its config
dataclass (``lr=3e-4``, ``loss.targets.power=3``), in the spirit of
big_vision/nanoGPT configs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from loctune.config import ConfigError
from loctune.run_config import DataOptions
from loctune.types import DataError

if TYPE_CHECKING:
    from loctune.types import Sample


def increment_run_dir(project: str, name: str) -> Path:
    """``project/name``, or ``name2``, ``name3``... if taken (Ultralytics' ``runs/train/exp``)."""
    base = Path(project) / name
    path, i = base, 2
    while path.exists():
        path = base.with_name(f"{name}{i}")
        i += 1
    return path


#: synthetic dataset specs and the task they generate
SYNTHETIC_TASKS = {"synthetic": "grounding", "synthetic-detection": "detection"}
SYNTHETIC_SIZES = {"train": 1000, "val": 200, "test": 500}
#: share of the training images held out as "val" when a dataset has no val split
VAL_FRACTION = 0.1


class UsageError(ConfigError):
    """Bad command-line input, reported in one line rather than a traceback."""


def _number(kind: type, low: float, high: float = float("inf"), open_high: bool = False):
    """An argparse ``type=`` that refuses values outside ``[low, high]`` (``high`` excluded with
    ``open_high``) and non-finite ones, so ``--max-new-tokens -1`` is a usage error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not (low <= value <= high) or (open_high and value == high):
            bound = f"< {high:g}" if open_high else f"<= {high:g}"
            raise argparse.ArgumentTypeError(
                f"expected {low:g} <= value" + ("" if high == float("inf") else f" {bound}")
                + f", got {text}"
            )
        return value

    parse.__name__ = kind.__name__
    return parse


_COUNT = _number(int, 0)
_POSITIVE = _number(int, 1)
_FRACTION = _number(float, 0.0, 1.0)


def load_splits(
    spec: str, sizes: Mapping[str, int | None], image_size: int = 64,
    options: DataOptions | None = None,
) -> dict[str, list[Sample]]:
    """The splits named in ``sizes`` of a dataset spec, each cut to its size (None: all).

    ``spec`` is ``synthetic``, ``synthetic-detection``, ``raccoon`` or an annotation
    path (see :func:`loctune.data.load_dataset`). A dataset's own split
    (``meta["split"]``) is used as it is; a dataset without one is whichever split
    is asked for. When ``train`` and ``val`` are asked for and the data has no val
    split, ``val`` is carved from the training images (:data:`VAL_FRACTION`, by
    image, seed 0), so the CLI never scores an image it trained on. A dataset that
    reads as no samples at all is a :class:`DataError` saying which file and why.
    """
    if spec in SYNTHETIC_TASKS:
        from loctune.data.synthetic import SPLITS, make_split

        if options is not None and options != DataOptions():
            raise UsageError(f"--data {spec}: generated data takes no reader options "
                             "(--format, --image-root, --instances, --allow-outside-root)")
        unknown = [split for split in sizes if split not in SPLITS]
        if unknown:
            raise UsageError(f"--data {spec}: no {unknown[0]!r} split; it has {list(SPLITS)}")
        return {
            split: make_split(SYNTHETIC_TASKS[spec], split,
                              SYNTHETIC_SIZES.get(split, 200) if n is None else n,
                              image_size=image_size)
            for split, n in sizes.items()
        }
    from loctune.data import dataset_splits, load_dataset, raccoon, split_by_image

    reader_options = (options or DataOptions()).reader_options()
    if spec == "raccoon":
        if set(reader_options) - {"allow_outside_root"} or (options and options.format):
            raise UsageError("--data raccoon: a named set knows its own layout; of the reader "
                             "options only --allow-outside-root applies")
        read = raccoon("all", **reader_options)
    elif not Path(spec).exists():
        raise FileNotFoundError(
            f"--data {spec}: no such file or directory (expected a data.yaml, COCO .json, "
            f"VOC folder, .csv or .jsonl, or one of {[*SYNTHETIC_TASKS, 'raccoon']})"
        )
    else:
        read = load_dataset(spec, (options or DataOptions()).format, **reader_options)
    samples = read.require_samples().samples
    own = dataset_splits(samples)
    carve_val = "train" in sizes and "val" in sizes
    if own is None:
        parts = {split: list(samples) for split in sizes if not (carve_val and split == "val")}
    else:
        parts = own
    if carve_val and "val" not in parts and "train" in parts:
        parts |= split_by_image(parts["train"], {"train": 1 - VAL_FRACTION, "val": VAL_FRACTION})
    missing = [split for split in sizes if split not in parts]
    if missing:
        raise UsageError(
            f"--data {spec}: no {' or '.join(map(repr, missing))} split; it has {sorted(parts)}"
        )
    return {split: parts[split] if n is None else parts[split][:n] for split, n in sizes.items()}


def _method_loss(method: str):
    from loctune.losses import list_losses, loss_config

    try:
        return loss_config(method)
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(
            f"--method {method!r}: {err.args[0]} (presets: {', '.join(list_losses())}; "
            "a variant is preset:key=value,...)"
        ) from None


#: ``loctune train`` flags and the RunConfig field each sets
_TRAIN_FLAGS = {
    "model": "model.name", "codec": "model.codec", "dtype": "model.dtype", "lora": "model.lora",
    "qlora": "model.qlora", "freeze_vision": "model.freeze_vision", "data": "data",
    "format": "data_options.format", "image_root": "data_options.image_root",
    "instances": "data_options.instances", "allow_outside_root": "data_options.allow_outside_root",
    "n_train": "n_train", "n_val": "n_val", "max_new_tokens": "max_new_tokens",
    "steps": "train.steps", "epochs": "train.epochs", "batch": "train.batch_size",
    "lr": "train.lr", "mixed_precision": "train.mixed_precision",
}


def run_config_from_args(args):
    """The run's one record: ``--config`` file, then flags, then ``key=value`` overrides.

    An override names a RunConfig field (``model.codec=patch:grid=16``, ``n_val=0``) or,
    for brevity, a TrainConfig field (``lr=3e-4`` is ``train.lr=3e-4``).
    """
    from loctune.config import apply_overrides, config_to_dict, load_config, parse_overrides
    from loctune.run_config import RunConfig

    flags = [f"{field}={getattr(args, flag)}" for flag, field in _TRAIN_FLAGS.items()
             if getattr(args, flag) is not None and getattr(args, flag) is not False]
    cfg = load_config(RunConfig, args.config) if args.config else RunConfig()
    top = set(config_to_dict(cfg))
    routed = [o if o.partition("=")[0].split(".")[0].strip() in top else f"train.{o}"
              for o in args.overrides]
    parse_overrides(args.overrides)  # the override's own syntax errors name it as typed
    cfg = apply_overrides(cfg, [*flags, *routed])
    if args.method:
        cfg = replace(cfg, train=replace(cfg.train, loss=_method_loss(args.method)))
    if not cfg.data:
        raise UsageError("train: give --data (or data: in --config)")
    return cfg


def cmd_train(args) -> int:
    from loctune.evaluate import evaluate, json_safe
    from loctune.models.spec import open_model
    from loctune.train import train

    cfg = run_config_from_args(args)
    # --resume continues the named run; a fresh run never overwrites one (exp, exp2, ...)
    run_dir = Path(args.project) / args.name if args.resume else increment_run_dir(
        args.project, args.name
    )
    if args.resume and not (run_dir / "last").is_dir():
        raise UsageError(f"--resume: {run_dir} has no last/ checkpoint to continue from "
                         "(name the run with --project and --name)")
    cfg = replace(cfg, train=replace(cfg.train, run_dir=str(run_dir)))
    # n_val=0: no validation, so nothing is carved from the training images
    sizes = {"train": cfg.n_train} | ({} if cfg.n_val == 0 else {"val": cfg.n_val})
    splits = load_splits(cfg.data, sizes, options=cfg.data_options)
    train_samples, val_samples = splits["train"], splits.get("val", [])
    adapter = open_model(cfg.model, train_samples, seed=cfg.train.seed, target=cfg.data, log=print)
    if cfg.model.codec is None and isinstance(getattr(adapter.codec, "spec", None), str):
        # the record names the codec the model was opened with, not "the default" of today
        cfg = replace(cfg, model=replace(cfg.model, codec=adapter.codec.spec))
    print(f"training {cfg.model.name} on {cfg.data}: {len(train_samples)} train / "
          f"{len(val_samples)} val -> {run_dir}")
    final = {}  # the latest validation in full: its predictions and plots go to run_dir/val

    def validate(a):
        final["val"] = evaluate(a, val_samples, max_new_tokens=cfg.max_new_tokens, progress=False)
        return final["val"].metrics

    result = train(adapter, train_samples, cfg.train, eval_fn=validate if val_samples else None,
                   resume=args.resume, run_record=cfg)
    adapter.save_pretrained(str(run_dir / "model"))
    if "val" in final:  # what `loctune eval` writes, for the final validation (last/'s weights)
        final["val"].save(run_dir / "val", val_samples)
    print(json.dumps(json_safe({k: round(v, 4) for k, v in result.metrics.items()}), indent=1))
    plots = f"; final validation and its plots: {run_dir / 'val'}" if "val" in final else ""
    print(f"results saved to {run_dir} (model: {run_dir / 'model'}{plots})")
    return 0


def cmd_eval(args) -> int:
    from loctune.evaluate import evaluate, json_safe
    from loctune.models import load_model

    options = DataOptions(args.format, args.image_root, args.instances, args.allow_outside_root)
    samples = load_splits(args.data, {args.split: args.n}, options=options)[args.split]
    adapter = load_model(args.model)
    result = evaluate(adapter, samples, batch_size=args.batch, max_new_tokens=args.max_new_tokens,
                      confidence=args.confidence, nms_iou=args.nms_iou or None, conf=args.conf)
    out = increment_run_dir(args.project, args.name)
    result.save(out, samples)
    metrics = {k: round(v, 4) for k, v in result.metrics.items()}
    print(json.dumps(json_safe(metrics), indent=1))
    print(f"predictions, metrics and plots saved to {out}")
    return 0


def cmd_predict(args) -> int:
    from loctune.models import load_model
    from loctune.predict import predict

    adapter = load_model(args.model)
    prediction = predict(adapter, args.images, args.prompt, task=args.task, conf=args.conf,
                         confidence=args.confidence, nms_iou=args.nms_iou or None,
                         batch_size=args.batch, max_new_tokens=args.max_new_tokens)
    out = prediction.save(increment_run_dir(args.project, args.name), save_txt=args.save_txt,
                          save_coco=args.save_coco)
    for sample, r in zip(prediction.samples, prediction.records, strict=True):
        dets = ", ".join(f"{d['label']} {[round(c) for c in d['box']]} ({d['score']:.2f})"
                         for d in r["detections"])
        print(f"{sample.image}: {dets or 'nothing found'}")
    print(f"drawn boxes and predictions.json saved to {out}")
    return 0


def cmd_compare(args) -> int:
    from loctune.compare import CompareConfig, run_compare

    return _run_study(args, CompareConfig, run_compare)


def cmd_pretrain(args) -> int:
    from loctune.pretrain import PretrainConfig, run_pretrain

    return _run_study(args, PretrainConfig, run_pretrain)


def cmd_inspect_study(args) -> int:
    from loctune.inspect.study import InspectStudyConfig, run_inspect_study

    return _run_study(args, InspectStudyConfig, run_inspect_study)


def cmd_inspect_real(args) -> int:
    from loctune.inspect.real import InspectRealConfig, run_inspect_real

    return _run_study(args, InspectRealConfig, run_inspect_real)


def cmd_demo(args) -> int:
    from loctune.compare import demo_config, run_compare

    return _run_study(args, demo_config(args.out), run_compare)


def _run_study(args, config, run) -> int:
    """Build a study's config (a class: from ``--config`` or its defaults, then ``--out``; or
    a ready config), apply ``key=value`` overrides, run it, print its report's tables."""
    from loctune.config import apply_overrides, load_config

    if isinstance(config, type):
        config = load_config(config, args.config) if args.config else config()
        if args.out:
            config = replace(config, out_dir=args.out)
    config = apply_overrides(config, args.overrides)
    t0 = time.time()
    path = run(config)
    print(path.read_text().split("![")[0])
    print(f"finished in {(time.time() - t0) / 60:.1f} min; report: {path}")
    return 0


def cmd_inspect(args) -> int:
    """Few-shot inspection by in-context examples: verdicts for images, or ``--eval`` metrics."""
    from loctune.inspect.evaluation import evaluate_in_context
    from loctune.inspect.folder import read_inspection_data
    from loctune.inspect.records import by_product, inspection_sample
    from loctune.inspect.run import inspect_in_context
    from loctune.inspect.selection import ExampleSelector
    from loctune.inspect.tiling import Tiling
    from loctune.models import load_model

    if args.eval != bool(args.data) or args.eval == bool(args.examples or args.query):
        raise SystemExit("inspect: give --examples DIR --query IMAGE..., or --data DIR --eval")
    options = {k: v for k, v in (("dtype", args.dtype), ("codec", args.codec)) if v}
    adapter = load_model(args.model, **options)
    try:
        tiling = Tiling.parse(args.tile, args.overlap) if args.tile else None
    except ValueError as err:
        raise UsageError(f"--{err}") from None
    out = increment_run_dir(args.project, args.name)
    if args.eval:
        samples = read_inspection_data(args.data)
        queries = [s for s in samples if s.meta.get("split", "test") == "test"][: args.n]
        result = evaluate_in_context(adapter, queries, samples, args.k, args.select, args.metric,
                                     tiling=tiling, seed=args.seed,
                                     max_new_tokens=args.max_new_tokens, progress=True)
        result.save(out)
        print(json.dumps(result.metrics, indent=1))
        print(f"metrics.json and predictions.json saved to {out}")
        return 0
    examples = read_inspection_data(args.examples)
    products = list(by_product(examples))
    product = args.product or products[0]
    if product not in products or (len(products) > 1 and not args.product):
        raise SystemExit(f"inspect: --product must name one of the example products {products}")
    selector = ExampleSelector([s for s in examples if s.meta["product"] == product], args.k,
                               args.select, args.metric, seed=args.seed)
    records = []
    for path in args.query:
        query = inspection_sample(str(path), product, image_id=Path(path).stem)
        pred = inspect_in_context(adapter, query, selector.select(query), tiling,
                                  args.max_new_tokens)
        records.append({"image": str(path), **pred.to_json()})
        verdict = f"defective: {pred.defect_type}" if pred.defective else "good"
        boxes = " ".join(str([round(c) for c in d.box]) for d in pred.detections)
        print(f"{path}: {verdict} (score {pred.score:.3f}) {boxes}".rstrip())
    out.mkdir(parents=True)
    (out / "predictions.json").write_text(json.dumps(records, indent=1))
    print(f"predictions.json saved to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from loctune.data import FORMATS
    from loctune.evaluate import CONF, CONFIDENCE_MODES, NMS_IOU

    summary = " ".join(__doc__.split("\n\n")[0].split())  # the docstring's first paragraph
    p = argparse.ArgumentParser(prog="loctune", description=summary)
    sub = p.add_subparsers(dest="command", required=True)

    def common_model(sp, needs_data=True, required=True):
        sp.add_argument("--model", required=required,
                        help="checkpoint dir, shipped checkpoint name, 'small[:preset]' or hub id")
        if needs_data:
            sp.add_argument("--data", required=required,
                            help="data.yaml, COCO json, VOC dir, CSV, JSONL, 'synthetic', "
                                 "'raccoon'")
            sp.add_argument("--format", choices=FORMATS,
                            help="annotation format, when detection cannot tell")
            sp.add_argument("--image-root",
                            help="folder the annotation's image paths are relative to "
                                 "(default: beside the annotation file)")
            sp.add_argument("--instances", help="RefCOCO: the COCO instances file of the refs")
            sp.add_argument("--allow-outside-root", action="store_true",
                            help="read image paths that resolve outside the dataset root")
        sp.add_argument("--project", default=f"runs/{sp.prog.split()[-1]}")
        sp.add_argument("--name", default="exp")
        sp.add_argument("--batch", type=_POSITIVE, default=None if sp.prog.endswith("train") else 8)
        sp.add_argument("--max-new-tokens", type=_POSITIVE,
                        help="generation length (default: room for the most boxes in the data)")

    def decoding(sp):
        sp.add_argument("--confidence", default="tokens", choices=CONFIDENCE_MODES,
                        help="detection score: all object tokens, location tokens, location mass")
        sp.add_argument("--nms-iou", type=_FRACTION, default=NMS_IOU,
                        help="drop a detection overlapping a better one of its label by more "
                             "(0: keep all)")

    t = sub.add_parser("train", help="fine-tune a model with loctune's supervision")
    common_model(t, required=False)
    t.add_argument("--config", help="YAML/JSON run record (a run's config.yaml: model, data, "
                                    "train); flags and key=value override it")
    t.add_argument(
        "--method",
        help="named method, e.g. ce, distance_inverse, gem_distance_inverse, gem:beta=2",
    )
    t.add_argument("--steps", type=_COUNT)
    t.add_argument("--epochs", type=_number(float, 0.0))
    t.add_argument("--lr", type=float)
    t.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])
    t.add_argument("--lora", type=_POSITIVE, metavar="RANK",
                   help="train a LoRA adapter of this rank")
    t.add_argument("--freeze-vision", action="store_true")
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights dtype of a hub model")
    t.add_argument("--qlora", action="store_true",
                   help="with --lora: load the base model in 4 bit (CUDA)")
    t.add_argument("--codec", help="codec spec overriding the model's, e.g. rowcol:grid=16, "
                                   "patch:grid=16, bins:n_bins=1000 (fresh small VLM: "
                                   "rowcol:grid=32)")
    t.add_argument("--n-train", type=_COUNT)
    t.add_argument("--n-val", type=_COUNT,
                   help="validation images (default: the data's val split, or 10%% of train); "
                        "0: none, train on every training image")
    t.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    t.add_argument("overrides", nargs="*",
                   help="key=value overrides of the run record (model.codec=..., n_val=0) or "
                        "of its train section (lr=3e-4 is train.lr=3e-4)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="generate, decode and score on a split")
    common_model(e)
    e.add_argument("--split", default="test",
                   help="split to score; a file without splits is scored whole")
    e.add_argument("--n", type=_COUNT, help="first n images of the split only")
    e.add_argument("--conf", type=_FRACTION, default=CONF,
                   help="score from which a detection counts for precision, recall and the "
                        "confusion matrix (AP uses every score)")
    decoding(e)
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="draw predicted boxes on images and write JSON")
    common_model(pr, needs_data=False)
    pr.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    pr.add_argument("--prompt", required=True, help="referring expression or 'detect a ; b'")
    pr.add_argument("--task", choices=["grounding", "detection"],
                    help="default: detection for a prompt starting 'detect', else grounding")
    pr.add_argument("--conf", type=_FRACTION, default=0.0, help="drop detections scoring lower")
    pr.add_argument("--save-txt", action="store_true", help="also YOLO labels/<image>.txt")
    pr.add_argument("--save-coco", action="store_true", help="also COCO coco_results.json")
    decoding(pr)
    pr.set_defaults(func=cmd_predict)

    c = sub.add_parser("compare", help="methods x labelled sizes x seeds, with a report")
    c.add_argument("--config", help="YAML/JSON CompareConfig")
    c.add_argument("--out", help="report directory (default runs/compare)")
    c.add_argument("overrides", nargs="*", help="key=value CompareConfig overrides")
    c.set_defaults(func=cmd_compare)

    pt = sub.add_parser("pretrain", help="stages 1-2 (projector alignment, multi-task) on the "
                        "synthetic source corpus, into a checkpoint for train/eval/predict")
    pt.add_argument("--config", help="YAML/JSON PretrainConfig")
    pt.add_argument("--out", help="output directory (default runs/pretrain)")
    pt.add_argument("overrides", nargs="*", help="key=value PretrainConfig overrides")
    pt.set_defaults(func=cmd_pretrain)

    d = sub.add_parser("demo", help="a reduced compare on built-in data (<= 10 min on 2 CPU cores)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("overrides", nargs="*", help="key=value CompareConfig overrides")
    d.set_defaults(func=cmd_demo)

    ins = sub.add_parser("inspect",
                         help="few-shot inspection with good/defective examples in context")
    ins.add_argument("--model", required=True,
                     help="multi-image chat VLM (SmolVLM/Idefics3, Qwen2-VL) or a small VLM "
                          "trained on episodes (inspect-study's s<seed>/model)")
    ins.add_argument("--examples", help="folder (MVTec layout) of good and defective examples")
    ins.add_argument("--query", nargs="+", help="images to inspect, with --examples")
    ins.add_argument("--product", help="which product of --examples the queries are")
    ins.add_argument("--data", help="folder (MVTec layout) or 'synthetic', with --eval")
    ins.add_argument("--eval", action="store_true", help="score the test images of --data")
    ins.add_argument("--n", type=_COUNT, help="--eval: first n test images only")
    ins.add_argument("--k", type=_COUNT, default=2, help="good and defective examples each")
    ins.add_argument("--select", default="balanced", choices=["random", "balanced", "nearest"])
    ins.add_argument("--metric", default="cosine", choices=["cosine", "dot", "centred"],
                     help="similarity for --select nearest")
    ins.add_argument("--tile", help="ROWSxCOLS: global view plus crops per image, e.g. 2x2")
    ins.add_argument("--overlap", type=_number(float, 0.0, 1.0, open_high=True), default=0.0,
                     help="crop overlap fraction")
    ins.add_argument("--seed", type=_COUNT, default=0)
    ins.add_argument("--dtype", help="fp32, bf16, fp16")
    ins.add_argument("--codec", help="box codec, e.g. qwen2vl for Qwen2-VL's own format")
    ins.add_argument("--max-new-tokens", type=_POSITIVE, default=64)
    ins.add_argument("--project", default="runs/inspect")
    ins.add_argument("--name", default="exp")
    ins.set_defaults(func=cmd_inspect)

    st = sub.add_parser("inspect-study",
                        help="train the small VLM on inspection episodes; report accuracy vs "
                             "in-context examples, with and without tiling, against PatchCore")
    st.add_argument("--config", help="YAML/JSON InspectStudyConfig")
    st.add_argument("--out", help="report directory (default runs/inspect_study)")
    st.add_argument("overrides", nargs="*", help="key=value InspectStudyConfig overrides")
    st.set_defaults(func=cmd_inspect_study)

    real = sub.add_parser("inspect-real",
                          help="few-shot PatchCore on real boards (DeepPCB crops): random vs "
                               "pretrained features, with and without tiling, by k; example "
                               "selection by cosine, dot and centred cosine")
    real.add_argument("--config", help="YAML/JSON InspectRealConfig")
    real.add_argument("--out", help="report directory (default runs/inspect_real)")
    real.add_argument("overrides", nargs="*", help="key=value InspectRealConfig overrides")
    real.set_defaults(func=cmd_inspect_real)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may sit anywhere among the options, as in Ultralytics' CLI;
    # argparse only gathers the first run of them into the positional.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or "overrides" not in args]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, FloatingPointError) as err:
        print(f"loctune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
