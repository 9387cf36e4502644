"""Pipeline mechanics (fan-out, sessions, streaming, stop strings, errors) over a scripted engine.

The scripted engine answers with texts chosen per prompt, token by token, through the real SmolLM2 tokenizer; it
honours max_new_tokens, min_new_tokens, stop_token_ids, seeds, the session length and abort like a real engine (an
unfinished request whose stream is closed is aborted by the engine itself, as lm-torch does). The same mechanics are
tested again on lm-torch's real engine in tests/lm_torch.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from lm_core import AsyncPipeline, GenerationConfig, Pipeline, Session
from lm_core.engine import Engine, EngineOutput, EngineStats, session_length_error
from lm_core.engine_registry import register_engine, unregister_engine

transformers = pytest.importorskip("transformers")

ANSWERS = {
    "capital": ["The capital of France is Paris."],
    "colour": ["Blue.", "Green, like grass.", "Red as a rose.", "Yellow!", "A deep violet."],
    "count": ["One, two, three, four, five, six, seven, eight, nine, ten."],
    "unicode": ["Café 日本語 🦙 done."],
}


def _answers_for(prompt_text: str) -> list[str]:
    for key, answers in ANSWERS.items():
        if key in prompt_text:
            return answers
    return ["I do not know."]


class ScriptedEngine(Engine):
    """Emits a scripted answer (chosen by the request's seed) one token per step."""

    step_delay = 0.0

    def __init__(self, model_path) -> None:
        self.hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
        self.requests: dict[str, dict] = {}
        self.received: dict[str, object] = {}  # every EngineRequest, by request id
        self.aborted: set[str] = set()
        self.abort_calls: list[str] = []  # every abort, from `abort` or from a closed stream
        self.finished: dict[str, str] = {}

    @classmethod
    def from_pretrained(cls, model_path, config=None):
        return cls(model_path)

    @property
    def session_len(self) -> int:
        return 256

    async def generate(self, request):
        cfg = request.gen_config
        self.received[request.request_id] = request
        error = session_length_error(len(request.prompt_token_ids), cfg.max_new_tokens, self.session_len)
        if error is not None:
            yield EngineOutput(request.request_id, [], "error", error=error)
            return
        prompt = self.hf_tokenizer.decode(request.prompt_token_ids)
        answers = _answers_for(prompt)
        pick = random.Random(cfg.random_seed).randrange(len(answers)) if cfg.random_seed is not None else 0
        ids = [*self.hf_tokenizer.encode(answers[pick], add_special_tokens=False), self.hf_tokenizer.eos_token_id]
        self.requests[request.request_id] = {"prompt": prompt, "config": cfg}
        stop_ids = set(cfg.stop_token_ids or ())
        finished = False
        try:
            for i, token in enumerate(ids):
                await asyncio.sleep(self.step_delay)
                if request.request_id in self.aborted:
                    self.finished[request.request_id] = "abort"
                    finished = True
                    yield EngineOutput(request.request_id, [], "abort")
                    return
                finish = None
                if token in stop_ids and i + 1 > cfg.min_new_tokens:
                    finish = "stop"
                elif cfg.max_new_tokens is not None and i + 1 >= cfg.max_new_tokens:
                    finish = "length"
                logprobs = [{token: -0.5}] if cfg.logprobs is not None else None
                if finish:
                    self.finished[request.request_id] = finish
                    finished = True
                yield EngineOutput(request.request_id, [token], finish, logprobs=logprobs)
                if finish:
                    return
        finally:
            self.requests.pop(request.request_id, None)
            if not finished:  # the consumer went away
                self._abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        self.aborted.add(request_id)
        self.abort_calls.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.requests))

    async def close(self) -> None:
        self.requests.clear()


def _wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture(scope="module")
def pipe(default_model_dir):
    register_engine("scripted", ScriptedEngine)
    from lm_core import pipeline

    with pipeline(str(default_model_dir), backend="scripted") as p:
        yield p
    unregister_engine("scripted")


@pytest.fixture(scope="module")
def hf_tokenizer(default_model_dir):
    return transformers.AutoTokenizer.from_pretrained(default_model_dir)


def _chat_ids(hf_tokenizer, messages):
    out = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_single_prompt_goes_through_the_model_chat_template(pipe, hf_tokenizer):
    response = pipe("What is the capital of France?")
    assert response.text == "The capital of France is Paris."
    assert response.finish_reason == "stop" and response.stop_str is None
    expected_ids = [*hf_tokenizer.encode(response.text, add_special_tokens=False), hf_tokenizer.eos_token_id]
    assert response.token_ids == expected_ids
    assert response.generate_token_len == len(expected_ids)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert response.input_token_len == len(_chat_ids(hf_tokenizer, messages))


