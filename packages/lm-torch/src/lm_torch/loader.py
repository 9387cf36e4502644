"""Building a model from a Hugging Face directory: config, class, weights (safetensors, .bin, or dummy)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lm_torch.config import TorchEngineConfig
from lm_torch.distributed.group import SINGLE, TPGroup
from lm_torch.distributed.sharding import LazyTensor
from lm_torch.layers.context import BuildContext
from lm_torch.layers.linear import LinearBase
from lm_torch.layers.quant import parse_quant_config
from lm_torch.models.registry import get_model_class

if TYPE_CHECKING:
    from lm_torch.kernels.tuning import TuningTables

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# config.json model types whose checkpoints lm-torch runs as vision-language models (models.vlm).
VISION_LANGUAGE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "llava", "internvl")


def load_hf_config(model_path: Path) -> Any:
    """The transformers config of `model_path` (transformers fills defaults and maps legacy keys for us)."""
    from transformers import AutoConfig, PretrainedConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except ValueError:
        # Families transformers does not know (InternLM2 ships remote code we do not run): the raw config.json.
        config = PretrainedConfig.from_pretrained(model_path)
    if config.model_type == "gemma3" or config.model_type in VISION_LANGUAGE_MODEL_TYPES:
        # A multimodal checkpoint keeps the language model's config inside; its architecture names the whole, and
        # a vision-language model class reads the whole config (its vision tower's part) from `multimodal_config`.
        text_config = config.text_config
        text_config.architectures = config.architectures
        text_config.multimodal_config = config
        if getattr(config, "quantization_config", None) is not None:
            text_config.quantization_config = config.quantization_config  # it quantizes the language model
        return text_config
    return config


def resolve_device(requested: str) -> torch.device:
    """The torch device of `TorchEngineConfig.device` (auto: CUDA if present)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("TorchEngineConfig.device is 'cuda' but torch sees no CUDA device")
    return torch.device(requested)


def resolve_dtype(requested: str, hf_config: Any, device: torch.device) -> torch.dtype:
    """auto: float32 on CPU (exact, and fast enough there); on CUDA the checkpoint's dtype, with float32 as bf16."""
    if requested != "auto":
        return _TORCH_DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    declared = _TORCH_DTYPES.get(str(declared).removeprefix("torch."), torch.bfloat16)
    return torch.bfloat16 if declared == torch.float32 else declared


