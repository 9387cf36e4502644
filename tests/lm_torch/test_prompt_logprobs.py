"""Prompt logprobs (`GenerationConfig.prompt_logprobs`) against transformers' log-softmax over the prompt.

The engine computes them while it prefills: over prompts split into several chunks (a small `max_prefill_token_num`),
next to a prefix cached by an earlier request (which must not let positions be skipped), through preemption and
recompute, and with `max_new_tokens=0` (prefill only). Each entry must hold the prompt token and transformers' top N
at that position, within 1e-4 in float32. The default model runs on the CPU; a tiny random Llama runs on CUDA
(marker `gpu`) through the Triton path, CUDA graphs and overlapped steps included.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from lm_core import AsyncPipeline, GenerationConfig, Pipeline
from lm_core.engine import EngineRequest

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
CHUNK = 48  # max_prefill_token_num: a 150-token prompt takes four steps


def _make_pipe(model_dir, **config) -> Pipeline:
    from lm_torch.engine import TorchEngine

    engine = TorchEngine.from_pretrained(model_dir, {"block_size": 16, "num_threads": 1, **config})
    return Pipeline(AsyncPipeline(engine, model_dir))


@pytest.fixture(scope="module")
def pipe(default_model_dir):
    with _make_pipe(default_model_dir, max_prefill_token_num=CHUNK, num_kv_blocks=256, max_batch_size=16) as p:
        yield p


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def _prompt(seed: int, length: int, vocab: int = 40000) -> list[int]:
    return torch.randint(100, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax(logits) in float32: row i is the distribution of token i + 1. [len(ids), vocab]"""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).logits[0].float()
    return torch.log_softmax(logits, dim=-1).cpu()


def assert_prompt_logprobs(entries, ids: list[int], reference: torch.Tensor, num_top: int) -> None:
    """One entry per prompt token, the first None; each holds the prompt token and transformers' top `num_top`."""
    assert entries is not None and len(entries) == len(ids) and entries[0] is None
    for i in range(1, len(ids)):
        entry, row = entries[i], reference[i - 1]
        assert entry[ids[i]] == pytest.approx(row[ids[i]].item(), abs=TOLERANCE), f"prompt token {i}"
        top = row.topk(num_top)
        others = {t: v for t, v in entry.items() if t != ids[i]}
        assert len(entry) in (num_top, num_top + 1) and len(others) <= num_top
        for token, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            if token in entry:
                assert entry[token] == pytest.approx(value, abs=TOLERANCE)
            else:  # only a tie at the edge of the top N may pick another token
                assert value - min(entry.values()) < TOLERANCE, f"position {i}: top token {token} missing"


def _engine_run(pipe: Pipeline, prompt: list[int], cfg: GenerationConfig):
    """Drive the engine directly: (generated ids, prompt logprobs, cached prompt tokens, finish reason, outputs)."""

    async def run():
        request = EngineRequest(uuid.uuid4().hex, prompt, cfg)
        ids, prompt_logprobs, cached, reason, outputs = [], None, 0, None, 0
        async for out in pipe.async_pipeline.engine.generate(request):
            outputs += 1
            ids += out.token_ids
            if out.prompt_logprobs is not None:
                assert prompt_logprobs is None, "prompt logprobs came twice"
                prompt_logprobs = out.prompt_logprobs
            cached = max(cached, out.num_cached_tokens)
            reason = out.finish_reason
        return ids, prompt_logprobs, cached, reason, outputs

    return asyncio.run_coroutine_threadsafe(run(), pipe._loop).result()


def test_chunked_prompt_logprobs_equal_transformers(pipe, hf_model):
    ids = _prompt(0, 150)
    reference = reference_logprobs(hf_model, ids)
    response = pipe(ids, GenerationConfig(max_new_tokens=4, prompt_logprobs=5, ignore_eos=True))
    assert_prompt_logprobs(response.prompt_logprobs, ids, reference, 5)
    # Generation goes on as without prompt logprobs.
    plain = pipe(ids, GenerationConfig(max_new_tokens=4, ignore_eos=True))
    assert response.token_ids == plain.token_ids and plain.prompt_logprobs is None


def test_prefill_only_request_ends_after_its_prompt(pipe, hf_model):
    ids = _prompt(1, 70)
    cfg = GenerationConfig(max_new_tokens=0, prompt_logprobs=0)
    generated, prompt_logprobs, _, reason, outputs = _engine_run(pipe, ids, cfg)
    assert (generated, reason, outputs) == ([], "length", 1)
    assert_prompt_logprobs(prompt_logprobs, ids, reference_logprobs(hf_model, ids), 0)
    # Through the pipeline: no text, no tokens, the prompt scored.
    response = pipe(ids, GenerationConfig(max_new_tokens=0, prompt_logprobs=2))
    assert (response.text, response.token_ids, response.finish_reason) == ("", [], "length")
    assert len(response.prompt_logprobs) == len(ids)


