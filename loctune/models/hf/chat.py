"""Chat VLMs without location tokens of their own: SmolVLM/Idefics3 and Qwen2-VL/2.5-VL.

The prompt is the checkpoint's chat template with one user turn (the image and
an instruction) and the generation prompt for the assistant; the answer is the
assistant's text closed by the end-of-turn token, which also stops generation.

Boxes are written with loctune's generic ``bins`` codec by default: its tokens
(``<loc_bin_0>`` ...) are added to the vocabulary as special tokens and their
embeddings start as the mean embedding of their number's digits (see
``base._add_embedding_rows``). Qwen2-VL can instead write boxes as plain text
with the ``qwen2vl`` codec (``codec="qwen2vl"``), the format it was pretrained
on; that codec has no location tokens, so soft targets over location tokens do
not apply and the loss is ordinary token cross-entropy.
"""

from __future__ import annotations

from typing import ClassVar

from loctune.models.hf.base import HFAdapter, split_class_names
from loctune.types import Sample


class ChatAdapter(HFAdapter):
    """A user turn with the image and an instruction, then the assistant's answer."""

    default_codec = "bins"
    end_of_turn: ClassVar[str] = ""
    #: text between the generation prompt and the answer (Idefics3 writes "Assistant: ...")
    answer_prefix: ClassVar[str] = ""

    def instruction(self, sample: Sample) -> str:
        if sample.task == "detection":
            return f"Detect every {', '.join(split_class_names(sample))} in the image."
        return f"Locate {sample.prompt} in the image."

    def prompt_text(self, sample: Sample) -> str:
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": self.instruction(sample)}],
            }
        ]
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def answer_text(self, sample: Sample) -> str:
        return self.answer_prefix + super().answer_text(sample)

    @property
    def answer_end_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.end_of_turn)


class Idefics3Adapter(ChatAdapter):
    """SmolVLM (``idefics3`` checkpoints) and SmolVLM2 (``smolvlm``)."""

    family = "smolvlm"
    model_classes: ClassVar[dict[str, str]] = {
        "idefics3": "Idefics3ForConditionalGeneration",
        "smolvlm": "SmolVLMForConditionalGeneration",
    }
    end_of_turn = "<end_of_utterance>"
    answer_prefix = " "
    lora_target_modules = (
        r".*text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    )
    vision_tower_path = "model.vision_model"


class Qwen2VLAdapter(ChatAdapter):
    """Qwen2-VL and Qwen2.5-VL; ``mm_token_type_ids`` drive their multimodal RoPE."""

    family = "qwen2vl"
    model_classes: ClassVar[dict[str, str]] = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }
    end_of_turn = "<|im_end|>"
    token_fields: ClassVar[dict[str, int]] = {"mm_token_type_ids": 0}
    lora_target_modules = (
        r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    )
    vision_tower_path = "model.visual"
