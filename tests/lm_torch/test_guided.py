"""Guided decoding (`GenerationConfig.response_format`, xgrammar) in TorchEngine on the default model.

Outputs are checked against the schema (by hand, and with jsonschema_rs when installed) or the regex; the constrained
logprobs against transformers' logits masked by xgrammar's own matcher and kernel.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys

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
