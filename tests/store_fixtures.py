"""Fixtures for the store tests: a fresh SQLite file or PostgreSQL schema per test, a moto S3 server.

PostgreSQL is the real server at 127.0.0.1:5432 (database `test`, override with VPTQ_TEST_PG_URL);
each test gets its own schema (through search_path) that is dropped afterwards. S3 is moto's
ThreadedMotoServer on 127.0.0.1 at a free port, reached over real HTTP through AWS_ENDPOINT_URL,
the same code path as MinIO.
"""

from __future__ import annotations

import os
import uuid

import pytest
from vptq_service.serve.launch import free_port

PG_URL = os.environ.get("VPTQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# A recognizable secret: tests assert it never shows up in logs, errors or rows.
S3_SECRET = "s3cr3t-" + uuid.uuid4().hex


def _pg_admin():
    import psycopg

    conninfo = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        return psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL at {PG_URL} does not answer ({str(e).splitlines()[0]}): the store tests need it")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """An empty database (no schema yet): a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lineage.db'}"
        return
    schema = f"vptq_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        sep = "&" if "?" in PG_URL else "?"
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with _pg_admin() as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def repo(db_url, monkeypatch):
    """A Repository on a migrated database; VPTQ_DB_URL points at it."""
    from vptq_service.store.db import make_engine
    from vptq_service.store.migrate import upgrade
    from vptq_service.store.repository import Repository

    monkeypatch.setenv("VPTQ_DB_URL", db_url)
    engine = make_engine(db_url)
    upgrade(engine)
    r = Repository(engine)
    yield r
    r.close()


@pytest.fixture(scope="session")
def moto_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(moto_server, monkeypatch):
    """AWS_* variables for the moto server (the boto3 default chain picks them up)."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "vptq-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return moto_server


@pytest.fixture
def bucket(s3_env, monkeypatch):
    """A fresh bucket; VPTQ_ARTIFACTS=s3://bucket/models points into it."""
    import boto3

    name = f"vptq-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket=name)
    monkeypatch.setenv("VPTQ_ARTIFACTS", f"s3://{name}/models")
    return name


def s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def make_folder(root, sizes: dict[str, int], seed: int = 0):
    """A folder with files of the given sizes (random bytes, reproducible)."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for rel, size in sizes.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))
    return root


def work_on_job(url: str, job_id: int, layers: int, barrier) -> None:
    """Child-process body of the concurrency test: many small transactions on one job."""
    from vptq_service.store.migrate import open_database
    from vptq_service.store.repository import Repository

    repo = Repository(open_database(url)) if url.startswith("sqlite") else Repository.open(url)
    barrier.wait(timeout=60)
    repo.set_job_status(job_id, "running")
    for i in range(layers):
        repo.add_layer_result(job_id, f"model.layers.{i}.mlp.up_proj", proxy_loss=i * 0.5, seconds=0.01,
                              bits_per_weight=2.0)
    repo.set_job_status(job_id, "succeeded")
    repo.close()


def publish_then_die(folder: str, name: str, version: str, die_after: int) -> None:
    """Child-process body: publish, and die abruptly (no cleanup) after die_after files."""
    from vptq_service.store.artifacts import open_artifact_store
    from vptq_service.store.registry import Registry

    def progress(done: int, total: int, path: str) -> None:
        if done >= die_after:
            os._exit(17)  # like SIGKILL: no finally blocks, no manifest

    Registry(open_artifact_store()).publish(name, version, folder, progress=progress)