def test_a_cached_prefix_does_not_skip_prompt_logprobs(pipe, hf_model):
    prefix = _prompt(2, 96)  # six full blocks
    first, second = prefix + _prompt(3, 20), prefix + _prompt(4, 30)
    cfg = GenerationConfig(max_new_tokens=2, ignore_eos=True)
    _engine_run(pipe, first, cfg)
    # The prefix is cached: a plain request takes it ...
    assert _engine_run(pipe, second, cfg)[2] >= 80
    # ... one that wants prompt logprobs computes every position, and they are right.
    _, prompt_logprobs, cached, reason, _ = _engine_run(pipe, second, cfg.replace(prompt_logprobs=3))
    assert cached == 0 and reason == "length"
    assert_prompt_logprobs(prompt_logprobs, second, reference_logprobs(hf_model, second), 3)


@pytest.mark.slow
def test_batched_and_preempted_requests_keep_their_prompt_logprobs(default_model_dir, pipe, hf_model):
    """Eight requests at once in a cache of 12 blocks: chunks of several prompts share steps, and sequences are
    preempted (some mid-prompt) and recomputed; every prompt's logprobs are still complete and right, and the
    requests without prompt logprobs generate what they generate alone."""
    prompts = [_prompt(10 + i, n) for i, n in enumerate((60, 25, 90, 40, 75, 33, 64, 50))]
    configs = [
        GenerationConfig(max_new_tokens=20, ignore_eos=True, prompt_logprobs=2 if i % 2 == 0 else None)
        for i in range(len(prompts))
    ]
    with _make_pipe(default_model_dir, max_prefill_token_num=CHUNK, num_kv_blocks=12, max_batch_size=8) as small:
        outs = _run_concurrently(small, prompts, configs)
        assert small.async_pipeline.engine.scheduler.num_preemptions > 0
        assert small.async_pipeline.engine.stats().kv_usage == 0.0
    for prompt, cfg, (ids, prompt_logprobs, reason) in zip(prompts, configs, outs, strict=True):
        assert reason == "length" and len(ids) == 20
        if cfg.prompt_logprobs is None:
            assert prompt_logprobs is None
            assert ids == pipe(prompt, cfg).token_ids
        else:
            assert_prompt_logprobs(prompt_logprobs, prompt, reference_logprobs(hf_model, prompt), 2)


def _run_concurrently(pipe: Pipeline, prompts, configs):
    """Every request at once, straight to the engine: per request (generated ids, prompt logprobs, finish reason)."""

    async def one(prompt, cfg):
        request = EngineRequest(uuid.uuid4().hex, prompt, cfg)
        ids, prompt_logprobs, reason = [], None, None
        async for out in pipe.async_pipeline.engine.generate(request):
            ids += out.token_ids
            prompt_logprobs = out.prompt_logprobs if out.prompt_logprobs is not None else prompt_logprobs
            reason = out.finish_reason
        return ids, prompt_logprobs, reason

    async def run():
        return await asyncio.gather(*(one(p, c) for p, c in zip(prompts, configs, strict=True)))

    return asyncio.run_coroutine_threadsafe(run(), pipe._loop).result()


# ---------------------------------------------------------------------------------------------------------------------
# CUDA: the Triton path, with prompt chunks in eager steps and one-token chunks in decode steps that replay a graph.

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random float32 Llama saved as safetensors, and the same model in transformers on the GPU."""
    path = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return path, model.cuda()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(("chunk", "overlap"), [(32, True), (32, False), (4, True)])
def test_prompt_logprobs_on_the_gpu(tiny_llama, chunk, overlap):
    """A budget of 4 tokens a step cuts prompts into chunks of one token next to decodes: steps whose every row is
    one token replay a CUDA graph, and the prompt positions among them must still be scored."""
    pytest.importorskip("triton")
    from lm_torch.engine import TorchEngine

    path, reference = tiny_llama
    config = {"device": "cuda", "dtype": "float32", "max_prefill_token_num": chunk, "overlap_steps": overlap}
    engine = TorchEngine.from_pretrained(path, {**config, "max_batch_size": 8, "num_kv_blocks": 128})
    prompts = [_prompt(20 + i, n, vocab=500) for i, n in enumerate((100, 7, 45, 70))]
    configs = [
        GenerationConfig(max_new_tokens=12, ignore_eos=True, prompt_logprobs=None if i == 1 else 4)
        for i in range(len(prompts))
    ]

    async def run():
        async def one(prompt, cfg):
            ids, prompt_logprobs = [], None
            async for out in engine.generate(EngineRequest(uuid.uuid4().hex, prompt, cfg)):
                ids += out.token_ids
                prompt_logprobs = out.prompt_logprobs if out.prompt_logprobs is not None else prompt_logprobs
            return ids, prompt_logprobs

        return await asyncio.gather(*(one(p, c) for p, c in zip(prompts, configs, strict=True)))

    results = asyncio.run(run())
    for prompt, cfg, (ids, prompt_logprobs) in zip(prompts, configs, results, strict=True):
        assert len(ids) == 12
        if cfg.prompt_logprobs is None:
            assert prompt_logprobs is None
        else:
            assert_prompt_logprobs(prompt_logprobs, prompt, reference_logprobs(reference, prompt), 4)
    if chunk == 4:
        assert engine.runner.graphs.num_replays > 0
    asyncio.run(engine.close())
