"""`vptq`: the command line. Bad input -> one line on stderr, exit 2; failures exit 1.

`--debug` shows the traceback. Progress bars (rich) go to stderr when it is a terminal, so
`--json` keeps stdout to exactly one JSON object.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="vptq",
    help="VPTQ compression service: quantize LLMs to 2-4 bits and evaluate them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class HessianMode(str, Enum):
    sequential = "sequential"
    original = "original"


def _err(msg: str, code: int) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


@contextmanager
def _errors(debug: bool):
    """Map exceptions to one-line messages and exit codes (2 usage, 1 failure)."""
    from vptq.config import ConfigError
    from vptq.source import SourceError

    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing was written", err=True)
        raise typer.Exit(130) from None
    except (ConfigError, SourceError, FileExistsError) as e:
        if debug:
            raise
        _err(str(e), 2)
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line, no traceback
        if debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        _err(f"{type(e).__name__}: {first} (run with --debug for the traceback)", 1)


@contextmanager
def _progress(enabled: bool, label: str):
    """Yields a callback(done, total, text); a rich bar on stderr only when it is a terminal."""
    if not (enabled and sys.stderr.isatty()):
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=Console(stderr=True), transient=False) as prog:
        task = prog.add_task(label, total=None, info="")

        def cb(done: int, total: int, info: str = "") -> None:
            prog.update(task, completed=done, total=total, info=info)

        yield cb


def _emit(data: dict, as_json: bool, human: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        typer.echo(human)


@app.command()
def compress(
    source: str = typer.Argument(..., help="HF model folder, a .gguf file, or 'smollm2'."),
    bits: int = typer.Option(2, "--bits", help="Target bits per weight preset: 2, 3 or 4."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not exist unless --overwrite)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text (default: wikitext-2 valid)."),
    nsamples: int = typer.Option(32, "--nsamples", help="Calibration windows."),
    seqlen: int = typer.Option(1024, "--seqlen", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed for windows and codebooks."),
    device: Device = typer.Option(Device.cpu, "--device", help="Compute device."),
    hessians: HessianMode = typer.Option(HessianMode.sequential, "--hessians",
                                         help="sequential: from the quantized prefix; original: from the FP model."),
    set_: list[str] = typer.Option([], "--set", help="Override a QuantConfig field, e.g. --set enable_norm=false."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Quantize SOURCE with VPTQ and save it in the VPTQ checkpoint format."""
    with _errors(debug):
        from vptq.config import preset
        from vptq.pipeline import compress as run_compress

        cfg = preset(bits).with_(seed=seed, hessians=hessians.value, **_overrides(set_))
        with _progress(True, "quantize") as cb:
            result, _, _ = run_compress(source, cfg, out, calib, nsamples, seqlen, device.value,
                                        overwrite, cb)
        s = result.summary()
        _emit(s, as_json, f"wrote {s['out']}: {s['layers']} linears, {s['bpw']:.3f} bpw all-in, "
              f"{s['seconds']:.1f} s")


def _overrides(items: list[str]) -> dict:
    from vptq.config import ConfigError, QuantConfig

    fields = QuantConfig.__dataclass_fields__
    out: dict = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or key not in fields or key in ("targets", "hessians", "seed"):
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                              f"{sorted(k for k in fields if k not in ('targets', 'hessians', 'seed'))}")
        typ = type(getattr(QuantConfig(), key))
        try:
            if typ is bool:
                if val.lower() not in ("true", "false", "1", "0", "on", "off"):
                    raise ValueError(val)
                out[key] = val.lower() in ("true", "1", "on")
            else:
                out[key] = typ(val)
        except ValueError:
            raise ConfigError(f"--set {item!r}: {val!r} is not a valid {typ.__name__}") from None
    return out


@app.command("eval")
def eval_(
    source: str = typer.Argument(..., help="Original model (folder, .gguf, 'smollm2') or a quantized folder."),
    text: Path = typer.Option(..., "--text", help="Evaluation text (e.g. wikitext-2 test.txt)."),
    windows: int = typer.Option(10, "--windows", help="Number of non-overlapping windows."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per window."),
    device: Device = typer.Option(Device.cpu, "--device", help="Compute device."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Perplexity of a model on the first WINDOWS windows of SEQLEN tokens of TEXT."""
    with _errors(debug):
        from vptq.pipeline import evaluate

        with _progress(True, "evaluate") as cb:
            r = evaluate(source, text, windows, seqlen, device.value,
                         (lambda d, t: cb(d, t, "")) if cb else None)
        data = {"perplexity": r.perplexity, "windows": r.windows, "seqlen": r.seqlen, "tokens": r.tokens}
        _emit(data, as_json, f"perplexity {r.perplexity:.3f} over {r.windows} x {r.seqlen} tokens")


from cli.db import register as _register_store  # noqa: E402 - store commands: db, artifacts, pull

_register_store(app)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
