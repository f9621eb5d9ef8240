"""`loctune pretrain`: stages 1-2 of the research plan, on a source corpus, into one checkpoint.

1. *Projector alignment* on captions: the vision encoder stays frozen and the
   projector learns to say what the image holds. A pretrained LM is frozen too
   (the LLaVA recipe); loctune's own decoder has no language yet, so it trains
   with the projector.
2. *Multi-task*: grounding, detection, captioning and counting together, the
   encoder still frozen (its features come from the cache, so a CPU run
   encodes each image once).

Stage 3, task fine-tuning, is ``loctune train --model OUT/model`` on a target set.
The checkpoint records its source datasets (``config.trained_on``), so a transfer
study can refuse one that has seen its target. Each stage resumes from its last
checkpoint, and a finished stage is skipped on rerun.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loctune.baselines import mean_box_scores
from loctune.config import save_config
from loctune.train import TrainConfig
from loctune.types import Sample

#: the name the synthetic source corpus is recorded under in ``trained_on``
SOURCE_NAME = "synthetic-shapes"


@dataclass
class SourceConfig:
    """The source corpus: synthetic scenes, each task from its own seeded stream."""

    image_size: int = 128  # render size; the model resizes to its own input
    min_objects: int = 1
    max_objects: int = 4
    backgrounds: tuple[str, ...] = ("gradient", "texture")
    caption: int = 1500
    grounding: int = 3000
    detection: int = 1500
    counting: int = 1000
    n_test: int = 300  # held-out grounding and detection scenes, scored after stage 2
    seed: int = 0


def _stage(**overrides: Any) -> TrainConfig:
    # a stage hands its final weights to the next one: no best/ to keep (best_metric="")
    return TrainConfig(**{"batch_size": 32, "log_every": 25, "best_metric": "", **overrides})


@dataclass
class PretrainConfig:
    """Model, corpus and the two stages' optimisation (``align.lr=...``,
    ``multitask.steps=...``)."""

    out_dir: str = "runs/pretrain"
    # a SmallVLM preset (``pretrained``: EfficientNet-Lite0 + own decoder)
    model: str = "pretrained"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # SmallVLMConfig fields
    codec: str = "rowcol:grid=32"  # a codec spec (loctune.codecs.get_codec)
    seed: int = 0
    source: SourceConfig = field(default_factory=SourceConfig)
    align: TrainConfig = field(
        default_factory=lambda: _stage(steps=300, lr=1e-3, warmup_steps=30)
    )
    multitask: TrainConfig = field(
        default_factory=lambda: _stage(steps=2000, lr=5e-4, warmup_steps=100, min_lr=5e-5)
    )
    train_vision: bool = False  # stage 2 also trains the encoder (no feature cache then)
    eval_batch: int = 64


def source_corpus(cfg: SourceConfig, split: str = "train") -> dict[str, list[Sample]]:
    """Samples per task of the synthetic source; ``split="test"`` holds grounding and detection."""
    from loctune.data.synthetic import SyntheticConfig, make_split

    scenes = SyntheticConfig(
        image_size=cfg.image_size,
        min_objects=cfg.min_objects,
        max_objects=cfg.max_objects,
        backgrounds=tuple(cfg.backgrounds),
    )
    if split == "test":
        sizes = {"grounding": cfg.n_test, "detection": cfg.n_test}
    else:
        sizes = {t: getattr(cfg, t) for t in ("caption", "grounding", "detection", "counting")}
    return {t: make_split(t, split, n, seed=cfg.seed, config=scenes) for t, n in sizes.items()}


def run_pretrain(cfg: PretrainConfig, log: Callable[[str], None] = print) -> Path:
    """Run both stages (resuming), score on held-out scenes, write ``OUT/model`` and a report."""
    from loctune.evaluate import evaluate
    from loctune.models.small_vlm_adapter import SmallVLMAdapter
    from loctune.train import train

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "pretrain_config.yaml")
    t0 = time.time()
    corpus = source_corpus(cfg.source)
    test = source_corpus(cfg.source, "test")
    everything = [s for samples in corpus.values() for s in samples]
    log(f"source corpus: {', '.join(f'{len(v)} {k}' for k, v in corpus.items())} "
        f"({time.time() - t0:.0f} s)")

    stage1_model = out / "align" / "model"
    if (stage1_model / "adapter.json").is_file():
        adapter = SmallVLMAdapter.from_pretrained(stage1_model)
        log(f"stage 1 done before: {stage1_model}")
    else:
        adapter = SmallVLMAdapter.build(
            cfg.codec,
            samples=[*everything, *test["grounding"], *test["detection"]],
            config=cfg.model,
            seed=cfg.seed,
            **cfg.model_overrides,
        )
        own_decoder = not adapter.config.text_model
        trainable = ["projector.*"]
        if own_decoder:
            trainable += [n.split(".")[0] + ".*" for n, _ in adapter.model.named_parameters()
                          if not n.startswith(("vision.", "projector."))]
        stage = replace(cfg.align, run_dir=str(out / "align"), seed=cfg.seed,
                        trainable=sorted(set(trainable)))
        log(f"stage 1, projector alignment on {len(corpus['caption'])} captions: "
            f"training {', '.join(stage.trainable)} for {stage.steps} steps")
        train(adapter, corpus["caption"], stage, resume=True)
        adapter.save_pretrained(stage1_model)

    final = out / "model"
    stage2_dir = out / "multitask"
    if (final / "adapter.json").is_file():
        adapter = SmallVLMAdapter.from_pretrained(final)
        log(f"stage 2 done before: {final}")
    else:
        freeze = [] if cfg.train_vision else ["vision.*"]
        stage = replace(cfg.multitask, run_dir=str(stage2_dir), seed=cfg.seed, freeze=freeze)
        log(f"stage 2, multi-task on {len(everything)} samples for {stage.steps} steps")
        train(adapter, everything, stage, resume=True)
        adapter.model.config = replace(
            adapter.model.config, trained_on=(*adapter.model.config.trained_on, SOURCE_NAME)
        )
        adapter.save_pretrained(final)

    log(f"scoring on {cfg.source.n_test} held-out grounding and detection scenes")
    metrics: dict[str, Any] = {}
    for task, samples in test.items():
        scores = evaluate(adapter, samples, batch_size=cfg.eval_batch, progress=False).metrics
        metrics[task] = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    metrics["grounding_mean_box"] = mean_box_scores(corpus["grounding"], test["grounding"])
    metrics["minutes"] = (time.time() - t0) / 60
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return write_report(cfg, metrics, out)


def write_report(cfg: PretrainConfig, metrics: dict[str, Any], out: Path) -> Path:
    g, d, prior = metrics["grounding"], metrics["detection"], metrics["grounding_mean_box"]
    lines = [
        "# Pretraining on the synthetic source corpus",
        "",
        f"Model preset `{cfg.model}`, codec `{cfg.codec}`; "
        f"{cfg.align.steps} alignment + {cfg.multitask.steps} multi-task steps; "
        f"{metrics['minutes']:.1f} min in all (this run, scoring included).",
        "",
        f"Held-out scenes ({cfg.source.n_test} per task):",
        "",
        "| task | metric | model | mean training box |",
        "|---|---|---:|---:|",
        f"| grounding | Acc@0.5 | {g['acc50']:.3f} | {prior['acc50']:.3f} |",
        f"| grounding | mIoU | {g['miou']:.3f} | {prior['miou']:.3f} |",
        f"| detection | AP50 | {d['ap50']:.3f} | – |",
        f"| detection | AP | {d['ap']:.3f} | – |",
        f"| both | unparseable | {g['unparseable_rate']:.3f} / {d['unparseable_rate']:.3f} | – |",
        "",
        f"Checkpoint: `{out / 'model'}` (fine-tune with `loctune train --model {out / 'model'}`).",
    ]
    if cfg.model == "smollm2" or cfg.model_overrides.get("text_model"):
        lines += ["", "The decoder starts from SmolLM2-135M-Instruct as packaged (Q4_1 GGUF "
                  "dequantised to fp32): its weights carry 4-bit rounding noise."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
