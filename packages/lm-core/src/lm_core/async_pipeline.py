"""`AsyncPipeline`: text in, streamed `Response`s out, over any `Engine`. lm-serve and `Pipeline` build on it.

Per request: chat template -> token ids -> n engine requests (one per sample, distinct seeds) -> for each, an
incremental detokenizer and a stop-string matcher; a matched stop string aborts that engine request at once.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from lm_core.engine import Engine, EngineOutput, EngineRequest
from lm_core.generation_config import GenerationConfig, as_gen_config, load_model_generation_defaults
from lm_core.response import Response

Prompt = str | Sequence[dict[str, Any]] | Sequence[int]
# Prompts up to this many characters are tokenized on the event loop; longer ones in a worker thread.
INLINE_PROMPT_CHARS = 32 * 1024


def _num_chars(prompt: Any) -> int:
    """About how many characters of text `prompt` holds (token ids count as none)."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
        return sum(len(m.get("content") if isinstance(m.get("content"), str) else str(m)) for m in prompt)
    return 0


class AsyncPipeline:
    """Generation over one engine and one tokenizer; every method is a coroutine or async iterator."""

    def __init__(
        self,
        engine: Engine,
        model_path: str | os.PathLike[str],
        chat_template: Any = None,
        *,
        allow_special_tokens_in_content: bool = False,
    ) -> None:
        """`allow_special_tokens_in_content`: text in messages that spells a special token (``<|im_start|>``) is
        tokenized as that token; by default it stays ordinary text, so users cannot forge the template's turns."""
        from lm_core.chat_template import load_chat_template
        from lm_core.tokenizer import Tokenizer

        self.engine = engine
        self.model_path = Path(model_path)
        self.tokenizer = Tokenizer.from_pretrained(self.model_path)
        if chat_template is None or isinstance(chat_template, (str, os.PathLike)):
            chat_template = load_chat_template(chat_template, self.model_path) or load_chat_template("base")
        self.chat_template = chat_template
        self.generation_defaults = load_model_generation_defaults(self.model_path)
        if not isinstance(allow_special_tokens_in_content, bool):
            raise ValueError(
                f"allow_special_tokens_in_content must be True or False, got {allow_special_tokens_in_content!r}"
            )
        self.allow_special_tokens_in_content = allow_special_tokens_in_content

    @classmethod
    def from_model(
        cls,
        model: str | None = None,
        backend: str = "auto",
        backend_config: Any = None,
        chat_template: Any = None,
        *,
        allow_special_tokens_in_content: bool = False,
    ) -> AsyncPipeline:
        """Resolve `model`, pick and load the engine, and load the tokenizer and chat template.

        Everything that can be checked without the weights (backend name, chat template, session length against
        the model's context) is checked before the engine loads them, with a ValueError naming the problem.
        """
        from lm_core.chat_template import load_chat_template
        from lm_core.engine_registry import select_engine
        from lm_core.model_info import check_session_len
        from lm_core.resolve import resolve_model

        model_path = resolve_model(model)
        if chat_template is None or isinstance(chat_template, (str, os.PathLike)):
            chat_template = load_chat_template(chat_template, model_path) or load_chat_template("base")
        session_len = (
            backend_config.get("session_len")
            if isinstance(backend_config, dict)
            else getattr(backend_config, "session_len", None)
        )
        check_session_len(model_path, session_len)
        engine_class = select_engine(backend, model_path)
        engine = engine_class.from_pretrained(model_path, backend_config)
        return cls(engine, model_path, chat_template, allow_special_tokens_in_content=allow_special_tokens_in_content)

    # -- preprocessing -------------------------------------------------------------------------------------------

    def prompt_token_ids(
        self,
        prompt: Prompt,
        do_preprocess: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The token ids the engine sees for `prompt` (a string, an OpenAI message list, or token ids)."""
        from lm_core.messages import validate_messages

        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            if not do_preprocess:
                ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            else:
                ids = self._render([{"role": "user", "content": prompt}], tools, chat_template_kwargs)
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            if any(t < 0 or t >= self.tokenizer.vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be in [0, {self.tokenizer.vocab_size})")
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
            if not do_preprocess:
                raise ValueError("a message list needs its chat template: do_preprocess=False takes a string prompt")
            ids = self._render(validate_messages(prompt), tools, chat_template_kwargs)
        else:
            raise ValueError(
                "prompt must be a non-empty string, a non-empty list of OpenAI-style messages or a list of token ids, "
                f"got {type(prompt).__name__} {str(prompt)[:80]!r}"
            )
        if not ids:
            raise ValueError("the prompt is empty: it has no tokens")
        return ids

    def _render(self, messages, tools, chat_template_kwargs) -> list[int]:
        from lm_core.chat_templates.encoding import render_and_encode

        _, ids = render_and_encode(
            self.chat_template,
            self.tokenizer,
            messages,
            tools=tools,
            allow_special_tokens_in_content=self.allow_special_tokens_in_content,
            chat_template_kwargs=chat_template_kwargs,
        )
        return ids

    def resolve_gen_config(
        self, gen_config: GenerationConfig | dict[str, Any] | None, num_prompt_tokens: int
    ) -> GenerationConfig:
        """The user's config (or a dict of its fields) over the model's defaults, checked against the engine's length
        limit."""
        cfg = as_gen_config(gen_config).with_model_defaults(self.generation_defaults)
        limit = self.engine.session_len
        if limit is not None:
            if num_prompt_tokens >= limit:
                raise ValueError(f"the prompt has {num_prompt_tokens} tokens; the session length is {limit}")
            room = limit - num_prompt_tokens
            user_set = "max_new_tokens" in cfg.explicit_fields
            if cfg.max_new_tokens is None or (cfg.max_new_tokens > room and not user_set):
                # Unset (or left at the built-in default): generate up to the session length.
                cfg = cfg.replace(max_new_tokens=room, mark_explicit=False)
            elif cfg.max_new_tokens > room:
                raise ValueError(
                    f"prompt ({num_prompt_tokens} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the "
                    f"session length {limit}"
                )
        return cfg

    # -- generation ----------------------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: Prompt,
        gen_config: GenerationConfig | dict[str, Any] | None = None,
        *,
        do_preprocess: bool = True,
        request_id: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        index_offset: int = 0,
        group: str | None = None,
    ) -> AsyncIterator[Response]:
        """Stream `Response` pieces for all `n` samples of one prompt, interleaved as they come (see `index`).

        `group` names the client request this prompt is part of (`EngineRequest.group`; default: this call), so that
        the engine shares its capacity fairly between requests whatever their number of prompts and samples."""
        if _num_chars(prompt) > INLINE_PROMPT_CHARS:
            # Seconds of tokenizer work for a long prompt must not stall the event loop (other requests' streams).
            prompt_ids = await asyncio.to_thread(
                self.prompt_token_ids, prompt, do_preprocess, tools, chat_template_kwargs
            )
        else:
            prompt_ids = self.prompt_token_ids(prompt, do_preprocess, tools, chat_template_kwargs)
        cfg = self.resolve_gen_config(gen_config, len(prompt_ids))
        base_id = request_id or uuid.uuid4().hex
        group = group or base_id
        engine_ids = self.engine_request_ids(base_id, cfg.n)
        if cfg.n == 1:
            async for piece in self.generate_from_ids(prompt_ids, cfg, engine_ids[0], index_offset, group):
                yield piece
            return
        # n samples: distinct seeds (consecutive from the user's seed, so the whole set is reproducible).
        seeds = [cfg.random_seed + i if cfg.random_seed is not None else random.getrandbits(63) for i in range(cfg.n)]
        streams = [
            self.generate_from_ids(prompt_ids, cfg.replace(n=1, random_seed=seed), engine_id, index_offset + i, group)
            for i, (seed, engine_id) in enumerate(zip(seeds, engine_ids, strict=True))
        ]
        async for piece in merge_streams(streams):
            yield piece

    @staticmethod
    def engine_request_ids(request_id: str, n: int) -> list[str]:
        """The engine's request ids for the `n` samples `generate(..., request_id=request_id)` runs (for `abort`)."""
        return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]

    async def generate_from_ids(
        self, prompt_ids: list[int], cfg: GenerationConfig, request_id: str, index: int = 0, group: str | None = None
    ) -> AsyncIterator[Response]:
        """Stream one sequence: detokenize incrementally, apply stop strings, abort the engine request on a match."""
        from lm_core.detokenizer import IncrementalDetokenizer
        from lm_core.stop_strings import StopStringMatcher

        stop_ids = set(cfg.stop_token_ids or ())
        if not cfg.ignore_eos:
            stop_ids.update(self.tokenizer.eos_token_ids)
        request = EngineRequest(
            request_id, prompt_ids, cfg.replace(n=1, stop_token_ids=sorted(stop_ids) or None), group=group
        )
        detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids,
            skip_special_tokens=cfg.skip_special_tokens,
            spaces_between_special_tokens=cfg.spaces_between_special_tokens,
        )
        matcher = StopStringMatcher(cfg.stop_words, cfg.include_stop_str_in_output) if cfg.stop_words else None
        num_generated = 0
        finished = False
        stream = self.engine.generate(request)
        try:
            async for out in stream:
                num_generated += len(out.token_ids)
                text, stop_str = self._text_of(out, detokenizer, matcher, stop_ids, cfg)
                finish_reason = "stop" if stop_str is not None else out.finish_reason
                finished = finish_reason is not None
                yield Response(
                    text=text,
                    token_ids=list(out.token_ids),
                    input_token_len=len(prompt_ids),
                    generate_token_len=num_generated,
                    finish_reason=finish_reason,
                    logprobs=out.logprobs,
                    prompt_logprobs=out.prompt_logprobs,
                    index=index,
                    stop_str=stop_str,
                    error=out.error,
                )
                if finished:
                    break
        finally:
            await stream.aclose()
            if not finished or (matcher is not None and matcher.finished):
                # A stop string, or a consumer that went away (client disconnect): free the engine's resources now.
                await self.engine.abort(request_id)

    @staticmethod
    def _text_of(out: EngineOutput, detokenizer, matcher, stop_ids: set[int], cfg: GenerationConfig):
        ids = out.token_ids
        # The token that ended the request (EOS or a stop id) adds no text unless the user asks for stop strings.
        if out.finish_reason == "stop" and ids and ids[-1] in stop_ids and not cfg.include_stop_str_in_output:
            ids = ids[:-1]
        text = detokenizer.step(ids)
        if out.finish_reason is not None:
            text += detokenizer.finish()
        if matcher is None:
            return text, None
        text, stop_str = matcher.feed(text)
        if stop_str is None and out.finish_reason is not None:
            text += matcher.flush()
        return text, stop_str

    # -- embeddings -----------------------------------------------------------------------------------------------

    async def embed(
        self, inputs: str | list[int], pooling: str = "mean", normalize: bool = True
    ) -> tuple[list[float], int]:
        """One embedding vector for `inputs` and its number of prompt tokens.

        A string is tokenized as it is, with the tokenizer's own special tokens (BOS where it adds one) and no chat
        template; a list of ints is taken as token ids. `pooling` is "mean" (over all tokens) or "last" (the last
        token's final hidden state); `normalize` scales the vector to unit L2 norm.
        """
        from lm_core.engine import POOLING_METHODS

        if pooling not in POOLING_METHODS:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_METHODS)}, got {pooling!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        if isinstance(inputs, str):
            if not inputs:
                raise ValueError("inputs is empty: there is nothing to embed")
            if len(inputs) > INLINE_PROMPT_CHARS:
                ids = await asyncio.to_thread(self.tokenizer.encode, inputs, True)
            else:
                ids = self.tokenizer.encode(inputs, add_special_tokens=True)
        elif isinstance(inputs, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in inputs):
            ids = list(inputs)
            if any(t < 0 or t >= self.tokenizer.vocab_size for t in ids):
                raise ValueError(f"inputs token ids must be in [0, {self.tokenizer.vocab_size})")
        else:
            raise ValueError(
                f"inputs must be a string or a list of token ids, got {type(inputs).__name__} {str(inputs)[:80]!r}"
            )
        if not ids:
            raise ValueError("inputs is empty: it has no tokens")
        limit = self.engine.session_len
        if limit is not None and len(ids) > limit:
            raise ValueError(f"inputs has {len(ids)} tokens; the session length is {limit}")
        vector = await self.engine.embed(ids, pooling, normalize)
        return vector, len(ids)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def close(self) -> None:
        await self.engine.close()


async def merge_streams(streams: list[AsyncIterator[Response]]) -> AsyncIterator[Response]:
    """Interleave several async iterators in arrival order; closing the merge closes them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[Response]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
        except Exception as exc:
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
