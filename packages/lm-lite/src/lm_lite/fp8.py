"""`lm lite fp8`: blocked FP8 weights by round-to-nearest, no calibration, in the DeepSeek-V3 / Qwen3-*-FP8 format.

Every decoder-layer linear of the family's table (`families`) becomes two tensors:
    weight            [N, K] float8_e4m3fn
    weight_scale_inv  [ceil(N / 128), ceil(K / 128)] float32
    W[n, k] ~ float32(weight[n, k]) * weight_scale_inv[n // 128, k // 128]
Per 128 x 128 block (the last row and column of blocks partial where 128 does not divide N or K): scale = amax / 448
(1 for an all-zero block), weight = float8(clamp(w / scale, -448, 448)) rounded to nearest even, in float32 from
the source's values. q, k and v (gate and up) are quantized apart, each with its own grid, as published FP8
checkpoints store them; Phi-3's fused projections as one tensor. Every other tensor (embeddings, norms, the LM head,
biases, a vision tower) keeps its name and its dtype. config.json gains
    quantization_config = {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic, weight_block_size: [128, 128],
                           modules_to_not_convert: [lm_head, ...]}
(the LM head listed as Qwen3-FP8 lists it; a multimodal Gemma 3 also lists its vision tower and projector), and the
tokenizer, generation config and other small files are copied. The source's safetensors are read one tensor at a
time; no model is built.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lm_lite.options import prepare_job

if TYPE_CHECKING:  # torch is imported when a function runs, so that `lm lite --help` stays instant
    import torch

PathLike = str | os.PathLike
BLOCK = (128, 128)
FP8_MAX = 448.0
# Where transformers' checkpoints keep the decoder layers (text models, then multimodal Gemma 3's language model).
_LAYER_PREFIXES = ("model.layers", "model.language_model.layers", "language_model.model.layers")


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (q [N, K] float8_e4m3fn, scale [ceil(N / bn), ceil(K / bk)] float32), round to nearest."""
    import torch

    n, k = weight.shape
    bn, bk = block
    rows, cols = -(-n // bn), -(-k // bk)
    # Zero-padded to whole blocks: [rows, bn, cols, bk]; the padding changes no block's amax.
    tiles = torch.nn.functional.pad(weight.float(), (0, cols * bk - k, 0, rows * bn - n)).view(rows, bn, cols, bk)
    amax = tiles.abs().amax(dim=3).amax(dim=1)  # [rows, cols]
    scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rows * bn, cols * bk)[:n, :k].contiguous(), scale


def quantize_fp8(model: PathLike | None, work_dir: PathLike = "./work_dir", overwrite: bool = False) -> Path:
    """Write the blocked FP8 checkpoint of `model` (module docstring) into `work_dir`; returns its path."""
    job = prepare_job(model, work_dir, overwrite)
    if job.config.get("architectures", [None])[0] == "InternLM2ForCausalLM":
        raise ValueError("lm lite fp8 does not support InternLM2: its fused wqkv rows interleave q, k and v per head")
    files = sorted(job.model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{job.model_dir} holds no *.safetensors weights, which lm lite fp8 reads")
    print(f"lm-lite: FP8 blocks {BLOCK[0]}x{BLOCK[1]}: {job.model_dir} -> {job.work_dir}", file=sys.stderr, flush=True)
    from safetensors import safe_open

    from lm_lite.checkpoint import _copy_side_files, _save_shards
    from lm_lite.walker import progress

    linear = _linear_pattern(job.family.linears)
    state: dict[str, torch.Tensor] = {}
    quantized = 0
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in progress(list(f.keys()), f"fp8: {file.name}"):
                tensor = f.get_tensor(name)
                if linear.match(name) and tensor.dim() == 2 and tensor.is_floating_point():
                    state[name], state[f"{name}_scale_inv"] = quantize_blocks(tensor)
                    quantized += 1
                else:
                    state[name] = tensor
    if not quantized:
        raise ValueError(f"no decoder linear of {job.family.name}'s table found in {job.model_dir}'s tensors")
    _save_shards(job.work_dir, {k: v.contiguous() for k, v in state.items()})
    config = dict(job.config)
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
        "modules_to_not_convert": ["lm_head", *_not_converted(job.config)],
    }
    (job.work_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_side_files(job.model_dir, job.work_dir)
    return job.work_dir


def _linear_pattern(linears: tuple[str, ...]) -> re.Pattern[str]:
    """Checkpoint names of the decoder linears' weights: `<layers>.<i>.<linear>.weight`."""
    prefixes = "|".join(re.escape(p) for p in _LAYER_PREFIXES)
    names = "|".join(re.escape(n) for n in linears)
    return re.compile(rf"^(?:{prefixes})\.\d+\.(?:{names})\.weight$")


def _not_converted(config: dict) -> list[str]:
    """Parts of a multimodal checkpoint that stay in floating point besides the LM head."""
    if config.get("architectures", [None])[0] == "Gemma3ForConditionalGeneration":
        return ["vision_tower", "multi_modal_projector"]
    return []
