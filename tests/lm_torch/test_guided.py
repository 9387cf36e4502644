"""Guided decoding (`GenerationConfig.response_format`, xgrammar) in TorchEngine on the default model.

Outputs are checked against the schema (by hand, and with jsonschema_rs when installed) or the regex; the constrained
logprobs against transformers' logits masked by xgrammar's own matcher and kernel.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import sys
import time

import pytest
import torch

from lm_core import AsyncPipeline, GenerationConfig, Pipeline, Response
from lm_core.engine import EngineRequest

transformers = pytest.importorskip("transformers")
xgr = pytest.importorskip("xgrammar")

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
TRIP = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
        "location": {
            "type": "object",
            # Integers with bounds: an unbounded "number" lets a small model sample fraction digits until the limit.
            "properties": {
                "lat": {"type": "integer", "minimum": -90, "maximum": 90},
                "lon": {"type": "integer", "minimum": -180, "maximum": 180},
            },
            "required": ["lat", "lon"],
        },
    },
    "required": ["city", "tags", "location"],
}
# What lm-serve sends for tool_choice="required": an array of calls to the named tools.
TOOL_CALLS = {
    "type": "array",
    "minItems": 1,
    "maxItems": 2,
    "items": {
        "type": "object",
        "properties": {
            "name": {"const": "get_weather"},
            "arguments": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
            },
        },
        "required": ["name", "arguments"],
    },
}
COUNTER = {
    "type": "object",
    "properties": {"count": {"type": "integer", "minimum": 1, "maximum": 10}, "done": {"type": "boolean"}},
    "required": ["count", "done"],
}
SCHEMA_PROMPTS = [
    (PERSON, "Describe a fictional person as JSON with a name and an age."),
    (TRIP, "Plan a trip: give the city, a few tags and its coordinates as JSON."),
    (TOOL_CALLS, "What is the weather in Paris? Call the get_weather tool."),
    (COUNTER, "Pick a number between 1 and 10 and say whether you are done, as JSON."),
]
GREEDY = GenerationConfig(max_new_tokens=96)
SAMPLED = GenerationConfig(max_new_tokens=96, do_sample=True, temperature=0.8, top_p=0.95, random_seed=11)


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def make_pipe(model_dir, **config) -> Pipeline:
    from lm_torch.engine import TorchEngine

    engine = TorchEngine.from_pretrained(model_dir, {"block_size": 16, **config})
    return Pipeline(AsyncPipeline(engine, model_dir))


@pytest.fixture(scope="module")
def pipe(default_model_dir):
    with make_pipe(default_model_dir, max_batch_size=32, num_kv_blocks=512) as p:
        yield p


def generate_many(pipe: Pipeline, jobs: list[tuple[object, GenerationConfig]]) -> list[Response]:
    """Run every (prompt, config) at once, so that they share batches; one accumulated Response each."""

    async def one(prompt, cfg: GenerationConfig) -> Response:
        result = Response(text="")
        async for piece in pipe.async_pipeline.generate(prompt, cfg):
            result.extend(piece)
        return result

    async def together() -> list[Response]:
        return await asyncio.gather(*(one(prompt, cfg) for prompt, cfg in jobs))

    return asyncio.run_coroutine_threadsafe(together(), pipe._loop).result()


def check_schema(schema: dict, value, path: str = "$") -> None:
    """Validate `value` against the schema subset the tests use; strict like the engine: no unnamed properties."""
    if "const" in schema:
        assert value == schema["const"], path
    if "enum" in schema:
        assert value in schema["enum"], path
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), path
        properties = schema.get("properties", {})
        assert set(schema.get("required", [])) <= set(value), f"{path}: missing required keys"
        assert set(value) <= set(properties), f"{path}: properties outside the schema"
        for key, item in value.items():
            check_schema(properties[key], item, f"{path}.{key}")
    elif kind == "array":
        assert isinstance(value, list), path
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)), path
        for i, item in enumerate(value):
            check_schema(schema["items"], item, f"{path}[{i}]")
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", len(value)), path
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), path
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), path
    elif kind == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), path
    elif kind == "boolean":
        assert isinstance(value, bool), path
    try:
        import jsonschema_rs
    except ImportError:
        return
    if path == "$":
        assert jsonschema_rs.validator_for(schema).is_valid(value)


def assert_valid_json(response: Response, schema: dict) -> None:
    assert response.finish_reason == "stop", (response.finish_reason, response.error, response.text)
    check_schema(schema, json.loads(response.text))


def test_json_schema_outputs_validate_greedy_and_sampled(pipe):
    jobs = [
        (prompt, cfg.replace(response_format=json_format(schema)))
        for schema, prompt in SCHEMA_PROMPTS
        for cfg in (GREEDY, SAMPLED)
    ]
    responses = generate_many(pipe, jobs)
    for (schema, _), pair in zip(SCHEMA_PROMPTS, zip(responses[::2], responses[1::2], strict=True), strict=True):
        for response in pair:
            assert_valid_json(response, schema)


def test_json_object_and_regex_outputs(pipe):
    formats = [
        ("Describe a cat as a JSON object.", {"type": "json_object"}),
        ("Is the sky blue? Answer yes or no.", {"type": "regex", "regex": r"(yes|no)"}),
        ("Give me a phone number.", {"type": "regex", "regex": r"\d{3}-\d{4}"}),
        ("Name a colour in lower case.", {"type": "regex", "regex": r"[a-z]{3,10}"}),
    ]
    jobs = [(prompt, cfg.replace(response_format=fmt)) for prompt, fmt in formats for cfg in (GREEDY, SAMPLED)]
    responses = generate_many(pipe, jobs)
    for (_, fmt), response in zip([f for f in formats for _ in range(2)], responses, strict=True):
        assert response.finish_reason == "stop", (response.error, response.text)
        if fmt["type"] == "json_object":
            assert isinstance(json.loads(response.text), dict)
        else:
            assert re.fullmatch(fmt["regex"], response.text), (fmt, response.text)


def test_a_complete_grammar_stops_the_request_even_with_ignore_eos(pipe):
    cfg = GenerationConfig(max_new_tokens=32, ignore_eos=True, response_format={"type": "regex", "regex": r"\d{3}"})
    response = pipe("Give me a three digit number.", cfg)
    assert response.finish_reason == "stop"
    assert re.fullmatch(r"\d{3}", response.text), response.text
    assert len(response.token_ids) < 32  # the digits and the stop token, not max_new_tokens


def test_mixed_batches_leave_unguided_requests_untouched(pipe):
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Who wrote Hamlet?"]
    plain = GenerationConfig(max_new_tokens=32)
    alone = [r.token_ids for r in pipe(questions, plain)]
    guided_jobs = [(prompt, GREEDY.replace(response_format=json_format(schema))) for schema, prompt in SCHEMA_PROMPTS]
    guided_alone = [r.token_ids for r in generate_many(pipe, guided_jobs[:1])]
    mixed = generate_many(pipe, [*zip(questions, [plain] * 3, strict=True), *guided_jobs])
    assert [r.token_ids for r in mixed[:3]] == alone
    assert mixed[3].token_ids == guided_alone[0]
    for (schema, _), response in zip(SCHEMA_PROMPTS, mixed[3:], strict=True):
        assert_valid_json(response, schema)


def test_preempted_guided_requests_stay_valid_and_unchanged(default_model_dir, pipe):
    jobs = [
        (prompt, GenerationConfig(max_new_tokens=64, response_format=json_format(schema)))
        for schema, prompt in SCHEMA_PROMPTS
        if schema is not TRIP  # the longest: together with its prompt it alone would nearly fill the tiny cache
    ] * 2
    reference = [r.token_ids for r in generate_many(pipe, jobs)]
    with make_pipe(default_model_dir, num_kv_blocks=8, max_batch_size=16) as small:
        responses = generate_many(small, jobs)
        assert small.async_pipeline.engine.scheduler.num_preemptions > 0
        assert [r.token_ids for r in responses] == reference
        schemas = [schema for schema, _ in SCHEMA_PROMPTS if schema is not TRIP] * 2
        for schema, response in zip(schemas, responses, strict=True):
            assert_valid_json(response, schema)
        assert small.async_pipeline.engine.stats().kv_usage == 0.0


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        (json_format({"type": "object", "properties": {"a": {"type": "no-such-type"}}}), "JSON schema"),
        (json_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "JSON schema"),
        ({"type": "regex", "regex": r"(?=a)a"}, "regular expression"),
    ],
)
def test_invalid_formats_fail_the_request_and_the_engine_keeps_serving(pipe, response_format, message):
    response = pipe("Hello", GenerationConfig(max_new_tokens=8, response_format=response_format))
    assert response.finish_reason == "error" and response.token_ids == []
    assert "response_format" in response.error and message in response.error
    assert "Paris" in pipe("What is the capital of France?", GenerationConfig(max_new_tokens=16)).text
    assert pipe.async_pipeline.engine.stats().num_running == 0


def test_min_new_tokens_with_a_format_is_rejected(pipe):
    cfg = GenerationConfig(max_new_tokens=8, min_new_tokens=2, response_format={"type": "json_object"})
    response = pipe("Hello", cfg)
    assert response.finish_reason == "error" and "min_new_tokens" in response.error


def test_constrained_logprobs_are_log_softmax_of_the_masked_logits(pipe, default_model_dir):
    """Recompute every step's distribution independently: transformers' logits, masked by a fresh xgrammar matcher
    (xgrammar's own bitmask kernel), then log_softmax. The engine's logprobs must be exactly those."""
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    prompt_ids = pipe.async_pipeline.prompt_token_ids(SCHEMA_PROMPTS[0][1])
    cfg = GenerationConfig(max_new_tokens=64, logprobs=5, response_format=json_format(PERSON))
    response = pipe(prompt_ids, cfg)
    assert response.finish_reason == "stop"
    generated = response.token_ids
    assert len(response.logprobs) == len(generated)

    vocab = model.config.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(PERSON), any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(pipe.tokenizer.eos_token_ids))
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0].float()  # [tokens, vocab]
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    num_forced = 0
    for step, token in enumerate(generated):
        step_logits = logits[len(prompt_ids) - 1 + step].clone()[None]  # [1, vocab]
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(step_logits, bitmask)
        expected = torch.log_softmax(step_logits[0], dim=-1)
        entry = response.logprobs[step]
        finite = torch.isfinite(expected)
        num_allowed = int(finite.sum())
        top = expected.topk(min(5, num_allowed))
        # The top-N of the allowed tokens (two logits closer than the tolerance may swap places at the edge).
        assert len(entry) == len({token, *top.indices.tolist()}), f"step {step}"
        for candidate, value in entry.items():
            assert value == pytest.approx(expected[candidate].item(), abs=1e-4), f"step {step}, token {candidate}"
            if candidate != token:
                assert value >= top.values[-1].item() - 1e-4, f"step {step}: {candidate} is not in the top 5"
        num_forced += num_allowed == 1
        assert matcher.accept_token(token), f"step {step}: xgrammar rejects the engine's token {token}"
    assert matcher.is_terminated()
    assert num_forced > 0  # some steps allowed one token only: the logprobs really are the masked distribution


def test_bitmask_op_matches_xgrammars_kernel():
    """`ops.apply_token_bitmask` (plain torch, any device) against xgrammar's CPU kernel, rows subset included."""
    from lm_torch.sampling import ops

    vocab, batch = 1000, 5
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab + 24, generator=generator)  # a padded vocabulary
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), generator=generator, dtype=torch.int32)
    rows = [0, 2, 4]
    expected = logits.clone()
    # xgrammar indexes logits and bitmask by the same row; ours takes the guided rows' masks only.
    full = torch.full((batch, bitmask.shape[1]), -1, dtype=torch.int32)
    full[rows] = bitmask
    xgr.apply_token_bitmask_inplace(expected, full, vocab_size=vocab, indices=rows)
    expected[rows, vocab:] = float("-inf")  # past the vocabulary: disallowed (xgrammar leaves those columns alone)
    got = logits.clone()
    ops.apply_token_bitmask(got, torch.tensor(rows), bitmask, vocab)
    assert torch.equal(got, expected)
    all_rows = logits[rows].clone()
    ops.apply_token_bitmask(all_rows, None, bitmask, vocab)
    assert torch.equal(all_rows, expected[rows])


