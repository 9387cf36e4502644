"""The engine's GPU path: overlapped steps (any device), and on CUDA the Triton kernels, CUDA graphs and the memory
plan, end to end against transformers.

Overlap (`overlap_steps`) schedules step N + 1 before step N's tokens are back: the scheduler counts them as
pending and the runner reads them from its device token buffer. It must not change a single output, and no made-up
token id may ever enter a sequence: the CPU tests run the default model with it on and off over stops,
min_new_tokens, seeded sampling with logprobs, penalties (whose steps cannot overlap), preemption and aborts,
watching every step's update.
The GPU tests (marker `gpu`) build a tiny random Llama and compare greedy outputs with transformers' `generate` on
the same GPU in float32, with CUDA graphs on and off and overlap on and off.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from lm_core.engine import EngineRequest
from lm_core.generation_config import GenerationConfig
from lm_torch.engine import TorchEngine

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Where transformers' two best logits at a step are closer than this, either token is a correct greedy choice.
TIE_TOLERANCE = 1e-4


async def _generate(engine: TorchEngine, prompt: list[int], cfg: GenerationConfig, abort_after: int | None = None):
    """(token ids, per-token logprobs, finish reason) of one request; aborted after `abort_after` tokens."""
    request_id = uuid.uuid4().hex
    ids, logprobs, reason = [], [], None
    async for out in engine.generate(EngineRequest(request_id, prompt, cfg)):
        ids += out.token_ids
        logprobs += out.logprobs or []
        reason = out.finish_reason
        if abort_after is not None and len(ids) >= abort_after and reason is None:
            await engine.abort(request_id)
    return ids, logprobs, reason


def _run_all(engine: TorchEngine, prompts, configs) -> list[tuple]:
    async def run():
        return await asyncio.gather(*(_generate(engine, p, c) for p, c in zip(prompts, configs, strict=True)))

    return asyncio.run(run())


def _watch(engine: TorchEngine) -> dict[str, int]:
    """Check every step the engine records: after `Scheduler.update` no sequence of the step holds a negative (made-up)
    token id, and none has more tokens in flight than it may. Counts the steps and those that read a pending token
    (scheduled before the previous step's tokens were back)."""
    counts = {"steps": 0, "pending_inputs": 0}
    update = engine.scheduler.update

    def checked(batch, result):
        counts["steps"] += 1
        pending = [
            len(ids) < n - max(k - 1, 0)
            for ids, n, k in zip(batch.token_ids, batch.num_new_tokens, batch.num_sampled, strict=True)
        ]
        counts["pending_inputs"] += any(pending)
        outputs = update(batch, result)
        for seq in batch.seqs:
            assert all(t >= 0 for t in seq.token_ids), f"{seq.request_id} holds a made-up token id"
            # A finished sequence keeps the count of the steps in flight for it: their tokens are dropped.
            assert seq.is_finished or 0 <= seq.num_pending_tokens <= 1
        return outputs

    engine.scheduler.update = checked
    return counts


def _prompts(seed: int, count: int, vocab: int, low: int = 3, high: int = 70) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=gen).tolist()
    return [torch.randint(5, vocab - 5, (n,), generator=gen).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------------------------------
# Overlapped steps on the CPU (the default model).


@pytest.fixture(scope="module")
def cpu_engines(default_model_dir):
    def make(overlap: bool, blocks: int) -> TorchEngine:
        config = {"overlap_steps": overlap, "num_kv_blocks": blocks, "max_batch_size": 8, "block_size": 16}
        return TorchEngine.from_pretrained(default_model_dir, config)

    engines = {(overlap, blocks): make(overlap, blocks) for overlap in (False, True) for blocks in (256, 7)}
    for engine in engines.values():
        engine.watched = _watch(engine)
    return engines


def _mixed_configs(plain: list[tuple]) -> list[GenerationConfig]:
    """Configs exercising every way a request ends, built from the plain greedy outputs `plain`."""
    configs = [GenerationConfig(max_new_tokens=len(ids), ignore_eos=True) for ids, _, _ in plain]
    stop_at = plain[0][0][4]
    configs[0] = GenerationConfig(max_new_tokens=24, stop_token_ids=[stop_at])  # stops mid-way
    configs[1] = GenerationConfig(max_new_tokens=24, stop_token_ids=[plain[1][0][2]], min_new_tokens=5)
    configs[2] = GenerationConfig(max_new_tokens=len(plain[2][0]), stop_token_ids=[plain[2][0][-1]])  # both at once
    configs[3] = GenerationConfig(max_new_tokens=16, do_sample=True, top_p=0.9, random_seed=11, logprobs=2)
    configs[4] = GenerationConfig(max_new_tokens=16, repetition_penalty=1.3, ignore_eos=True)  # never overlapped
    configs[5] = GenerationConfig(max_new_tokens=1, ignore_eos=True)
    return configs


def test_overlapped_steps_change_no_output(cpu_engines):
    prompts = _prompts(0, 10, 40000)
    plain_cfg = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in (24, 24, 13, 8, 8, 8, 20, 3, 17, 9)]
    plain = _run_all(cpu_engines[(False, 256)], prompts, plain_cfg)
    configs = _mixed_configs(plain)
    expected = _run_all(cpu_engines[(False, 256)], prompts, configs)
    assert expected[0][2] == "stop" and expected[2][2] == "stop" and len(expected[1][0]) > 5
    for key in ((True, 256), (False, 7), (True, 7)):
        before = cpu_engines[key].scheduler.num_preemptions
        got = _run_all(cpu_engines[key], prompts, configs)
        assert [(ids, reason) for ids, _, reason in got] == [(ids, reason) for ids, _, reason in expected], key
        # A preempted sequence's logits are recomputed by a prefill: equal up to the order of float sums.
        _, logprobs, _ = got[3]
        for token, value, reference in zip(expected[3][0], logprobs, expected[3][1], strict=True):
            assert value[token] == pytest.approx(reference[token], abs=1e-4)
        if key[1] == 7:  # 7 blocks of 16 tokens for up to 8 sequences of up to 93 tokens
            assert cpu_engines[key].scheduler.num_preemptions > before
        assert cpu_engines[key].stats().kv_usage == 0.0
        watched = cpu_engines[key].watched
        assert watched["steps"] > 0 and (watched["pending_inputs"] > 0) == key[0]  # overlap on: steps ran ahead


