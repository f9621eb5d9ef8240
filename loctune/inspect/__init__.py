"""Few-shot visual inspection: readers, synthetic products, tiling, multi-scale, a baseline,
in-context inspection by chat VLMs and by the small VLM trained on episodes, and the study.

Records are ``loctune.types.Sample`` with ``task="inspection"`` (see
``records``); ``by_product`` groups them into the unit of a few-shot episode.
"""

from loctune.inspect.answers import ParsedAnswer, answer_text, parse_answer
from loctune.inspect.baseline import (
    FEATURES,
    AnomalyPrediction,
    PatchCore,
    RandomConvFeatures,
    patch_extractor,
)
from loctune.inspect.deeppcb import balanced_crop_windows, deeppcb_crops, load_deeppcb
from loctune.inspect.episodes import (
    EncoderFeatures,
    EpisodeAdapter,
    episode_parts,
    training_episodes,
)
from loctune.inspect.evaluation import (
    ICLEvaluation,
    evaluate_in_context,
    evaluate_patchcore_fixed_shots,
    evaluate_patchcore_in_context,
)
from loctune.inspect.features import PretrainedPatchFeatures
from loctune.inspect.folder import folder_categories, load_inspection_folder, read_inspection_data
from loctune.inspect.metrics import accuracy, auroc, f1, inspection_metrics, point_in_boxes
from loctune.inspect.multiscale import MultiScaleEncoder
from loctune.inspect.prompts import Episode, build_prompt
from loctune.inspect.real import InspectRealConfig, run_inspect_real
from loctune.inspect.records import by_product, inspection_prompt, inspection_sample
from loctune.inspect.regions import label_components, largest_region, mask_to_boxes
from loctune.inspect.run import ICLPrediction, inspect_in_context, predict_episodes
from loctune.inspect.selection import ExampleSelector, select_examples
from loctune.inspect.study import InspectStudyConfig, run_inspect_study
from loctune.inspect.synthetic import (
    DEFECT_TYPES,
    TEST_PRODUCTS,
    TRAIN_PRODUCTS,
    render_synthetic,
    synthetic_inspection_set,
)
from loctune.inspect.tiling import (
    TileGrid,
    Tiling,
    crop_samples,
    crop_to_image,
    detections_from_crops,
    image_to_crop,
    layout_description,
    merge_detections,
    tile_grid,
    tile_views,
)

__all__ = [
    "FEATURES",
    "InspectRealConfig",
    "PretrainedPatchFeatures",
    "balanced_crop_windows",
    "deeppcb_crops",
    "evaluate_patchcore_fixed_shots",
    "patch_extractor",
    "run_inspect_real",
    "EncoderFeatures",
    "Episode",
    "EpisodeAdapter",
    "InspectStudyConfig",
    "episode_parts",
    "evaluate_patchcore_in_context",
    "predict_episodes",
    "run_inspect_study",
    "select_examples",
    "training_episodes",
    "ExampleSelector",
    "ICLEvaluation",
    "ICLPrediction",
    "Tiling",
    "build_prompt",
    "evaluate_in_context",
    "inspect_in_context",
    "parse_answer",
    "ParsedAnswer",
    "answer_text",
    "inspection_metrics",
    "read_inspection_data",
    "DEFECT_TYPES",
    "TEST_PRODUCTS",
    "TRAIN_PRODUCTS",
    "AnomalyPrediction",
    "MultiScaleEncoder",
    "PatchCore",
    "RandomConvFeatures",
    "TileGrid",
    "accuracy",
    "auroc",
    "by_product",
    "crop_samples",
    "crop_to_image",
    "detections_from_crops",
    "f1",
    "folder_categories",
    "image_to_crop",
    "inspection_prompt",
    "inspection_sample",
    "label_components",
    "largest_region",
    "layout_description",
    "load_deeppcb",
    "load_inspection_folder",
    "mask_to_boxes",
    "merge_detections",
    "point_in_boxes",
    "render_synthetic",
    "synthetic_inspection_set",
    "tile_grid",
    "tile_views",
]