def test_grammar_state_sync_rolls_back_and_replays(default_model_dir):
    """`GrammarState.sync` makes the matcher describe exactly the given tokens, whatever it had accepted."""
    from lm_torch.guided import GrammarBackend
    from lm_torch.sequence import Sequence

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    vocab = transformers.AutoConfig.from_pretrained(default_model_dir).vocab_size
    backend = GrammarBackend(hf_tokenizer, vocab)
    fmt = json_format(PERSON)
    tokens = hf_tokenizer.encode('{"name": "Ada", "age": 36}', add_special_tokens=False)
    prompt = [1, 2, 3]

    def mask_after(generated: list[int]) -> torch.Tensor:
        state = backend.new_state(fmt, [2])
        for token in generated:
            assert state.accept(token)
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        state.fill(bitmask, 0)
        return bitmask

    state = backend.new_state(fmt, [2])
    for token in tokens[:6]:
        assert state.accept(token)
    seq = Sequence("r", prompt + tokens[:3], len(prompt), GenerationConfig())
    from lm_torch.guided import fill_bitmasks

    assert torch.equal(fill_bitmasks([state], [seq], vocab, torch.device("cpu")), mask_after(tokens[:3]))
    assert state.num_accepted == 3
    seq = Sequence("r", prompt + tokens, len(prompt), GenerationConfig())
    assert torch.equal(fill_bitmasks([state], [seq], vocab, torch.device("cpu")), mask_after(tokens))
    assert state.accept(2) and state.is_terminated
    assert not state.accept(tokens[0]) and "response_format" in state.error


