"""`vptq`: the command line. Bad input -> one line on stderr, exit 2; failures exit 1.

`--debug` shows the traceback. Progress bars (rich) go to stderr when it is a terminal, so
`--json` keeps stdout to exactly one JSON object: while a `--json` job runs, anything a
library prints on stdout is sent to stderr. Ctrl-C (exit 130) or SIGTERM (exit 143) mid-run
leaves nothing at --out: the checkpoint is written to a temporary sibling folder and renamed
at the end (vptq.io.save_quantized).

This module owns the app, `compress` and `eval`, and registers the other modules' commands; the
modules import cli/errors.py, cli/output.py and cli/options.py, never this one (no import cycle).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer
from vptq_service.cli import db, generate, jobs, plan, serve, settings
from vptq_service.cli import options as opt
from vptq_service.cli.errors import EXIT_FAILURE, EXIT_USAGE, OneLineErrors, errors, fail
from vptq_service.cli.output import emit, progress, stdout_to_stderr
from vptq_service.flows.spec import JobSpec

app = typer.Typer(
    name="vptq",
    cls=OneLineErrors,
    help="VPTQ compression service: quantize LLMs to 2-4 bits and evaluate them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
@opt.request_command
def compress(
    request: Callable[[], JobSpec],
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the checkpoint to this folder "
                                       "(must not exist unless --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out checkpoint folder."),
    as_json: opt.Json = False,
    debug: opt.Debug = False,
) -> None:
    """Quantize SOURCE now, in this process, through the `compress` flow; publish NAME:VERSION.

    Re-running the identical command resumes an interrupted job (finished blocks are reused).
    """
    with errors(debug):
        from vptq_service.flows.request import export_artifact, open_job
        from vptq_service.store.artifacts import open_artifact_store

        from vptq.io import check_out

        if out is not None:
            check_out(out, overwrite)
        spec = request()
        open_artifact_store().check()  # an unreachable store fails now, not after the quantization
        job = open_job(spec)
        with stdout_to_stderr(as_json), progress(True, "quantize") as cb:
            import vptq_service.flows.compress as fc

            fc.progress_hook = cb
            try:
                s = jobs.run_flow(job.id)
            finally:
                fc.progress_hook = None
        if s.get("status") != "succeeded":
            fail(f"job {s['job_id']} {s.get('status')}: {s.get('error') or 'see `vptq jobs logs`'}", EXIT_FAILURE)
        if out is not None:
            export_artifact(s["artifact"], out, overwrite)
            s["out"] = str(out)
        else:
            s["out"] = s.get("artifact_uri")
        human = (f"job {s['job_id']}: {s['artifact']}"
                 + (" (REJECTED by --max-ppl-ratio)" if s.get("artifact_status") == "rejected" else "")
                 + f", {s.get('layers', 0)} linears, {s.get('bpw', 0):.3f} bpw all-in, "
                 f"{s.get('blocks_total')} blocks ({s.get('blocks_reused')} reused), {s.get('seconds', 0):.1f} s")
        if s.get("perplexity_after") is not None:
            human += f"\nperplexity {s['perplexity_before']:.3f} -> {s['perplexity_after']:.3f}"
        if out is not None:
            human += f"\nwrote {out}"
        emit(s, as_json, human)


@app.command("eval")
def eval_(
    source: str = typer.Argument(..., help="Original model (folder, .gguf, 'smollm2'), a quantized folder, "
                                 "or a registry artifact NAME[:VERSION]."),
    text: list[Path] = typer.Option(..., "--text", help="Evaluation text (e.g. wikitext-2 test.txt); repeat it "
                                    "to score several texts with one model load."),
    windows: int = typer.Option(10, "--windows", help="Number of non-overlapping windows."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per window."),
    device: opt.Device = opt.DEFAULT.device,
    as_json: opt.Json = False,
    debug: opt.Debug = False,
) -> None:
    """Perplexity of a model on the first WINDOWS windows of SEQLEN tokens of TEXT."""
    with errors(debug):
        from vptq_service.cli.refs import local_model

        from vptq.pipeline import check_device, evaluate_texts

        check_device(device)
        source = local_model(source)
        t0 = time.perf_counter()
        with stdout_to_stderr(as_json), progress(True, "evaluate") as cb:
            rs = evaluate_texts(source, text, windows, seqlen, device, (lambda d, t: cb(d, t, "")) if cb else None)
        r = rs[0]  # the first text's figures stay the top-level keys (one --text: the whole answer)
        data = {"perplexity": r.perplexity, "windows": r.windows, "seqlen": r.seqlen, "tokens": r.tokens,
                "seconds": round(time.perf_counter() - t0, 2)}
        human = f"perplexity {r.perplexity:.3f} over {r.windows} x {r.seqlen} tokens"
        if len(rs) > 1:
            data["texts"] = [{"text": str(t), "perplexity": x.perplexity, "tokens": x.tokens} for t, x in zip(text, rs, strict=True)]
            human = "\n".join(f"{t}: perplexity {x.perplexity:.3f} over {x.windows} x {x.seqlen} tokens"
                              for t, x in zip(text, rs, strict=True))
        emit(data, as_json, human)


db.register(app)  # db, artifacts, pull
jobs.register(app)  # submit, jobs, worker, server
generate.register(app)  # generate, chat
plan.register(app)  # plan
settings.register(app)  # config show
serve.register(app)  # serve (an OpenAI-compatible endpoint)


def main() -> None:  # console-script entry point
    from vptq_service.cli.malloc import tune

    try:
        tune()  # large freed blocks kept for reuse (cli/malloc.py): CPU quantization faults far less
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    app()


if __name__ == "__main__":
    main()
