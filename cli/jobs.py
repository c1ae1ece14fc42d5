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

import logging
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from vptq_service.cli import options as opt
from vptq_service.cli.errors import EXIT_USAGE, errors, fail
from vptq_service.cli.output import emit, stdout_to_stderr
from vptq_service.flows.spec import JobSpec

# job ids are INTEGER columns: a bigger number is a typo (click's range check: exit 2, one line)
MAX_JOB_ID = 2**31 - 1


def job_id_arg(help: str):  # noqa: A002 - typer's keyword
    return typer.Argument(..., help=help, min=1, max=MAX_JOB_ID)


jobs_app = typer.Typer(name="jobs", help="Compression jobs: ls, show, logs, cancel, resume.", no_args_is_help=True,
                       add_completion=False, pretty_exceptions_enable=False)


def _human(s: dict[str, Any]) -> str:
    line = (f"job {s['job_id']} {s['status']}: {s.get('blocks_total', 0)} blocks "
            f"({s.get('blocks_reused', 0)} reused)")
    if s.get("artifact"):
        line += f", artifact {s['artifact']}"
    if s.get("error"):
        line += f", error: {s['error']}"
    return line


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
def _console_logs(verbose: bool = False):
    """Prefect's console log lines, meanwhile: muted (the terminal has the progress bar and the
    summary; `vptq jobs logs ID` and the Prefect UI keep every line), or with --verbose on the
    current stderr without tracebacks."""
    from prefect.logging.handlers import PrefectConsoleHandler

    names = ["", *(n for n in list(logging.root.manager.loggerDict) if n.startswith("prefect"))]
    handlers = {h for name in names for h in getattr(logging.getLogger(name), "handlers", [])
                if isinstance(h, PrefectConsoleHandler)}
    saved = {h: (h.formatter, h.console.file, h.level) for h in handlers}
    for h in handlers:
        h.setFormatter(_NoTraceback(h.formatter))
        h.console.file = sys.stderr
        if not verbose:
            h.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for h, (fmt, file, level) in saved.items():
            h.setFormatter(fmt)
            h.console.file = file if not getattr(file, "closed", False) else sys.__stderr__
            h.setLevel(level if verbose else logging.CRITICAL + 1)  # the temporary server's exit line too


def prefect_ready() -> None:
    """Start Prefect's ephemeral API for this process, the first time in a PREFECT_HOME under a lock.

    Every process without PREFECT_API_URL starts its own temporary Prefect server on the SQLite
    database in PREFECT_HOME, and each server migrates that database when it starts. Two first-time
    commands at once raced there (`index ... already exists` and ~190 lines of tracebacks, though
    both jobs ran). So the first start in a PREFECT_HOME holds an exclusive lock file until the
    server answers (its migrations and block registration are done then) and leaves a marker, per
    Prefect version (a newer one brings migrations); later starts skip the lock."""
    import fcntl

    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return  # a server of its own (`vptq server`, the test harness): nothing to set up here
    server = SubprocessASGIServer()
    home = Path(PREFECT_HOME.value()).expanduser()
    marker = home / f".vptq-ready-{prefect.__version__}"
    if server.running or marker.exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".vptq-setup.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        try:
            server.start()
            marker.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_flow(job_id: int, verbose: bool = False) -> dict[str, Any]:
    """Run (or resume) the job's flow in this process; its summary dict (a failed job raises)."""
    from vptq_service.flows.compress import compress as compress_flow

    with _console_logs(verbose):
        prefect_ready()
        return compress_flow(job_id)


@opt.request_command
def submit(
    request: Callable[[], JobSpec],
    cron: Optional[str] = typer.Option(None, "--cron", help="Instead of one run: a scheduled deployment "
                                       "re-running this request on a cron schedule (e.g. '0 3 * * *')."),
    local: bool = typer.Option(False, "--local", help="Run in this process even when PREFECT_API_URL is set."),
    as_json: opt.Json = False,
    debug: opt.Debug = False,
) -> None:
    """Submit a compression job: a Prefect flow run on a worker, or in this process."""
    with errors(debug):
        spec = request()
        api = os.environ.get("PREFECT_API_URL")
        if cron is not None:
            if not api:
                fail("--cron needs a Prefect server: start `vptq server`, export PREFECT_API_URL and run "
                     "`vptq worker`", EXIT_USAGE)
            from vptq_service.flows.schedule import schedule_request

            data = schedule_request(spec, cron)
            emit(data, as_json, f"scheduled {data['deployment']} on '{cron}' (next: {data['next_run']})")
            return
        from vptq_service.flows.request import open_job

        job = open_job(spec)
        if api and not local and job.status != "succeeded":
            from prefect.deployments import run_deployment

            run = run_deployment("compress/compress", parameters={"job_id": job.id}, timeout=0)
            data = {"job_id": job.id, "status": "queued", "flow_run_id": str(run.id), "blocks_total": None,
                    "blocks_reused": None, "artifact": None}
            emit(data, as_json, f"job {job.id} queued as flow run {run.id}")
            return
        with stdout_to_stderr(as_json):
            s = run_flow(job.id)
        emit(s, as_json, _human(s))
        if s.get("status") != "succeeded":
            raise typer.Exit(1)