def test_without_xgrammar_guided_requests_fail_clearly_and_others_run(pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as on a machine without it: `import xgrammar` fails
    response = pipe("Hello", GenerationConfig(max_new_tokens=8, response_format={"type": "json_object"}))
    assert response.finish_reason == "error" and "needs xgrammar" in response.error
    assert "Paris" in pipe("What is the capital of France?", GenerationConfig(max_new_tokens=16)).text


def test_aborting_a_guided_request_while_its_grammar_compiles(pipe):
    engine = pipe.async_pipeline.engine
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(40)}}
    cfg = GenerationConfig(max_new_tokens=64, response_format=json_format(schema))
    prompt_ids = pipe.async_pipeline.prompt_token_ids("Fill in the form.")

    async def submit_and_abort() -> list:
        stream = engine.generate(EngineRequest("abort-me", prompt_ids, cfg))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # one loop turn: the request is registered and waits for its compilation
        assert "abort-me" in engine._compiling
        await engine.abort("abort-me")
        outputs = [await first]
        async for output in stream:
            outputs.append(output)
        return outputs

    outputs = asyncio.run_coroutine_threadsafe(submit_and_abort(), pipe._loop).result()
    assert outputs[-1].finish_reason == "abort"
    assert not engine._compiling and not engine._aborted_while_compiling
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)


