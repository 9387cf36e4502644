"""Checkpoint formats and dtypes: sharded safetensors with an index, .bin, GGUF, dummy weights."""

from __future__ import annotations

import json

import pytest
import torch

from lm_torch.config import TorchEngineConfig
from lm_torch.loader import build_model, load_hf_config

transformers = pytest.importorskip("transformers")

TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    from lm_torch.attention import StepMetadata

    dtype = next(model.parameters()).dtype
    caches = [
        (torch.zeros(4, 16, h, d, dtype=dtype), torch.zeros(4, 16, h, d, dtype=dtype))
        for h, d in model.kv_cache_shape()
    ]
    meta = model.prepare_attention(StepMetadata.build([len(ids)], [len(ids)], [[2, 0]], 16, "cpu"))
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids)), caches, meta))


def _load(path, **config):
    cfg = TorchEngineConfig(**config)
    dtype = {"auto": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
    from lm_torch.attention import TorchAttentionBackend

    return build_model(path, cfg, load_hf_config(path), torch.device("cpu"), dtype, TorchAttentionBackend())


@pytest.mark.parametrize("layout", ["sharded-safetensors", "bin"])
def test_checkpoint_layouts_load_exactly(reference, tmp_path, layout):
    if layout == "bin":
        # Older checkpoints: a pickled state dict (transformers 5 no longer writes these itself).
        reference.config.save_pretrained(tmp_path)
        torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        reference.save_pretrained(tmp_path, max_shard_size="100KB")
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    ids = torch.randint(0, TINY["vocab_size"], (20,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    assert (_logits(_load(tmp_path), ids) - expected).abs().max().item() < 1e-5


def test_bfloat16_load_stays_close(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (20,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    model = _load(tmp_path, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert (_logits(model, ids) - expected).abs().max().item() < 0.1


def test_dummy_weights_need_only_config_json(reference, tmp_path):
    reference.config.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    model = _load(tmp_path, load_format="dummy")
    assert 0.015 < model.get_submodule("layers.0.mlp.gate_up_proj").dense_weight().std().item() < 0.025
    assert torch.isfinite(_logits(model, torch.arange(10))).all()
    with pytest.raises(ValueError, match="holds no weights"):
        _load(tmp_path)


def test_missing_weights_are_named(reference, tmp_path):
    from safetensors.torch import save_file

    reference.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if "layers.1.mlp" not in k}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks .* weights.*layers\.1\.mlp"):
        _load(tmp_path)


@pytest.mark.slow
def test_engine_runs_a_gguf_file_like_its_converted_directory(default_gguf, default_model_dir):
    from lm_core import AsyncPipeline, GenerationConfig, Pipeline
    from lm_torch.engine import TorchEngine

    cfg = GenerationConfig(max_new_tokens=12)
    answers = []
    for source in (default_gguf, default_model_dir):
        engine = TorchEngine.from_pretrained(source, {"num_kv_blocks": 64})
        with Pipeline(AsyncPipeline(engine, default_model_dir)) as pipe:
            answers.append(pipe("What is the capital of France?", cfg).token_ids)
    assert answers[0] == answers[1]


def test_built_model_chose_its_paths_at_construction(reference, tmp_path):
    """The CPU build gives every linear the split-blocks method and the attention layers their backend, with no
    pass after loading; the blocks hold the checkpoint's weights."""
    from lm_torch.attention import TorchAttentionBackend
    from lm_torch.layers.linear import CpuSplitLinearMethod, Linear

    reference.save_pretrained(tmp_path)
    model = _load(tmp_path)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.method, CpuSplitLinearMethod) for m in linears)
    assert all("weight" not in m._parameters and m.weight_blocks.dim() == 3 for m in linears)
    expected = reference.model.layers[0].self_attn.o_proj.weight
    assert torch.equal(model.get_submodule("layers.0.self_attn.o_proj").dense_weight(), expected)
    assert all(isinstance(layer.backend, TorchAttentionBackend) for layer in model.attention_layers())
