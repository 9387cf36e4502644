"""A tiny random Gemma 3 vision-language checkpoint for the engine tests, built offline with transformers.

The model is transformers' `Gemma3ForConditionalGeneration` from a small config: a 2-layer SigLIP tower on 56 px
images (patch 14: a 4 x 4 grid pooled to `mm_tokens_per_image` = 4 tokens) and a 3-layer Gemma 3 text model whose
two sliding-window layers have a window of 5 tokens, shorter than an image's span with its markers, so that the
window cuts into what image tokens see. It is saved with a byte-level BPE tokenizer trained here (Gemma's special
tokens included), a chat template written like Gemma 3's (`<start_of_image>` per image part) and the published
`preprocessor_config.json` values with the size lowered to the tower's 56 px. transformers' model is the reference.

Loaded by path: test modules cannot import each other. It loads its sibling `tiny_vlms.py` the same way for the
shared tokenizer trainer and random images.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

# google/gemma-3-4b-it's template without the system-prompt folding: "<start_of_image>" per image part.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# google/gemma-3-4b-it's published Gemma3ImageProcessor values, the 896 px size lowered to the tower's 56.
PREPROCESSOR = {
    "do_convert_rgb": None,
    "do_normalize": True,
    "do_pan_and_scan": None,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Gemma3ImageProcessor",
    "image_seq_length": 4,
    "image_std": [0.5, 0.5, 0.5],
    "pan_and_scan_max_num_crops": None,
    "pan_and_scan_min_crop_size": None,
    "pan_and_scan_min_ratio_to_activate": None,
    "processor_class": "Gemma3Processor",
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 56, "width": 56},
}

WINDOW = 5


def _sibling(name: str) -> Any:
    """The module `name`.py beside this file, loaded by path."""
    spec = importlib.util.spec_from_file_location(f"tiny_gemma3_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_VLMS = _sibling("tiny_vlms")
random_image = TINY_VLMS.random_image


def make_gemma3(path: Path, seed: int = 0) -> Path:
    """A random Gemma 3 checkpoint at `path` (see the module docstring); returns `path`."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    path.mkdir(parents=True, exist_ok=True)
    tok = TINY_VLMS.train_tokenizer(path, SPECIALS, TEMPLATE, "<end_of_turn>", "<pad>")
    tok.bos_token = "<bos>"
    tok.save_pretrained(path)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    text = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "max_position_embeddings": 1024,
        "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "bos_token_id": ids["<bos>"],
        "eos_token_id": ids["<end_of_turn>"],
        "pad_token_id": ids["<pad>"],
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
    }
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # norms and the tower off their init, so that a misplaced tensor shows
        for name, param in model.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name or param.ndim == 1:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": ids["<end_of_turn>"]}))
    return path


def hf_inputs(model_path: Path, token_ids: list[int], images: list[Any]) -> dict[str, Any]:
    """transformers' inputs for our prompt ids and images: its PIL image processor's pixels, and `token_type_ids`
    (1 at image placeholders: the bidirectional mask over each image's tokens)."""
    import torch
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    config = json.loads((model_path / "config.json").read_text())
    ids = torch.tensor([token_ids])
    inputs: dict[str, Any] = {"input_ids": ids, "token_type_ids": (ids == config["image_token_index"]).long()}
    if images:
        keys = ("do_normalize", "do_rescale", "do_resize", "image_mean", "image_std", "resample", "rescale_factor")
        processor = Gemma3ImageProcessorPil(size=PREPROCESSOR["size"], **{k: PREPROCESSOR[k] for k in keys})
        inputs["pixel_values"] = processor(images=images, return_tensors="pt")["pixel_values"]
    return inputs