@pytest.mark.parametrize("cfg", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_ban_on_every_allowed_token_ends_the_request_with_an_error(pipe, default_model_dir, cfg):
    """bad_token_ids that cover every token the grammar allows leave nothing to sample: a clear error, no crash."""
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    vocab = transformers.AutoConfig.from_pretrained(default_model_dir).vocab_size
    fmt = {"type": "regex", "regex": r"(yes|no)"}
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab)).compile_regex(
        fmt["regex"]
    )
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask)
    logits = torch.zeros(1, vocab)
    xgr.apply_token_bitmask_inplace(logits, bitmask)
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert 0 < len(allowed) < 100
    response = pipe("Is the sky blue?", cfg.replace(response_format=fmt, bad_token_ids=allowed))
    assert response.finish_reason == "error" and response.token_ids == []
    assert "response_format" in response.error and "nothing the grammar allows" in response.error
    assert "Paris" in pipe("What is the capital of France?", GenerationConfig(max_new_tokens=16)).text


# -- compilation: worker threads, time limit, cache ------------------------------------------------------------------


def nested_schema(depth: int, key: str = "a") -> dict:
    """An object `depth` levels deep: xgrammar's compile time grows steeply with depth (~5 s at 300 levels here)."""
    schema: dict = {"type": "string", "maxLength": 8}
    for _ in range(depth):
        schema = {"type": "object", "properties": {key: schema}, "required": [key]}
    return schema


def small_schema(tag: str) -> dict:
    """A quick schema of its own (property names from `tag`), so that no cache holds it before the test."""
    return {
        "type": "object",
        "properties": {f"{tag}_name": {"type": "string", "maxLength": 10}, f"{tag}_n": {"type": "integer"}},
        "required": [f"{tag}_name", f"{tag}_n"],
    }


def run_on(pipe: Pipeline, coro):
    return asyncio.run_coroutine_threadsafe(coro, pipe._loop).result()


