"""Florence-2: task tokens ``<OD>`` / ``<CAPTION_TO_PHRASE_GROUNDING>``, ``<loc_N>`` answers.

An encoder-decoder: the processor expands the task token into its natural
prompt for the encoder; the answer, between BOS and EOS as Florence-2 was
trained, is the decoder's target (decoder inputs start with the
``decoder_start_token_id``).
"""

from __future__ import annotations

from typing import ClassVar

from loctune.models.hf.base import HFAdapter
from loctune.types import Sample


class Florence2Adapter(HFAdapter):
    family = "florence2"
    model_classes: ClassVar[dict[str, str]] = {"florence2": "Florence2ForConditionalGeneration"}
    default_codec = "florence2"
    lora_target_modules = (
        r".*language_model\.(encoder|decoder)\.layers\.\d+\."
        r"((self_attn|encoder_attn)\.(q|k|v|out)_proj|fc1|fc2)"
    )
    vision_tower_path = "model.vision_tower"

    def prompt_text(self, sample: Sample) -> str:
        if sample.task == "detection":
            return "<OD>"
        return f"<CAPTION_TO_PHRASE_GROUNDING>{sample.prompt}"

    def answer_ids(self, answer: str) -> list[int]:
        tok = self.tokenizer
        return [
            tok.bos_token_id,
            *tok(answer, add_special_tokens=False)["input_ids"],
            tok.eos_token_id,
        ]
