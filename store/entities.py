"""Plain frozen dataclasses that leave store/: callers never see ORM objects or sessions."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class ModelRecord:
    id: int
    source_uri: str
    sha256: str
    architecture: str | None
    parameter_count: int | None
    created_at: datetime


@dataclass(frozen=True)
class CalibrationSetRecord:
    id: int
    source: str
    nsamples: int
    seqlen: int
    seed: int
    token_hash: str
    created_at: datetime


@dataclass(frozen=True)
class JobRecord:
    id: int
    source_uri: str
    status: str
    config: dict[str, Any] = field(hash=False)
    job_key: str | None
    model_id: int | None
    calibration_set_id: int | None
    code_version: str | None
    prefect_run_id: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    heartbeat_at: datetime | None = None  # last sign of life of the process running it
    runner: str | None = None  # which process runs it (host:pid)


@dataclass(frozen=True)
class LayerResultRecord:
    id: int
    job_id: int
    layer_name: str
    proxy_loss: float
    seconds: float
    bits_per_weight: float
    created_at: datetime


@dataclass(frozen=True)
class ArtifactRecord:
    id: int
    name: str
    version: str
    uri: str
    size: int
    sha256: str
    job_id: int | None
    published_at: datetime
    status: str = "published"  # or "rejected" (failed the job's evaluation gate), "reserved" (publish in flight)
    publisher: str | None = None  # while reserved: host:pid of the publisher
    staging: str | None = None  # while reserved: the store prefix its files are uploaded under

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class EvaluationRecord:
    id: int
    artifact_id: int | None
    model_id: int | None
    dataset: str
    windows: int
    seqlen: int
    perplexity: float
    created_at: datetime


@dataclass(frozen=True)
class HessianSetRecord:
    id: int
    key: str
    model_id: int | None
    calibration_set_id: int | None
    job_id: int | None  # the job that computed it
    mode: str
    nsamples: int
    seqlen: int
    uri: str
    size: int
    blocks: int
    seconds: float
    created_at: datetime