async def timed_stream(engine, request_id: str, prompt_ids: list[int], cfg: GenerationConfig) -> dict:
    """Consume one request: its submission time, its outputs' arrival times from then, the longest gap between
    outputs, and the outputs."""
    start = time.perf_counter()
    stamps, outputs = [], []
    async for output in engine.generate(EngineRequest(request_id, prompt_ids, cfg)):
        stamps.append(time.perf_counter() - start)
        outputs.append(output)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"start": start, "first": stamps[0], "max_gap": max(gaps, default=0.0), "outputs": outputs}


def test_a_repeated_format_compiles_once(pipe):
    engine = pipe.async_pipeline.engine
    pool = engine.grammar_pool()
    schema = small_schema("cache")
    before = pool.num_compiles
    first = pipe("Describe a thing as JSON.", GREEDY.replace(response_format=json_format(schema)))
    assert_valid_json(first, schema)
    assert pool.num_compiles == before + 1
    # The same schema again, under another name and written with other whitespace: the cached grammar serves it.
    same = {"type": "json_schema", "json_schema": {"name": "other", "schema": json.loads(json.dumps(schema, indent=4))}}
    hits = pool.num_cache_hits
    again = pipe("Describe a thing as JSON.", GREEDY.replace(response_format=same))
    assert again.token_ids == first.token_ids
    assert pool.num_compiles == before + 1 and pool.num_cache_hits == hits + 1
    # Requests for one uncached schema at once (as n > 1 samples arrive) share a single compile.
    shared = small_schema("shared")
    cfg = SAMPLED.replace(response_format=json_format(shared))
    jobs = [("Describe a thing as JSON.", cfg.replace(random_seed=seed)) for seed in range(3)]
    for response in generate_many(pipe, jobs):
        assert_valid_json(response, shared)
    assert pool.num_compiles == before + 2


def test_a_compile_over_the_time_limit_fails_clearly_and_the_engine_keeps_serving(pipe):
    engine = pipe.async_pipeline.engine
    pool = engine.grammar_pool()
    prompt_ids = pipe.async_pipeline.prompt_token_ids("Fill in the form.")
    slow = GenerationConfig(max_new_tokens=8, response_format=json_format(nested_schema(200, "limit")))
    quick = small_schema("after_limit")

    async def scenario() -> tuple:
        pool.time_limit = 0.3
        try:
            start = time.perf_counter()
            failed = await timed_stream(engine, "too-slow", prompt_ids, slow)
            elapsed = time.perf_counter() - start
            # The same schema while its compile still runs on: refused at once, without a second compile.
            compiles = pool.num_compiles
            repeat = await timed_stream(engine, "too-slow-again", prompt_ids, slow)
            assert pool.num_compiles == compiles
            # With as many overdue compiles running as allowed, uncached formats are refused until one ends.
            pool.max_overdue = 1
            other = GenerationConfig(max_new_tokens=8, response_format=json_format(small_schema("refused")))
            (busy,) = (await timed_stream(engine, "refused", prompt_ids, other))["outputs"]
            assert busy.finish_reason == "error" and "still running past their time limit" in busy.error
            assert pool.num_compiles == compiles
        finally:
            pool.time_limit, pool.max_overdue = 5.0, 4
        # Meanwhile other guided requests compile and run.
        other = await timed_stream(engine, "after", prompt_ids, GREEDY.replace(response_format=json_format(quick)))
        return failed, elapsed, repeat, other

    failed, elapsed, repeat, other = run_on(pipe, scenario())
    for result in (failed, repeat):
        (output,) = result["outputs"]
        assert output.finish_reason == "error" and output.token_ids == []
        assert "response_format" in output.error and "longer than" in output.error and "0.3 s" in output.error
    assert elapsed < 1.5  # the limit, not the compile's ~2 s or more
    text = pipe.tokenizer.decode([t for o in other["outputs"] for t in o.token_ids])
    check_schema(quick, json.loads(text))
    assert "Paris" in pipe("What is the capital of France?", GenerationConfig(max_new_tokens=16)).text


