"""`vptq submit`, `vptq jobs list/show/resume` and `vptq worker`: compression jobs as Prefect flow runs.

`vptq submit` validates the request, writes a `queued` job row (or finds the job of the identical
request, which it then resumes) and:
- when PREFECT_API_URL is set in the environment (a Prefect server and a `vptq worker` serving the
  `compress` deployment), creates a flow run of `compress/compress` and returns the job id at once;
- otherwise (or with --local) runs the `compress` flow in this process and prints its summary.
`vptq jobs resume ID` always runs the flow in this process. JSON keys: job_id, status,
blocks_total, blocks_reused, artifact (name:version), error. Exit 2 on bad input, 1 on failure.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from typing import Any, Optional

import typer

jobs_app = typer.Typer(name="jobs", help="Compression jobs: list, show, resume.", no_args_is_help=True,
                       add_completion=False, pretty_exceptions_enable=False)


@contextmanager
def _job_errors(debug: bool):
    """Bad input (config, source, unknown job) -> one line, exit 2; other failures -> one line, exit 1."""
    from cli.main import EXIT_FAILURE, EXIT_USAGE, _err, _errors, _stdout_to_stderr  # noqa: F401
    from store.errors import StoreError

    with _errors(debug):
        try:
            yield
        except StoreError as e:
            if debug:
                raise
            _err(str(e), EXIT_USAGE if "no job with id" in str(e) else EXIT_FAILURE)
        except Exception as e:  # noqa: BLE001 - a failed flow: the job row has the reason
            from vptq.config import ConfigError
            from vptq.source import SourceError

            if debug or isinstance(e, ConfigError | SourceError | FileExistsError):
                raise
            _err(f"{type(e).__name__}: {' '.join(str(e).split())}", EXIT_FAILURE)


def _emit(data: dict[str, Any], as_json: bool, human: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, default=str) + "\n")
        sys.stdout.flush()
    else:
        typer.echo(human)


def _human(s: dict[str, Any]) -> str:
    line = (f"job {s['job_id']} {s['status']}: {s.get('blocks_total', 0)} blocks "
            f"({s.get('blocks_reused', 0)} reused)")
    if s.get("artifact"):
        line += f", artifact {s['artifact']}"
    if s.get("error"):
        line += f", error: {s['error']}"
    return line


def _find_job(repo, key: str):
    """The newest job of the identical request that can still be run or reported."""
    for job in repo.list_jobs(limit=10_000):
        if job.config.get("job_key") == key and job.status != "cancelled":
            return job
    return None


class _NoTraceback(logging.Formatter):
    """Formats like `inner` but without exception text: the CLI's stderr stays one line per event
    (the Prefect UI still gets the traceback through its own handler)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record).split("\nTraceback (most recent call last)")[0]
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


@contextmanager
def _console_logs():
    """Prefect's console log handlers write to the current stderr, without tracebacks, meanwhile."""
    from prefect.logging.handlers import PrefectConsoleHandler

    names = ["", *(n for n in list(logging.root.manager.loggerDict) if n.startswith("prefect"))]
    handlers = {h for name in names for h in getattr(logging.getLogger(name), "handlers", [])
                if isinstance(h, PrefectConsoleHandler)}
    saved = {h: (h.formatter, h.console.file) for h in handlers}
    for h in handlers:
        h.setFormatter(_NoTraceback(h.formatter))
        h.console.file = sys.stderr
    try:
        yield
    finally:
        for h, (fmt, file) in saved.items():
            h.setFormatter(fmt)
            h.console.file = file if not getattr(file, "closed", False) else sys.__stderr__


def _run_flow(job_id: int) -> dict[str, Any]:
    from flows.compress import compress as compress_flow

    with _console_logs():
        return compress_flow(job_id)