def test_abort_while_steps_overlap(cpu_engines):
    engine = cpu_engines[(True, 256)]
    prompts = _prompts(1, 3, 40000)
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)

    async def run():
        return await asyncio.gather(
            _generate(engine, prompts[0], cfg, abort_after=5),
            _generate(engine, prompts[1], cfg),
            _generate(engine, prompts[2], cfg, abort_after=1),
        )

    (ids_a, _, reason_a), (ids_b, _, reason_b), (ids_c, _, reason_c) = asyncio.run(run())
    assert reason_a == reason_c == "abort" and 5 <= len(ids_a) < 40 and len(ids_c) < 40
    assert reason_b == "length" and len(ids_b) == 40
    assert engine.stats().kv_usage == 0.0 and engine.stats().num_running == 0


# ---------------------------------------------------------------------------------------------------------------------
# CUDA: Triton kernels, CUDA graphs, memory plan.


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random float32 Llama (GQA 4/2, head_dim 16) saved as safetensors, and the same model in transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        eos_token_id=None,  # our requests never stop early; transformers must not either
        pad_token_id=0,
        bos_token_id=None,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return path, model


def _transformers_greedy(model, prompt: list[int], max_new_tokens: int):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt], device="cuda"),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.int64, device="cuda"),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt) :].tolist(), out.logits


