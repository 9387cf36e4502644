"""`lm chat [MODEL]`: a streaming chat REPL, or one answer with --prompt.

Decoding is greedy unless a sampling flag is given (`--temperature` above 0, `--top-p`, `--top-k`), as with
`pipeline()`; then the model's generation_config.json fills the sampling values not given. Ctrl-C stops the answer
being written (aborting its engine request) and returns to the prompt; Ctrl-C at the prompt leaves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from lm_core.cli.base import CONTEXT_SETTINGS
from lm_core.cli.engine_options import SeveralValuesCommand, engine_config, engine_options
from lm_core.generation_config import GenerationConfig

if TYPE_CHECKING:
    from lm_core.pipeline import Pipeline

REPL_HELP = "Type a message; 'reset' starts a new conversation, 'exit' (or Ctrl-D, or Ctrl-C here) leaves."


@click.command("chat", cls=SeveralValuesCommand, context_settings=CONTEXT_SETTINGS)
@click.argument("model_name", metavar="[MODEL]", required=False)
@click.option("--prompt", help="Answer this one message and exit, instead of starting the REPL.")
@click.option("--chat-template", help="A built-in template name or a .jinja/.json file (default: the model's own).")
@click.option("--system", help="A system message to start each conversation with.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    help="Sample at this temperature (0: greedy; default: greedy unless --top-p or --top-k is given).",
)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Sample from this probability mass.")
@click.option("--top-k", type=click.IntRange(min=0), help="Sample from this many most likely tokens (0: all).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="Seed for sampling.")
@engine_options
def chat(
    model_name: str | None,
    prompt: str | None,
    chat_template: str | None,
    system: str | None,
    max_new_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    **options: Any,
) -> None:
    """Chat with MODEL (default: SmolLM2-135M-Instruct), streaming the answer."""
    from lm_core.async_pipeline import AsyncPipeline
    from lm_core.pipeline import Pipeline

    gen_config = _gen_config(max_new_tokens, temperature, top_p, top_k, seed)
    try:
        # Argument mistakes (template, backend, session length) fail here, before the weights load.
        async_pipe = AsyncPipeline.from_model(
            model_name, options["backend"], engine_config(options) or None, chat_template
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        raise SystemExit(130) from None
    pipe = Pipeline(async_pipe)
    history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    try:
        if prompt is not None:
            try:
                answer = _answer(pipe, [*history, {"role": "user", "content": prompt}], gen_config)
            except ValueError as exc:
                raise click.ClickException(str(exc)) from None
            if answer is None:
                raise SystemExit(130)  # the shell's status for a run ended by Ctrl-C
            return
        _repl(pipe, history, gen_config)
    finally:
        pipe.close()


def _gen_config(
    max_new_tokens: int, temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None
) -> GenerationConfig:
    """The decoding config the flags ask for; unset sampling values come from the model when sampling."""
    fields: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if temperature is not None:
        fields["temperature"] = temperature
    sampling = {"top_p": top_p, "top_k": top_k, "random_seed": seed}
    fields.update({k: v for k, v in sampling.items() if v is not None})
    fields["do_sample"] = bool(temperature) or (temperature is None and (top_p is not None or top_k is not None))
    try:
        return GenerationConfig(**fields)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def _repl(pipe: Pipeline, history: list[dict[str, Any]], gen_config: GenerationConfig) -> None:
    """Read messages until 'exit', Ctrl-D or Ctrl-C at the prompt; answer each in the running conversation."""
    click.echo(REPL_HELP)
    messages = list(history)
    while True:
        try:
            text = click.prompt(">>>", prompt_suffix=" ", default="", show_default=False)
        except (EOFError, click.Abort):  # Ctrl-D, or Ctrl-C at the prompt
            click.echo()
            return
        if text.strip() == "exit":
            return
        if text.strip() == "reset":
            messages = list(history)
            click.echo("(new conversation)")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        try:
            answer = _answer(pipe, messages, gen_config)
        except ValueError as exc:  # e.g. the conversation no longer fits the session: say so, keep the REPL
            click.echo(f"Error: {exc} ('reset' starts a new conversation)", err=True)
            answer = None
        if answer is None:  # stopped or failed: the question and any partial answer leave the conversation
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})


def _answer(pipe: Pipeline, messages: list[dict[str, Any]], gen_config: GenerationConfig) -> str | None:
    """Stream one answer to stdout; return its text, or None when Ctrl-C stopped it (its request is aborted)."""
    pieces: list[str] = []
    stream = pipe.stream_infer(messages, gen_config)
    try:
        for piece in stream:
            click.echo(piece.text, nl=False)
            pieces.append(piece.text)
            if piece.finish_reason == "error":
                raise click.ClickException(piece.error or "the engine reported an error")
    except KeyboardInterrupt:
        stream.close()  # cancels the generation, which aborts the engine request
        click.echo("\n(stopped)")
        return None
    click.echo()
    return "".join(pieces)
