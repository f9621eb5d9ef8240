"""The in-context inspection study: can loctune's small VLM learn to inspect from examples?

For every seed the small VLM is trained on episodes of the training product
types (:func:`~loctune.inspect.episodes.training_episodes`, through
:func:`loctune.train.train`); then every image of the held-out product types
is a query, answered after ``k`` good and ``k`` defective examples of its
type for each ``k`` of ``eval_k``, without and with tiling. The PatchCore
baseline is scored on the same good shots, on the trained VLM's vision
encoder features, on fixed random convolutions and on the ImageNet-pretrained
EfficientNet-Lite0's mid-level features. ``vlm=false`` runs PatchCore alone.

A seed's model (``s<seed>/model``) and every evaluation cell
(``s<seed>/<method>/k<k>/metrics.json``) are written when finished and
skipped on rerun; an interrupted training resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from loctune import report
from loctune.cells import CellGrid
from loctune.config import require_choices
from loctune.inspect.answers import answer_text
from loctune.inspect.baseline import PatchCore, RandomConvFeatures, patch_extractor
from loctune.inspect.episodes import (
    EncoderFeatures,
    EpisodeAdapter,
    episode_parts,
    training_episodes,
)
from loctune.inspect.evaluation import (
    ICLEvaluation,
    evaluate_in_context,
    evaluate_patchcore_in_context,
)
from loctune.inspect.prompts import Episode
from loctune.inspect.records import inspection_sample
from loctune.inspect.report import write_study_report
from loctune.inspect.synthetic import DEFECT_TYPES, TEST_PRODUCTS, synthetic_inspection_set
from loctune.inspect.tiling import Tiling
from loctune.losses import LossConfig
from loctune.models.small_vlm import SmallVLMConfig, small_vlm_config
from loctune.models.small_vlm_adapter import ADAPTER_FILE, Answer, Part, SmallVLMAdapter
from loctune.models.spec import ModelConfig, open_model
from loctune.models.tokenizer import WordTokenizer
from loctune.train import TrainConfig
from loctune.types import Sample

CONFIG_FILE = "inspect_study_config.json"
#: config fields that may change between runs of one study without invalidating its parts
RERUNNABLE = ("out_dir", "seeds", "eval_k", "eval_batch_size", "train.progress")
FEATURES = ("vlm", "conv", "lite0")
#: run directory of each training phase under s<seed>/
PHASES = ("train_single", "train_episodes")


@dataclass
class InspectStudyConfig:
    """One study; the defaults run in about 20 minutes on one CPU thread.

    ``k`` counts examples per class (``k`` good and ``k`` defective). Images
    are rendered at ``render_size`` and shown to the model at ``image_size``
    (defects 1-4 px wide shrink to a fraction of a pixel); tiling shows a
    global view plus ``tile_rows x tile_cols`` crops, each also at
    ``image_size``. Training has two phases through :func:`loctune.train.train`:
    ``single_image_steps`` on single images (``k=0`` episodes, untiled), then
    ``steps`` on episodes with ``k`` from ``train_k``, a ``tiled_fraction`` of
    them tiled. Without the first phase the model stayed at chance in this
    budget (on held-out images of the training types): among many images the
    decoder must find the one it answers for before the encoder gets a useful
    signal, which a lone image gives at once. A step is a group of episodes
    sharing ``k`` and tiling that hold ``group_images`` images between them.

    PatchCore featurises each image (or crop, tiled) at ``patchcore_size`` px (0: the VLM's
    ``image_size``, like for like; the pretrained ``lite0`` features need more, e.g.
    ``render_size``). ``vlm=false`` trains and asks no VLM: PatchCore alone, on features
    other than ``vlm``.
    """

    out_dir: str = "runs/inspect_study"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_k: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])
    # data: TRAIN_PRODUCTS for training, TEST_PRODUCTS (unseen types) for evaluation
    data_seed: int = 0
    render_size: int = 96
    n_train: int = 200  # good and defective images per training product
    n_test: int = 20  # good and defective images per test product: the queries and their examples
    # a fresh small VLM (SmallVLMConfig fields in model.overrides) and its box codec
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        "small", codec="bins:n_bins=32,strict=false", image_size=32,
        overrides={"patch_size": 8, "pixel_shuffle": 2, "vision_width": 64, "vision_depth": 2},
    ))
    tile_rows: int = 2
    tile_cols: int = 2
    # training: phase 1 single_image_steps on single images, then train.steps on episodes
    single_image_steps: int = 1000
    train_k: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])
    tiled_fraction: float = 0.5
    supervise_examples: bool = True
    group_images: int = 64
    method: str = "distance_inverse"  # loss preset or variant, see loctune.losses.list_losses()
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2000, batch_size=1, lr=1e-3, warmup_steps=30, save_every=100, best_metric=""
    ))
    # evaluation
    eval_batch_size: int = 16
    max_new_tokens: int = 48
    patchcore_features: list[str] = field(default_factory=lambda: ["vlm", "conv"])
    patchcore_size: int = 0
    vlm: bool = True

    def __post_init__(self):
        if self.train.batch_size != 1 or self.train.steps < 1 or self.train.loss != LossConfig():
            raise ValueError(
                "InspectStudyConfig.train: batch_size must be 1 (a step is a group of "
                "group_images images), steps >= 1, and the loss is named by method"
            )
        if not self.model.is_fresh_small:
            raise ValueError("InspectStudyConfig.model.name must be 'small' or 'small:PRESET'")
        for name in ("seeds", "eval_k", "train_k"):
            if not getattr(self, name):
                raise ValueError(f"InspectStudyConfig.{name} must not be empty")
        for name in ("eval_k", "train_k"):
            if min(getattr(self, name)) < 0:
                raise ValueError(f"InspectStudyConfig.{name} must hold numbers >= 0")
        needed = max(self.eval_k) + 1
        if self.n_test < needed:
            raise ValueError(
                f"InspectStudyConfig.n_test ({self.n_test}) must be >= max(eval_k) + 1 = "
                f"{needed}: every query needs k examples of each class besides itself"
            )
        if self.n_train < max(self.train_k) + 1:
            raise ValueError(
                f"InspectStudyConfig.n_train ({self.n_train}) must be >= max(train_k) + 1"
            )
        require_choices("InspectStudyConfig.patchcore_features", self.patchcore_features,
                        FEATURES)
        if not self.vlm and (not self.patchcore_features or "vlm" in self.patchcore_features):
            raise ValueError("InspectStudyConfig: vlm=false trains no VLM, so patchcore_features "
                             f"must name others of {FEATURES} than 'vlm', got "
                             f"{self.patchcore_features}")
        if self.patchcore_size < 0:
            raise ValueError(f"InspectStudyConfig.patchcore_size must be >= 0 (0: image_size), "
                             f"got {self.patchcore_size}")

    @property
    def image_size(self) -> int:
        return self.small_config.image_size

    @property
    def small_config(self) -> SmallVLMConfig:
        """The small VLM's config as the study builds it."""
        sizes = {"image_size": self.model.image_size} if self.model.image_size else {}
        return replace(small_vlm_config(self.model.preset), **sizes, **self.model.overrides)

    @property
    def tiling(self) -> Tiling:
        return Tiling(self.tile_rows, self.tile_cols, global_size=self.image_size)