def submit(
    source: str = typer.Argument(..., help="HF model folder, a .gguf file, 'smollm2' or s3://bucket/prefix."),
    name: str = typer.Option(..., "--name", help="Registry name of the result (published as NAME:vN)."),
    bits: int = typer.Option(2, "--bits", help="Bits per weight preset: 2, 3 or 4."),
    version: Optional[str] = typer.Option(None, "--version", help="Registry version (default: the next vN)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text (default: wikitext-2 valid)."),
    nsamples: int = typer.Option(64, "--nsamples", help="Calibration windows."),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed for windows and codebooks."),
    set_: list[str] = typer.Option([], "--set", help="Override a QuantConfig field, e.g. --set e2e_steps=0."),
    eval_text: Optional[str] = typer.Option(None, "--eval-text", help="Held-out text (default: the calibration text)."),
    eval_windows: int = typer.Option(4, "--eval-windows", help="Perplexity windows before/after (0 = none)."),
    eval_seqlen: int = typer.Option(512, "--eval-seqlen", help="Tokens per perplexity window."),
    device: str = typer.Option("cpu", "--device", help="Compute device (cpu, cuda)."),
    local: bool = typer.Option(False, "--local", help="Run in this process even when PREFECT_API_URL is set."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Submit a compression job: a Prefect flow run on a worker, or in this process."""
    from cli.main import EXIT_USAGE, _err, _overrides, _stdout_to_stderr

    if bits not in (2, 3, 4):
        _err(f"--bits {bits}: choose 2, 3 or 4", EXIT_USAGE)
    with _job_errors(debug):
        from pydantic import ValidationError

        from flows.spec import JobSpec
        from store.errors import StoreError
        from store.registry import parse_ref
        from store.repository import Repository
        from tasks.workspace import code_version
        from vptq.config import ConfigError
        from vptq.pipeline import check_device, read_text
        from vptq.source import resolve

        try:
            spec = JobSpec(source=source, name=name, version=version, bits=bits, calib=calib, nsamples=nsamples,
                           seqlen=seqlen, seed=seed, overrides=_overrides(set_), device=device,
                           eval_text=eval_text, eval_windows=eval_windows, eval_seqlen=eval_seqlen).normalized()
        except ValidationError as e:
            err = e.errors()[0]
            raise ConfigError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
        # every cheap check before a job row exists: a bad request leaves nothing behind
        try:
            parse_ref(f"{name}:{version}" if version else name)
        except StoreError as e:
            raise ConfigError(f"--name/--version: {e}") from None
        cfg = spec.quant_config()
        check_device(device)
        if not spec.source.startswith("s3://"):
            resolve(spec.source)
        for path, what, opt in ((spec.calib, "calibration", "--calib"), (spec.eval_text, "evaluation text", "--eval-text")):
            if path:
                read_text(path, what, opt)
        repo = Repository.open()
        try:
            job = _find_job(repo, spec.key())
            if job is None:
                job = repo.create_job(spec.source, {"spec": spec.model_dump(), "job_key": spec.key(),
                                                    "quant": cfg.to_dict()}, code_version=code_version())
        finally:
            repo.close()
        if os.environ.get("PREFECT_API_URL") and not local and job.status != "succeeded":
            from prefect.deployments import run_deployment

            run = run_deployment("compress/compress", parameters={"job_id": job.id}, timeout=0)
            data = {"job_id": job.id, "status": "queued", "flow_run_id": str(run.id), "blocks_total": None,
                    "blocks_reused": None, "artifact": None}
            _emit(data, as_json, f"job {job.id} queued as flow run {run.id}")
            return
        with _stdout_to_stderr(as_json):
            s = _run_flow(job.id)
        _emit(s, as_json, _human(s))


@jobs_app.command("list")
def list_jobs(
    status: Optional[str] = typer.Option(None, "--status", help="Only jobs in this status."),
    limit: int = typer.Option(50, "--limit", help="At most this many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON array on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Jobs, newest first."""
    with _job_errors(debug):
        from store.repository import Repository

        repo = Repository.open()
        try:
            rows = [{"job_id": j.id, "status": j.status, "source": j.source_uri,
                     "name": j.config.get("spec", {}).get("name"), "created_at": j.created_at.isoformat(),
                     "error": j.error} for j in repo.list_jobs(status, limit)]
        finally:
            repo.close()
        if as_json:
            sys.stdout.write(json.dumps(rows) + "\n")
        else:
            for r in rows:
                typer.echo(f"{r['job_id']:>5}  {r['status']:<9}  {r['name'] or '-':<20}  {r['source']}"
                           + (f"  ({r['error']})" if r["error"] else ""))


@jobs_app.command("show")
def show(
    job_id: int = typer.Argument(..., help="Job id (see `vptq jobs list`)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """One job: status, error, blocks, layers, artifact."""
    with _job_errors(debug):
        from flows.compress import job_summary
        from store.repository import Repository

        repo = Repository.open()
        try:
            s = job_summary(repo, job_id)
            s["layers"] = [{"layer": r.layer_name, "proxy_loss": r.proxy_loss, "bpw": r.bits_per_weight,
                            "seconds": r.seconds} for r in repo.layer_results(job_id)]
            s["spec"] = repo.get_job(job_id).config.get("spec")
            s["blocks_reused"] = None  # known only to the run that reported it
        finally:
            repo.close()
        _emit(s, as_json, _human(s) + "".join(f"\n  {r['layer']}: proxy loss {r['proxy_loss']:.4g}, "
                                              f"{r['bpw']:.3f} bpw" for r in s["layers"]))


@jobs_app.command("resume")
def resume(
    job_id: int = typer.Argument(..., help="A crashed, killed or failed job."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Continue a job in this process: finished blocks are reused, not recomputed."""
    from cli.main import _stdout_to_stderr

    with _job_errors(debug):
        from store.repository import Repository

        repo = Repository.open()
        try:
            repo.get_job(job_id)  # an unknown id fails here, before Prefect starts
        finally:
            repo.close()
        with _stdout_to_stderr(as_json):
            s = _run_flow(job_id)
        _emit(s, as_json, _human(s))


def worker(
    limit: int = typer.Option(1, "--limit", help="Flow runs at once."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Serve the `compress` deployment: run the jobs `vptq submit` queues (needs PREFECT_API_URL)."""
    from cli.main import EXIT_USAGE, _err

    if not os.environ.get("PREFECT_API_URL"):
        _err("PREFECT_API_URL is not set: start `vptq server` and export "
             "PREFECT_API_URL=http://127.0.0.1:4200/api", EXIT_USAGE)
    with _job_errors(debug):
        from flows.compress import DEPLOYMENT
        from flows.compress import compress as compress_flow

        compress_flow.serve(name=DEPLOYMENT, limit=limit)


def server(port: int = typer.Option(4200, "--port", help="Port on 127.0.0.1.")) -> None:
    """Start the Prefect server and UI on 127.0.0.1 (then export PREFECT_API_URL=http://127.0.0.1:PORT/api)."""
    import shutil

    exe = shutil.which("prefect") or os.path.join(os.path.dirname(sys.executable), "prefect")
    os.execv(exe, [exe, "server", "start", "--host", "127.0.0.1", "--port", str(port)])


def register(main_app: typer.Typer) -> None:
    """Attach `submit`, `jobs`, `worker` and `server` to the main app."""
    main_app.command("submit")(submit)
    main_app.add_typer(jobs_app, name="jobs")
    main_app.command("worker")(worker)
    main_app.command("server")(server)
