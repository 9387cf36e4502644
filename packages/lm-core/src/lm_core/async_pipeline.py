"""`AsyncPipeline`: text in, streamed `Response`s out, over any `Engine`. lm-serve and `Pipeline` build on it.

Per request, once: chat template -> token ids (`render`, `prompt_token_ids`) -> a `PreparedRequest` (`prepare`: the
config over the model's defaults, every stop id, the bad words as token ids). Then `generate` sends n engine requests
(one per sample, distinct seeds) and runs, for each, an incremental detokenizer and a stop-string matcher; a matched
stop string closes that engine stream, and the engine frees the request when its stream is closed.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from lm_core.engine import Engine, EngineOutput, EngineRequest, session_length_error
from lm_core.generation_config import GenerationConfig, as_gen_config, load_model_generation_defaults
from lm_core.multimodal import has_media, is_media_tuple, prompt_with_images, split_media
from lm_core.response import Response

if TYPE_CHECKING:
    from lm_core.chat_templates.template import ChatTemplate
    from lm_core.detokenizer import IncrementalDetokenizer
    from lm_core.stop_strings import StopStringMatcher
    from lm_core.tokenizer import Tokenizer

# A text, OpenAI messages (with image/video parts for a vision-language model), token ids, or (text, images).
Prompt = str | Sequence[Mapping[str, Any]] | Sequence[int] | tuple[str, Any]
# Prompts up to this many characters are tokenized on the event loop; longer ones in a worker thread.
INLINE_PROMPT_CHARS = 32 * 1024
# Arguments of ChatTemplate.render that chat_template_kwargs must not replace.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt", "special_tokens"})


@dataclass(frozen=True)
class RenderedPrompt:
    """A conversation rendered by the chat template: its text (output parsers look at how it ends) and token ids."""

    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class PreparedRequest:
    """One prompt made ready for the engine, once per request; `AsyncPipeline.generate` consumes it.

    `gen_config` is the caller's config over the model's defaults, with `max_new_tokens` filled in with the room the
    session leaves when the caller left it unset, and `stop_token_ids` holding every id that ends the sequence (the
    tokenizer's EOS ids unless `ignore_eos`); `stop_token_ids` is the same set, for membership tests. `bad_word_ids`
    is `gen_config.bad_words` tokenized, each word with and without a leading space.
    """

    prompt_ids: list[int]
    gen_config: GenerationConfig
    stop_token_ids: frozenset[int]
    bad_word_ids: list[list[int]] | None = None
    multimodal: list[dict[str, Any]] | None = None
    adapter_name: str | None = None


def _num_chars(prompt: object) -> int:
    """About how many characters of text `prompt` holds (token ids count as none)."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, RenderedPrompt):
        return 0
    if isinstance(prompt, Sequence):
        total = 0
        for message in cast(Sequence[object], prompt):
            if not isinstance(message, Mapping):
                return 0
            content = cast(Mapping[str, object], message).get("content")
            total += len(content) if isinstance(content, str) else len(str(cast(object, message)))
        return total
    return 0


def _is_token_ids(prompt: object) -> bool:
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and len(cast(Sequence[object], prompt)) > 0
        and all(isinstance(t, int) and not isinstance(t, bool) for t in cast(Sequence[object], prompt))
    )


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_messages(prompt: object) -> bool:
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and len(cast(Sequence[object], prompt)) > 0
        and all(isinstance(m, Mapping) for m in cast(Sequence[object], prompt))
    )


