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

In-context prompts (:meth:`ChatAdapter.generate_in_context`) are one
user/assistant turn pair per example, then the query as the last user turn
with the generation prompt: every example answer then sits exactly where the
query answer will, behind the same template tokens, and ends with the
end-of-turn token generation stops on; each turn is self-contained, so a tiled
turn numbers its own images. Both families' templates render multi-turn,
multi-image chats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from loctune.models.base import InContextAnswer, Turn
from loctune.models.hf.base import HFAdapter, split_class_names
from loctune.types import Sample


class ChatAdapter(HFAdapter):
    """A user turn with the image and an instruction, then the assistant's answer."""

    default_codec = "bins"
    end_of_turn: ClassVar[str] = ""
    #: text between the generation prompt and the answer (Idefics3 writes "Assistant: ...")
    answer_prefix: ClassVar[str] = ""

    def instruction(self, sample: Sample) -> str:
        if sample.task == "inspection":  # the prompt is the question itself
            return sample.prompt
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

    # ------------------------------------------------------------------ in-context prompts

    @staticmethod
    def in_context_messages(turns: Sequence[Turn]) -> tuple[list[dict[str, Any]], list]:
        """Chat messages for ``apply_chat_template`` (a user turn per turn, an assistant
        turn per answer) and their images, in order."""
        if not turns or turns[-1].answer is not None:
            raise ValueError("turns: expected examples with answers, then a query without one")
        messages, images = [], []
        for turn in turns:
            content = [{"type": "image"} for _ in turn.images]
            messages.append(
                {"role": "user", "content": [*content, {"type": "text", "text": turn.text}]}
            )
            images += turn.images
            if turn.answer is not None:
                text = [{"type": "text", "text": turn.answer}]
                messages.append({"role": "assistant", "content": text})
        return messages, images

    def _choice_tokens(self, choices: Sequence[str]) -> tuple[list[int], list[int]]:
        """Tokens every choice starts with, then each choice's first token after them."""
        rows = [
            self.tokenizer(self.answer_prefix + c, add_special_tokens=False)["input_ids"]
            for c in choices
        ]
        n = 0
        while rows and all(len(r) > n + 1 for r in rows) and len({r[n] for r in rows}) == 1:
            n += 1
        if rows and len({r[n] if len(r) > n else None for r in rows}) < len(rows):
            raise ValueError(f"choices: the tokenizer cannot tell {list(choices)} apart")
        return (rows[0][:n] if rows else []), [r[n] for r in rows]

    def _in_context_inputs(self, turns: Sequence[Turn], forced: list[int]) -> dict[str, Any]:
        """Model inputs of one prompt, with the ``forced`` answer tokens appended."""
        messages, images = self.in_context_messages(turns)
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        ids, fields, batch = self._unpadded_rows(self.encode_prompts([text], [images]))
        batch["input_ids"] = torch.tensor([ids[0] + forced])
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        for key, rows in fields.items():
            batch[key] = torch.tensor([rows[0] + [self.token_fields[key]] * len(forced)])
        return self.model_inputs(batch)

    @torch.no_grad()
    def generate_in_context(
        self,
        prompts: Sequence[Sequence[Turn]],
        choices: Sequence[str] = (),
        max_new_tokens: int = 64,
    ) -> list[InContextAnswer]:
        """One prompt at a time (multi-image prompts are long), choices read at the first step."""
        forced, first_ids = self._choice_tokens(choices)
        answers = []
        for turns in prompts:
            out = self.greedy(self._in_context_inputs(turns, forced), max_new_tokens)
            [generation] = self._generations(out, prefix=forced)
            first = out.logits[0][0].float().log_softmax(-1)
            answers.append(InContextAnswer(generation.text, [float(first[i]) for i in first_ids]))
        return answers


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
