"""`vptq serve`: an OpenAI-compatible HTTP endpoint for a model (issue 28; the server is serve/).

SOURCE is resolved as `vptq generate` resolves it (cli/refs.py): a folder, a .gguf, 'smollm2', or
a published NAME[:VERSION], pulled with every sha256 verified. `register(app)` attaches the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from vptq_service.cli import options as opt
from vptq_service.cli.errors import EXIT_FAILURE, EXIT_USAGE, errors, fail


def serve(
    source: str = typer.Argument(..., help="A quantized or original model folder, a .gguf file, 'smollm2', or "
                                 "a published artifact NAME[:VERSION] (pulled and verified)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback without "
                             "--api-key is warned about."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    device: opt.Device = "cpu",
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="VPTQ_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 and /metrics."),
    served_name: Optional[str] = typer.Option(None, "--served-name", help="The model id clients send "
                                              "(default: NAME[:VERSION] as given, or the folder's name)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Sequences decoded together."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting beyond the batch before 429."),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="Largest max_tokens a request may ask for."),
    debug: opt.Debug = False,
) -> None:
    """Serve SOURCE over HTTP: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    if not 1 <= port <= 65535:
        fail(f"--port {port}: use 1..65535", EXIT_USAGE)
    for flag, val, low in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0), ("--max-tokens", max_tokens, 1)):
        if val < low:
            fail(f"{flag} {val}: use at least {low}", EXIT_USAGE)
    if api_key is not None and not api_key.strip():
        fail("--api-key: the key is empty", EXIT_USAGE)
    with errors(debug):
        from vptq_service.cli.refs import local_model
        from vptq_service.serve.run import serve as run_server
        from vptq_service.store.errors import StoreError

        from vptq.pipeline import check_device

        check_device(device)
        try:
            path = local_model(source)
        except StoreError as e:
            fail(str(e), EXIT_FAILURE)
        model_id = served_name or (Path(source).name if Path(source).expanduser().exists() else source)
        run_server(path, model_id, host=host, port=port, device=device, api_key=api_key, max_batch=max_batch,
                   max_queue=max_queue, max_tokens=max_tokens)


def register(main_app: typer.Typer) -> None:
    main_app.command("serve")(serve)
