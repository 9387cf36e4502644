"""Embeddings (`TorchEngine.embed`, `AsyncPipeline.embed`) on the default model, against transformers.

The reference is transformers' `AutoModel` (the decoder without its LM head): `last_hidden_state` is the output of
the final norm, pooled and normalised here by hand.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from lm_core import AsyncPipeline, GenerationConfig, Pipeline

transformers = pytest.importorskip("transformers")

CHUNK = 64  # max_prefill_token_num of the test engine: longer prompts are embedded over several steps
SESSION_LEN = 512
TOLERANCE = 1e-4

LONG_TEXT = " ".join(
    [
        "The quick brown fox jumps over the lazy dog while the river keeps flowing toward the distant sea.",
        "Paged attention stores keys and values in fixed-size blocks, so sequences grow without copying.",
        "A scheduler mixes decode steps with chunks of long prompts to keep every step within its budget.",
        "Mean pooling averages the final hidden states of every token; last pooling keeps only the final one.",
    ]
    * 2
)


def make_pipe(model_dir, **config) -> Pipeline:
    from lm_torch.engine import TorchEngine

    engine = TorchEngine.from_pretrained(model_dir, {"block_size": 16, "session_len": SESSION_LEN, **config})
    return Pipeline(AsyncPipeline(engine, model_dir))


@pytest.fixture(scope="module")
def pipe(default_model_dir):
    with make_pipe(default_model_dir, max_batch_size=16, num_kv_blocks=256, max_prefill_token_num=CHUNK) as p:
        yield p


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    return transformers.AutoModel.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def reference(hf_model, ids: list[int], pooling: str, normalize: bool) -> torch.Tensor:
    with torch.no_grad():
        hidden = hf_model(torch.tensor([ids])).last_hidden_state[0]  # [tokens, hidden], after the final norm
    vector = hidden.mean(dim=0) if pooling == "mean" else hidden[-1]
    return torch.nn.functional.normalize(vector, dim=0) if normalize else vector


def run(pipe: Pipeline, coro):
    return asyncio.run_coroutine_threadsafe(coro, pipe._loop).result()


def assert_close(vector: list[float], expected: torch.Tensor) -> None:
    got = torch.tensor(vector)
    assert got.shape == expected.shape
    # Unnormalised hidden states reach magnitudes in the tens: compare relative to the vector's scale there.
    tolerance = TOLERANCE * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("normalize", [True, False])
def test_embeddings_match_transformers(pipe, hf_model, pooling, normalize):
    tokenizer = pipe.tokenizer
    long_ids = tokenizer.encode(LONG_TEXT, add_special_tokens=True)
    assert len(long_ids) > 2 * CHUNK  # three or more prefill chunks
    for text in ["Hello world", LONG_TEXT]:
        vector, num_tokens = run(pipe, pipe.async_pipeline.embed(text, pooling=pooling, normalize=normalize))
        ids = tokenizer.encode(text, add_special_tokens=True)
        assert num_tokens == len(ids)
        assert_close(vector, reference(hf_model, ids, pooling, normalize))
        if normalize:
            assert abs(torch.tensor(vector).norm().item() - 1.0) < 1e-5
    ids = [101, 2000, 3000, 4000, 5]
    vector, num_tokens = run(pipe, pipe.async_pipeline.embed(ids, pooling=pooling, normalize=normalize))
    assert num_tokens == 5
    assert_close(vector, reference(hf_model, ids, pooling, normalize))


def test_strings_use_the_tokenizers_special_tokens_and_no_chat_template(pipe, hf_model, default_model_dir):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    text = "Embeddings see the raw text."
    vector, num_tokens = run(pipe, pipe.async_pipeline.embed(text))
    ids = hf_tokenizer(text)["input_ids"]
    assert num_tokens == len(ids)
    assert_close(vector, reference(hf_model, ids, "mean", True))


def test_embeddings_while_generation_runs(pipe, hf_model):
    tokenizer = pipe.tokenizer
    questions = ["Write a poem about the moon.", "List ten fruits.", "Explain gravity to a child."]
    cfg = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    alone = [r.token_ids for r in pipe(questions, cfg)]
    texts = [LONG_TEXT, "short text", LONG_TEXT[:300], "another one, a little longer than the short text"]

    async def together():
        async def generate(question: str) -> list[int]:
            ids: list[int] = []
            async for piece in pipe.async_pipeline.generate(question, cfg):
                ids += piece.token_ids
            return ids

        async def embed(text: str, pooling: str):
            await asyncio.sleep(0.05)  # let the generations start first, so embeddings join running batches
            return await pipe.async_pipeline.embed(text, pooling=pooling)

        generations = [generate(q) for q in questions]
        embeddings = [embed(t, pooling) for t in texts for pooling in ("mean", "last")]
        return await asyncio.gather(*generations, *embeddings)

    results = run(pipe, together())
    assert results[: len(questions)] == alone
    pairs = [(t, pooling) for t in texts for pooling in ("mean", "last")]
    for (text, pooling), (vector, num_tokens) in zip(pairs, results[len(questions) :], strict=True):
        ids = tokenizer.encode(text, add_special_tokens=True)
        assert num_tokens == len(ids)
        assert_close(vector, reference(hf_model, ids, pooling, True))
    stats = pipe.async_pipeline.engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_usage) == (0, 0, 0.0)


def test_cached_prefixes_are_not_skipped(pipe, hf_model):
    """A prompt whose blocks sit in the prefix cache (generated just before) is still embedded from every token."""
    engine = pipe.async_pipeline.engine
    ids = pipe.tokenizer.encode(LONG_TEXT, add_special_tokens=True)
    pipe(ids, GenerationConfig(max_new_tokens=2))  # caches the prompt's full blocks
    hit_rate = engine.stats().prefix_cache_hit_rate
    vector, _ = run(pipe, pipe.async_pipeline.embed(ids, pooling="mean", normalize=False))
    assert_close(vector, reference(hf_model, ids, "mean", False))
    assert engine.stats().prefix_cache_hit_rate == hit_rate  # embeddings neither hit nor count as lookups
    # ... while generation still reuses those blocks.
    reply = list(pipe.stream_infer(ids, GenerationConfig(max_new_tokens=1)))
    assert reply and engine.stats().prefix_cache_hit_rate >= hit_rate


def test_preempted_embeddings_restart_their_pooling(default_model_dir, hf_model):
    """With a tiny KV cache, embeddings and generations preempt each other and are recomputed; vectors stay exact."""
    with make_pipe(default_model_dir, num_kv_blocks=12, max_batch_size=8, max_prefill_token_num=48) as small:
        tokenizer = small.tokenizer
        texts = [LONG_TEXT[:400], LONG_TEXT[100:500], LONG_TEXT[200:600]]
        cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)

        async def crowd():
            async def generate(prompt: str) -> str:
                return "".join([p.text async for p in small.async_pipeline.generate(prompt, cfg)])

            generations = [generate(f"Tell me a long story number {i}.") for i in range(4)]
            embeddings = [small.async_pipeline.embed(t, pooling="mean") for t in texts]
            return await asyncio.gather(*generations, *embeddings)

        results = run(small, crowd())
        assert small.async_pipeline.engine.scheduler.num_preemptions > 0
        for text, (vector, _) in zip(texts, results[4:], strict=True):
            ids = tokenizer.encode(text, add_special_tokens=True)
            assert_close(vector, reference(hf_model, ids, "mean", True))
        assert small.async_pipeline.engine.stats().kv_usage == 0.0


def test_a_prompt_of_exactly_the_session_length_embeds(pipe, hf_model):
    ids = (pipe.tokenizer.encode(LONG_TEXT, add_special_tokens=True) * 10)[:SESSION_LEN]
    vector, num_tokens = run(pipe, pipe.async_pipeline.embed(ids, pooling="last"))
    assert num_tokens == SESSION_LEN
    assert_close(vector, reference(hf_model, ids, "last", True))


@pytest.mark.parametrize(
    ("inputs", "kwargs", "message"),
    [
        ("", {}, "inputs is empty"),
        ([], {}, "inputs is empty"),
        ([1, 2, 10**9], {}, "inputs token ids"),
        (list(range(100, 100 + SESSION_LEN + 1)), {}, "session length"),
        ("hello", {"pooling": "max"}, "pooling"),
        ("hello", {"normalize": "yes"}, "normalize"),
        ({"text": "hello"}, {}, "inputs must be"),
    ],
)
def test_bad_embedding_input_raises_value_errors(pipe, inputs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(pipe, pipe.async_pipeline.embed(inputs, **kwargs))
    engine = pipe.async_pipeline.engine
    with pytest.raises(ValueError):
        run(pipe, engine.embed([], "mean", True))
    with pytest.raises(ValueError, match="pooling"):
        run(pipe, engine.embed([1, 2], "cls", True))
    assert len(run(pipe, pipe.async_pipeline.embed("still serving"))[0]) == hf_hidden_size(pipe)


def hf_hidden_size(pipe: Pipeline) -> int:
    return pipe.async_pipeline.engine.runner.hf_config.hidden_size


def test_the_scheduler_runs_embeddings_prefill_only_in_chunks_without_prefix_hits():
    """No torch: an embedding sequence is chunked, never samples, ignores cached blocks and ends with its prompt."""
    from lm_torch.block_manager import BlockManager
    from lm_torch.scheduler import Scheduler, StepResult
    from lm_torch.sequence import Sequence

    bm = BlockManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(bm, max_batch_size=4, max_num_batched_tokens=6, session_len=12)
    prompt = list(range(100, 112))
    generation = Sequence("gen", prompt[:9], 9, GenerationConfig(max_new_tokens=1))
    scheduler.add(generation)
    while not generation.is_finished:  # computes and caches the prompt's first two full blocks
        batch = scheduler.schedule()
        scheduler.update(batch, StepResult([[1] * k for k in batch.num_sampled], [None] * len(batch.seqs)))
    assert bm.num_cached_blocks == 2

    embedding = Sequence("emb", prompt, len(prompt), GenerationConfig(), pooling="mean")  # == session_len: allowed
    scheduler.add(embedding)
    chunks = []
    while not embedding.is_finished:
        batch = scheduler.schedule()
        assert batch.seqs == [embedding] and batch.num_sampled == [0]
        chunks.append((batch.starts[0], batch.num_new_tokens[0]))
        outputs = scheduler.update(batch, StepResult([[]], [None]))
    assert chunks == [(0, 6), (6, 6)]  # from token 0 although blocks of its prefix were cached
    assert outputs == [(0, embedding, 0)] and embedding.finish_reason == "stop" and embedding.num_cached_tokens == 0
    assert bm.usage() == 0.0 and scheduler.stats()["prefix_cache_hit_rate"] == 0.0
    bm.check_invariants([])

    too_long = Sequence("long", [*prompt, 1], len(prompt) + 1, GenerationConfig(), pooling="last")
    scheduler.add(too_long)
    assert scheduler.take_finished() == [too_long] and too_long.finish_reason == "error"
