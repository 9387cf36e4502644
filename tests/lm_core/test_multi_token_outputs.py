"""Engine outputs that carry several tokens (a multi-token step: speculative decoding, multi-step decoding) give the
same responses as one token per output: stop strings are matched token by token, so a stop string that completes at
any position of a multi-token output ends the response there, and the tokens after it are dropped with their
logprobs.

The engine here emits a fixed answer through the real SmolLM2 tokenizer, `per_output` tokens at a time; the
reference is the same engine with one token per output, through the same pipeline.
"""

from __future__ import annotations

import asyncio

import pytest

from lm_core import AsyncPipeline, GenerationConfig
from lm_core.engine import Engine, EngineOutput, EngineStats

transformers = pytest.importorskip("transformers")

ANSWER = "One, two, three, four, five, six, seven, eight, nine, ten."


class GroupedEngine(Engine):
    """Emits ANSWER then EOS, `per_output` tokens per output (the last output may hold fewer)."""

    def __init__(self, model_path, per_output: int) -> None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
        self.tokens = [*tokenizer.encode(ANSWER, add_special_tokens=False), tokenizer.eos_token_id]
        self.per_output = per_output

    @classmethod
    def from_pretrained(cls, model_path, config=None):
        return cls(model_path, 1)

    @property
    def session_len(self) -> int:
        return 512

    async def generate(self, request):
        stop_ids = set(request.gen_config.stop_token_ids or ())
        for start in range(0, len(self.tokens), self.per_output):
            group = self.tokens[start : start + self.per_output]
            finish = None
            for j, token in enumerate(group):
                if token in stop_ids:
                    group, finish = group[: j + 1], "stop"
                    break
            logprobs = [{t: -0.1 * (start + j)} for j, t in enumerate(group)] if request.gen_config.logprobs else None
            yield EngineOutput(request.request_id, group, finish, logprobs=logprobs)
            await asyncio.sleep(0)
            if finish:
                return

    async def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats()

    async def close(self) -> None:
        pass


def _run(pipe: AsyncPipeline, cfg: GenerationConfig):
    async def collect():
        pieces = [p async for p in pipe.generate([1, 2, 3], cfg)]
        return (
            "".join(p.text for p in pieces),
            [t for p in pieces for t in p.token_ids],
            [lp for p in pieces for lp in p.logprobs or []],
            pieces[-1].finish_reason,
            pieces[-1].generate_token_len,
        )

    return asyncio.run(collect())


@pytest.mark.parametrize("per_output", [2, 4])
def test_a_stop_string_at_any_position_of_a_multi_token_output(default_model_dir, per_output):
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    single = AsyncPipeline(GroupedEngine(default_model_dir, 1), default_model_dir)
    grouped = AsyncPipeline(GroupedEngine(default_model_dir, per_output), default_model_dir)
    tokens = single.engine.tokens
    ended_at = set()
    for position in range(1, 12):
        # A stop string that completes exactly at token `position`: its last character comes from that token.
        before = tokenizer.decode(tokens[:position])
        upto = tokenizer.decode(tokens[: position + 1])
        stop = upto[len(before) - 2 :] if len(upto) > len(before) else None
        if not stop or stop in before:
            continue
        cfg = GenerationConfig(max_new_tokens=64, stop_words=[stop], logprobs=1)
        expected = _run(single, cfg)
        got = _run(grouped, cfg)
        assert got == expected, (position, stop)
        text, ids, logprobs, reason, count = got
        assert reason == "stop" and ids == tokens[: position + 1] and len(logprobs) == len(ids) == count
        assert stop not in text and ANSWER.startswith(text)
        ended_at.add(position % per_output)
    assert ended_at == set(range(per_output))  # every position within an output was a stop's last token


@pytest.mark.parametrize("per_output", [3, 5])
def test_multi_token_outputs_without_a_stop_string_are_whole(default_model_dir, per_output):
    single = AsyncPipeline(GroupedEngine(default_model_dir, 1), default_model_dir)
    grouped = AsyncPipeline(GroupedEngine(default_model_dir, per_output), default_model_dir)
    for cfg in (GenerationConfig(max_new_tokens=64), GenerationConfig(max_new_tokens=64, stop_words=["zebra"])):
        expected = _run(single, cfg)
        assert _run(grouped, cfg) == expected
        assert expected[0] == ANSWER and expected[3] == "stop"
