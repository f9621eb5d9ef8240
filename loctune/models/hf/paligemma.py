"""PaliGemma 1 and 2: ``detect`` prompts, answers of ``<locNNNN>`` tokens then the label.

The processor puts ``<image>`` tokens, BOS and a trailing newline around the
prompt; the answer (the processor's "suffix") follows with ``token_type_ids``
1, which PaliGemma uses to attend bidirectionally over the prefix and causally
over the suffix.
"""

from __future__ import annotations

from typing import ClassVar

from loctune.models.hf.base import HFAdapter, split_class_names
from loctune.types import Sample


class PaliGemmaAdapter(HFAdapter):
    family = "paligemma"
    model_classes: ClassVar[dict[str, str]] = {"paligemma": "PaliGemmaForConditionalGeneration"}
    default_codec = "paligemma"
    token_fields: ClassVar[dict[str, int]] = {"token_type_ids": 1}
    lora_target_modules = (
        r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    )
    vision_tower_path = "model.vision_tower"

    def prompt_text(self, sample: Sample) -> str:
        if sample.task == "detection":
            return "<image>detect " + " ; ".join(split_class_names(sample))
        return f"<image>detect {sample.prompt}"