def run_inspect_study(
    cfg: InspectStudyConfig, progress: bool = True, log: Callable[[str], None] = print
) -> Path:
    """Run every missing part of the study, then (re)write its report; returns report.md."""
    grid = CellGrid(cfg.out_dir, cfg, CONFIG_FILE, RERUNNABLE)
    train_set = synthetic_inspection_set(
        "train", cfg.n_train, cfg.n_train, seed=cfg.data_seed, size=cfg.render_size
    )
    test_set = synthetic_inspection_set(
        "test", cfg.n_test, cfg.n_test, seed=cfg.data_seed, size=cfg.render_size
    )
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        adapter = None
        if cfg.vlm:
            log(f"seed {seed}: model")
            adapter = trained_model(cfg, seed, train_set, progress)
        log(f"seed {seed}: evaluation on {len(test_set)} queries of {', '.join(TEST_PRODUCTS)}")
        rows += evaluate_seed(cfg, grid, seed, adapter, test_set, progress)
        grid.write_rows(rows)
    return write_report(cfg, rows, train_set, test_set)


def _seed_dir(cfg: InspectStudyConfig, seed: int) -> Path:
    return Path(cfg.out_dir) / f"s{seed}"


def build_model(cfg: InspectStudyConfig, seed: int, samples: Sequence[Sample]) -> SmallVLMAdapter:
    """A fresh small VLM whose vocabulary holds the answers of ``samples`` (the training
    set) and whose context fits the longest possible episode: ``max(k)`` examples per
    class, tiled, every answer as long as a defect spanning all crops makes it."""
    from loctune.codecs import get_codec

    codec = get_codec(cfg.model.codec)
    tiling = cfg.tiling
    answers = [answer_text(s, codec, t) for s in samples for t in (None, tiling)]
    longest_type = max(DEFECT_TYPES, key=lambda t: len(WordTokenizer.split(t)))
    size = cfg.render_size
    everywhere = inspection_sample(
        Image.new("RGB", (size, size)), "bound", [(0, 0, size, size)], [longest_type]
    )
    small = cfg.small_config
    image_tokens = (small.image_size // small.patch_size // small.pixel_shuffle) ** 2
    turns = 2 * max(*cfg.train_k, *cfg.eval_k) + 1
    longest = Episode([everywhere] * (turns - 1), everywhere, tiling)
    max_positions = sum(_positions(part, image_tokens) for part in episode_parts(longest, codec))
    return open_model(cfg.model, texts=answers, seed=seed, max_positions=max_positions)


def _positions(part: Part, image_tokens: int) -> int:
    """Positions one sequence part takes in the small VLM (an answer's eos included)."""
    if isinstance(part, Image.Image):
        return image_tokens
    if isinstance(part, Answer):
        return len(WordTokenizer.split(part.text)) + 1
    return len(WordTokenizer.split(part))


def trained_model(
    cfg: InspectStudyConfig, seed: int, train_set: Sequence[Sample], progress: bool = True
) -> SmallVLMAdapter:
    """The seed's trained model: reopened when saved, else trained (resuming a checkpoint)."""
    from loctune.losses import loss_config
    from loctune.train import train

    seed_dir = _seed_dir(cfg, seed)
    model_dir = seed_dir / "model"
    if (model_dir / ADAPTER_FILE).is_file():
        return SmallVLMAdapter.from_pretrained(model_dir)
    adapter = build_model(cfg, seed, train_set)
    episodes = EpisodeAdapter(adapter, cfg.supervise_examples)
    t0 = time.perf_counter()
    for phase, (steps, k_choices, tiled_fraction) in enumerate(_phases(cfg)):
        if steps == 0:
            continue
        groups = training_episodes(
            train_set,
            n_groups=steps,
            group_images=cfg.group_images,
            k_choices=k_choices,
            tiling=cfg.tiling,
            tiled_fraction=tiled_fraction,
            seed=seed + 10_000 * phase,
        )
        # one item is a group of episodes (train.batch_size is 1)
        tcfg = replace(cfg.train, run_dir=str(seed_dir / PHASES[phase]), steps=steps, seed=seed,
                       loss=loss_config(cfg.method), progress=progress)
        # a finished phase resumes at its end: its weights are loaded, nothing is retrained
        train(episodes, groups, tcfg, resume=True)
    adapter.save_pretrained(model_dir)
    (seed_dir / "train_time.json").write_text(
        json.dumps(
            {"seconds": time.perf_counter() - t0, "parameters": adapter.model.num_parameters()}
        )
    )
    return adapter


def _phases(cfg: InspectStudyConfig) -> list[tuple[int, list[int], float]]:
    """(steps, k choices, tiled fraction) of each training phase, in :data:`PHASES` order."""
    return [(cfg.single_image_steps, [0], 0.0),
            (cfg.train.steps, cfg.train_k, cfg.tiled_fraction)]


def evaluate_seed(
    cfg: InspectStudyConfig,
    grid: CellGrid,
    seed: int,
    adapter: SmallVLMAdapter | None,
    test_set: Sequence[Sample],
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Rows ``{method, k, seed, metrics...}`` of every method at every k for one seed
    (``adapter`` None: PatchCore's only)."""
    from tqdm.auto import tqdm

    tiles = (cfg.tile_rows, cfg.tile_cols)
    extractors = {
        "vlm": lambda: EncoderFeatures(adapter.model).eval(),
        "conv": lambda: RandomConvFeatures(seed=seed),
        "lite0": lambda: patch_extractor("lite0"),
    }
    nets = {f: extractors[f]() for f in cfg.patchcore_features}  # each built once per seed
    cells: list[tuple[str, int, Callable[[], ICLEvaluation]]] = []
    for k in cfg.eval_k:
        for tiled in (False, True):
            suffix = "_tiled" if tiled else ""
            if adapter is not None:
                run = _vlm_run(cfg, adapter, test_set, k, tiled, seed)
                cells.append((f"vlm{suffix}", k, run))
            if k == 0:
                continue  # PatchCore needs good shots
            for features in cfg.patchcore_features:

                def make_detector(features=features, tiled=tiled) -> PatchCore:
                    return PatchCore(
                        nets[features],
                        input_size=cfg.patchcore_size or cfg.image_size,
                        tiles=tiles if tiled else None,
                    )

                run = _patchcore_run(test_set, k, make_detector, seed)
                cells.append((f"patchcore_{features}{suffix}", k, run))
    rows = []
    for method, k, run in tqdm(cells, desc=f"seed {seed} eval", disable=not progress):
        metrics = grid.cell((f"s{seed}", method, f"k{k}"), _saved(run), done="metrics.json")
        scalars = {m: v for m, v in metrics.items() if not isinstance(v, dict)}
        rows.append({"method": method, "k": k, "seed": seed, **scalars})
    return rows


def _saved(run: Callable[[], ICLEvaluation]) -> Callable[[Path], dict[str, Any]]:
    """A cell run that keeps the evaluation's predictions beside its metrics."""

    def cell(directory: Path) -> dict[str, Any]:
        result = run()
        result.save(directory)
        return result.metrics

    return cell


def _vlm_run(cfg, adapter, test_set, k, tiled, seed) -> Callable[[], ICLEvaluation]:
    return lambda: evaluate_in_context(
        adapter,
        test_set,
        k=k,
        tiling=cfg.tiling if tiled else None,
        seed=seed,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.eval_batch_size,
    )


def _patchcore_run(test_set, k, make_detector, seed) -> Callable[[], ICLEvaluation]:
    return lambda: evaluate_patchcore_in_context(
        test_set, k=k, make_detector=make_detector, seed=seed
    )


def write_report(
    cfg: InspectStudyConfig,
    rows: list[dict[str, Any]],
    train_set: Sequence[Sample],
    test_set: Sequence[Sample],
) -> Path:
    """The study's report (:func:`~loctune.inspect.report.write_study_report`) from its rows
    and what the seeds' training runs recorded."""
    curves = {}
    for seed in cfg.seeds:
        offset, curve = 0, []
        for name, (steps, _, _) in zip(PHASES, _phases(cfg), strict=True):
            points = report.read_jsonl(_seed_dir(cfg, seed) / name / "metrics.jsonl")
            curve += [(offset + p["step"], p["loss"]) for p in points if "loss" in p]
            offset += steps
        curves[f"seed {seed}"] = curve
    times = [
        json.loads(f.read_text())
        for seed in cfg.seeds
        if (f := _seed_dir(cfg, seed) / "train_time.json").exists()
    ]
    return write_study_report(cfg, rows, train_set, test_set, curves, times, CONFIG_FILE)
