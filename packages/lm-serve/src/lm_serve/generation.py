"""`Generation`: one request's engine work, started before any HTTP header is sent, closed exactly once.

Starting awaits the first piece, so a request the engine rejects (a `Response` with finish_reason "error" and no
tokens) is answered with a 400 even when the client asked for a stream. Closing aborts whatever still runs in the
engine (client gone, error, or normal end) and frees the request's concurrency slot.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import Request

from lm_core.async_pipeline import PreparedRequest, Prompt, RenderedPrompt, merge_streams
from lm_core.generation_config import GenerationConfig
from lm_core.response import Response
from lm_serve.errors import APIError, ServerShuttingDown, bad_request
from lm_serve.metrics import RequestTracker
from lm_serve.state import ServerState


@dataclass(frozen=True)
class PromptJob:
    """One prompt of a request, prepared by the pipeline (token ids, resolved config with n samples), and the index
    of its first sample."""

    prepared: PreparedRequest
    index_offset: int = 0

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt's token ids."""
        return self.prepared.prompt_ids

    @property
    def gen_config(self) -> GenerationConfig:
        """The resolved config (model defaults applied, every stop id)."""
        return self.prepared.gen_config


def prepare_job(
    state: ServerState,
    prompt: Prompt | RenderedPrompt,
    gen_config: GenerationConfig,
    *,
    param: str | None,
    index_offset: int = 0,
    do_preprocess: bool = False,
    multimodal: list[dict[str, Any]] | None = None,
) -> PromptJob:
    """`prompt` prepared once by the pipeline, or a 400 naming `param`: bad prompt ids, or a prompt (plus
    max_tokens) beyond the engine's session length, refused here so that a streamed answer fails before it starts.

    Blocking (tokenizes): routes call it through `off_loop`.
    """
    pipe = state.pipeline
    try:
        prepared = pipe.prepare(prompt, gen_config, do_preprocess=do_preprocess, multimodal=multimodal)
        pipe.check_length(prepared)
    except ValueError as exc:
        raise bad_request(exc, param=param) from None
    return PromptJob(prepared, index_offset)


class ClientDisconnected(Exception):
    """The client went away before the answer was ready."""


class Generation:
    """Iterate with `async for piece in gen` after `await gen.start()`; always `await gen.aclose()`."""

    def __init__(self, state: ServerState, jobs: list[PromptJob], request_id: str | None = None) -> None:
        self.state = state
        self.jobs = jobs
        self.request_id = request_id or uuid.uuid4().hex
        self.num_prompt_tokens = sum(len(job.prompt_ids) for job in jobs)
        self.num_sequences = sum(job.gen_config.n for job in jobs)
        self._stream: AsyncIterator[Response] | None = None
        self._first: Response | None = None
        self._tracker: RequestTracker | None = None
        self._holds_slot = False
        self._closed = False

    async def start(self) -> Generation:
        """Take a concurrency slot per sequence (400 if the request is larger than allowed, 429 if the slots are
        taken), submit every prompt and wait for the first piece (400 if refused)."""
        if self.state.draining:
            raise ServerShuttingDown()
        self.state.check_num_sequences(len(self.jobs), max((job.gen_config.n for job in self.jobs), default=1))
        self.state.limiter.acquire(self.num_sequences)
        self._holds_slot = True
        self.state.generations.add(self)
        try:
            pipe = self.state.pipeline
            # All prompts and samples of this request form one group: the engine shares its batch fairly between
            # groups, so a request of thousands of sequences cannot starve one sent after it.
            streams = [
                pipe.generate(
                    job.prepared,
                    request_id=f"{self.request_id}-{p}",
                    index_offset=job.index_offset,
                    group=self.request_id,
                )
                for p, job in enumerate(self.jobs)
            ]
            self._stream = streams[0] if len(streams) == 1 else merge_streams(streams)
            start = time.perf_counter()
            try:
                first = self._check(await self._stream.__anext__())
            except StopAsyncIteration:
                raise APIError(
                    "the engine returned nothing for this request", status_code=500, type="server_error"
                ) from None
            except ValueError as exc:
                raise bad_request(exc) from None
            if first.finish_reason == "error" and not first.token_ids:
                failure = pipe.engine.failure
                if failure is not None:  # the engine is down, not the request at fault
                    raise APIError(failure, status_code=503, type="server_error", code="engine_unavailable")
                raise APIError(first.error or "the engine rejected this request")
            if self.state.metrics is not None:  # only requests the engine accepted count
                self._tracker = self.state.metrics.track(self.num_prompt_tokens, self.num_sequences, start)
            self._first = first
            return self
        except BaseException:
            await self.aclose()
            raise

    async def __aiter__(self) -> AsyncIterator[Response]:
        """The pieces of every sequence, the first one (awaited by `start`) included."""
        if self._first is None or self._stream is None:
            raise RuntimeError("Generation.start() must be awaited first")
        piece, self._first = self._first, None
        self._record(piece)
        yield piece
        async for piece in self._stream:
            self._record(self._check(piece))
            yield piece

    def _check(self, piece: Response) -> Response:
        # At shutdown the engine requests are aborted (`interrupt`): their streams end with finish_reason "abort".
        if piece.finish_reason == "abort" and self.state.draining:
            raise ServerShuttingDown()
        return piece

    async def interrupt(self) -> None:
        """Abort this request's engine work; the answer then ends with `ServerShuttingDown` (the server stops)."""
        pipe = self.state.pipeline
        for p, job in enumerate(self.jobs):
            for engine_id in pipe.engine_request_ids(f"{self.request_id}-{p}", job.gen_config.n):
                await pipe.abort(engine_id)

    def _record(self, piece: Response) -> None:
        if self._tracker is None:
            return
        self._tracker.tokens(piece.index, len(piece.token_ids))
        if piece.finish_reason is not None:
            self._tracker.finish(piece.index, piece.finish_reason)

    async def aclose(self) -> None:
        """Abort what still runs and release the slot; safe to call twice and from a cancelled task."""
        if self._closed:
            return
        self._closed = True
        self.state.generations.discard(self)
        # Shielded: a cancelled request (client gone) must still abort its engine work and free its KV blocks.
        with anyio.CancelScope(shield=True):
            try:
                if self._stream is not None:
                    await _aclose(self._stream)
            finally:
                if self._tracker is not None:
                    self._tracker.close()
                if self._holds_slot:
                    self.state.limiter.release(self.num_sequences)

    async def collect(self, request: Request) -> dict[int, Response]:
        """The whole output per sequence index (non-streamed requests); aborts if the client disconnects."""
        results: dict[int, Response] = {}

        async def drain() -> None:
            async for piece in self:
                results.setdefault(piece.index, Response(text="", index=piece.index)).extend(piece)

        drain_task = asyncio.ensure_future(drain())
        watch_task = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({drain_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if drain_task not in done:
                raise ClientDisconnected()
            drain_task.result()
            return results
        finally:
            for task in (drain_task, watch_task):
                task.cancel()
            await asyncio.gather(drain_task, watch_task, return_exceptions=True)
            await self.aclose()


async def _aclose(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the request body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
