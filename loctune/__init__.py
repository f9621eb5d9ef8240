"""loctune: geometry-aware supervision of location tokens for fine-tuning VLMs on detection.

The public API, imported lazily so that ``import loctune`` (and the CLI's
``--help``) does not pay for torch/transformers until a name is used::

    from loctune import get_codec, LossConfig, train, evaluate
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, ...]] = {
    "loctune.types": ("Sample", "Detection", "DecodeResult", "Box", "Encoding", "ObjectSpan"),
    "loctune.boxes": ("iou", "iou_matrix", "clip", "raster_order"),
    "loctune.codecs": ("Codec", "LocationSpace", "get_codec", "list_codecs", "register_codec"),
    "loctune.targets": ("TargetSpec", "make_targets"),
    "loctune.losses": (
        "LossConfig", "LocationLoss", "build_loss", "loss_config", "list_losses", "register_loss",
    ),
    "loctune.models": ("VLMAdapter", "Generation", "load_model"),
    "loctune.models.small_vlm": ("SmallVLM", "SmallVLMConfig", "small_vlm_config"),
    "loctune.models.small_vlm_adapter": ("SmallVLMAdapter",),
    "loctune.models.spec": ("ModelConfig", "open_model"),
    "loctune.run_config": ("RunConfig", "DataOptions"),
    "loctune.models.backbones": ("create_backbone", "packaged_state_dict"),
    "loctune.models.text_lm": ("load_causal_lm", "LMTokenizer", "PACKAGED_LM"),
    "loctune.pretrain": ("PretrainConfig", "SourceConfig", "run_pretrain", "source_corpus"),
    "loctune.models.hf": ("load_adapter", "HFAdapter", "LoadOptions", "LoraOptions"),
    "loctune.data": (
        "load_dataset", "raccoon", "named_set", "SampleSet", "ValidationReport", "DataError",
        "split_samples",
    ),
    "loctune.data.synthetic": ("SyntheticConfig", "make_grounding_split", "make_detection_split"),
    "loctune.train": ("train", "TrainConfig", "TrainResult", "load_weights", "in_raster_order"),
    "loctune.checkpointing": ("ResumeError",),
    "loctune.config": (
        "load_config", "apply_overrides", "save_config", "parse_spec", "ConfigError",
    ),
    "loctune.evaluate": (
        "evaluate", "evaluate_generations", "EvalResult", "GenerationDecoder",
        "suppress_duplicates",
    ),
    "loctune.predict": ("predict", "Prediction", "expand_images", "infer_task"),
    "loctune.exports": ("coco_export", "write_coco", "write_yolo_txt", "to_supervision"),
    "loctune.metrics": (
        "grounding_metrics", "coco_detection_metrics", "evaluate_detections",
        "DetectionEvaluation", "duplicate_box_rate", "location_entropy",
    ),
    "loctune.plots": ("plot_results", "plot_pr_curves", "plot_confusion_matrix"),
    "loctune.compare": ("CompareConfig", "run_compare", "demo_config"),
    "loctune.visualize": ("draw_detections", "draw_truth_and_predictions"),
    "loctune.inspect": (
        "synthetic_inspection_set", "load_inspection_folder", "load_deeppcb", "tile_views",
        "detections_from_crops", "MultiScaleEncoder", "PatchCore",
        "inspect_in_context", "evaluate_in_context", "ExampleSelector",
        "EpisodeAdapter", "training_episodes", "predict_episodes", "evaluate_patchcore_in_context",
        "InspectStudyConfig", "run_inspect_study",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'loctune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
