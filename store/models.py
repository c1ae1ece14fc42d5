"""SQLAlchemy 2.0 typed ORM for the lineage tables (architecture.md, "Lineage tables").

Constraints are explicitly named (stable Alembic diffs); job status is checked by the database;
timestamps are timezone-aware UTC on every backend. `to_entity()` is the only way rows leave.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from vptq_service.store import entities

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "crashed", "cancelled")
ARTIFACT_STATUSES = ("reserved", "published", "rejected")
# reserved: a publish in flight holds name:version (the unique row wins before any upload);
# rejected: failed its evaluation gate, never "latest"

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores aware UTC datetimes; SQLite returns naive values, which are UTC by construction."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware datetime (UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Model(Base):
    """A source model as fetched: where from and its content hash."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("source_uri", "sha256"), Index(None, "sha256"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    architecture: Mapped[str | None] = mapped_column(String(128))
    parameter_count: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def to_entity(self) -> entities.ModelRecord:
        return entities.ModelRecord(self.id, self.source_uri, self.sha256, self.architecture,
                                    self.parameter_count, self.created_at)


class CalibrationSet(Base):
    """Calibration windows drawn from a text: enough to redraw them bit for bit."""

    __tablename__ = "calibration_sets"
    __table_args__ = (
        CheckConstraint("nsamples > 0", name="nsamples_positive"),
        CheckConstraint("seqlen > 0", name="seqlen_positive"),
        Index(None, "token_hash"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    nsamples: Mapped[int] = mapped_column(Integer)
    seqlen: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def to_entity(self) -> entities.CalibrationSetRecord:
        return entities.CalibrationSetRecord(self.id, self.source, self.nsamples, self.seqlen, self.seed,
                                             self.token_hash, self.created_at)


class Job(Base):
    """One compression request and its lifecycle."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("status IN (" + ", ".join(f"'{s}'" for s in JOB_STATUSES) + ")", name="status"),
        # `vptq jobs` lists by status, newest first
        Index(None, "status", "created_at"),
        Index(None, "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_uri: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # identity of the request (flows/request.py): the same request finds its job by this, indexed
    job_key: Mapped[str | None] = mapped_column(String(64), index=True)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), index=True)
    calibration_set_id: Mapped[int | None] = mapped_column(
        ForeignKey("calibration_sets.id", ondelete="SET NULL"), index=True)
    code_version: Mapped[str | None] = mapped_column(String(64))
    prefect_run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # liveness of the process running the job: a job is taken over only when its runner is gone
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    runner: Mapped[str | None] = mapped_column(String(128))

    def to_entity(self) -> entities.JobRecord:
        return entities.JobRecord(
            id=self.id, source_uri=self.source_uri, status=self.status, config=dict(self.config or {}),
            job_key=self.job_key, model_id=self.model_id, calibration_set_id=self.calibration_set_id, code_version=self.code_version,
            prefect_run_id=self.prefect_run_id, error=self.error, created_at=self.created_at,
            started_at=self.started_at, finished_at=self.finished_at, updated_at=self.updated_at,
            heartbeat_at=self.heartbeat_at, runner=self.runner)


class LayerResult(Base):
    """Metrics of one quantized linear of a job (one row per layer; a rerun replaces it)."""

    __tablename__ = "layer_results"
    __table_args__ = (UniqueConstraint("job_id", "layer_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    layer_name: Mapped[str] = mapped_column(String(256))
    proxy_loss: Mapped[float] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    bits_per_weight: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def to_entity(self) -> entities.LayerResultRecord:
        return entities.LayerResultRecord(self.id, self.job_id, self.layer_name, self.proxy_loss, self.seconds,
                                          self.bits_per_weight, self.created_at)


class Artifact(Base):
    """A published registry entry name:version (unique) and where its files live."""

    __tablename__ = "artifacts"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        CheckConstraint("size >= 0", name="size_nonnegative"),
        CheckConstraint("status IN (" + ", ".join(f"'{s}'" for s in ARTIFACT_STATUSES) + ")", name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))  # of manifest.json, which hashes every file
    published_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    status: Mapped[str] = mapped_column(String(16), default="published", server_default="published")
    # while reserved: who holds name:version (host:pid) and the store prefix its files are staged under
    publisher: Mapped[str | None] = mapped_column(String(128))
    staging: Mapped[str | None] = mapped_column(String(256))

    def to_entity(self) -> entities.ArtifactRecord:
        return entities.ArtifactRecord(self.id, self.name, self.version, self.uri, self.size, self.sha256,
                                       self.job_id, self.published_at, self.status, self.publisher, self.staging)


class HessianSet(Base):
    """A stored Hessian set (hessians="original"): one pass of a model over calibration windows,
    reused by every later job on the same (model, calibration, mode, nsamples, seqlen) = key."""

    __tablename__ = "hessian_sets"
    __table_args__ = (
        UniqueConstraint("key"),
        CheckConstraint("size >= 0 AND blocks >= 0", name="size_blocks_nonnegative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), index=True)
    calibration_set_id: Mapped[int | None] = mapped_column(
        ForeignKey("calibration_sets.id", ondelete="SET NULL"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))  # computed by
    mode: Mapped[str] = mapped_column(String(16))
    nsamples: Mapped[int] = mapped_column(Integer)
    seqlen: Mapped[int] = mapped_column(Integer)
    uri: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    blocks: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def to_entity(self) -> entities.HessianSetRecord:
        return entities.HessianSetRecord(self.id, self.key, self.model_id, self.calibration_set_id, self.job_id,
                                         self.mode, self.nsamples, self.seqlen, self.uri, self.size, self.blocks,
                                         self.seconds, self.created_at)


class Evaluation(Base):
    """A perplexity measurement of an artifact or of a source model (exactly one of the two)."""

    __tablename__ = "evaluations"
    __table_args__ = (
        CheckConstraint("(artifact_id IS NULL) <> (model_id IS NULL)", name="one_subject"),
        CheckConstraint("windows > 0 AND seqlen > 0", name="windows_seqlen_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    dataset: Mapped[str] = mapped_column(String(256))
    windows: Mapped[int] = mapped_column(Integer)
    seqlen: Mapped[int] = mapped_column(Integer)
    perplexity: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def to_entity(self) -> entities.EvaluationRecord:
        return entities.EvaluationRecord(self.id, self.artifact_id, self.model_id, self.dataset, self.windows,
                                         self.seqlen, self.perplexity, self.created_at)
