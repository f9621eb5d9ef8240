"""Tiny random checkpoints of the supported Hugging Face VLM families, built offline.

Each ``tiny_<family>(directory)`` writes a model (random weights, a few
thousand parameters per layer) and its processor with ``save_pretrained``, so
that tests exercise the real ``from_pretrained`` loading path without the hub.
Tokenizers are byte-level BPE models trained in memory on a few sentences,
with the family's special tokens added the way the real checkpoints have them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "detect a red circle ; blue square ; green triangle",
    "Locate the phrases in the caption: the dog on the left",
    "Locate the objects with category name in the image.",
    "Locate the cat in the image. Detect every dog, cat in the image.",
    "User: Assistant: user assistant system 0 1 2 3 4 5 6 7 8 9 10 100 512 999",
    "An image of a snowman warming himself by a fire.",
]


def tiny_image(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    """A small random RGB image."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def bpe_tokenizer(
    special: Sequence[str],
    *,
    bos: str,
    eos: str,
    pad: str,
    unk: str | None = None,
    **model_specific: str,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (about 300 merges) with ``special`` tokens first.

    ``model_specific`` names tokens a processor reads as attributes
    (``image_token="<image>"``).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(dict.fromkeys([pad, bos, eos, *([unk] if unk else []), *special])),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        extra_special_tokens=model_specific or None,
    )


def _vocab_size(n_tokens: int) -> int:
    """Embedding rows for a tokenizer: a multiple of 64 with room to spare, as checkpoints do."""
    return (n_tokens // 64 + 1) * 64


def tiny_paligemma(directory: str | Path) -> str:
    """PaliGemma with a 2-layer SigLIP (32 px, 4 image tokens) and a 2-layer Gemma."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    tokenizer = bpe_tokenizer(["<image>"], bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>")
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_seq_length=4)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    tokenizer = processor.tokenizer  # now with <loc0000>..<loc1023>, <seg000>..<seg127>
    vocab = _vocab_size(len(tokenizer))
    config = PaliGemmaConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 16,
            "vision_use_head": False,
        },
        text_config={
            "model_type": "gemma",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "vocab_size": vocab,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=vocab,
        projection_dim=32,
        hidden_size=32,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(PaliGemmaForConditionalGeneration(config), processor, directory)


def tiny_florence2(directory: str | Path) -> str:
    """Florence-2 with a 2-stage DaViT (32 px) and a 1+1-layer BART, ``<loc_0>``..``<loc_999>``."""
    from transformers import (
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    locations = [f"<loc_{i}>" for i in range(1000)]
    tokenizer = bpe_tokenizer(
        ["<image>", "<od>", "</od>"],
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        image_token="<image>",
    )
    tokenizer.add_tokens(locations)
    image_processor = CLIPImageProcessorPil(
        size={"height": 32, "width": 32},
        crop_size={"height": 32, "width": 32},
        do_center_crop=False,
        image_seq_length=17,  # (32 / 8) ** 2 patches + 1 pooled token
    )
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    vocab = _vocab_size(len(tokenizer))
    config = Florence2Config(
        vision_config={
            "depths": [1, 1],
            "patch_size": [7, 3],
            "patch_stride": [4, 2],
            "patch_padding": [3, 1],
            "patch_prenorm": [False, True],
            "embed_dim": [16, 32],
            "num_heads": [2, 4],
            "num_groups": [2, 4],
            "window_size": 4,
            "projection_dim": 32,
            "max_position_embeddings": 16,
            "max_temporal_embeddings": 4,
        },
        text_config={
            "model_type": "bart",
            "vocab_size": vocab,
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 128,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.eos_token_id,
            "forced_eos_token_id": None,
        },
        image_token_id=tokenizer.image_token_id,
    )
    return _save(Florence2ForConditionalGeneration(config), processor, directory)


def tiny_kosmos2(directory: str | Path) -> str:
    """Kosmos-2 with a 2-layer CLIP vision tower (32 px), 4 latent queries, a 2-layer decoder."""
    from transformers import (
        CLIPImageProcessorPil,
        Kosmos2Config,
        Kosmos2ForConditionalGeneration,
        Kosmos2Processor,
    )

    tokenizer = bpe_tokenizer([], bos="<s>", eos="</s>", pad="<pad>", unk="<unk>")
    image_processor = CLIPImageProcessorPil(
        size={"height": 32, "width": 32},
        crop_size={"height": 32, "width": 32},
        do_center_crop=False,
    )
    # the processor adds the markup tags and <patch_index_0000>..<patch_index_1023>
    processor = Kosmos2Processor(image_processor=image_processor, tokenizer=tokenizer)
    tokenizer = processor.tokenizer
    config = Kosmos2Config(
        text_config={
            "vocab_size": _vocab_size(len(tokenizer)),
            "embed_dim": 32,
            "layers": 2,
            "ffn_dim": 64,
            "attention_heads": 4,
            "max_position_embeddings": 256,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 16,
        },
        latent_query_num=4,
    )
    return _save(Kosmos2ForConditionalGeneration(config), processor, directory)


IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _llama_text_config(tokenizer, vocab: int) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def tiny_idefics3(directory: str | Path) -> str:
    """Idefics3 (SmolVLM 1) with a 64 px, 2-layer SigLIP, pixel shuffle to 4 image tokens."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tokenizer = bpe_tokenizer(
        ["<|im_start|>"], bos="<|im_start|>", eos="<|endoftext|>", pad="<|endoftext|>"
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": 64},
        max_image_size={"longest_edge": 64},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=4,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    tokenizer = processor.tokenizer
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 16,
        },
        text_config=_llama_text_config(tokenizer, _vocab_size(len(tokenizer))),
        scale_factor=2,
        image_token_id=processor.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save(Idefics3ForConditionalGeneration(config), processor, directory)