def _row(j) -> dict[str, Any]:
    spec = j.config.get("spec", {})
    return {"job_id": j.id, "status": j.status, "source": j.source_uri, "name": spec.get("name"),
            "bits": spec.get("bits"), "created_at": j.created_at.isoformat(),
            "finished_at": j.finished_at.isoformat() if j.finished_at else None, "error": j.error}


@jobs_app.command("ls")
def list_jobs(
    status: Optional[str] = typer.Option(None, "--status", help="Only jobs in this status."),
    limit: int = typer.Option(50, "--limit", help="At most this many, newest first.", min=0, max=MAX_JOB_ID),
    as_json: bool = typer.Option(False, "--json", help='Print {"items": [...]} on stdout.'),
    debug: opt.Debug = False,
) -> None:
    """Jobs, newest first."""
    with errors(debug):
        from vptq_service.store.models import JOB_STATUSES
        from vptq_service.store.repository import Repository

        if status is not None and status not in JOB_STATUSES:
            fail(f"--status {status!r}: use one of {', '.join(JOB_STATUSES)}", EXIT_USAGE)
        with Repository.session_scope() as repo:
            rows = [_row(j) for j in repo.list_jobs(status, limit)]
        if as_json:
            emit({"items": rows}, True, "")
        elif not rows:
            typer.echo("no jobs yet: start one with `vptq compress smollm2 --bits 2` or `vptq submit`")
        else:
            for r in rows:
                typer.echo(f"{r['job_id']:>5}  {r['status']:<9}  {r['name'] or '-':<20}  {r['source']}"
                           + (f"  ({r['error']})" if r["error"] else ""))


jobs_app.command("list", hidden=True)(list_jobs)  # the longer spelling, kept working


@jobs_app.command("show")
def show(
    job_id: int = job_id_arg("Job id (see `vptq jobs ls`)."),
    as_json: opt.Json = False,
    debug: opt.Debug = False,
) -> None:
    """One job: status, blocks done of total, error, layers, artifact."""
    with errors(debug):
        from vptq_service.flows.compress import job_summary
        from vptq_service.store.errors import mask_text
        from vptq_service.store.repository import Repository

        with Repository.session_scope() as repo:
            s = job_summary(repo, job_id)
            s["layers"] = [{"layer": r.layer_name, "proxy_loss": r.proxy_loss, "bpw": r.bits_per_weight,
                            "seconds": r.seconds} for r in repo.layer_results(job_id)]
            s["spec"] = dict(repo.get_job(job_id).config.get("spec") or {}) or None
            if s["spec"] and s["spec"].get("source"):  # a row written before sources were checked for secrets
                s["spec"]["source"] = mask_text(s["spec"]["source"])
            s["blocks_reused"] = None  # known only to the run that reported it
            job = repo.get_job(job_id)  # who runs it and when it last said so (a job is taken over when stale)
            s["runner"] = job.runner
            s["heartbeat_at"] = job.heartbeat_at.isoformat() if job.heartbeat_at else None
        head = (f"job {s['job_id']} {s['status']}: {s['blocks_done']}/{s['blocks_total']} blocks"
                + (f", runner {s['runner']} (heartbeat {s['heartbeat_at']})"
                   if s["status"] == "running" and s["runner"] else "")
                + (f", artifact {s['artifact']}" if s.get("artifact") else "")
                + (f", error: {s['error']}" if s.get("error") else ""))
        emit(s, as_json, head + "".join(f"\n  {r['layer']}: proxy loss {r['proxy_loss']:.4g}, "
                                         f"{r['bpw']:.3f} bpw" for r in s["layers"]))


