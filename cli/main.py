"""`vptq`: the command line. Bad input -> one line on stderr, exit 2; failures exit 1.

`--debug` shows the traceback. Progress bars (rich) go to stderr when it is a terminal, so
`--json` keeps stdout to exactly one JSON object: while a `--json` job runs, anything a
library prints on stdout is sent to stderr. Ctrl-C (exit 130) or SIGTERM (exit 143) mid-run
leaves nothing at --out: the checkpoint is written to a temporary sibling folder and renamed
at the end (vptq.io.save_quantized).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import contextmanager, redirect_stdout
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own copy of click; older ones use click itself
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - depends on the typer version
    from click import exceptions as _cx

_NoArgsIsHelp = getattr(_cx, "NoArgsIsHelpError", ())  # click >= 8.2

EXIT_USAGE = 2  # bad input: the message says what to change
EXIT_FAILURE = 1  # the job itself failed
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM


class _OneLineErrors(TyperGroup):
    """Usage errors (missing option, bad value) as one line on stderr, not a rich panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as e:  # bare `vptq`: the help, as typer prints it
            e.show()
            code = EXIT_USAGE
        except _cx.UsageError as e:
            where = e.ctx.command_path if e.ctx else "vptq"
            msg = " ".join(e.format_message().split())
            typer.echo(f"error: {msg} (see '{where} --help')", err=True)
            code = EXIT_USAGE
        except _cx.ClickException as e:
            typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            code = e.exit_code
        except typer.Abort:
            typer.echo("interrupted", err=True)
            code = EXIT_INTERRUPTED
        else:
            code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    name="vptq",
    cls=_OneLineErrors,
    help="VPTQ compression service: quantize LLMs to 2-4 bits and evaluate them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


class HessianMode(StrEnum):
    sequential = "sequential"
    original = "original"


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (temporary folders) runs."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _err(msg: str, code: int) -> None:
    typer.echo("error: " + " ".join(msg.split()), err=True)  # always one line
    raise typer.Exit(code)


def _quiet_libraries() -> None:
    """No tqdm/hub bars on a stderr that is not a terminal (logs, pipes); set before tqdm is imported."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from a CLI
    # Prefect waits 20 s for its ephemeral API server; a cold first start (fresh install: bytecode
    # compiled, database migrated) on 2 busy cores can take longer and failed a job before it began
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _hint(e: BaseException) -> str:
    """What to do about an error that comes from the environment rather than the request."""
    if isinstance(e, ImportError) and (e.name == "kernels" or "from 'kernels'" in str(e)):
        # transformers >= 5.25 imports Hugging Face's `kernels` distribution when it is installed, and
        # finds this project's top-level `kernels` package instead (pyproject pins transformers < 5.25)
        return (" -- another installed distribution provides a top-level `kernels` package (Hugging Face's"
                " `kernels`), which clashes with vptq-service's: `pip uninstall kernels`, or install"
                " vptq-service in its own environment")
    return ""


@contextmanager
def _errors(debug: bool):
    """Map exceptions to one-line messages and exit codes (2 usage, 1 failure)."""
    _quiet_libraries()
    from vptq_service.store.errors import StoreError, StoreUsageError

    from vptq.config import ConfigError
    from vptq.source import SourceError

    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a worker): keep the default
        pass
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing was written to --out", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Terminated:
        typer.echo("terminated: nothing was written to --out", err=True)
        raise typer.Exit(EXIT_TERMINATED) from None
    except (ConfigError, SourceError, FileExistsError) as e:
        if debug:
            raise
        _err(str(e), EXIT_USAGE)
    except StoreError as e:  # the database or artifact store: its message says what to fix
        if debug:
            raise
        _err(str(e), EXIT_USAGE if isinstance(e, StoreUsageError) else EXIT_FAILURE)
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line, no traceback
        if debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _err(f"{type(e).__name__}: {first}{_hint(e)} (run with --debug for the traceback)", EXIT_FAILURE)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def _stdout_to_stderr(enabled: bool):
    """While a --json job runs, whatever anything prints on stdout (Python or C) goes to stderr."""
    if not enabled:
        yield
        return
    real = sys.stdout
    try:
        fd_out, fd_err = real.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. a test runner's buffer)
        fd_out = fd_err = None
    real.flush()
    saved = os.dup(fd_out) if fd_out is not None else None
    if saved is not None:
        os.dup2(fd_err, fd_out)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        real.flush()
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, fd_out)
            os.close(saved)


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
            prog.update(task, completed=done, total=total or None, info=info)  # total 0: a stage, not a count

        yield cb


def _emit(data: dict, as_json: bool, human: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()
    else:
        typer.echo(human)


def _default_name(source: str, bits: int) -> str:
    """Registry name when --name is not given: the source's last path part, e.g. smollm2-2bit."""
    import re

    stem = source.rstrip("/").split("/")[-1].split("@")[0]
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._") or "model"
    return f"{stem[:100]}-{bits}bit"