def _tiny_qwen_vl(directory: str | Path, model_type: str) -> str:
    import transformers

    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    tokenizer = bpe_tokenizer(
        [*specials, "<|image_pad|>", "<|video_pad|>"],
        bos="<|im_start|>",
        eos="<|im_end|>",
        pad="<|endoftext|>",
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        vision_bos_token="<|vision_start|>",
        vision_eos_token="<|vision_end|>",
    )
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=32 * 32
    )
    video_processor = transformers.Qwen2VLVideoProcessor(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=32 * 32
    )
    processor_class = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}
    processor = getattr(transformers, processor_class[model_type])(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "num_heads": 4,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    if model_type == "qwen2_vl":
        vision |= {"embed_dim": 32, "mlp_ratio": 2}
        config_class, model_class = "Qwen2VLConfig", "Qwen2VLForConditionalGeneration"
    else:
        vision |= {"intermediate_size": 64, "out_hidden_size": 32, "window_size": 16}
        vision |= {"fullatt_block_indexes": [1]}
        config_class, model_class = "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"
    config = getattr(transformers, config_class)(
        text_config={
            "vocab_size": _vocab_size(len(tokenizer)),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [1, 1, 2],
                "rope_theta": 1e4,
            },
            "tie_word_embeddings": True,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    return _save(getattr(transformers, model_class)(config), processor, directory)


def tiny_qwen2_vl(directory: str | Path) -> str:
    """Qwen2-VL with a 2-layer ViT (4 px patches, 2x2 merge) and a 2-layer decoder."""
    return _tiny_qwen_vl(directory, "qwen2_vl")


def tiny_qwen2_5_vl(directory: str | Path) -> str:
    """Qwen2.5-VL, same sizes as :func:`tiny_qwen2_vl`."""
    return _tiny_qwen_vl(directory, "qwen2_5_vl")


def _save(model, processor, directory: str | Path) -> str:
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


TINY_BUILDERS: dict[str, Callable[[str | Path], str]] = {
    "paligemma": tiny_paligemma,
    "florence2": tiny_florence2,
    "kosmos2": tiny_kosmos2,
    "idefics3": tiny_idefics3,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
}
