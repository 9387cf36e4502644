"""`pipeline()`: the blocking API over `AsyncPipeline`, usable from scripts, threads and Jupyter alike.

The pipeline owns an event loop running in a daemon thread; every call hands a coroutine to that loop and waits for
it. The caller's thread never runs a loop of ours, so a caller that already has one running (Jupyter) is fine.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from lm_core.async_pipeline import AsyncPipeline, PreparedRequest, Prompt, merge_streams
from lm_core.generation_config import GenerationConfig, as_gen_config
from lm_core.multimodal import is_media_tuple
from lm_core.response import Response

if TYPE_CHECKING:
    from lm_core.tokenizer import Tokenizer


def pipeline(
    model: str | None = None,
    backend: str = "auto",
    backend_config: Any = None,
    chat_template: Any = None,
    *,
    allow_special_tokens_in_content: bool = False,
    media_policy: Any = None,
) -> Pipeline:
    """Load `model` (None: the default model) on an engine (`"auto"`: the best installed one).

    `chat_template` is a built-in template name, a path to a .jinja/.json file, or None for the model's own.
    `allow_special_tokens_in_content`: text in messages that spells a special token becomes that token (by default
    it stays text, so a user cannot forge the template's turns). `media_policy`: an `lm_vl.MediaPolicy` for the
    images and videos of a vision-language model's prompts (default: lm-vl's strict policy). Prompts with images are
    messages with image parts, or ``(prompt, image)`` / ``(prompt, [images])`` tuples.
    """
    return Pipeline(
        AsyncPipeline.from_model(
            model,
            backend,
            backend_config,
            chat_template,
            allow_special_tokens_in_content=allow_special_tokens_in_content,
            media_policy=media_policy,
        )
    )


@dataclass
class Session:
    """A multi-turn conversation for `Pipeline.chat`: its messages and the latest response."""

    messages: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])
    response: Response | None = None

    def reset(self) -> None:
        """Forget the conversation."""
        self.messages.clear()
        self.response = None


class Pipeline:
    """Blocking generation: `pipe(prompts)`, `pipe.stream_infer(prompts)`, `pipe.chat(prompt, session)`."""

    def __init__(self, async_pipeline: AsyncPipeline) -> None:
        self.async_pipeline = async_pipeline
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lm-pipeline-loop", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""
        return self.async_pipeline.tokenizer

    def __call__(
        self,
        prompts: Prompt | Sequence[Prompt],
        gen_config: GenerationConfig | dict[str, Any] | None = None,
        do_preprocess: bool = True,
    ) -> Response | list[Response]:
        """Generate for one prompt or a batch; one prompt with n == 1 gives a `Response`, otherwise a list.

        `gen_config` is a `GenerationConfig` or a dict of its fields (an unknown key is a ValueError naming it).
        """
        batch, single = _as_batch(prompts)
        gen_config = as_gen_config(gen_config)
        n = gen_config.n
        results = [Response(text="", index=i) for i in range(len(batch) * n)]
        for piece in self.stream_infer(batch, gen_config, do_preprocess):
            results[piece.index].extend(piece)
        return results[0] if single and n == 1 else results

    def stream_infer(
        self,
        prompts: Prompt | Sequence[Prompt],
        gen_config: GenerationConfig | dict[str, Any] | None = None,
        do_preprocess: bool = True,
    ) -> Generator[Response, None, None]:
        """Yield `Response` pieces of every sequence as they are generated (see `Response.index`).

        Invalid prompts or configs raise before anything is generated. Leaving the loop early aborts the rest.
        """
        self._check_open()
        batch, _ = _as_batch(prompts)
        gen_config = as_gen_config(gen_config)
        n = gen_config.n
        # Prepare (and length-check) every prompt first, so a bad one in a batch fails the call before any runs; each
        # prompt is rendered and tokenized here only, and generation consumes the prepared requests.
        prepared: list[PreparedRequest] = []
        for prompt in batch:
            request = self.async_pipeline.prepare(prompt, gen_config, do_preprocess=do_preprocess)
            self.async_pipeline.check_length(request)
            prepared.append(request)
        items: queue.Queue[Response | Exception | None] = queue.Queue()

        async def produce() -> None:
            streams = [self.async_pipeline.generate(p, index_offset=i * n) for i, p in enumerate(prepared)]
            try:
                if len(streams) == 1:
                    async for piece in streams[0]:
                        items.put(piece)
                else:
                    async for piece in merge_streams(streams):
                        items.put(piece)
            except asyncio.CancelledError:  # the consumer left early; closing the streams frees their requests
                raise
            except Exception as exc:  # handed to the consuming thread, which re-raises it
                items.put(exc)
            finally:
                items.put(None)  # the end

        future = asyncio.run_coroutine_threadsafe(produce(), self._loop)
        try:
            while (item := items.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            if not future.done():
                future.cancel()  # cancelling closes the streams, which abort their engine requests

    def chat(
        self,
        prompt: str | list[dict[str, Any]],
        session: Session | None = None,
        gen_config: GenerationConfig | dict[str, Any] | None = None,
    ) -> Session:
        """Add `prompt` (a user message, or messages) to `session` (a new one when None), answer, and return it."""
        session = session if session is not None else Session()
        new = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        response = self(session.messages + new, as_gen_config(gen_config).replace(n=1))
        if not isinstance(response, Response):  # one conversation with n == 1 gives one Response
            raise TypeError(f"expected one Response, got {type(response).__name__}")
        session.messages.extend(new)
        session.messages.append({"role": "assistant", "content": response.text})
        session.response = response
        return session

    def close(self) -> None:
        """Stop the engine and the pipeline's event loop."""
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self.async_pipeline.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this pipeline is closed")

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _as_batch(prompts: object) -> tuple[list[Prompt], bool]:
    """Split the accepted prompt shapes into (list of prompts, whether a single prompt was given)."""
    if isinstance(prompts, str) or is_media_tuple(prompts):  # a text, or one (prompt, images) tuple
        return [cast(Prompt, prompts)], True
    if isinstance(prompts, Sequence) and prompts:
        items = cast(Sequence[Any], prompts)
        if isinstance(items[0], (dict, int)):  # one message list, or one list of token ids
            return [items], True
        return list(items), False
    raise ValueError(
        "prompts must be a string, a list of strings, a message list or a list of message lists, "
        f"got {type(cast(object, prompts)).__name__} {str(cast(object, prompts))[:80]!r}"
    )