@pytest.mark.slow
def test_a_slow_compile_delays_no_other_request(default_model_dir):
    """While a deeply nested schema compiles for seconds, another guided request (its own, quick schema) and an
    unguided stream run as on an idle engine: their latency and chunk gaps against a baseline taken just before."""
    with make_pipe(
        default_model_dir, num_threads=1, max_batch_size=8, num_kv_blocks=128, grammar_compile_timeout=120
    ) as pipe:
        engine = pipe.async_pipeline.engine
        prompt_ids = pipe.async_pipeline.prompt_token_ids("Describe a fictional person as JSON.")
        plain = GenerationConfig(max_new_tokens=24, ignore_eos=True)
        slow_cfg = GenerationConfig(max_new_tokens=4, response_format=json_format(nested_schema(300, "deep")))

        def guided(tag: str) -> GenerationConfig:
            return GenerationConfig(max_new_tokens=24, response_format=json_format(small_schema(tag)))

        async def scenario() -> tuple:
            await timed_stream(engine, "warm", prompt_ids, guided("warm"))  # builds xgrammar's tokenizer tables
            idle = await asyncio.gather(
                timed_stream(engine, "idle-guided", prompt_ids, guided("idle")),
                timed_stream(engine, "idle-plain", prompt_ids, plain),
            )
            slow = asyncio.ensure_future(timed_stream(engine, "slow", prompt_ids, slow_cfg))
            await asyncio.sleep(0.3)  # the slow compile is under way
            busy = await asyncio.gather(
                timed_stream(engine, "busy-guided", prompt_ids, guided("busy")),
                timed_stream(engine, "busy-plain", prompt_ids, plain),
            )
            return idle, busy, await slow

        (idle_guided, idle_plain), (busy_guided, busy_plain), slow = run_on(pipe, scenario())
        assert slow["outputs"][-1].finish_reason in ("stop", "length"), slow["outputs"][-1].error
        numbers = {
            "slow compile s": slow["first"],
            "guided first s (idle, busy)": (idle_guided["first"], busy_guided["first"]),
            "guided max gap s": (idle_guided["max_gap"], busy_guided["max_gap"]),
            "plain max gap s": (idle_plain["max_gap"], busy_plain["max_gap"]),
        }
        print(numbers)  # shown with -s or -rP
        # Slow enough that queueing behind it would show (its first output comes right after its compile).
        assert slow["first"] > 2.0, numbers
        # The other guided request is not queued behind the slow compile: its first token comes about as fast as
        # idle (a compile thread competes for the cores, hence the margin), and well before the slow one's.
        assert busy_guided["first"] < max(4 * idle_guided["first"], idle_guided["first"] + 1.0), numbers
        slow_first = slow["start"] + slow["first"] - busy_guided["start"]  # on the busy request's clock
        assert busy_guided["first"] < slow_first / 2, numbers
        # No stall: a compile that held the GIL or the event loop would stop every stream for seconds.
        for busy, idle in ((busy_guided, idle_guided), (busy_plain, idle_plain)):
            assert busy["max_gap"] < max(1.0, 4 * idle["max_gap"]), numbers


# -- schemas that no value satisfies, keywords xgrammar would not enforce --------------------------------------------


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "no JSON value satisfies"),
        ({"type": "object", "properties": {"a": {"allOf": [{"type": "boolean"}, {"type": "null"}]}}}, "properties/a"),
        ({"enum": []}, "enum is empty"),
        ({"type": "string", "enum": ["a", 1]}, "enum value 1 is not of type string"),
        ({"type": "integer", "const": "x"}, "const value"),
        ({"type": "integer", "minimum": 0, "enum": [-1]}, "below the lower bound"),
        ({"type": "integer", "minimum": 5, "maximum": 3}, "no number lies between"),
        ({"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 4}, "no integer lies between"),
        ({"type": "string", "minLength": 4, "maxLength": 2}, "minLength 4 is greater than maxLength 2"),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 1}, "minItems 3"),
        ({"type": []}, "empty list"),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "required": ["b"],
                "additionalProperties": False,
            },
            "required property 'b' is excluded",
        ),
        ({"type": "integer", "not": {"const": 3}}, "keyword 'not'"),
        ({"type": "integer", "if": {"minimum": 0}, "then": {"maximum": 5}}, "keyword 'if'"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "keyword 'uniqueItems'"),
        ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "keyword 'contains'"),
        ({"type": "object", "properties": {"a": {}, "b": {}}, "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"type": "string", "format": "iri"}, "keyword 'format'"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "keyword 'maxLength'"),
        ({"type": "string", "format": "email", "pattern": "^z"}, "keyword 'format'"),
        ({"type": "string", "contentEncoding": "base64"}, "keyword 'contentEncoding'"),
        ({"type": "number", "multipleOf": 0.5}, "keyword 'multipleOf'"),
        ({"minimum": 3}, "keyword 'minimum' at # needs a 'type'"),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "keyword 'oneOf'"),
        ({"$ref": "https://example.com/schema.json"}, "keyword '$ref'"),
    ],
)
def test_unsatisfiable_schemas_and_unenforced_keywords_are_refused(pipe, schema, message):
    response = pipe("Hello", GenerationConfig(max_new_tokens=8, response_format=json_format(schema)))
    assert response.finish_reason == "error" and response.token_ids == []
    assert response.error.startswith("response_format:") and message in response.error, response.error