def _assert_same_greedy(ours: list[int], reference: list[int], step_logits) -> None:
    for step, (a, b) in enumerate(zip(ours, reference, strict=False)):
        if a == b:
            continue
        top2 = torch.topk(step_logits[step][0].float(), 2)
        gap = (top2.values[0] - top2.values[1]).item()
        assert gap < TIE_TOLERANCE and a in top2.indices.tolist(), f"step {step}: {a} != {b} (top-2 gap {gap:.2e})"
        return  # a tie: the continuations may rightly differ from here
    assert len(ours) == len(reference)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    ("eager_mode", "overlap", "sizes"),
    [(False, True, None), (False, False, None), (True, True, None), (False, True, [4, 16]), (False, True, [1, 8])],
)
def test_greedy_matches_transformers_on_the_gpu(tiny_llama, eager_mode, overlap, sizes, capsys):
    """Also with chosen graph sizes (`cuda_graph_sizes`): 13 decodes replay the graph of 16, or, with no graph that
    large, run eagerly."""
    pytest.importorskip("triton")
    path, reference = tiny_llama
    config = {"device": "cuda", "dtype": "float32", "eager_mode": eager_mode, "overlap_steps": overlap}
    if sizes is not None:
        config["cuda_graph_sizes"] = sizes
    engine = TorchEngine.from_pretrained(path, {**config, "max_batch_size": 16, "num_kv_blocks": 128})
    watched = _watch(engine)
    startup = capsys.readouterr().err
    assert "memory:" in startup and "activation reserve" in startup and "start-up" in startup
    assert ("CUDA graphs for" in startup) != eager_mode
    prompts = _prompts(2, 13, 512)  # 13 sequences: the graph of bucket 16 pads 3 rows
    cfg = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    results = _run_all(engine, prompts, [cfg] * len(prompts))
    reference = reference.cuda()
    for prompt, (ids, _, reason) in zip(prompts, results, strict=True):
        assert reason == "length"
        _assert_same_greedy(ids, *_transformers_greedy(reference, prompt, 24))
    if not eager_mode and 16 in engine.runner.graphs.graphs:
        # Rows 13-15 of bucket 16 were padding in every replay: zero embeddings stay zero to the final norm.
        assert engine.runner.graphs.outputs[16][13:].eq(0).all()
    if sizes is not None:
        assert engine.runner.graphs.buckets == sizes
        assert (engine.runner.graphs.num_replays > 0) == (max(sizes) >= len(prompts))
    elif not eager_mode:
        assert engine.runner.graphs.num_replays > 0
    assert watched["steps"] > 0 and (watched["pending_inputs"] > 0) == overlap
    asyncio.run(engine.close())


@pytest.mark.gpu
@needs_gpu
def test_sampling_logprobs_and_preemption_on_the_gpu(tiny_llama):
    pytest.importorskip("triton")
    path, reference = tiny_llama
    roomy = TorchEngine.from_pretrained(path, {"device": "cuda", "dtype": "float32", "num_kv_blocks": 128})
    tight = TorchEngine.from_pretrained(
        path, {"device": "cuda", "dtype": "float32", "num_kv_blocks": 6, "max_batch_size": 8}
    )
    prompts = _prompts(3, 8, 512, high=40)
    sampled = GenerationConfig(max_new_tokens=12, do_sample=True, top_k=20, random_seed=4, logprobs=3)
    ids, logprobs, _ = _run_all(roomy, prompts[:1], [sampled])[0]
    # Seeded: the batch does not change the tokens (the logits do change in the last bits: another GEMM shape).
    crowd_ids, crowd_logprobs, _ = _run_all(roomy, prompts[:3], [sampled] * 3)[0]
    assert crowd_ids == ids
    assert len(logprobs) == len(ids) and all(t in lp and len(lp) <= 4 for t, lp in zip(ids, logprobs, strict=True))
    for token, alone, crowd in zip(ids, logprobs, crowd_logprobs, strict=True):
        assert crowd[token] == pytest.approx(alone[token], abs=1e-4)
    greedy = [GenerationConfig(max_new_tokens=20, ignore_eos=True)] * len(prompts)
    reference = reference.cuda()
    for prompt, (ids, _, reason) in zip(prompts, _run_all(tight, prompts, greedy), strict=True):
        assert reason == "length"
        _assert_same_greedy(ids, *_transformers_greedy(reference, prompt, 20))
    assert tight.scheduler.num_preemptions > 0 and tight.stats().kv_usage == 0.0


@pytest.mark.gpu
@needs_gpu
def test_kv_cache_that_cannot_fit_is_refused(tiny_llama):
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="kv_cache_gb"):
        TorchEngine.from_pretrained(tiny_llama[0], {"device": "cuda", "kv_cache_gb": 10_000.0})
