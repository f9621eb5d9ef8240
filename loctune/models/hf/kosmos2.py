"""Kosmos-2: ``<grounding>`` markup with two ``<patch_index_NNNN>`` corners per box.

For a referring expression the phrase is part of the prompt, as Kosmos-2 was
trained (``<grounding><phrase>the dog</phrase>``), and the model writes only
``<object>...</object>``; the generated text handed to the codec gets the
phrase back in front so that it decodes to a labelled box. For detection the
prompt is ``<grounding>`` alone and the answer is the whole markup.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from loctune.models.hf.base import HFAdapter
from loctune.types import Sample

LEADING_PHRASE = re.compile(r"^\s*<phrase>.*?</phrase>")


class Kosmos2Adapter(HFAdapter):
    family = "kosmos2"
    model_classes: ClassVar[dict[str, str]] = {"kosmos-2": "Kosmos2ForConditionalGeneration"}
    default_codec = "kosmos2"
    token_fields: ClassVar[dict[str, int]] = {"image_embeds_position_mask": 0}
    lora_target_modules = (
        r".*text_model\.model\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|ffn\.(fc1|fc2))"
    )
    vision_tower_path = "vision_model"

    @staticmethod
    def _phrase(sample: Sample) -> str:
        return f"<phrase>{sample.prompt}</phrase>"

    def prompt_text(self, sample: Sample) -> str:
        if sample.task == "detection":
            return "<grounding>"
        return "<grounding>" + self._phrase(sample)

    def answer_text(self, sample: Sample) -> str:
        text = super().answer_text(sample)
        if sample.task == "detection":
            return text
        return LEADING_PHRASE.sub("", text, count=1).lstrip()

    def generated_text(self, sample: Sample, text: str) -> str:
        if sample.task == "detection":
            return text
        return self._phrase(sample) + text

    def encode_prompts(self, prompts: list[str], images: list) -> dict[str, Any]:
        # The number of image placeholders must match the model's latent queries.
        return self.processor(
            text=prompts,
            images=images,
            padding="longest",
            return_tensors="pt",
            num_image_tokens=self._unwrapped.config.latent_query_num,
        )