REWRITTEN = [
    # allOf merged: both parts' properties, the tighter bound.
    {
        "allOf": [
            {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]},
            {"properties": {"age": {"type": "integer", "minimum": 20, "maximum": 60}}, "required": ["age"]},
        ]
    },
    # Keywords beside anyOf apply to every branch; a $ref with a sibling keyword; oneOf whose branches exclude each
    # other (a different const in a property both require).
    {
        "$defs": {"small": {"type": "integer", "maximum": 9}},
        "type": "object",
        "properties": {
            "value": {"type": "integer", "anyOf": [{"minimum": 100, "maximum": 120}, {"maximum": -100}]},
            "digit": {"$ref": "#/$defs/small", "minimum": 7},
            "shape": {
                "oneOf": [
                    {
                        "type": "object",
                        "properties": {
                            "kind": {"const": "circle"},
                            "r": {"type": "integer", "minimum": 1, "maximum": 9},
                        },
                        "required": ["kind", "r"],
                    },
                    {
                        "type": "object",
                        "properties": {
                            "kind": {"const": "square"},
                            "side": {"type": "integer", "minimum": 1, "maximum": 9},
                        },
                        "required": ["kind", "side"],
                    },
                ]
            },
        },
        "required": ["value", "digit", "shape"],
    },
    # A required name missing from properties: still required (xgrammar alone would drop it).
    {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["b"],
        "additionalProperties": {"type": "boolean"},
        "maxProperties": 2,
    },
]


@pytest.mark.parametrize("schema", REWRITTEN, ids=["allOf", "siblings", "required"])
def test_schemas_xgrammar_reads_in_part_are_rewritten_and_enforced(pipe, schema):
    """Outputs validate against the schema as written, by jsonschema_rs (an independent validator)."""
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    jobs = [
        ("Answer with a JSON object.", cfg.replace(response_format=json_format(schema))) for cfg in (GREEDY, SAMPLED)
    ]
    for response in generate_many(pipe, jobs):
        assert response.finish_reason == "stop", (response.error, response.text)
        jsonschema_rs.validator_for(schema).validate(json.loads(response.text))


def test_schemas_from_pydantic_models_are_accepted_and_compile(default_model_dir):
    """What clients send (pydantic's schemas: optionals, enums, nested and recursive models, discriminated unions,
    constrained fields, formats) passes the check, and the rewritten schema compiles."""
    import enum
    from datetime import date
    from typing import Literal

    from pydantic import BaseModel, Field

    from lm_torch.guided import GrammarBackend
    from lm_torch.guided import check_schema as enforceable

    class Colour(enum.Enum):
        RED = "red"
        BLUE = "blue"

    class Cat(BaseModel):
        kind: Literal["cat"]
        lives: int = Field(ge=1, le=9)

    class Dog(BaseModel):
        kind: Literal["dog"]
        good: bool

    class Node(BaseModel):
        label: str = Field(pattern="^[a-z]{1,10}$")
        children: list[Node] = Field(default_factory=list, max_length=3)

    class Record(BaseModel):
        name: str | None = None
        colour: Colour
        born: date
        scores: dict[str, int]
        ratio: float = Field(gt=0, lt=1)
        pet: Cat | Dog = Field(discriminator="kind")
        tree: Node
        tags: list[str] = Field(min_length=1, max_length=4)

    Node.model_rebuild()
    vocab = transformers.AutoConfig.from_pretrained(default_model_dir).vocab_size
    backend = GrammarBackend(transformers.AutoTokenizer.from_pretrained(default_model_dir), vocab)
    for model in (Record, Node, Cat):
        schema = model.model_json_schema()
        enforceable(schema)
        backend.compile(json_format(schema))


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "5"])
def test_grammar_compile_timeout_is_validated(value):
    from lm_torch.config import TorchEngineConfig

    with pytest.raises(ValueError, match="grammar_compile_timeout"):
        TorchEngineConfig(grammar_compile_timeout=value)
