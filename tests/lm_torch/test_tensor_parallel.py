"""Tensor parallelism on the CPU: every family's model split over 2 and 4 gloo ranks gives the logits of the unsplit
model and of transformers.

Each case's checkpoint is the random tiny model of `test_model_families` (plus a vocabulary of 503, which no rank
count divides, and a single KV head replicated over 4 ranks). The ranks are processes joined in a gloo group; each
builds the model through the loader with its `TPGroup`, reads its part of the safetensors checkpoint, and runs the
paged forward pass of `test_model_families` (chunked prefill, then one-token decodes, shuffled block tables). Rank 0's
logits (gathered over the vocabulary shards) must be within 1e-4 of transformers' and of the unsplit model's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for the rank processes: see tp_ranks
import tp_ranks
from test_model_families import FAMILIES, TINY, TOLERANCE, _hf_logits, _save_hf, _tokens


def _odd_vocab(path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    # 503 is prime: every rank count pads the last shard of the embedding and the (untied) LM head.
    config = LlamaConfig(**{**TINY, "vocab_size": 503}, tie_word_embeddings=False)
    return _save_hf(LlamaForCausalLM, config, path), None, None


def _one_kv_head(path: Path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # One KV head (multi-query attention) and qkv biases: at tp 4 every rank holds a copy of the head.
    config = Qwen2Config(**{**TINY, "num_key_value_heads": 1}, tie_word_embeddings=True)
    return _save_hf(Qwen2ForCausalLM, config, path), None, None


CASES = {**FAMILIES, "llama-vocab-503": _odd_vocab, "qwen2-one-kv-head": _one_kv_head}
SIZES = (2, 4)


@pytest.fixture(scope="module")
def split_logits(tmp_path_factory):
    """{size: {case: rank 0's logits}}, and {case: (transformers' logits, the unsplit model's logits)}."""
    jobs, expected = [], {}
    for name, build in CASES.items():
        path = tmp_path_factory.mktemp(name)
        reference, hf_config, engine_config = build(path)
        engine = {} if engine_config is None else {"session_len": engine_config.scheduler.session_len}
        expected[name] = (_hf_logits(reference, _tokens(seed=1)), tp_ranks.model_logits(path, hf_config, engine))
        jobs.append((name, path, hf_config, engine))
    return {size: tp_ranks.run_ranks(size, jobs) for size in SIZES}, expected


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_split_logits_match_the_unsplit_model_and_transformers(split_logits, case, size):
    got, expected = split_logits
    hf, whole = expected[case]
    logits = got[size][case]
    assert logits.shape == hf.shape
    to_hf = (logits - hf).abs().max().item()
    to_whole = (logits - whole).abs().max().item()
    assert to_hf < TOLERANCE, f"{case} tp {size}: {to_hf:.3g} from transformers"
    assert to_whole < TOLERANCE, f"{case} tp {size}: {to_whole:.3g} from tp 1"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("size", SIZES)
def test_gpu_split_logits_through_the_triton_kernels(tmp_path, size):
    """Every case split over ranks sharing one GPU (gloo on CUDA tensors), float32, the Triton attention backend and
    kernels at their sharded shapes: within 1e-4 of transformers on the same GPU."""
    pytest.importorskip("triton")
    jobs, expected = [], {}
    for name, build in CASES.items():
        path = tmp_path / name
        path.mkdir()
        reference, hf_config, engine_config = build(path)
        engine = {} if engine_config is None else {"session_len": engine_config.scheduler.session_len}
        expected[name] = _hf_logits(reference.cuda(), _tokens(seed=1))
        jobs.append((name, path, hf_config, engine))
    got = tp_ranks.run_ranks(size, jobs, device="cuda")
    for name, logits in got.items():
        diff = (logits - expected[name]).abs().max().item()
        assert diff < TOLERANCE, f"{name} tp {size} on CUDA: {diff:.3g} from transformers"
