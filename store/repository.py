"""Repository: the lineage API the tasks call. One session per call, plain dataclasses out.

Each public method runs in its own transaction (commit on success, rollback on error, close
always), so a status change is atomic and no ORM object or session leaves store/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session
from vptq_service.store import entities
from vptq_service.store.db import session_factory
from vptq_service.store.errors import StoreError, StoreUsageError, mask_text, mask_url
from vptq_service.store.models import (
    ARTIFACT_STATUSES,
    JOB_STATUSES,
    Artifact,
    CalibrationSet,
    Evaluation,
    HessianSet,
    Job,
    LayerResult,
    Model,
    utcnow,
)

# Which status may follow which. A crashed job may be resumed (running) or re-queued.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "crashed", "cancelled"}),
    "crashed": frozenset({"running", "queued", "failed", "cancelled"}),
    "failed": frozenset({"queued"}),
    "succeeded": frozenset(),
    "cancelled": frozenset(),
}
FINISHED = frozenset({"succeeded", "failed", "cancelled"})


class JobTakenOver(StoreError):
    """Another process took the job over (this one's heartbeat went stale): stop, write nothing."""


class Repository:
    """Lineage rows: models, calibration sets, jobs, layer results, artifacts, evaluations."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sessions = session_factory(engine)

    @classmethod
    def open(cls, url: str | None = None) -> Repository:
        """A repository on url (default VPTQ_DB_URL / the SQLite file in VPTQ_HOME) at schema head."""
        from vptq_service.store.migrate import open_database

        return cls(open_database(url))

    @classmethod
    @contextmanager
    def session_scope(cls, url: str | None = None) -> Iterator[Repository]:
        """`with Repository.session_scope() as repo:` opens, yields and always closes a repository."""
        repo = cls.open(url)
        try:
            yield repo
        finally:
            repo.close()

    @property
    def url(self) -> str:
        """The database URL with the password hidden."""
        return self._engine.url.render_as_string()

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Commit on success, roll back on error, always close; DB errors become StoreError."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except StoreError:
            session.rollback()
            raise
        except SQLAlchemyError as e:
            session.rollback()
            raise StoreError(f"database error on {self.url}: {_first_line(e)}", self._engine.url.password) from None
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    # -- models and calibration sets -------------------------------------------------------

    def add_model(self, source_uri: str, sha256: str, architecture: str | None = None,
                  parameter_count: int | None = None) -> entities.ModelRecord:
        """Record a fetched model; the same (source, sha256) returns the existing row."""
        source_uri = mask_url(source_uri)
        with self.session() as s:
            row = s.scalar(select(Model).where(Model.source_uri == source_uri, Model.sha256 == sha256))
            if row is None:
                row = Model(source_uri=source_uri, sha256=sha256, architecture=architecture,
                            parameter_count=parameter_count)
                s.add(row)
                s.flush()
            return row.to_entity()

    def add_calibration_set(self, source: str, nsamples: int, seqlen: int, seed: int,
                            token_hash: str) -> entities.CalibrationSetRecord:
        with self.session() as s:
            row = CalibrationSet(source=mask_url(source), nsamples=nsamples, seqlen=seqlen, seed=seed,
                                 token_hash=token_hash)
            s.add(row)
            s.flush()
            return row.to_entity()

    # -- jobs ------------------------------------------------------------------------------

    def create_job(self, source_uri: str, config: dict[str, Any], code_version: str | None = None,
                   model_id: int | None = None, calibration_set_id: int | None = None,
                   prefect_run_id: str | None = None, job_key: str | None = None) -> entities.JobRecord:
        """A new job in status `queued`; job_key is the request's identity (find_job)."""
        with self.session() as s:
            row = Job(source_uri=mask_url(source_uri), config=dict(config), code_version=code_version,
                      model_id=model_id, calibration_set_id=calibration_set_id, prefect_run_id=prefect_run_id,
                      job_key=job_key, status="queued")
            s.add(row)
            s.flush()
            return row.to_entity()

    def get_job(self, job_id: int) -> entities.JobRecord:
        with self.session() as s:
            return _job(s, job_id).to_entity()

    def find_job(self, job_key: str) -> entities.JobRecord | None:
        """The newest job of this request key that was not cancelled (it can be resumed or reported)."""
        with self.session() as s:
            row = s.scalar(select(Job).where(Job.job_key == job_key, Job.status != "cancelled")
                           .order_by(Job.created_at.desc(), Job.id.desc()).limit(1))
            return None if row is None else row.to_entity()

    def list_jobs(self, status: str | None = None, limit: int = 50) -> list[entities.JobRecord]:
        """Newest first, optionally one status."""
        if status is not None:
            _check_status(status)
        with self.session() as s:
            q = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
            if status is not None:
                q = q.where(Job.status == status)
            return [r.to_entity() for r in s.scalars(q)]

    def set_job_status(self, job_id: int, status: str, error: str | None = None,
                       runner: str | None = None) -> entities.JobRecord:
        """Move a job to status in one transaction (row locked on PostgreSQL); illegal moves refused.
        With `runner`: only while that process runs the job (JobTakenOver otherwise)."""
        _check_status(status)
        with self.session() as s:
            row = _job(s, job_id, lock=True)
            if runner is not None and row.runner is not None and row.runner != runner:
                raise JobTakenOver(f"job {job_id} was taken over by {row.runner}: this process stopped running it")
            if status not in TRANSITIONS[row.status]:
                raise StoreError(f"job {job_id} is {row.status}: cannot become {status} "
                                 f"(allowed: {', '.join(sorted(TRANSITIONS[row.status])) or 'none'})")
            now = utcnow()
            row.status = status
            if status == "running":
                row.started_at = row.started_at or now
                row.finished_at = None
            if status in FINISHED or status == "crashed":
                row.finished_at = now
            row.error = mask_text(error) if error else (None if status in ("running", "queued", "succeeded") else row.error)
            s.flush()
            return row.to_entity()

    def claim_job(self, job_id: int, runner: str, stale_before: datetime,
                  gone: Callable[[str], bool] | None = None, restart_failed: bool = True
                  ) -> tuple[entities.JobRecord, str | None]:
        """Make `runner` the one process running the job, in one transaction (row locked).

        Returns (job, how): how = "started" (it was queued, crashed or, with restart_failed, failed),
        "resumed" (runner already had it), "taken_over" (it was running but its runner is gone: its
        heartbeat is older than stale_before, or gone(runner) says its process is dead), or None:
        not claimed (running with a live runner, or finished): the caller waits or reports it."""
        with self.session() as s:
            row = _job(s, job_id, lock=True)
            now, how = utcnow(), None
            if row.status == "running":
                if row.runner == runner:
                    how = "resumed"
                elif row.heartbeat_at is None or row.heartbeat_at < stale_before or \
                        (row.runner is not None and gone is not None and gone(row.runner)):
                    how = "taken_over"
                    row.error = None
            elif row.status in ("queued", "crashed") or (row.status == "failed" and restart_failed):
                how = "started"
                row.status, row.error, row.finished_at = "running", None, None
                row.started_at = row.started_at or now
            if how is not None:
                row.runner, row.heartbeat_at = runner, now
            s.flush()
            return row.to_entity(), how

    def beat_job(self, job_id: int, runner: str) -> bool:
        """Heartbeat: the job's heartbeat_at = now while `runner` runs it. False when it does not
        (another process took the job over, or it is no longer running): the runner must stop."""
        with self.session() as s:
            res = s.execute(update(Job).where(Job.id == job_id, Job.runner == runner, Job.status == "running")
                            .values(heartbeat_at=utcnow()))
            return res.rowcount == 1

    def update_job(self, job_id: int, *, model_id: int | None = None, calibration_set_id: int | None = None,
                   prefect_run_id: str | None = None, config_updates: dict[str, Any] | None = None
                   ) -> entities.JobRecord:
        """Attach lineage ids to a job (only the arguments given); config_updates merge into its config."""
        with self.session() as s:
            row = _job(s, job_id, lock=True)
            if config_updates:
                row.config = {**(row.config or {}), **config_updates}  # a new dict: JSON columns track assignment
            if model_id is not None:
                row.model_id = model_id
            if calibration_set_id is not None:
                row.calibration_set_id = calibration_set_id
            if prefect_run_id is not None:
                row.prefect_run_id = prefect_run_id
            s.flush()
            return row.to_entity()

    def add_layer_result(self, job_id: int, layer_name: str, proxy_loss: float, seconds: float,
                         bits_per_weight: float) -> entities.LayerResultRecord:
        """Record one linear's metrics; a rerun of the same layer replaces the earlier row."""
        with self.session() as s:
            _job(s, job_id)
            row = s.scalar(select(LayerResult).where(LayerResult.job_id == job_id,
                                                     LayerResult.layer_name == layer_name))
            if row is None:
                row = LayerResult(job_id=job_id, layer_name=layer_name)
                s.add(row)
            row.proxy_loss, row.seconds, row.bits_per_weight = float(proxy_loss), float(seconds), float(bits_per_weight)
            row.created_at = utcnow()
            s.flush()
            return row.to_entity()

    def layer_results(self, job_id: int) -> list[entities.LayerResultRecord]:
        with self.session() as s:
            q = select(LayerResult).where(LayerResult.job_id == job_id).order_by(LayerResult.id)
            return [r.to_entity() for r in s.scalars(q)]

    # -- artifacts and evaluations ---------------------------------------------------------

    def record_artifact(self, name: str, version: str, uri: str, size: int, sha256: str,
                        job_id: int | None = None, status: str = "published") -> entities.ArtifactRecord:
        """Register a published name:version; an existing name:version is refused."""
        if status not in ARTIFACT_STATUSES:
            raise StoreError(f"unknown artifact status {status!r}; expected one of {', '.join(ARTIFACT_STATUSES)}")
        try:
            with self.session() as s:
                row = Artifact(name=name, version=version, uri=mask_url(uri), size=size, sha256=sha256, job_id=job_id,
                               status=status)
                s.add(row)
                s.flush()
                return row.to_entity()
        except StoreError as e:
            if self.get_artifact(name, version) is not None:
                raise StoreError(f"artifact {name}:{version} is already registered; publish a new version") from None
            raise e

    def get_artifact(self, name: str, version: str) -> entities.ArtifactRecord | None:
        """The row of name:version in any status (a `reserved` one is a publish in flight)."""
        with self.session() as s:
            row = s.scalar(select(Artifact).where(Artifact.name == name, Artifact.version == version))
            return row.to_entity() if row else None

    def list_artifacts(self, name: str | None = None, include_reserved: bool = False) -> list[entities.ArtifactRecord]:
        """Published and rejected rows (with include_reserved also the publishes in flight)."""
        with self.session() as s:
            q = select(Artifact).order_by(Artifact.name, Artifact.published_at.desc())
            if name is not None:
                q = q.where(Artifact.name == name)
            if not include_reserved:
                q = q.where(Artifact.status != "reserved")
            return [r.to_entity() for r in s.scalars(q)]

    def reserve_artifact(self, name: str, version: str, uri: str, *, publisher: str, staging: str,
                         job_id: int | None = None) -> entities.ArtifactRecord | None:
        """Insert name:version as `reserved` (before any upload); None when the row exists already.

        The unique (name, version) constraint makes exactly one concurrent caller win: PostgreSQL
        blocks the second insert until the first commits, SQLite serializes writers."""
        with self.session() as s:
            row = Artifact(name=name, version=version, uri=mask_url(uri), size=0, sha256="", job_id=job_id,
                           status="reserved", publisher=publisher, staging=staging, published_at=utcnow())
            s.add(row)
            try:
                s.flush()
            except IntegrityError:
                s.rollback()
                return None
            return row.to_entity()

    def take_over_reservation(self, held: entities.ArtifactRecord, *, publisher: str, staging: str,
                              job_id: int | None = None) -> entities.ArtifactRecord | None:
        """Compare-and-swap a reservation whose publisher is gone to a new one; None if it changed meanwhile."""
        with self.session() as s:
            q = (update(Artifact).where(Artifact.id == held.id, Artifact.status == "reserved",
                                        Artifact.publisher == held.publisher, Artifact.staging == held.staging)
                 .values(publisher=publisher, staging=staging, published_at=utcnow(),
                         job_id=job_id if job_id is not None else held.job_id))
            if s.execute(q).rowcount != 1:
                return None
            row = s.get(Artifact, held.id)
            return None if row is None else row.to_entity()

    def finalize_artifact(self, artifact_id: int, *, size: int, sha256: str, status: str) -> entities.ArtifactRecord:
        """The manifest is committed: the reserved row becomes published/rejected (idempotent)."""
        if status not in ("published", "rejected"):
            raise StoreError(f"unknown artifact status {status!r}; expected published or rejected")
        with self.session() as s:
            row = s.get(Artifact, artifact_id, with_for_update=True)
            if row is None:
                raise StoreError(f"artifact row {artifact_id} vanished before it was finalized; "
                                 "run `vptq artifacts fsck --repair`")
            if row.status == "reserved":
                row.status, row.size, row.sha256 = status, size, sha256
                row.publisher = row.staging = None
                row.published_at = utcnow()
                s.flush()
            return row.to_entity()

    def release_artifact(self, artifact_id: int, publisher: str | None = None) -> bool:
        """Delete a reservation (a failed or dead publish); never a published row."""
        with self.session() as s:
            q = delete(Artifact).where(Artifact.id == artifact_id, Artifact.status == "reserved")
            if publisher is not None:
                q = q.where(Artifact.publisher == publisher)
            return s.execute(q).rowcount == 1

    def delete_artifact(self, name: str, version: str) -> bool:
        """Remove the row (and its evaluations); False when there was none."""
        with self.session() as s:
            row = s.scalar(select(Artifact).where(Artifact.name == name, Artifact.version == version))
            if row is None:
                return False
            s.delete(row)
            return True

    # -- Hessian sets ----------------------------------------------------------------------

    def add_hessian_set(self, key: str, mode: str, nsamples: int, seqlen: int, uri: str, size: int,
                        blocks: int, seconds: float, *, model_id: int | None = None,
                        calibration_set_id: int | None = None, job_id: int | None = None) -> entities.HessianSetRecord:
        """Record a stored Hessian set; an existing key returns its row (the first job that computed it)."""
        with self.session() as s:
            row = s.scalar(select(HessianSet).where(HessianSet.key == key))
            if row is None:
                row = HessianSet(key=key, mode=mode, nsamples=nsamples, seqlen=seqlen, uri=uri, size=size,
                                 blocks=blocks, seconds=seconds, model_id=model_id,
                                 calibration_set_id=calibration_set_id, job_id=job_id)
                s.add(row)
                s.flush()
            return row.to_entity()

    def get_hessian_set(self, key: str) -> entities.HessianSetRecord | None:
        with self.session() as s:
            row = s.scalar(select(HessianSet).where(HessianSet.key == key))
            return None if row is None else row.to_entity()

    def list_hessian_sets(self) -> list[entities.HessianSetRecord]:
        with self.session() as s:
            return [r.to_entity() for r in s.scalars(select(HessianSet).order_by(HessianSet.id))]

    def record_evaluation(self, dataset: str, windows: int, seqlen: int, perplexity: float, *,
                          artifact_id: int | None = None, model_id: int | None = None) -> entities.EvaluationRecord:
        """Perplexity of exactly one of an artifact or a source model."""
        if (artifact_id is None) == (model_id is None):
            raise StoreError("an evaluation needs exactly one of artifact_id or model_id")
        with self.session() as s:
            row = Evaluation(dataset=dataset, windows=windows, seqlen=seqlen, perplexity=float(perplexity),
                             artifact_id=artifact_id, model_id=model_id)
            s.add(row)
            s.flush()
            return row.to_entity()

    def evaluations(self, *, artifact_id: int | None = None, model_id: int | None = None) -> list[entities.EvaluationRecord]:
        with self.session() as s:
            q = select(Evaluation).order_by(Evaluation.id)
            if artifact_id is not None:
                q = q.where(Evaluation.artifact_id == artifact_id)
            if model_id is not None:
                q = q.where(Evaluation.model_id == model_id)
            return [r.to_entity() for r in s.scalars(q)]


def _job(s: Session, job_id: int, lock: bool = False) -> Job:
    q = select(Job).where(Job.id == job_id)
    if lock:
        q = q.with_for_update()  # no-op on SQLite, whose BEGIN IMMEDIATE already serializes writers
    row = s.scalar(q)
    if row is None:
        raise StoreUsageError(f"no job with id {job_id}; `vptq jobs` lists them")
    return row


def _check_status(status: str) -> None:
    if status not in JOB_STATUSES:
        raise StoreError(f"unknown job status {status!r}; expected one of {', '.join(JOB_STATUSES)}")


def _first_line(e: Exception) -> str:
    """The driver's message without SQLAlchemy's appended SQL and parameters (they may hold data)."""
    if isinstance(e, IntegrityError):
        return f"constraint violated: {str(e.orig).splitlines()[0] if e.orig else 'integrity error'}"
    text = str(getattr(e, "orig", None) or e)
    return text.splitlines()[0] if text else type(e).__name__
