"""GGUF to Hugging Face conversion, checked against transformers' own GGUF loader and the original model."""

from __future__ import annotations

import json
import shutil

import pytest

from lm_core.convert import convert_gguf
from lm_core.errors import GGUFConversionError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load GGUF files

# Both sides dequantize with gguf and compute in fp32, so they agree to rounding; 1e-3 is the bound.
LOGIT_ATOL = 1e-3
TENSOR_TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]
PROMPTS = ["What is the capital of France?", "def fib(n):\n    return", "Ünïcödé, 日本語 and 12345 digits."]


def _transformers_gguf_model(gguf_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


def _max_logit_diff(a, b, input_ids) -> float:
    with torch.no_grad():
        return (a(input_ids).logits - b(input_ids).logits).abs().max().item()


@pytest.mark.slow
def test_default_model_matches_transformers_gguf_loader(default_gguf, tmp_path):
    ours_dir = convert_gguf(default_gguf, tmp_path / "hf", progress=False)
    ours = transformers.AutoModelForCausalLM.from_pretrained(ours_dir, dtype=torch.float32).eval()
    reference = _transformers_gguf_model(default_gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ours_dir)
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        diff = _max_logit_diff(ours, reference, ids)
        assert diff < LOGIT_ATOL, f"max |logit difference| {diff} for {prompt!r}"


@pytest.mark.slow
def test_default_model_tokenizer_matches_transformers_gguf_tokenizer(default_gguf, tmp_path):
    ours_dir = convert_gguf(default_gguf, tmp_path / "hf", progress=False)
    ours = transformers.AutoTokenizer.from_pretrained(ours_dir)
    reference = transformers.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    texts = [*PROMPTS, "  two  spaces\n\ttab", "<|im_start|>user\nhi<|im_end|>", "emoji 🦙🦙 and 3.14159", "x" * 50]
    for text in texts:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    rendered = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ours.eos_token == "<|im_end|>" and ours.bos_token == "<|im_start|>"


@pytest.mark.parametrize("type_name", TENSOR_TYPES)
def test_tensor_types_match_transformers_gguf_loader(tiny_llama, llama_gguf_writer, tmp_path, type_name):
    gguf_path = llama_gguf_writer(tiny_llama, tmp_path / f"tiny-{type_name}.gguf", type_name)
    ours_dir = convert_gguf(gguf_path, tmp_path / "hf", progress=False)
    ours = transformers.AutoModelForCausalLM.from_pretrained(ours_dir, dtype=torch.float32).eval()
    reference = _transformers_gguf_model(gguf_path)
    input_ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    diff = _max_logit_diff(ours, reference, input_ids)
    assert diff < LOGIT_ATOL, f"{type_name}: max |logit difference| {diff}"
    if type_name == "F32":  # lossless: the round trip must give back the original model, Q/K permutation included
        assert _max_logit_diff(ours, tiny_llama, input_ids) < 1e-4


def test_config_and_sharding_layout(tiny_llama, llama_gguf_writer, tmp_path, monkeypatch):
    import lm_core.convert.gguf_model as gguf_model

    gguf_path = llama_gguf_writer(tiny_llama, tmp_path / "tiny.gguf", "F16")
    # Force several shards to check the index that large models get.
    monkeypatch.setattr(gguf_model, "_SHARD_BYTES", 1_000_000)
    out = convert_gguf(gguf_path, tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    cfg = tiny_llama.config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_key_value_heads"], config["num_attention_heads"]) == (2, 4)
    assert config["tie_word_embeddings"] is False
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tiny_llama.state_dict())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert reloaded.config.intermediate_size == cfg.intermediate_size


def test_truncated_gguf_is_rejected(default_gguf, tmp_path):
    broken = tmp_path / "broken.gguf"
    with default_gguf.open("rb") as src:
        broken.write_bytes(src.read(default_gguf.stat().st_size // 3))
    with pytest.raises(GGUFConversionError, match="truncated"):
        convert_gguf(broken, tmp_path / "out", progress=False)
    header_only = tmp_path / "header.gguf"
    with default_gguf.open("rb") as src:
        header_only.write_bytes(src.read(1000))
    with pytest.raises(GGUFConversionError, match="truncated or corrupt"):
        convert_gguf(header_only, tmp_path / "out2", progress=False)


def test_unsupported_architecture_is_named(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFConversionError, match=r"architecture 'mamba' is not supported.*llama"):
        convert_gguf(path, tmp_path / "out", progress=False)


def test_conversion_output_is_self_contained(default_model_dir, tmp_path):
    # The cached default model must load from a copy: no file of it may point back into the cache.
    copy = shutil.copytree(default_model_dir, tmp_path / "copy")
    config = transformers.AutoConfig.from_pretrained(copy)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
