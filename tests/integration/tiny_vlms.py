"""Tiny random vision-language checkpoints for the engine tests, built offline with transformers.

No real VLM checkpoint is available offline, so each family is a random model from a small config, saved with a
tokenizer trained here (byte-level BPE over a few sentences plus the family's special tokens), a chat template
written like the family's own, and the family's published `preprocessor_config.json` values (image sizes capped
small so that an image is a few dozen placeholder tokens). transformers' model is the reference.

Loaded by path (the `tiny_vlms` fixture in tests/conftest.py): test modules cannot import each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Describe the image in one sentence. What colour is the sky?",
    "A picture of a cat sitting on a mat, next to a red ball.",
    "user assistant system: you are a helpful assistant that looks at pictures.",
    "0123456789 How many objects are there? Compare the two images.",
]

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL-7B-Instruct's published preprocessor values, max_pixels lowered so an image is at most 64 tokens.
QWEN_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 28 * 28 * 64,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "image_processor_type": "Qwen2VLImageProcessor",
}


def train_tokenizer(path: Path, specials: list[str], template: str, eos: str, pad: str) -> Any:
    """A byte-level BPE tokenizer (about 400 tokens) with `specials` as special tokens, saved at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad)
    hf.chat_template = template
    hf.save_pretrained(path)
    return hf


def make_qwen2_5_vl(path: Path, seed: int = 0, version: str = "2.5") -> Path:
    """A random Qwen2.5-VL (or Qwen2-VL, `version="2"`): 2 text layers of hidden 64 (M-RoPE sections 2/3/3),
    a 2-block vision tower of width 32 (2.5: windows of 56 px, block 1 full attention)."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(path, QWEN_SPECIALS, QWEN_TEMPLATE, "<|im_end|>", "<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }
    tokens = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    if version == "2":
        vision = {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "hidden_size": 64}
        vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
        model_class: Any = Qwen2VLForConditionalGeneration
    else:
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64}
        vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56)
        vision.update(fullatt_block_indexes=[1], tokens_per_second=2)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        model_class = Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(QWEN_PREPROCESSOR))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": ids["<|im_end|>"]}))
    return path


def random_image(seed: int, size: tuple[int, int]) -> Any:
    """A random RGB PIL image of `size` = (width, height), smooth enough to survive resizing."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.BILINEAR)


def hf_qwen_inputs(model_path: Path, token_ids: list[int], images: list[Any]) -> dict[str, Any]:
    """transformers' inputs for our prompt ids and images: its PIL image processor's pixels and grids, and the
    token types M-RoPE needs (1 at image placeholders)."""
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config = json.loads((model_path / "config.json").read_text())
    processor = Qwen2VLImageProcessorPil(**{k: v for k, v in QWEN_PREPROCESSOR.items() if k != "image_processor_type"})
    ids = torch.tensor([token_ids])
    inputs: dict[str, Any] = {"input_ids": ids, "mm_token_type_ids": (ids == config["image_token_id"]).int()}
    if images:
        out = processor(images=images, return_tensors="pt")
        inputs["pixel_values"] = out["pixel_values"]
        inputs["image_grid_thw"] = out["image_grid_thw"]
    return inputs


LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# llava-hf/llava-1.5-7b-hf's template: the images of a message first ("<image>\n" each), then its texts.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ part['text'] + ' ' }}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-1.5's published preprocessor values (CLIPImageProcessor), the 336 px resize and crop lowered to the tower's 56.
LLAVA_PREPROCESSOR = {
    "crop_size": {"height": 56, "width": 56},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 56},
}

INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]

# OpenGVLab/InternVL3-*-hf's template: "<IMG_CONTEXT>\n" per image part (InternVLProcessor expands each).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# InternVL3-hf's published GotOcr2 values, tiles of the tiny tower's 56 px and at most 4 of them (plus a thumbnail).
INTERNVL_PREPROCESSOR = {
    "crop_to_patches": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "GotOcr2ImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "max_patches": 4,
    "min_patches": 1,
    "processor_class": "InternVLProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 56, "width": 56},
}


