"""`POST /v1/completions`: text completion of one or more prompts (strings or token ids).

With `echo` and `logprobs` the logprobs cover the prompt too (its first token has none), as lm-eval-harness reads
them to score a continuation; `max_tokens: 0` with `echo` scores the prompt without generating. vLLM's
`prompt_logprobs` extension adds each choice's prompt logprobs in vLLM's shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lm_core.generation_config import GenerationConfig
from lm_core.response import Response as Piece
from lm_serve.errors import APIError
from lm_serve.generation import ClientDisconnected, Generation, PromptJob, prepare_job
from lm_serve.logprobs import CompletionLogprobs, TokenTexts, prompt_logprobs_json
from lm_serve.offload import off_loop
from lm_serve.output import usage_json
from lm_serve.protocol import CompletionRequest
from lm_serve.request_guards import GuardedRoute
from lm_serve.sampling import build_gen_config
from lm_serve.state import ServerState
from lm_serve.streaming import ChunkWriter, SSEResponse

router = APIRouter(route_class=GuardedRoute)


def _prompts(prompt: Any) -> list[Any]:
    """The request's prompts: one string or id list becomes a batch of one."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise APIError("prompt is empty", param="prompt")
    return list(prompt)


def _prompt_jobs(
    state: ServerState, body: CompletionRequest, gen_config: GenerationConfig
) -> tuple[list[PromptJob], list[str]]:
    """Each prompt prepared by the pipeline (checked against the context) and, with `echo`, the text to repeat."""
    jobs: list[PromptJob] = []
    echoes: list[str] = []
    for p, prompt in enumerate(_prompts(body.prompt)):
        job = prepare_job(state, prompt, gen_config, param="prompt", index_offset=p * body.n)
        jobs.append(job)
        if body.echo:
            echoes.append(prompt if isinstance(prompt, str) else state.tokenizer.decode(job.prompt_ids))
        else:
            echoes.append("")
    return jobs, echoes


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Text completion (OpenAI's legacy API): streamed as SSE chunks when `stream` is true."""
    state: ServerState = request.app.state.lm
    state.check_model(body.model)
    if body.suffix:
        raise APIError("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError("best_of other than n is not supported", param="best_of")
    if body.max_tokens == 0 and not body.echo:
        raise APIError("max_tokens must be at least 1 (0 only with echo, to score the prompt)", param="max_tokens")
    if body.prompt_logprobs is not None and body.stream:
        raise APIError("prompt_logprobs are not available with stream: true", param="prompt_logprobs")
    gen_config = build_gen_config(
        body,
        max_tokens=body.max_tokens,
        logprobs=body.logprobs,
        response_format=body.response_format.to_engine() if body.response_format else None,
        model_defaults=state.pipeline.generation_defaults,
        vocab_size=state.tokenizer.vocab_size,
    )
    num_prompt_top = [n for n in (body.logprobs if body.echo else None, body.prompt_logprobs) if n is not None]
    if num_prompt_top:
        gen_config = gen_config.replace(prompt_logprobs=max(num_prompt_top))
    jobs, echoes = await off_loop(request, _prompt_jobs, state, body, gen_config)
    gen = await Generation(state, jobs).start()
    ctx = _CompletionContext(state, body, echoes, [j.prompt_ids for j in jobs])
    if body.stream:
        return SSEResponse(ctx.events(gen), gen.aclose)
    try:
        results = await gen.collect(request)
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(ctx.completion(results))


class _CompletionContext:
    """What building one request's answer needs."""

    def __init__(
        self, state: ServerState, body: CompletionRequest, echoes: list[str], prompt_ids: list[list[int]]
    ) -> None:
        self.state = state
        self.body = body
        self.echoes = echoes
        self.prompt_ids = prompt_ids
        self.num_prompt = sum(len(ids) for ids in prompt_ids)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.writer = ChunkWriter("text_completion", "cmpl", state.model_name, include_usage, self.num_prompt)
        self.texts = TokenTexts(state.tokenizer)
        self.started: set[int] = set()
        self.num_choices = len(echoes) * body.n
        self._logprobs: dict[int, CompletionLogprobs] = {}

    def _echo(self, index: int) -> str:
        return self.echoes[index // self.body.n]

    def _logprobs_of(self, index: int, piece: Piece) -> dict[str, Any] | None:
        """The choice's logprobs object for `piece`; a choice's first piece (which carries the prompt logprobs)
        starts with the echoed prompt's tokens."""
        if self.body.logprobs is None:
            return None
        state = self._logprobs.get(index)
        prompt = None
        if state is None:
            state = self._logprobs[index] = CompletionLogprobs(self.body.logprobs, self.texts)
            if self.body.echo:
                ids = self.prompt_ids[index // self.body.n]
                entries: list[dict[int, float] | None] = piece.prompt_logprobs or [None] * len(ids)
                prompt = state.render(ids, entries)
                state.offset = len(self._echo(index))  # generated text starts right after the echoed prompt
        out = state.render(piece.visible_token_ids, piece.logprobs)
        return out if prompt is None else {key: prompt[key] + out[key] for key in out}

    def _prompt_logprobs_of(self, index: int, result: Piece) -> list[dict[str, Any] | None] | None:
        """vLLM's `prompt_logprobs` of a choice, when the request asked for them."""
        if self.body.prompt_logprobs is None:
            return None
        ids = self.prompt_ids[index // self.body.n]
        entries: list[dict[int, float] | None] = result.prompt_logprobs or [None] * len(ids)
        return prompt_logprobs_json(ids, entries, self.body.prompt_logprobs, self.texts)

    def completion(self, results: dict[int, Piece]) -> dict[str, Any]:
        """The non-streamed `text_completion` object."""
        choices: list[dict[str, Any]] = []
        for index in range(self.num_choices):
            result = results[index]
            if result.finish_reason == "error":
                raise APIError(result.error or "generation failed", status_code=500, type="server_error")
            choice: dict[str, Any] = {
                "index": index,
                "text": self._echo(index) + result.text,
                "logprobs": self._logprobs_of(index, result),
                "finish_reason": result.finish_reason,
            }
            if self.body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._prompt_logprobs_of(index, result)
            choices.append(choice)
        num_completion = sum(r.generate_token_len for r in results.values())
        return {
            "id": self.writer.id,
            "object": "text_completion",
            "created": self.writer.created,
            "model": self.state.model_name,
            "choices": choices,
            "usage": usage_json(self.num_prompt, num_completion),
            "system_fingerprint": None,
        }

    def _choices(self, piece: Piece) -> list[dict[str, Any]]:
        """The chunk choice of one piece; a choice's first piece starts with the echoed prompt."""
        i = piece.index
        text = piece.text
        if i not in self.started:
            self.started.add(i)
            text = self._echo(i) + text
        logprobs = self._logprobs_of(i, piece)
        if not text and piece.finish_reason is None and not (logprobs and logprobs["tokens"]):
            return []
        return [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": piece.finish_reason}]

    def events(self, gen: Generation) -> AsyncIterator[str]:
        """The SSE stream of `text_completion` chunks."""
        return self.writer.events(gen, self._choices)
