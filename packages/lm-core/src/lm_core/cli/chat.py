"""`lm chat [MODEL]`: a streaming chat REPL, or one answer with --prompt."""

from __future__ import annotations

import click

REPL_HELP = "Type a message; 'reset' starts a new conversation, 'exit' (or Ctrl-D) leaves."


@click.command("chat")
@click.argument("model_name", metavar="[MODEL]", required=False)
@click.option("--prompt", help="Answer this one message and exit, instead of starting the REPL.")
@click.option("--backend", default="auto", show_default=True, help="Engine: auto, torch, turbomind, ...")
@click.option("--chat-template", help="A built-in template name or a .jinja/.json file (default: the model's own).")
@click.option("--system", help="A system message to start each conversation with.")
@click.option("--max-new-tokens", type=int, default=512, show_default=True)
@click.option("--temperature", type=float, default=None, help="Sample at this temperature (default: greedy).")
@click.option("--top-p", type=float, default=None)
@click.option("--top-k", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--session-len", type=int, default=None, help="Longest conversation in tokens (engine setting).")
def chat(
    model_name, prompt, backend, chat_template, system, max_new_tokens, temperature, top_p, top_k, seed, session_len
) -> None:
    """Chat with MODEL (default: SmolLM2-135M-Instruct), streaming the answer."""
    from lm_core.generation_config import GenerationConfig
    from lm_core.pipeline import pipeline

    sampling = {"do_sample": True, "temperature": temperature} if temperature else {}
    optional = {"top_p": top_p, "top_k": top_k, "random_seed": seed}
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, **sampling, **{k: v for k, v in optional.items() if v is not None}
    )
    backend_config = {"session_len": session_len} if session_len else None
    pipe = pipeline(model_name, backend=backend, backend_config=backend_config, chat_template=chat_template)
    history = [{"role": "system", "content": system}] if system else []
    try:
        if prompt is not None:
            _answer(pipe, [*history, {"role": "user", "content": prompt}], gen_config)
            return
        click.echo(REPL_HELP)
        messages = list(history)
        while True:
            try:
                text = click.prompt(">>>", prompt_suffix=" ", default="", show_default=False)
            except (EOFError, click.Abort):
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
            messages.append({"role": "assistant", "content": _answer(pipe, messages, gen_config)})
    finally:
        pipe.close()


def _answer(pipe, messages, gen_config) -> str:
    """Stream one answer to stdout; return its text."""
    pieces = []
    for piece in pipe.stream_infer(messages, gen_config):
        click.echo(piece.text, nl=False)
        pieces.append(piece.text)
        if piece.finish_reason == "error":
            raise click.ClickException(piece.error or "the engine reported an error")
    click.echo()
    return "".join(pieces)
