"""`vptq submit --cron`: re-run one compression request on a cron schedule (e.g. nightly
re-quantization of a moving model path).

One Prefect deployment, `compress-scheduled/scheduled`, of the small flow `compress-scheduled(spec)`,
served by `vptq worker` next to `compress/compress`. Each request is one *schedule* of that
deployment (slug `NAME-<request key>`, the request's spec as the schedule's parameters), so a
request scheduled after the worker started is run without restarting it, and scheduling the same
request again only updates its cron (idempotent).

Job identity of a scheduled run: `compress-scheduled` fetches the model first and keys the job on
(request key, model sha256) -- `job_key = digest("scheduled", spec.key(), sha256)`. So
- the model at the path changed since the last run -> a new sha -> a new job row, a new version
  (`NAME:vN+1`) published;
- the model is unchanged -> the same key -> the finished job is found and reported, nothing is
  recomputed or published again (a failed or crashed run of that model is resumed instead).
The job keys of scheduled runs never collide with those of `vptq submit`/`vptq compress` without
--cron. A scheduled request always publishes the next free version, so `--version` is refused.
Schedules use Prefect's default timezone (UTC) unless a timezone is given.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from vptq_service.flows.spec import JobSpec

FLOW = "compress-scheduled"
DEPLOYMENT = "scheduled"
FULL_NAME = f"{FLOW}/{DEPLOYMENT}"


def check_cron(cron: str, timezone: str | None = None) -> str:
    """The cron expression (5 fields, or an @daily-style alias), else ConfigError."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    from vptq.config import ConfigError

    text = " ".join((cron or "").split())
    hint = "give 5 fields 'minute hour day-of-month month day-of-week', e.g. '0 3 * * *' (03:00 daily)"
    if not (text.startswith("@") or len(text.split()) == 5):
        raise ConfigError(f"--cron {cron!r}: expected 5 fields, got {len(text.split())}: {hint}")
    try:
        CronSchedule(cron=text, timezone=timezone)
    except ValidationError as e:
        msg = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(f"--cron {cron!r}: {msg}: {hint}") from None
    return text


def next_run(cron: str, timezone: str | None = None, after: datetime | None = None) -> str:
    """The next time the schedule fires (ISO 8601, in the schedule's timezone)."""
    from zoneinfo import ZoneInfo

    from prefect._vendor.croniter import croniter

    tz = ZoneInfo(timezone or "UTC")
    start = (after or datetime.now(UTC)).astimezone(tz)
    return croniter(cron, start).get_next(datetime).isoformat()


def schedule_slug(spec: JobSpec) -> str:
    """The schedule's identity: the same request is the same schedule."""
    return f"{spec.name}-{spec.key()[:12]}"


def _deployment():
    return compress_scheduled.to_deployment(
        name=DEPLOYMENT, description="Scheduled re-runs of `vptq submit --cron` requests (one schedule each).")


def schedule_request(spec: JobSpec, cron: str, timezone: str | None = None) -> dict[str, Any]:
    """Create (or update) the schedule that re-runs `spec` on `cron`; needs PREFECT_API_URL.

    Returns {deployment, schedule, cron, timezone, next_run, job_spec_key, created}.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import CronSchedule

    from vptq.config import ConfigError

    cron = check_cron(cron, timezone)
    if spec.version:
        raise ConfigError("--cron publishes the next free version at each run that finds a changed model: "
                          "leave out --version")
    schedule = CronSchedule(cron=cron, timezone=timezone)
    slug = schedule_slug(spec)
    params = {"spec": spec.model_dump(mode="json")}
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(FULL_NAME)
        except Exception:  # noqa: BLE001 - not there yet: create it (a worker serves it when it starts)
            _deployment().apply()
            dep = client.read_deployment_by_name(FULL_NAME)
        existing = next((s for s in client.read_deployment_schedules(dep.id) if s.slug == slug), None)
        if existing is None:
            client.create_deployment_schedules(dep.id, [(schedule, True)], parameters=params, slug=slug)
        else:
            client.update_deployment_schedule(dep.id, existing.id, active=True, schedule=schedule,
                                              parameters=params)
    return {"deployment": FULL_NAME, "schedule": slug, "cron": cron, "timezone": schedule.timezone,
            "next_run": next_run(cron, schedule.timezone), "job_spec_key": spec.key(), "created": existing is None}


def scheduled_job_key(spec: JobSpec, model_sha256: str) -> str:
    """Key of a scheduled run's job: the request and the model as fetched now."""
    from vptq_service.tasks.workspace import digest

    return digest("scheduled", spec.key(), model_sha256)[:24]


def open_scheduled_job(spec: JobSpec, model_sha256: str, schedule: str | None = None):
    """The job of this request on this model: the newest not-cancelled one with the key, else a new row."""
    from vptq_service.flows.request import job_config
    from vptq_service.store.repository import Repository
    from vptq_service.tasks.workspace import code_version

    key = scheduled_job_key(spec, model_sha256)
    with Repository.session_scope() as repo:
        job = repo.find_job(key)
        if job is not None:
            return job
        return repo.create_job(spec.source, job_config(spec, key, schedule=schedule, model_sha256=model_sha256),
                               code_version=code_version(), job_key=key)


@flow(name=FLOW, log_prints=False, persist_result=False, result_serializer="json")  # never pickle (flows/compress.py)
def compress_scheduled(spec: dict[str, Any]) -> dict[str, Any]:
    """One scheduled run of a request: fetch the model, open the job of (request, model sha256), and
    run (or report) it with the `compress` flow as a subflow."""
    from vptq_service.flows.compress import compress
    from vptq_service.tasks import fetch_model

    log = get_run_logger()
    job_spec = JobSpec.model_validate(spec)
    fetched = fetch_model(job_spec.source)
    job = open_scheduled_job(job_spec, fetched["sha256"], schedule_slug(job_spec))
    if job.status == "succeeded":
        log.info("model %s unchanged (sha256 %s): job %d already published it", job_spec.source,
                 fetched["sha256"][:12], job.id)
    else:
        log.info("job %d for %s (sha256 %s)", job.id, job_spec.source, fetched["sha256"][:12])
    return compress(job.id)
