"""TorchEngine end to end on the default model (SmolLM2-135M-Instruct, fp32, CPU), against transformers."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from lm_core import AsyncPipeline, GenerationConfig, Pipeline
from lm_core.engine import EngineRequest

transformers = pytest.importorskip("transformers")

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Give me a tip for learning Python.",
    "Why is the sky blue?",
    "Name a famous painting by Leonardo da Vinci.",
    "What does a CPU do?",
    "Describe a cat in five words.",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet goldfish.",
    "What is the largest planet in our solar system?",
    "How many legs does a spider have?",
]
# Where transformers' two best logits at a step are closer than this, either token is a correct greedy choice.
TIE_TOLERANCE = 1e-5


def make_pipe(model_dir, **config) -> Pipeline:
    from lm_torch.engine import TorchEngine

    engine = TorchEngine.from_pretrained(model_dir, {"block_size": 16, **config})
    return Pipeline(AsyncPipeline(engine, model_dir))


@pytest.fixture(scope="module")
def pipe(default_model_dir):
    with make_pipe(default_model_dir, max_batch_size=64, num_kv_blocks=2048) as p:
        yield p


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    return model, tokenizer


def _engine_generate(pipe: Pipeline, prompt_ids: list[int], cfg: GenerationConfig) -> tuple[list[int], int, str]:
    """Drive the engine directly: (generated ids, cached prompt tokens, finish reason)."""

    async def run():
        request = EngineRequest(uuid.uuid4().hex, prompt_ids, cfg)
        ids, cached, reason = [], 0, None
        async for out in pipe.async_pipeline.engine.generate(request):
            ids += out.token_ids
            cached = max(cached, out.num_cached_tokens)
            reason = out.finish_reason
        return ids, cached, reason

    return asyncio.run_coroutine_threadsafe(run(), pipe._loop).result()


def _assert_same_greedy(ours: list[int], reference: list[int], step_logits: list[torch.Tensor]) -> None:
    for step, (a, b) in enumerate(zip(ours, reference, strict=False)):
        if a == b:
            continue
        top2 = torch.topk(step_logits[step][0], 2)
        gap = (top2.values[0] - top2.values[1]).item()
        assert gap < TIE_TOLERANCE and a in top2.indices.tolist(), f"step {step}: {a} != {b} (top-2 gap {gap:.2e})"
        return  # a tie: the continuations may rightly differ from here
    assert len(ours) == len(reference)


@pytest.mark.slow
def test_greedy_matches_transformers_generate(pipe, hf_model):
    model, tokenizer = hf_model
    responses = pipe([[{"role": "user", "content": q}] for q in QUESTIONS], GenerationConfig(max_new_tokens=64))
    for question, response in zip(QUESTIONS, responses, strict=True):
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=64, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        reference = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        assert response.input_token_len == inputs["input_ids"].shape[1]
        _assert_same_greedy(response.token_ids, reference, out.logits)


@pytest.mark.slow
def test_batch_invariance_of_greedy_outputs(pipe):
    rng = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(100, 40000, (int(n),), generator=rng).tolist()
        for n in torch.randint(4, 200, (32,), generator=rng)
    ]
    cfg = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    together = pipe(prompts, cfg)
    for prompt, response in zip(prompts[::4], together[::4], strict=True):
        alone = pipe(prompt, cfg)
        assert alone.token_ids == response.token_ids


@pytest.mark.slow
def test_prefix_cache_reuse_and_identical_outputs(default_model_dir, pipe):
    rng = torch.Generator().manual_seed(1)
    prefix = torch.randint(100, 40000, (512,), generator=rng).tolist()
    first = prefix + torch.randint(100, 40000, (20,), generator=rng).tolist()
    second = prefix + torch.randint(100, 40000, (30,), generator=rng).tolist()
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    ids_first, _, _ = _engine_generate(pipe, first, cfg)
    ids_second, cached, _ = _engine_generate(pipe, second, cfg)
    assert cached >= 448
    assert pipe.async_pipeline.engine.stats().prefix_cache_hit_rate > 0
    with make_pipe(default_model_dir, enable_prefix_caching=False, num_kv_blocks=256) as uncached:
        assert _engine_generate(uncached, first, cfg)[0] == ids_first
        no_cache_second, cached_off, _ = _engine_generate(uncached, second, cfg)
        assert no_cache_second == ids_second and cached_off == 0


@pytest.mark.slow
def test_preemption_under_a_tiny_kv_budget(default_model_dir, pipe):
    rng = torch.Generator().manual_seed(2)
    prompts = [torch.randint(100, 40000, (int(n),), generator=rng).tolist() for n in torch.randint(8, 40, (32,))]
    cfg = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    reference = [r.token_ids for r in pipe(prompts, cfg)]
    with make_pipe(default_model_dir, num_kv_blocks=8, max_batch_size=32) as small:
        responses = small(prompts, cfg)
        assert all(r.finish_reason == "length" for r in responses)
        assert [r.token_ids for r in responses] == reference
        assert small.async_pipeline.engine.scheduler.num_preemptions > 0
        assert small.async_pipeline.engine.stats().kv_usage == 0.0


def test_seeded_sampling_reproduces(pipe):
    cfg = GenerationConfig(do_sample=True, temperature=1.0, top_p=0.9, random_seed=77, max_new_tokens=16)
    first = pipe("Tell me a story.", cfg)
    assert pipe("Tell me a story.", cfg).token_ids == first.token_ids
    crowd = pipe(["Tell me a story.", "Another prompt", "A third one"], cfg)
    assert crowd[0].token_ids == first.token_ids


def test_pipeline_mechanics_on_the_real_engine(pipe):
    full = pipe("What is the capital of France?", GenerationConfig(max_new_tokens=32))
    assert "Paris" in full.text
    pieces = list(pipe.stream_infer("What is the capital of France?", GenerationConfig(max_new_tokens=32)))
    assert "".join(p.text for p in pieces) == full.text
    stop = pipe("What is the capital of France?", GenerationConfig(max_new_tokens=32, stop_words=["Paris"]))
    assert stop.stop_str == "Paris" and stop.text == full.text[: full.text.index("Paris")]
    samples = pipe("Name a colour.", GenerationConfig(n=3, do_sample=True, random_seed=5, max_new_tokens=8))
    assert [r.index for r in samples] == [0, 1, 2]
    session = pipe.chat("My name is Ada. Reply with one word.", gen_config=GenerationConfig(max_new_tokens=8))
    session = pipe.chat("What is my name?", session=session, gen_config=GenerationConfig(max_new_tokens=16))
    assert len(session.messages) == 4 and session.response.text
    logprobs = pipe("Hi", GenerationConfig(max_new_tokens=4, logprobs=3))
    assert len(logprobs.logprobs) == len(logprobs.token_ids)
    assert all(tok in lp and len(lp) <= 4 for tok, lp in zip(logprobs.token_ids, logprobs.logprobs, strict=True))


@pytest.mark.parametrize(
    ("prompt", "config", "message"),
    [
        ("", None, "empty"),
        ("hello", GenerationConfig(max_new_tokens=9000), "exceeds the session length"),
    ],
)
def test_bad_requests_fail_clearly_and_the_engine_keeps_serving(pipe, prompt, config, message):
    with pytest.raises(ValueError, match=message):
        pipe(prompt, config)
    with pytest.raises(ValueError, match=r"GenerationConfig\.top_p"):
        GenerationConfig(top_p=3.0)
    assert "Paris" in pipe("What is the capital of France?", GenerationConfig(max_new_tokens=16)).text


def test_engine_rejects_bad_raw_requests(pipe):
    ids, _, reason = _engine_generate(pipe, [10**9], GenerationConfig(max_new_tokens=4))
    assert (ids, reason) == ([], "error")
    ids, _, reason = _engine_generate(pipe, list(range(100, 8300)), GenerationConfig(max_new_tokens=4))
    assert reason == "error"
    assert _engine_generate(pipe, [1, 2, 3], GenerationConfig(max_new_tokens=4, ignore_eos=True))[2] == "length"


def test_unknown_architecture_lists_supported_ones(tmp_path, default_model_dir):
    import json
    import shutil

    from lm_torch.engine import TorchEngine

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"MambaForCausalLM.*not supported.*LlamaForCausalLM"):
        TorchEngine.from_pretrained(tmp_path, {"load_format": "dummy"})


def test_output_stream_keeps_order_wakes_its_reader_and_survives_cancellation():
    from lm_torch.engine import OutputStream

    async def scenario():
        stream = OutputStream()
        stream.put("a")
        stream.put("b")  # put before anyone reads: both kept, in order
        assert [await stream.get(), await stream.get()] == ["a", "b"]
        reader = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)
        assert not reader.done()  # nothing to read: it waits
        stream.put("c")
        assert await asyncio.wait_for(reader, 1) == "c"
        waiting = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)
        waiting.cancel()  # a consumer that goes away mid-wait
        with pytest.raises(asyncio.CancelledError):
            await waiting
        stream.put("d")  # the stream still works for the next reader
        assert await asyncio.wait_for(stream.get(), 1) == "d"

    asyncio.run(scenario())
