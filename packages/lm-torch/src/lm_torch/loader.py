"""Building a model from a Hugging Face directory: config, class, weights (safetensors, .bin, or dummy)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from lm_torch.config import TorchEngineConfig
from lm_torch.layers.quant import finish_loading, parse_quant_config, quantize_model
from lm_torch.models.registry import get_model_class

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_hf_config(model_path: Path):
    """The transformers config of `model_path` (transformers fills defaults and maps legacy keys for us)."""
    from transformers import AutoConfig, PretrainedConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except ValueError:
        # Families transformers does not know (InternLM2 ships remote code we do not run): the raw config.json.
        config = PretrainedConfig.from_pretrained(model_path)
    if config.model_type == "gemma3":
        # The multimodal checkpoint keeps the language model's config inside; its architecture names the whole.
        text_config = config.text_config
        text_config.architectures = config.architectures
        if getattr(config, "quantization_config", None) is not None:
            text_config.quantization_config = config.quantization_config  # it quantizes the language model
        return text_config
    return config


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("TorchEngineConfig.device is 'cuda' but torch sees no CUDA device")
    return torch.device(requested)


def resolve_dtype(requested: str, hf_config, device: torch.device) -> torch.dtype:
    """auto: float32 on CPU (exact, and fast enough there); on CUDA the checkpoint's dtype, with float32 as bf16."""
    if requested != "auto":
        return _TORCH_DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    declared = _TORCH_DTYPES.get(str(declared).removeprefix("torch."), torch.bfloat16)
    return torch.bfloat16 if declared == torch.float32 else declared


def build_model(model_path: Path, config: TorchEngineConfig, hf_config, device: torch.device, dtype: torch.dtype):
    """Instantiate the model class for the checkpoint's architecture and load its weights."""
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise ValueError(f"{model_path}/config.json names no architecture")
    model_class = get_model_class(architectures[0], config.custom_module_map)
    quant = parse_quant_config(hf_config)  # an unsupported format fails before the model is built
    max_positions = config.session_len or hf_config.max_position_embeddings
    with torch.device(device):
        model = model_class(hf_config, max_positions=max_positions)
    model = model.to(dtype=dtype)
    if quant is not None:
        # After the dtype cast, which would turn float8 weights into the compute dtype.
        quantize_model(model, quant, dtype)
    _keep_float32_buffers(model)
    if config.load_format == "dummy":
        _init_dummy(model, config.seed)
    else:
        loaded = model.load_weights(iter_checkpoint(model_path, config.load_format, device))
        optional = {n for n, p in model.named_parameters() if getattr(p, "optional_in_checkpoint", False)}
        missing = {n for n, _ in model.named_parameters()} - loaded - _tied(model) - optional
        if missing:
            raise ValueError(f"checkpoint {model_path} lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    finish_loading(model)
    return model.eval()


def iter_checkpoint(model_path: Path, load_format: str, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every checkpoint tensor, with a progress bar over the tensors (safetensors) or files."""
    from tqdm.auto import tqdm

    files = sorted(model_path.glob("*.safetensors")) if load_format in ("auto", "safetensors") else []
    use_safetensors = bool(files)
    if not files and load_format in ("auto", "bin"):
        files = sorted(p for p in model_path.glob("*.bin") if p.name != "training_args.bin")
    if not files:
        raise ValueError(f"{model_path} holds no weights (*.safetensors or *.bin); load_format={load_format!r}")
    if not use_safetensors:
        for file in tqdm(files, desc="loading weights", unit="file", file=sys.stderr):
            yield from torch.load(file, map_location=device, weights_only=True).items()
        return
    from safetensors import safe_open

    # The headers first (cheap), so that the bar counts tensors: a one-file checkpoint shows progress too.
    names = []
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            names.append(list(f.keys()))
    with tqdm(total=sum(map(len, names)), desc="loading weights", unit="tensor", file=sys.stderr) as bar:
        for file, file_names in zip(files, names, strict=True):
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in file_names:
                    yield name, f.get_tensor(name)
                    bar.update()


def _tied(model) -> set[str]:
    if getattr(model.config, "tie_word_embeddings", False):
        return {"lm_head.weight"}
    return set()


def _keep_float32_buffers(model) -> None:
    # Rotary tables stay float32 whatever the weights' dtype, as transformers computes them.
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name in ("cos", "sin"):
                setattr(module, name, buffer.float())


def _init_dummy(model, seed: int) -> None:
    """Random weights of a realistic scale (benchmarks only): normal(0, 0.02) matrices, unit-scale norms.

    Drawn on the model's device, so an 8B model initialises in seconds on a GPU.
    """
    generators: dict[torch.device, torch.Generator] = {}
    quantized: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "init_dummy"):  # quantized linears: integer weights of a matching spread
                device = next(module.parameters()).device
                if device not in generators:
                    generators[device] = torch.Generator(device=device).manual_seed(seed)
                module.init_dummy(generators[device])
                quantized.update(id(p) for p in module.parameters() if p is not module.bias)
        for name, param in model.named_parameters():
            if id(param) in quantized:
                continue
            if param.dim() > 1:
                if param.device not in generators:
                    generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
                param.normal_(0.0, 0.02, generator=generators[param.device])
            elif "norm" in name:
                # RMSNorm with an offset (Gemma) stores weight - 1: zero is a unit scale there.
                offset = getattr(_owner(model, name), "offset", 0.0)
                param.fill_(1.0 - offset)
            else:
                param.zero_()


def _owner(model, param_name: str):
    return model.get_submodule(param_name.rpartition(".")[0])
