"""`vptq generate` and `vptq chat`: text from an original or quantized model (issue 9).

SOURCE is an original model (HF folder, .gguf, 'smollm2'), one of our quantized folders
(config.json with a VPTQ quantization_config), or a published artifact NAME[:VERSION]
(pulled into VPTQ_HOME/cache, cli/refs.py). Text streams to stdout as it is generated;
timing goes to stderr. `--json` prints one JSON object and nothing else on stdout.
`register(app)` attaches the commands to the main Typer app.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
from vptq_service.cli import options as opt
from vptq_service.cli.errors import EXIT_FAILURE, EXIT_USAGE, errors, fail
from vptq_service.cli.output import emit, stdout_to_stderr

SOURCE_HELP = ("Original model (folder, .gguf, 'smollm2'), a quantized folder, or a published artifact "
               "NAME[:VERSION].")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _load(source: str, device: str):
    """(model, tokenizer); registry errors as one line, exit 1 (even an unknown NAME: the registry
    cannot supply the model)."""
    from vptq_service.cli.refs import local_model
    from vptq_service.store.errors import StoreError

    from vptq.generate import load_for_generation
    from vptq.pipeline import check_device

    check_device(device)
    try:
        path = local_model(source)
    except StoreError as e:
        fail(str(e), EXIT_FAILURE)
    return load_for_generation(path, device)


def generate(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate (greedy)."),
    device: opt.Device = opt.DEFAULT.device,
    as_json: bool = typer.Option(False, "--json", help='Print one JSON object {"text", "tokens", "seconds", '
                                 '"tokens_per_s"} and nothing else on stdout.'),
    debug: opt.Debug = False,
) -> None:
    """Continue PROMPT with SOURCE, streaming the text to stdout."""
    if max_new_tokens < 1:
        fail(f"--max-new-tokens {max_new_tokens}: use at least 1", EXIT_USAGE)
    with errors(debug):
        from vptq.generate import generate_text

        with stdout_to_stderr(as_json):
            model, tok = _load(source, device)
            r = generate_text(model, tok, prompt, max_new_tokens, None if as_json else _write)
        if as_json:
            emit(r.to_dict(), True, "")
        else:
            _write("\n")
            typer.echo(f"[{r.tokens} tokens in {r.seconds:.2f} s, {r.tokens_per_s:.1f} tokens/s]", err=True)


def chat(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Most tokens per reply (greedy)."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message opening the conversation."),
    device: opt.Device = opt.DEFAULT.device,
    debug: opt.Debug = False,
) -> None:
    """Multi-turn chat with SOURCE through its tokenizer's chat template.

    Reads one user message per line from stdin (a terminal or a pipe); replies stream to
    stdout, one reply per turn followed by a newline. `/exit` or end of input ends the chat,
    `/reset` forgets the conversation.
    """
    if max_new_tokens < 1:
        fail(f"--max-new-tokens {max_new_tokens}: use at least 1", EXIT_USAGE)
    with errors(debug):
        from vptq.generate import chat_turn

        model, tok = _load(source, device)
        start = [{"role": "system", "content": system}] if system else []
        messages = list(start)
        interactive = sys.stdin.isatty()
        if interactive:
            typer.echo("chat: one message per line; /reset forgets, /exit (or Ctrl-D) ends", err=True)
        while True:
            if interactive:
                typer.echo("> ", nl=False, err=True)
            line = sys.stdin.readline()
            if not line:  # end of input
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                messages = list(start)
                continue
            messages.append({"role": "user", "content": line})
            r = chat_turn(model, tok, messages, max_new_tokens, _write)
            _write("\n")
            messages.append({"role": "assistant", "content": r.text})
            if interactive:
                typer.echo(f"[{r.tokens} tokens, {r.tokens_per_s:.1f} tokens/s]", err=True)


def register(main_app: typer.Typer) -> None:
    """Attach `generate` and `chat` to the main app."""
    main_app.command("generate")(generate)
    main_app.command("chat")(chat)