def build_model(
    model_path: Path,
    config: TorchEngineConfig,
    hf_config: Any,
    device: torch.device,
    dtype: torch.dtype,
    attention_backend: Any = None,
    tuning: TuningTables | None = None,
    tp: TPGroup = SINGLE,
) -> nn.Module:
    """The ready model for the checkpoint's architecture: built for (device, dtype, quantization, kernels, attention
    backend, tensor-parallel rank) through one `BuildContext`, so each layer has chosen its code path and holds its
    shard; weights loaded (or dummy), then put in each linear method's layout once. Under tensor parallelism each
    rank reads only its part of each safetensors tensor."""
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise ValueError(f"{model_path}/config.json names no architecture")
    model_class = get_model_class(architectures[0], dict(config.model.custom_module_map))
    # An unsupported format fails before the model is built; `quantization` quantizes a float checkpoint at load.
    quant = parse_quant_config(hf_config, config.model.quantization)
    ctx = BuildContext(
        device=device,
        dtype=dtype,
        quant_config=quant,
        kernels=config.kernels,
        tuning=tuning,
        attention_backend=attention_backend,
        tp=tp,
    )
    max_positions = config.scheduler.session_len or hf_config.max_position_embeddings
    # Parameters are created in the compute dtype straight away (quantized layers keep the dtypes they declare).
    with torch.device(device), _default_dtype(dtype):
        model = model_class(hf_config, max_positions=max_positions, ctx=ctx)
    if quant is None:
        model = model.to(dtype=dtype)  # parameters a model class created in another dtype
    _keep_float32_buffers(model, dtype)
    if config.model.load_format == "dummy":
        if tp.size > 1 and quant is None:
            _init_dummy_sharded(model, tp, config.model.seed)
        else:
            _init_dummy(model, config.model.seed)
    else:
        loaded = model.load_weights(iter_checkpoint(model_path, config.model.load_format, device, lazy=tp.size > 1))
        optional = {n for n, p in model.named_parameters() if getattr(p, "optional_in_checkpoint", False)}
        missing = {n for n, _ in model.named_parameters()} - loaded - _tied(model) - optional
        if missing:
            raise ValueError(f"checkpoint {model_path} lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    process_weights_after_loading(model)
    return model.eval()


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every linear layer turn the loaded weights into its method's layout (once)."""
    for module in list(model.modules()):
        if isinstance(module, LinearBase):
            module.process_weights_after_loading()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def iter_checkpoint(
    model_path: Path, load_format: str, device: torch.device, lazy: bool = False
) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for every checkpoint tensor, with a progress bar over the tensors (safetensors) or files.

    lazy: safetensors tensors come as `LazyTensor`s, read (in part) by the model's loader while the file is open."""
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
                    yield name, LazyTensor(f.get_slice(name), device) if lazy else f.get_tensor(name)
                    bar.update()


def _tied(model: nn.Module) -> set[str]:
    if getattr(model.config, "tie_word_embeddings", False):
        return {"lm_head.weight"}
    return set()


def _keep_float32_buffers(model: nn.Module, dtype: torch.dtype) -> None:
    # Rotary tables are held in float32 whatever the weights' dtype, with the values of the model's dtype (the
    # rounding a dtype cast of the whole model gives them, with or without quantized layers).
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name in ("cos", "sin"):
                setattr(module, name, buffer.to(dtype).float())


def _init_dummy(model: nn.Module, seed: int) -> None:
    """Random weights of a realistic scale (benchmarks only): normal(0, 0.02) matrices, unit-scale norms.

    Drawn on the model's device, so an 8B model initialises in seconds on a GPU.
    """
    generators: dict[torch.device, torch.Generator] = {}
    quantized: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            init_dummy = getattr(module, "init_dummy", None)
            if init_dummy is not None:  # quantized linears: integer weights of a matching spread
                device = next(module.parameters()).device
                if device not in generators:
                    generators[device] = torch.Generator(device=device).manual_seed(seed)
                init_dummy(generators[device])
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


def _init_dummy_sharded(model: nn.Module, tp: TPGroup, seed: int) -> None:
    """`_init_dummy`'s weights for a tensor-parallel rank: the unsplit model's random tensors, drawn in the same order
    and shapes from the same generator, each loaded as a checkpoint tensor would be (the rank keeps its part). So every
    tensor-parallel size runs the same dummy model, and outputs compare across sizes."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    load = cast(Any, model).load_weights  # every model class the registry holds has one
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = _unsplit_shape(model, name, param, tp.size)
            if param.dim() > 1:
                tensor = torch.empty(shape, dtype=param.dtype, device=device).normal_(0.0, 0.02, generator=generator)
            elif "norm" in name:
                offset = getattr(_owner(model, name), "offset", 0.0)
                tensor = torch.full(shape, 1.0 - offset, dtype=param.dtype, device=device)
            else:
                tensor = torch.zeros(shape, dtype=param.dtype, device=device)
            load([(name, tensor)])
            del tensor


def _unsplit_shape(model: nn.Module, name: str, param: torch.Tensor, size: int) -> list[int]:
    """The shape `param` has in the unsplit model: its split dimension is the checkpoint's (the vocabulary for a
    padded one, the sum of the parts' for a fused projection, whose parts split separately)."""
    shape = list(param.shape)
    dim = getattr(param, "tp_dim", None)
    if dim is None:
        return shape
    target = name.split(".")[-2] if "." in name else ""
    sizes = getattr(model, "_checkpoint_sizes", None)
    # Only q/k/v can differ from local x size (KV heads replicated over ranks); a gate/up projection never does, and
    # an MoE model's several gate/up sizes (dense layers, shared experts) are not one `_checkpoint_sizes`.
    if target == "qkv_proj" and sizes is not None:
        shape[dim] = sum(sizes(target))
    elif getattr(param, "tp_padded", False):
        shape[dim] = cast(Any, model).config.vocab_size
    else:
        shape[dim] *= size
    return shape


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rpartition(".")[0])