def test_batches_of_strings_and_message_lists_keep_their_order(pipe):
    responses = pipe(["count please", "the capital?", "unicode test"])
    assert [r.index for r in responses] == [0, 1, 2]
    assert [r.text for r in responses] == [ANSWERS["count"][0], ANSWERS["capital"][0], ANSWERS["unicode"][0]]
    conversations = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "capital"}]] * 2
    assert [r.text for r in pipe(conversations)] == [ANSWERS["capital"][0]] * 2


def test_do_preprocess_false_tokenizes_the_raw_prompt(pipe, hf_tokenizer):
    response = pipe("capital of Italy", do_preprocess=False)
    assert response.input_token_len == len(hf_tokenizer("capital of Italy")["input_ids"])
    with pytest.raises(ValueError, match="do_preprocess=False takes a string"):
        pipe([{"role": "user", "content": "hi"}], do_preprocess=False)


def test_n_samples_use_distinct_reproducible_seeds(pipe):
    cfg = GenerationConfig(n=5, do_sample=True, random_seed=1234)
    first = pipe("favourite colour?", cfg)
    assert [r.index for r in first] == [0, 1, 2, 3, 4]
    texts = [r.text for r in first]
    assert len(set(texts)) > 1, "each sample must get its own seed"
    assert [r.text for r in pipe("favourite colour?", cfg)] == texts
    batch = pipe(["colour one", "colour two"], GenerationConfig(n=2, random_seed=7))
    assert [r.index for r in batch] == [0, 1, 2, 3]