class AsyncPipeline:
    """Generation over one engine and one tokenizer; every method is a coroutine or async iterator."""

    def __init__(
        self,
        engine: Engine,
        model_path: str | os.PathLike[str],
        chat_template: ChatTemplate | str | os.PathLike[str] | None = None,
        *,
        allow_special_tokens_in_content: bool = False,
        media_policy: Any = None,
    ) -> None:
        """Wrap `engine`, loading the tokenizer, chat template and generation defaults of the model at `model_path`.

        `allow_special_tokens_in_content`: text in messages that spells a special token (``<|im_start|>``) is
        tokenized as that token; by default it stays ordinary text, so users cannot forge the template's turns.
        `media_policy`: what request images and videos may be fetched and decoded (an `lm_vl.MediaPolicy`; default:
        lm-vl's strict policy). Media need lm-vl and a vision-language model.
        """
        from lm_core.chat_template import load_chat_template
        from lm_core.tokenizer import Tokenizer

        self.engine: Engine = engine
        self.model_path = Path(model_path)
        self.tokenizer: Tokenizer = Tokenizer.from_pretrained(self.model_path)
        if chat_template is None or isinstance(chat_template, (str, os.PathLike)):
            chat_template = load_chat_template(chat_template, self.model_path) or load_chat_template("base")
        self.chat_template: ChatTemplate = cast("ChatTemplate", chat_template)
        self.generation_defaults: dict[str, Any] = load_model_generation_defaults(self.model_path)
        if not _is_bool(allow_special_tokens_in_content):
            raise ValueError(
                f"allow_special_tokens_in_content must be True or False, got {allow_special_tokens_in_content!r}"
            )
        self.allow_special_tokens_in_content = allow_special_tokens_in_content
        self.media_policy = media_policy
        self._vision: Any = None  # lm_vl.inputs.VisionInputs, built on the first request with media

    @classmethod
    def from_model(
        cls,
        model: str | None = None,
        backend: str = "auto",
        backend_config: Any = None,
        chat_template: ChatTemplate | str | os.PathLike[str] | None = None,
        *,
        allow_special_tokens_in_content: bool = False,
        media_policy: Any = None,
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
            cast(dict[str, Any], backend_config).get("session_len")
            if isinstance(backend_config, dict)
            else getattr(backend_config, "session_len", None)
        )
        check_session_len(model_path, session_len)
        engine_class = select_engine(backend, model_path)
        engine = engine_class.from_pretrained(model_path, backend_config)
        return cls(
            engine,
            model_path,
            chat_template,
            allow_special_tokens_in_content=allow_special_tokens_in_content,
            media_policy=media_policy,
        )

    @property
    def session_len(self) -> int | None:
        """The engine's limit on prompt + generated tokens (None: no limit)."""
        return self.engine.session_len

    # -- preprocessing -------------------------------------------------------------------------------------------

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        *,
        add_generation_prompt: bool = True,
        expand: Callable[[str], str] | None = None,
    ) -> RenderedPrompt:
        """`messages` (OpenAI-style) rendered by the chat template and tokenized: the one path every chat prompt takes.

        The template writes any BOS itself. Unless `allow_special_tokens_in_content`, text in the messages, tools or
        template kwargs that spells a special token is tokenized as ordinary text. Invalid messages, a template
        failure, a reserved template kwarg or an empty result raise ValueError.
        """
        from lm_core.chat_templates.encoding import render_and_encode

        kwargs = dict(chat_template_kwargs or {})
        reserved = RESERVED_TEMPLATE_KWARGS & set(kwargs)
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}")
        text, ids = render_and_encode(
            self.chat_template,
            self.tokenizer,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            allow_special_tokens_in_content=self.allow_special_tokens_in_content,
            chat_template_kwargs=kwargs,
            expand=expand,
        )
        if not ids:
            raise ValueError("messages: the rendered prompt is empty")
        return RenderedPrompt(text, ids)

    def prompt_token_ids(
        self,
        prompt: Prompt | RenderedPrompt,
        do_preprocess: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """The token ids the engine sees for `prompt` (a string, OpenAI messages, token ids or a rendered prompt)."""
        if isinstance(prompt, RenderedPrompt):
            ids = list(prompt.token_ids)
        elif isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            if not do_preprocess:
                ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            else:
                ids = self.render([{"role": "user", "content": prompt}], tools, chat_template_kwargs).token_ids
        elif _is_token_ids(prompt):
            ids = list(cast(Sequence[int], prompt))
            vocab_size = self.tokenizer.vocab_size
            if any(t < 0 or t >= vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        elif _is_messages(prompt):
            if not do_preprocess:
                raise ValueError("a message list needs its chat template: do_preprocess=False takes a string prompt")
            ids = self.render(cast(Sequence[Mapping[str, Any]], prompt), tools, chat_template_kwargs).token_ids
        else:
            raise ValueError(
                "prompt must be a non-empty string, a non-empty list of OpenAI-style messages or a list of token ids, "
                f"got {type(prompt).__name__} {str(prompt)[:80]!r}"
            )
        if not ids:
            raise ValueError("the prompt is empty: it has no tokens")
        return ids

    def resolve_gen_config(
        self, gen_config: GenerationConfig | dict[str, Any] | None, num_prompt_tokens: int
    ) -> GenerationConfig:
        """The user's config (or a dict of its fields) over the model's defaults.

        An unset `max_new_tokens` (or one left at the built-in default beyond the room left) becomes the room the
        session leaves after the prompt. Whether the request fits is the engine's decision (see `check_length`).
        """
        cfg = as_gen_config(gen_config).with_model_defaults(self.generation_defaults)
        limit = self.engine.session_len
        if limit is not None and num_prompt_tokens < limit:
            room = limit - num_prompt_tokens
            user_set = "max_new_tokens" in cfg.explicit_fields
            if cfg.max_new_tokens is None or (cfg.max_new_tokens > room and not user_set):
                cfg = cfg.replace(max_new_tokens=room, mark_explicit=False)
        return cfg

    def bad_word_ids(self, bad_words: Sequence[str] | None) -> list[list[int]] | None:
        """Each bad word's token ids, with and without a leading space (mid-sentence words usually carry one in
        their first token); duplicates and empty encodings dropped. None when there are no bad words."""
        if not bad_words:
            return None
        variants: dict[tuple[int, ...], None] = {}
        for word in bad_words:
            for text in (word, " " + word):
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    variants[ids] = None
        return [list(v) for v in variants] or None

    def prepare(
        self,
        prompt: Prompt | RenderedPrompt,
        gen_config: GenerationConfig | dict[str, Any] | None = None,
        *,
        do_preprocess: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        multimodal: list[dict[str, Any]] | None = None,
        adapter_name: str | None = None,
    ) -> PreparedRequest:
        """Tokenize `prompt` (rendering messages with the chat template) and resolve `gen_config`: everything a
        request needs before the engine, done once. Bad input raises ValueError naming it.

        Messages with image or video parts, and a ``(prompt, image | [images])`` tuple, go through lm-vl: the media
        are loaded under `media_policy` and preprocessed for the model, the template's markers become the model's
        placeholder tokens, and `multimodal` gets one entry per item (lm-vl's `MediaError`, a ValueError with an
        HTTP status and the field, for media that are refused or cannot be fetched)."""
        if is_media_tuple(prompt):
            text, images = cast(tuple[str, Any], prompt)
            prompt = prompt_with_images(text, images)
        if _is_messages(prompt) and has_media(prompt):
            if multimodal is not None:
                raise ValueError("multimodal: pass media in the messages or as engine items, not both")
            if not do_preprocess:
                raise ValueError("a message list needs its chat template: do_preprocess=False takes a string prompt")
            rendered, multimodal = self.media_prompt(
                cast(Sequence[Mapping[str, Any]], prompt), tools, chat_template_kwargs
            )
            prompt_ids = rendered.token_ids
        else:
            prompt_ids = self.prompt_token_ids(prompt, do_preprocess, tools, chat_template_kwargs)
        cfg = self.resolve_gen_config(gen_config, len(prompt_ids))
        stop_ids = set(cfg.stop_token_ids or ())
        if not cfg.ignore_eos:
            stop_ids.update(self.tokenizer.eos_token_ids)
        cfg = cfg.replace(stop_token_ids=sorted(stop_ids) or None, mark_explicit=False)
        return PreparedRequest(
            prompt_ids,
            cfg,
            frozenset(stop_ids),
            self.bad_word_ids(cfg.bad_words),
            multimodal=multimodal,
            adapter_name=adapter_name,
        )

    def media_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> tuple[RenderedPrompt, list[dict[str, Any]]]:
        """(the rendered prompt, its `EngineRequest.multimodal` entries) of messages that hold images or videos.

        The messages are checked before any medium is fetched; media that are refused or cannot be loaded raise
        lm-vl's `MediaError` (a ValueError with an HTTP status, 400 or 422, and the field it names)."""
        from lm_core.messages import validate_messages

        template_messages, refs = split_media(messages)
        validate_messages(template_messages)
        try:
            vision = self.vision_inputs()
        except ValueError as error:  # a text-only model (or no lm-vl): name the first media part
            raise ValueError(f"{refs[0].part}: {error}") from None
        items = vision.process(refs)
        rendered = self.render(
            template_messages,
            tools,
            chat_template_kwargs,
            add_generation_prompt=add_generation_prompt,
            expand=lambda text: vision.expand_prompt(text, items),
        )
        return rendered, vision.items(rendered.token_ids, items, self.tokenizer.token_to_id)

    def vision_inputs(self) -> Any:
        """The model's `lm_vl.inputs.VisionInputs` (built on first use); a ValueError when this model or this
        installation takes no images (a text-only model, or lm-vl missing)."""
        if self._vision is None:
            try:
                from lm_vl.inputs import VisionInputs
            except ImportError:
                raise ValueError("images and videos need lm-vl, which is not installed: pip install lm-vl") from None
            try:
                self._vision = VisionInputs(self.model_path, self.media_policy)
            except ValueError as error:
                raise ValueError(f"this model takes no images or videos ({error}); send text parts only") from None
        return self._vision

    def check_length(self, prepared: PreparedRequest) -> None:
        """ValueError (the engine's wording) when `prepared` does not fit the engine's session length.

        The engine checks every request itself and is the authority; this is for callers that must refuse a request
        before starting any of it: a batch of prompts, or a server that answers 400 before it starts a stream.
        """
        error = session_length_error(
            len(prepared.prompt_ids), prepared.gen_config.max_new_tokens, self.engine.session_len
        )
        if error is not None:
            raise ValueError(error)

    # -- generation ----------------------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: Prompt | RenderedPrompt | PreparedRequest,
        gen_config: GenerationConfig | dict[str, Any] | None = None,
        *,
        do_preprocess: bool = True,
        request_id: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        index_offset: int = 0,
        group: str | None = None,
    ) -> AsyncIterator[Response]:
        """Stream `Response` pieces for all `n` samples of one prompt, interleaved as they come (see `index`).

        `prompt` is prepared here unless it is a `PreparedRequest` already (then `gen_config`, `do_preprocess`,
        `tools` and `chat_template_kwargs` must be left unset: it carries what they decide). A request the engine
        refuses as too long raises ValueError with the engine's message; other refusals end the stream with
        finish_reason "error". `group` names the client request this prompt is part of (`EngineRequest.group`;
        default: this call), so that the engine shares its capacity fairly between requests whatever their number
        of prompts and samples.
        """
        if isinstance(prompt, PreparedRequest):
            if gen_config is not None or tools is not None or chat_template_kwargs is not None:
                raise ValueError("a PreparedRequest carries its config: pass no gen_config, tools or template kwargs")
            prepared = prompt
        elif _num_chars(prompt) > INLINE_PROMPT_CHARS or has_media(prompt) or is_media_tuple(prompt):
            # Seconds of tokenizer work for a long prompt, or fetching and preprocessing media, must not stall the
            # event loop (other requests' streams).
            prepared = await asyncio.to_thread(
                self.prepare,
                prompt,
                gen_config,
                do_preprocess=do_preprocess,
                tools=tools,
                chat_template_kwargs=chat_template_kwargs,
            )
        else:
            prepared = self.prepare(
                prompt, gen_config, do_preprocess=do_preprocess, tools=tools, chat_template_kwargs=chat_template_kwargs
            )
        cfg = prepared.gen_config
        base_id = request_id or uuid.uuid4().hex
        group = group or base_id
        engine_ids = self.engine_request_ids(base_id, cfg.n)
        if cfg.n == 1:
            async for piece in self._generate_one(prepared, cfg, engine_ids[0], index_offset, group):
                yield piece
            return
        # n samples: distinct seeds (consecutive from the user's seed, so the whole set is reproducible).
        seeds = [cfg.random_seed + i if cfg.random_seed is not None else random.getrandbits(63) for i in range(cfg.n)]
        streams = [
            self._generate_one(prepared, cfg.replace(n=1, random_seed=seed), engine_id, index_offset + i, group)
            for i, (seed, engine_id) in enumerate(zip(seeds, engine_ids, strict=True))
        ]
        async for piece in merge_streams(streams):
            yield piece

    @staticmethod
    def engine_request_ids(request_id: str, n: int) -> list[str]:
        """The engine's request ids for the `n` samples `generate(..., request_id=request_id)` runs (for `abort`)."""
        return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]

    async def _generate_one(
        self, prepared: PreparedRequest, cfg: GenerationConfig, request_id: str, index: int, group: str
    ) -> AsyncIterator[Response]:
        """Stream one sequence: detokenize incrementally and apply stop strings.

        NOTE: the pipeline never calls `engine.abort` here. Closing the engine stream (a stop string matched, or our
        own consumer went away) is what frees the engine request: the engine's generator aborts an unfinished
        request in its `finally`, so each request is aborted at most once.
        """
        from lm_core.detokenizer import IncrementalDetokenizer
        from lm_core.stop_strings import StopStringMatcher

        request = EngineRequest(
            request_id,
            prepared.prompt_ids,
            cfg.replace(n=1, mark_explicit=False),
            multimodal=prepared.multimodal,
            adapter_name=prepared.adapter_name,
            group=group,
            bad_word_ids=prepared.bad_word_ids,
        )
        detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            prepared.prompt_ids,
            skip_special_tokens=cfg.skip_special_tokens,
            spaces_between_special_tokens=cfg.spaces_between_special_tokens,
        )
        matcher = StopStringMatcher(cfg.stop_words, cfg.include_stop_str_in_output) if cfg.stop_words else None
        num_generated = 0
        stream = self.engine.generate(request)
        try:
            async for out in stream:
                if num_generated == 0 and self._is_length_refusal(out, prepared):
                    raise ValueError(out.error)
                num_generated += len(out.token_ids)
                piece = self._response_of(out, prepared, detokenizer, matcher, num_generated, index)
                yield piece
                if piece.finish_reason is not None:
                    break
        finally:
            # An async generator's aclose is idempotent; on an unfinished request it makes the engine abort it.
            await cast(Any, stream).aclose()

    def _is_length_refusal(self, out: EngineOutput, prepared: PreparedRequest) -> bool:
        """Whether `out` is the engine refusing the request because it does not fit the session length."""
        if out.finish_reason != "error" or out.token_ids or not out.error:
            return False
        num_prompt, max_new_tokens = len(prepared.prompt_ids), prepared.gen_config.max_new_tokens
        return session_length_error(num_prompt, max_new_tokens, self.engine.session_len) is not None

    @staticmethod
    def _response_of(
        out: EngineOutput,
        prepared: PreparedRequest,
        detokenizer: IncrementalDetokenizer,
        matcher: StopStringMatcher | None,
        num_generated: int,
        index: int,
    ) -> Response:
        """The `Response` piece for engine output `out`: its text, and which of its tokens are visible.

        An output may carry several tokens (an engine's multi-token step). With stop strings they are matched token by
        token: the output ends at the token that completes a stop string, and the tokens after it are dropped (with
        their logprobs), as if the engine had produced them one at a time."""
        cfg = prepared.gen_config
        ids = list(out.token_ids)
        # The token that ended the request (EOS or a stop id) adds no text unless the user asks for stop strings.
        ends_with_stop_id = (
            out.finish_reason == "stop"
            and bool(ids)
            and ids[-1] in prepared.stop_token_ids
            and not cfg.include_stop_str_in_output
        )
        shown = ids[:-1] if ends_with_stop_id else ids
        stop_str = None
        if matcher is None:
            text = detokenizer.step(shown)
            if out.finish_reason is not None:
                text += detokenizer.finish()
        else:
            text = ""
            for j, token in enumerate(shown):
                piece, stop_str = matcher.feed(detokenizer.step([token]))
                text += piece
                if stop_str is not None:
                    ids = ids[: j + 1]
                    break
            if stop_str is None and out.finish_reason is not None:
                piece, stop_str = matcher.feed(detokenizer.finish())
                text += piece
                if stop_str is None:
                    text += matcher.flush()
        dropped = len(out.token_ids) - len(ids)
        return Response(
            text=text,
            token_ids=ids,
            input_token_len=len(prepared.prompt_ids),
            generate_token_len=num_generated - dropped,
            finish_reason="stop" if stop_str is not None else out.finish_reason,
            logprobs=out.logprobs[: len(ids)] if out.logprobs is not None else None,
            prompt_logprobs=out.prompt_logprobs,
            index=index,
            stop_str=stop_str,
            error=out.error,
            # A sequence a stop string ended shows every token it was given (the stop id included).
            num_hidden_tokens=1 if ends_with_stop_id and stop_str is None else 0,
        )

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
        if not _is_bool(normalize):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        if isinstance(inputs, str):
            if not inputs:
                raise ValueError("inputs is empty: there is nothing to embed")
            if len(inputs) > INLINE_PROMPT_CHARS:
                ids = await asyncio.to_thread(self.tokenizer.encode, inputs, True)
            else:
                ids = self.tokenizer.encode(inputs, add_special_tokens=True)
        elif _is_token_ids(inputs) or inputs == []:
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
        """Abort engine request `request_id` at the caller's wish (a server shutting down); its stream ends with
        finish_reason "abort". Closing a `generate` stream needs no call to this: the engine frees it then."""
        await self.engine.abort(request_id)

    async def close(self) -> None:
        """Stop the engine; pending requests end with "abort"."""
        await self.engine.close()


async def merge_streams(streams: Sequence[AsyncIterator[Response]]) -> AsyncIterator[Response]:
    """Interleave several async iterators in arrival order; closing the merge closes them all."""
    queue: asyncio.Queue[Response | Exception | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[Response]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
        except Exception as exc:
            await queue.put(exc)
        finally:
            await queue.put(None)  # this stream is done

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
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
            await cast(Any, stream).aclose()