@jobs_app.command("cancel")
def cancel(
    job_id: int = job_id_arg("A queued, running or crashed job."),
    as_json: opt.Json = False,
    debug: opt.Debug = False,
) -> None:
    """Cancel a job: a running flow stops before its next block; its Prefect flow run is cancelled."""
    with errors(debug):
        from vptq_service.store.repository import Repository

        with Repository.session_scope() as repo:
            job = repo.get_job(job_id)
            if job.status in ("succeeded", "failed", "cancelled"):
                fail(f"job {job_id} is already {job.status}: nothing to cancel", EXIT_USAGE)
            job = repo.set_job_status(job_id, "cancelled", error="cancelled by `vptq jobs cancel`")
        prefect_state = None
        if job.prefect_run_id and os.environ.get("PREFECT_API_URL"):
            prefect_state = _cancel_flow_run(job.prefect_run_id)
        data = {"job_id": job_id, "status": job.status, "prefect_run_id": job.prefect_run_id,
                "prefect_state": prefect_state}
        emit(data, as_json, f"job {job_id} cancelled" + (f" (flow run {prefect_state})" if prefect_state else ""))


def _cancel_flow_run(run_id: str) -> str | None:
    """Ask the Prefect API to cancel the flow run (a worker then stops its process)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(run_id))
        if run.state is not None and run.state.is_final():
            return run.state.name
        client.set_flow_run_state(UUID(run_id), Cancelling(), force=True)
        return "Cancelling"


@jobs_app.command("logs")
def logs(
    job_id: int = job_id_arg("Job id (see `vptq jobs ls`)."),
    limit: int = typer.Option(1000, "--limit", help="At most this many lines, oldest first.", min=0, max=MAX_JOB_ID),
    as_json: bool = typer.Option(False, "--json", help='Print {"items": [...]} on stdout.'),
    debug: opt.Debug = False,
) -> None:
    """The job's log lines as the Prefect API stored them (flow and task runs)."""
    with errors(debug):
        from vptq_service.store.repository import Repository

        with Repository.session_scope() as repo:
            job = repo.get_job(job_id)
        items: list[dict[str, Any]] = []
        if job.prefect_run_id:
            items = _read_logs(job.prefect_run_id, limit)
        if as_json:
            emit({"job_id": job_id, "status": job.status, "items": items}, True, "")
            return
        if not items:
            typer.echo(f"job {job_id} ({job.status}) has no log lines"
                       + ("" if job.prefect_run_id else ": it has not started") + (f"; error: {job.error}" if job.error else ""))
        for it in items:
            typer.echo(f"{it['timestamp'][11:19]} {it['level']:<7} {it['message']}")


def _read_logs(run_id: str, limit: int) -> list[dict[str, Any]]:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    rows: list = []
    prefect_ready()  # this process's temporary server, set up once per PREFECT_HOME
    with get_client(sync_client=True) as client:
        while len(rows) < limit:  # the API serves at most 200 lines a request
            page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(run_id)])),
                                    limit=min(200, limit - len(rows)), offset=len(rows), sort=LogSort.TIMESTAMP_ASC)
            rows.extend(page)
            if len(page) < 200:
                break
    return [{"timestamp": r.timestamp.isoformat(), "level": logging.getLevelName(r.level), "message": r.message}
            for r in rows]


@jobs_app.command("resume")
def resume(
    job_id: int = job_id_arg("A crashed, killed or failed job."),
    as_json: opt.Json = False,
    debug: opt.Debug = False,
) -> None:
    """Continue a job in this process: finished blocks are reused, not recomputed."""
    with errors(debug):
        from vptq_service.store.repository import Repository

        with Repository.session_scope() as repo:
            repo.get_job(job_id)  # an unknown id fails here, before Prefect starts
        with stdout_to_stderr(as_json):
            s = run_flow(job_id)
        emit(s, as_json, _human(s))


def worker(
    limit: int = typer.Option(1, "--limit", help="Flow runs at once.", min=1, max=1024),
    debug: opt.Debug = False,
) -> None:
    """Serve the `compress` and `compress-scheduled` deployments: run the jobs `vptq submit` queues
    and the scheduled re-runs of `vptq submit --cron` (needs PREFECT_API_URL)."""
    if not os.environ.get("PREFECT_API_URL"):
        fail("PREFECT_API_URL is not set: start `vptq server` and export "
             "PREFECT_API_URL=http://127.0.0.1:4200/api", EXIT_USAGE)
    with errors(debug):
        from prefect import serve
        from vptq_service.flows.compress import DEPLOYMENT
        from vptq_service.flows.compress import compress as compress_flow
        from vptq_service.flows.schedule import DEPLOYMENT as SCHEDULED
        from vptq_service.flows.schedule import compress_scheduled

        # a deployment applied without schedules keeps the schedules `vptq submit --cron` added
        serve(compress_flow.to_deployment(name=DEPLOYMENT), compress_scheduled.to_deployment(name=SCHEDULED),
              limit=limit)


def server(port: int = typer.Option(4200, "--port", help="Port on 127.0.0.1.", min=1, max=65535)) -> None:
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