def test_streamed_pieces_add_up_to_the_whole_response(pipe):
    whole = pipe("unicode please")
    pieces = list(pipe.stream_infer("unicode please"))
    assert len(pieces) > 3
    assert "".join(p.text for p in pieces) == whole.text
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids
    assert [p.finish_reason for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    assert pieces[-1].finish_reason == "stop"
    assert [p.generate_token_len for p in pieces] == list(range(1, len(pieces) + 1))


def test_stop_string_across_tokens_cuts_output_and_aborts_engine_request(pipe, hf_tokenizer):
    engine = pipe.async_pipeline.engine
    aborted_before = set(engine.aborted)
    full = ANSWERS["count"][0]
    stop = "four, five"
    assert len(hf_tokenizer.encode(stop, add_special_tokens=False)) >= 3
    response = pipe("count", GenerationConfig(stop_words=[stop, "never"]))
    assert response.text == full[: full.index(stop)]
    assert (response.finish_reason, response.stop_str) == ("stop", stop)
    assert len(response.token_ids) < len(hf_tokenizer.encode(full, add_special_tokens=False))
    # The matched stop string aborts the engine request (right after the last piece reached us).
    assert _wait_until(lambda: len(engine.aborted - aborted_before) == 1 and not engine.requests)
    (aborted,) = engine.aborted - aborted_before
    assert aborted not in engine.finished
    assert engine.abort_calls.count(aborted) == 1, "a request is aborted once"
    kept = pipe("count", GenerationConfig(stop_words=[stop], include_stop_str_in_output=True))
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_max_new_tokens_ends_with_length(pipe, hf_tokenizer):
    response = pipe("count", GenerationConfig(max_new_tokens=4))
    assert response.finish_reason == "length" and len(response.token_ids) == 4
    assert response.text == hf_tokenizer.decode(response.token_ids)


def test_logprobs_pass_through_per_token(pipe):
    response = pipe("capital", GenerationConfig(logprobs=2))
    assert len(response.logprobs) == len(response.token_ids)
    assert all(list(lp) == [tok] for lp, tok in zip(response.logprobs, response.token_ids, strict=True))


def test_chat_session_carries_history(pipe):
    session = pipe.chat("What is the capital of France?")
    assert session.response.text == ANSWERS["capital"][0]
    first_prompt_len = session.response.input_token_len
    session = pipe.chat("And its favourite colour?", session=session)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == ANSWERS["capital"][0]
    assert session.response.input_token_len > first_prompt_len + 5
    session.reset()
    assert session.messages == [] and isinstance(session, Session)


@pytest.mark.parametrize(
    ("prompt", "config", "message"),
    [
        ("", None, "empty"),
        ([], None, "prompts must be"),
        ([{"role": "robot", "content": "hi"}], None, "robot"),
        ([{"role": "user"}], None, "content"),
        (42, None, "prompts must be"),
        ("count", GenerationConfig(max_new_tokens=250), "exceeds the session length 256"),
        ("x " * 300, None, "session length is 256"),
    ],
)
def test_bad_input_raises_and_the_pipeline_keeps_serving(pipe, prompt, config, message):
    with pytest.raises(ValueError, match=message):
        pipe(prompt, config)
    assert pipe("capital").text == ANSWERS["capital"][0]


def test_embed_needs_an_engine_that_embeds_and_checks_its_input_first(pipe):
    async_pipe = pipe.async_pipeline

    def embed(*args, **kwargs):
        return asyncio.run_coroutine_threadsafe(async_pipe.embed(*args, **kwargs), pipe._loop).result()

    with pytest.raises(NotImplementedError, match="ScriptedEngine engine does not compute embeddings"):
        embed("capital")
    with pytest.raises(ValueError, match="inputs is empty"):
        embed("")
    with pytest.raises(ValueError, match="session length is 256"):
        embed(list(range(1, 258)))
    with pytest.raises(ValueError, match="pooling"):
        embed("capital", pooling="cls")


def test_leaving_a_stream_early_aborts_the_engine_request(pipe, monkeypatch):
    monkeypatch.setattr(ScriptedEngine, "step_delay", 0.05)  # the request must still be running when we leave
    engine = pipe.async_pipeline.engine
    before = set(engine.aborted)
    stream = pipe.stream_infer("count")
    next(stream)
    stream.close()
    assert _wait_until(lambda: engine.aborted - before and not engine.requests), "closing must abort the request"
    assert engine.stats().num_running == 0
    (aborted,) = engine.aborted - before
    assert engine.abort_calls.count(aborted) == 1, "a request is aborted once"


def test_threads_share_one_pipeline(pipe):
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        results[i] = pipe(["capital", "count", "unicode"][i % 3]).text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {i: ANSWERS[["capital", "count", "unicode"][i % 3]][0] for i in range(6)}


def test_blocking_call_inside_a_running_event_loop(pipe):
    """As in Jupyter, where the caller's thread already runs a loop."""

    async def notebook_cell() -> str:
        return pipe("capital").text

    assert asyncio.run(notebook_cell()) == ANSWERS["capital"][0]


def test_async_pipeline_streams_in_the_callers_loop(default_model_dir):
    engine = ScriptedEngine(default_model_dir)
    async_pipe = AsyncPipeline(engine, default_model_dir)

    async def run() -> list:
        return [piece async for piece in async_pipe.generate("capital", GenerationConfig(n=2, random_seed=3))]

    pieces = asyncio.run(run())
    assert {p.index for p in pieces} == {0, 1}
    for index in (0, 1):
        assert "".join(p.text for p in pieces if p.index == index) == ANSWERS["capital"][0]


def test_auto_backend_picks_the_highest_priority_supporting_engine(default_model_dir):
    from lm_core.engine_registry import select_engine

    class Preferred(ScriptedEngine):
        priority = 10

    class Unsupported(ScriptedEngine):
        priority = 20

        @classmethod
        def supports(cls, model_path) -> bool:
            return False

    register_engine("preferred", Preferred)
    register_engine("unsupported", Unsupported)
    try:
        assert select_engine("auto", default_model_dir) is Preferred
        assert select_engine("unsupported", default_model_dir) is Unsupported
        with pytest.raises(ValueError, match="unknown backend 'nope'"):
            select_engine("nope", default_model_dir)
    finally:
        unregister_engine("preferred")
        unregister_engine("unsupported")


def test_closed_pipeline_refuses_work(default_model_dir):
    pipe = Pipeline(AsyncPipeline(ScriptedEngine(default_model_dir), default_model_dir))
    assert pipe("capital").text == ANSWERS["capital"][0]
    pipe.close()
    with pytest.raises(RuntimeError, match="closed"):
        pipe("capital")


def test_gen_config_as_a_dict(pipe):
    response = pipe("count", {"max_new_tokens": 4})
    assert response.finish_reason == "length" and len(response.token_ids) == 4
    pieces = list(pipe.stream_infer(["count", "capital"], {"max_new_tokens": 3}))
    assert sorted({p.index for p in pieces}) == [0, 1]
    assert sum(len(p.token_ids) for p in pieces) == 6
    session = pipe.chat("What is the capital of France?", gen_config={"max_new_tokens": 64})
    assert session.response.text == ANSWERS["capital"][0]
    with pytest.raises(ValueError, match=r"no field\(s\) max_new_token"):
        pipe("count", {"max_new_token": 4})
    with pytest.raises(ValueError, match="gen_config must be a GenerationConfig or a dict"):
        pipe("count", 4)


def test_sampling_is_the_callers_choice_and_takes_the_models_values(pipe):
    # The default model's generation_config.json recommends do_sample, temperature 0.2 and top-p 0.9.
    unset = pipe.async_pipeline.resolve_gen_config(None, 8)
    assert unset.is_greedy
    sampled = pipe.async_pipeline.resolve_gen_config({"do_sample": True}, 8)
    assert not sampled.is_greedy and (sampled.temperature, sampled.top_p) == (0.2, 0.9)
    assert pipe.async_pipeline.resolve_gen_config({"do_sample": True, "top_p": 0.5}, 8).top_p == 0.5


def _count_renders(monkeypatch, async_pipe) -> list[int]:
    """A counter of the pipeline's chat template renders (the real template still renders)."""
    template = async_pipe.chat_template
    calls = [0]
    real = template.render

    def counting_render(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(template, "render", counting_render)
    return calls


@pytest.mark.parametrize("n", [1, 3])
def test_a_prompt_is_rendered_once_per_request(pipe, monkeypatch, n):
    renders = _count_renders(monkeypatch, pipe.async_pipeline)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    responses = pipe(messages, GenerationConfig(n=n, random_seed=1))
    assert [r.text for r in (responses if n > 1 else [responses])] == [ANSWERS["capital"][0]] * n
    assert renders[0] == 1
    pieces = list(pipe.stream_infer(["capital?", "colour?"], GenerationConfig(n=n, random_seed=1)))
    assert {p.index for p in pieces} == set(range(2 * n))
    assert renders[0] == 3, "one render per prompt of the batch"


def test_a_prepared_request_is_generated_without_rendering_again(pipe, monkeypatch):
    async_pipe = pipe.async_pipeline
    renders = _count_renders(monkeypatch, async_pipe)
    rendered = async_pipe.render([{"role": "user", "content": "capital"}])
    prepared = async_pipe.prepare(rendered, {"max_new_tokens": 64})
    assert renders[0] == 1 and prepared.prompt_ids == rendered.token_ids

    async def run() -> str:
        return "".join([piece.text async for piece in async_pipe.generate(prepared)])

    assert asyncio.run_coroutine_threadsafe(run(), pipe._loop).result() == ANSWERS["capital"][0]
    assert renders[0] == 1
    with pytest.raises(ValueError, match="PreparedRequest carries its config"):
        asyncio.run_coroutine_threadsafe(anext(async_pipe.generate(prepared, {"n": 2})), pipe._loop).result()


def test_bad_words_reach_the_engine_as_the_tokenizers_ids(pipe, hf_tokenizer):
    words = ["Paris", "capital of", "Paris"]
    response = pipe("capital", GenerationConfig(bad_words=words))
    request = pipe.async_pipeline.engine.received[_last_request_id(pipe)]
    expected = {
        tuple(hf_tokenizer.encode(prefix + word, add_special_tokens=False)) for word in words for prefix in ("", " ")
    }
    assert len(request.bad_word_ids) == len(expected) == 4
    assert {tuple(ids) for ids in request.bad_word_ids} == expected
    assert response.text == ANSWERS["capital"][0]  # the scripted engine does not apply them; the ids are the point
    pipe("capital")
    assert pipe.async_pipeline.engine.received[_last_request_id(pipe)].bad_word_ids is None


def _last_request_id(pipe) -> str:
    return list(pipe.async_pipeline.engine.received)[-1]


def _former_server_visible_ids(piece, stop_ids: set[int], include_stop: bool) -> list[int]:
    """How lm-serve decided a piece's visible tokens before `Response` said so (the rule that must not change)."""
    ids = piece.token_ids
    if piece.finish_reason == "stop" and ids and ids[-1] in stop_ids and not include_stop and piece.stop_str is None:
        return ids[:-1]
    return ids


COMMA = "<comma>"  # stands for the id of "," (a stop id that ends the scripted answer early)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"include_stop_str_in_output": True},
        {"ignore_eos": True, "max_new_tokens": 30},
        {"stop_words": ["four, five"]},
        {"stop_words": ["ten."]},  # the stop string ends right before EOS
        {"stop_token_ids": COMMA},
        {"stop_token_ids": COMMA, "include_stop_str_in_output": True},
        {"stop_token_ids": COMMA, "min_new_tokens": 5},
    ],
)
def test_response_visibility_equals_the_servers_former_rule(pipe, hf_tokenizer, fields):
    if fields.get("stop_token_ids") == COMMA:
        fields = {**fields, "stop_token_ids": hf_tokenizer.encode(",", add_special_tokens=False)}
    config = GenerationConfig(**fields)
    stop_ids = set(config.stop_token_ids or ())
    if not config.ignore_eos:
        stop_ids.update(pipe.tokenizer.eos_token_ids)
    pieces = list(pipe.stream_infer("count", config))
    for piece in pieces:
        assert piece.visible_token_ids == _former_server_visible_ids(piece, stop_ids, config.include_stop_str_in_output)
    whole = pipe("count", config)
    assert whole.visible_token_ids == _former_server_visible_ids(whole, stop_ids, config.include_stop_str_in_output)
    assert whole.visible_token_ids == [t for p in pieces for t in p.visible_token_ids]
    hidden = len(whole.token_ids) - len(whole.visible_token_ids)
    assert hidden == (
        1 if whole.finish_reason == "stop" and whole.stop_str is None and not config.include_stop_str_in_output else 0
    )