@app.command()
def compress(
    source: str = typer.Argument(..., help="HF model folder, a .gguf file, 'smollm2', s3://bucket/prefix "
                                 "or hf://org/name."),
    bits: int = typer.Option(2, "--bits", help="Target bits per weight preset: 2, 3 or 4."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the checkpoint to this folder "
                                       "(must not exist unless --overwrite)."),
    name: Optional[str] = typer.Option(None, "--name", help="Registry name (default: SOURCE-Bbit)."),
    version: Optional[str] = typer.Option(None, "--version", help="Registry version (default: the next vN)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML or JSON file of QuantConfig fields "
                                          "(see `vptq config show`); --set wins over it."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text (default: wikitext-2 valid)."),
    nsamples: Optional[int] = typer.Option(None, "--nsamples", help="Calibration windows, drawn from the text with "
                                           "--seed (default: 256 with fine-tuning, 64 without)."),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed for windows and codebooks."),
    device: Device = typer.Option(Device.cpu, "--device", help="Compute device."),
    hessians: Optional[HessianMode] = typer.Option(
        None, "--hessians", help="original (the presets'): from the FP model, one shared pass reused by later jobs "
        "on the same model and data; sequential: from the quantized prefix."),
    runner: str = typer.Option("local", "--runner", help="Where a block's linears are quantized: local "
                               "(this process), dask or ray (worker processes, one GPU each)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker processes of --runner dask|ray "
                                          "(default: the number of GPUs, else 2)."),
    finetune_steps: Optional[int] = typer.Option(
        None, "--finetune-steps", help="End-to-end KL fine-tuning steps after quantization (0 = off; "
        "default: the preset's, 400)."),
    set_: list[str] = typer.Option([], "--set", help="Override a QuantConfig field, e.g. --set enable_norm=false."),
    eval_text: Optional[Path] = typer.Option(None, "--eval-text", help="Held-out text for perplexity before/after "
                                             "(default: the calibration text)."),
    eval_windows: int = typer.Option(4, "--eval-windows", help="Perplexity windows before/after (0 = none)."),
    eval_seqlen: int = typer.Option(512, "--eval-seqlen", help="Tokens per perplexity window."),
    max_ppl_ratio: Optional[float] = typer.Option(
        None, "--max-ppl-ratio", help="Publish the version as rejected when perplexity after > R x before."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out checkpoint folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Quantize SOURCE now, in this process, through the `compress` flow; publish NAME:VERSION.

    Re-running the identical command resumes an interrupted job (finished blocks are reused).
    """
    if bits not in (2, 3, 4):
        _err(f"--bits {bits}: choose 2, 3 or 4", EXIT_USAGE)
    from vptq_service.cli.jobs import _job_errors

    with _job_errors(debug):
        from vptq_service.cli.jobs import build_spec, export_artifact, open_job, run_flow

        from vptq.io import check_out

        if out is not None:
            check_out(out, overwrite)
        over = overrides_from(config, set_)
        if finetune_steps is not None:
            if finetune_steps < 0:
                _err(f"--finetune-steps {finetune_steps}: use 0 (off) or a positive number of steps", EXIT_USAGE)
            over["e2e_steps"] = finetune_steps
        spec = build_spec(source, name or _default_name(source, bits), bits, version,
                          str(calib) if calib else None, nsamples, seqlen, seed, hessians.value if hessians else None, over,
                          device.value, str(eval_text) if eval_text else None, eval_windows, eval_seqlen,
                          max_ppl_ratio, runner, workers)
        from vptq_service.store.artifacts import open_artifact_store

        open_artifact_store().check()  # an unreachable store fails now, not after the quantization
        job = open_job(spec)
        with _stdout_to_stderr(as_json), _progress(True, "quantize") as cb:
            import vptq_service.flows.compress as fc

            fc.progress_hook = cb
            try:
                s = run_flow(job.id)
            finally:
                fc.progress_hook = None
        if s.get("status") != "succeeded":
            _err(f"job {s['job_id']} {s.get('status')}: {s.get('error') or 'see `vptq jobs logs`'}", EXIT_FAILURE)
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
        _emit(s, as_json, human)


def overrides_from(config: Path | None, items: list[str]) -> dict:
    """QuantConfig overrides: the --config file's fields, then --set FIELD=VALUE over them."""
    over = _config_file(config) if config is not None else {}
    over.update(_overrides(items))
    return over


_FIXED = ("targets", "hessians", "seed")  # set by their own options, not by --set/--config


def _config_file(path: Path) -> dict:
    """A flat TOML or JSON mapping of QuantConfig fields; unknown keys and wrong types refused."""
    import tomllib

    from vptq.config import ConfigError, QuantConfig

    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text(errors="replace")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise ConfigError(f"--config {path}: not valid {kind} ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of QuantConfig fields")
    fields = {k for k in QuantConfig.__dataclass_fields__ if k not in _FIXED}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    default = QuantConfig()
    for key, val in data.items():
        typ = type(getattr(default, key))
        ok = isinstance(val, typ) and not (typ is int and isinstance(val, bool))
        if typ is float and isinstance(val, int) and not isinstance(val, bool):
            data[key], ok = float(val), True
        if not ok:
            raise ConfigError(f"--config {path}: {key} = {val!r} is not a {typ.__name__}")
    return dict(data)


def _overrides(items: list[str]) -> dict:
    from vptq.config import ConfigError, QuantConfig

    fields = QuantConfig.__dataclass_fields__
    out: dict = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or key not in fields or key in _FIXED:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                              f"{sorted(k for k in fields if k not in _FIXED)}")
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
    source: str = typer.Argument(..., help="Original model (folder, .gguf, 'smollm2'), a quantized folder, "
                                 "or a registry artifact NAME[:VERSION]."),
    text: Path = typer.Option(..., "--text", help="Evaluation text (e.g. wikitext-2 test.txt)."),
    windows: int = typer.Option(10, "--windows", help="Number of non-overlapping windows."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per window."),
    device: Device = typer.Option(Device.cpu, "--device", help="Compute device."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Perplexity of a model on the first WINDOWS windows of SEQLEN tokens of TEXT."""
    with _errors(debug):
        from vptq_service.cli.refs import local_model

        from vptq.pipeline import evaluate

        source = local_model(source)
        t0 = time.perf_counter()
        with _stdout_to_stderr(as_json), _progress(True, "evaluate") as cb:
            r = evaluate(source, text, windows, seqlen, device.value,
                         (lambda d, t: cb(d, t, "")) if cb else None)
        data = {"perplexity": r.perplexity, "windows": r.windows, "seqlen": r.seqlen, "tokens": r.tokens,
                "seconds": round(time.perf_counter() - t0, 2)}
        _emit(data, as_json, f"perplexity {r.perplexity:.3f} over {r.windows} x {r.seqlen} tokens")


from vptq_service.cli.db import register as _register_store  # noqa: E402 - store commands: db, artifacts, pull

_register_store(app)
from vptq_service.cli.jobs import register as _register_jobs  # noqa: E402 - submit, jobs, worker

_register_jobs(app)
from vptq_service.cli.generate import register as _register_generate  # noqa: E402 - generate, chat

_register_generate(app)
from vptq_service.cli.plan import register as _register_plan  # noqa: E402 - plan

_register_plan(app)
from vptq_service.cli.settings import register as _register_settings  # noqa: E402 - config show

_register_settings(app)


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