def _perturb(model: Any, scale: float = 0.05) -> None:
    """Move the tower's and projector's parameters and every norm weight and bias off their init (ones, zeros, a
    0.02 spread) so that a misplaced tensor shows; the text model's matrices keep their config's spread."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name or param.ndim == 1:
                param.add_(scale * torch.randn_like(param))


def _tiny_text(tok: Any, bos: str, eos: str, pad: str, tie: bool) -> dict[str, Any]:
    """A 2-layer text config of hidden 64 (4 heads, 2 KV heads) over `tok`'s vocabulary."""
    return {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "bos_token_id": tok.convert_tokens_to_ids(bos),
        "eos_token_id": tok.convert_tokens_to_ids(eos),
        "pad_token_id": tok.convert_tokens_to_ids(pad),
        "tie_word_embeddings": tie,
    }


def make_llava(path: Path, seed: int = 0) -> Path:
    """A random LLaVA-1.5: a 2-layer Llama of hidden 64 and a 2-layer CLIP tower of width 32 at 56 px, patches of
    14 (feature layer -2: one layer runs; 16 tokens an image), parameters perturbed off their init."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(path, LLAVA_SPECIALS, LLAVA_TEMPLATE, "</s>", "<pad>")
    text = {"model_type": "llama", **_tiny_text(tok, "<s>", "</s>", "<pad>", tie=False)}
    text["initializer_range"] = 0.2  # transformers' 0.02: every prompt gives about the same greedy tokens
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
        "projection_dim": 32,
    }
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _perturb(model)
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(LLAVA_PREPROCESSOR))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": text["eos_token_id"]}))
    return path


def make_internvl(path: Path, seed: int = 0) -> Path:
    """A random InternVL3: a 2-layer Qwen2 of hidden 64 (embeddings tied, InternVLConfig's default; weights of
    spread 0.2) and a 2-layer InternViT of width 32 at 56 px, patches of 14, pixel shuffle 0.5 (4 tokens a tile),
    parameters perturbed."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(path, INTERNVL_SPECIALS, INTERNVL_TEMPLATE, "<|im_end|>", "<|endoftext|>")
    text = {"model_type": "qwen2", **_tiny_text(tok, "<|endoftext|>", "<|im_end|>", "<|endoftext|>", tie=True)}
    # Tied embeddings at transformers' 0.02 spread make the residual stream dominate: greedy decoding only repeats
    # its last token. A wider spread gives varied tokens.
    text["initializer_range"] = 0.2
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
    }
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    _perturb(model)
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(INTERNVL_PREPROCESSOR))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": text["eos_token_id"]}))
    return path


def _processor_kwargs(preprocessor: dict[str, Any]) -> dict[str, Any]:
    """A preprocessor_config.json's values as a transformers image processor's constructor takes them."""
    return {k: v for k, v in preprocessor.items() if k not in ("image_processor_type", "processor_class")}


def hf_llava_inputs(model_path: Path, token_ids: list[int], images: list[Any]) -> dict[str, Any]:
    """transformers' inputs for our prompt ids and images: `LlavaImageProcessorPil`'s pixels [images, 3, 56, 56]."""
    import torch
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    preprocessor = json.loads((model_path / "preprocessor_config.json").read_text())
    inputs: dict[str, Any] = {"input_ids": torch.tensor([token_ids])}
    if images:
        processor = LlavaImageProcessorPil(**_processor_kwargs(preprocessor))
        inputs["pixel_values"] = processor(images=images, return_tensors="pt")["pixel_values"]
    return inputs


def hf_internvl_inputs(model_path: Path, token_ids: list[int], images: list[Any]) -> dict[str, Any]:
    """transformers' inputs for our prompt ids and images: `GotOcr2ImageProcessorPil`'s tiles of every image,
    concatenated [tiles, 3, 56, 56], cropped to patches as `InternVLProcessor` asks."""
    import torch
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    preprocessor = json.loads((model_path / "preprocessor_config.json").read_text())
    inputs: dict[str, Any] = {"input_ids": torch.tensor([token_ids])}
    if images:
        processor = GotOcr2ImageProcessorPil(**_processor_kwargs(preprocessor))
        out = processor(images=images, crop_to_patches=True, return_tensors="pt")
        inputs["pixel_values"] = out["pixel_values"]
    return inputs
