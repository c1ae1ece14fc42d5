"""Lineage database tests, each on SQLite and on the real PostgreSQL (fresh schema per test)."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
from datetime import UTC, timedelta

import pytest
import typer
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner
from vptq_service.store.errors import StoreError, mask_url

from tests.store_fixtures import db_url, repo, work_on_job  # noqa: F401 - fixtures


def _cli():
    from vptq_service.cli.db import register

    app = typer.Typer()
    register(app)
    return app


def test_migrations_match_models(db_url):  # noqa: F811
    """Alembic head == the ORM: autogenerate finds no difference; constraints carry their names."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from vptq_service.store.db import make_engine
    from vptq_service.store.migrate import current_revision, head_revision, upgrade
    from vptq_service.store.models import Base

    engine = make_engine(db_url)
    assert current_revision(engine) is None
    assert upgrade(engine) == head_revision()
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], diff
        insp = inspect(conn)
        assert set(insp.get_table_names()) >= {"models", "calibration_sets", "jobs", "layer_results", "artifacts",
                                              "evaluations", "alembic_version"}
        assert "ck_jobs_status" in {c["name"] for c in insp.get_check_constraints("jobs")}
        assert "uq_artifacts_name_version" in {c["name"] for c in insp.get_unique_constraints("artifacts")}
        assert {"fk_layer_results_job_id_jobs"} <= {f["name"] for f in insp.get_foreign_keys("layer_results")}
        assert "ix_jobs_status_created_at" in {i["name"] for i in insp.get_indexes("jobs")}
    # the migration is reversible: down to nothing and back up
    from alembic import command
    from vptq_service.store.migrate import alembic_config

    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    assert upgrade(engine) == head_revision()
    engine.dispose()


def test_migration_0002_renames_completed_jobs(db_url):  # noqa: F811
    """A database written before 0002 keeps its finished jobs: `completed` becomes `succeeded`, and back."""
    from alembic import command
    from vptq_service.store.db import make_engine
    from vptq_service.store.migrate import alembic_config, upgrade

    engine = make_engine(db_url)
    upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO jobs (source_uri, status, config, created_at, updated_at) "
                          "VALUES ('m', 'completed', '{}', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
    upgrade(engine, "0002")
    with engine.begin() as conn:
        assert conn.execute(text("SELECT status FROM jobs")).scalar_one() == "succeeded"
        with pytest.raises(IntegrityError):  # the old name is no longer a valid status
            with conn.begin_nested():
                conn.execute(text("UPDATE jobs SET status = 'completed'"))
        assert "status" in {c["name"] for c in inspect(conn).get_columns("artifacts")}
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    with engine.begin() as conn:
        assert conn.execute(text("SELECT status FROM jobs")).scalar_one() == "completed"
    engine.dispose()


def test_sqlite_default_created_and_upgraded_on_first_use(tmp_path, monkeypatch):
    from vptq_service.store.migrate import head_revision
    from vptq_service.store.repository import Repository

    monkeypatch.delenv("VPTQ_DB_URL", raising=False)
    monkeypatch.setenv("VPTQ_HOME", str(tmp_path / "home"))
    r = Repository.open()
    assert (tmp_path / "home" / "vptq.db").is_file()
    job = r.create_job("smollm2", {"bits": 2})
    assert r.get_job(job.id).status == "queued"
    r.close()
    result = CliRunner().invoke(_cli(), ["db", "current"])
    assert result.exit_code == 0 and f"revision {head_revision()}, up to date" in result.stdout


def test_open_upgrades_sqlite_but_not_postgres(db_url, monkeypatch):  # noqa: F811
    """SQLite is migrated on first use; a shared PostgreSQL only by `vptq db upgrade`."""
    from vptq_service.store.migrate import current_revision, head_revision
    from vptq_service.store.repository import Repository

    monkeypatch.setenv("VPTQ_DB_URL", db_url)
    if db_url.startswith("postgresql"):
        with pytest.raises(StoreError, match="has no vptq schema; run `vptq db upgrade`"):
            Repository.open()
        result = CliRunner().invoke(_cli(), ["db", "upgrade"])
        assert result.exit_code == 0, result.output
        assert f"empty -> {head_revision()}" in result.stdout
    r = Repository.open()
    assert current_revision(r._engine) == head_revision()
    r.close()


def test_job_lifecycle_and_layer_results(repo):  # noqa: F811
    from vptq_service.store.models import Base

    model = repo.add_model("hf://org/model", "a" * 64, "LlamaForCausalLM", 135_000_000)
    assert repo.add_model("hf://org/model", "a" * 64).id == model.id  # idempotent
    calib = repo.add_calibration_set("wikitext2", 32, 1024, 0, "b" * 64)
    job = repo.create_job("hf://org/model", {"bits": 2, "vector_len": 8}, code_version="abc123")
    assert dataclasses.is_dataclass(job) and not isinstance(job, Base)
    assert job.status == "queued" and job.created_at.tzinfo is not None
    assert job.created_at.utcoffset() == timedelta(0)

    repo.update_job(job.id, model_id=model.id, calibration_set_id=calib.id, prefect_run_id="run-1")
    running = repo.set_job_status(job.id, "running")
    assert running.started_at is not None and running.finished_at is None
    with pytest.raises(StoreError, match="cannot become queued"):
        repo.set_job_status(job.id, "queued")
    with pytest.raises(StoreError, match="unknown job status"):
        repo.set_job_status(job.id, "exploded")

    repo.add_layer_result(job.id, "model.layers.0.self_attn.q_proj", 0.5, 1.0, 2.1)
    repo.add_layer_result(job.id, "model.layers.0.self_attn.q_proj", 0.25, 2.0, 2.1)  # a rerun replaces
    repo.add_layer_result(job.id, "model.layers.0.mlp.up_proj", 0.75, 1.5, 2.0)
    rows = repo.layer_results(job.id)
    assert [(r.layer_name, r.proxy_loss) for r in rows] == [("model.layers.0.self_attn.q_proj", 0.25),
                                                             ("model.layers.0.mlp.up_proj", 0.75)]
    crashed = repo.set_job_status(job.id, "crashed", error="worker lost")
    assert crashed.error == "worker lost"
    resumed = repo.set_job_status(job.id, "running")
    assert resumed.started_at == running.started_at and resumed.error is None
    done = repo.set_job_status(job.id, "succeeded")
    assert done.finished_at >= done.started_at
    got = repo.get_job(job.id)
    assert (got.model_id, got.calibration_set_id, got.prefect_run_id) == (model.id, calib.id, "run-1")
    assert got.config == {"bits": 2, "vector_len": 8}
    assert [j.id for j in repo.list_jobs(status="succeeded")] == [job.id]
    assert repo.list_jobs(status="queued") == []
    with pytest.raises(StoreError, match="no job with id 999"):
        repo.get_job(999)


def test_schema_enforces_status_and_subjects(repo):  # noqa: F811
    """The database itself refuses bad rows, whatever code writes them."""
    job = repo.create_job("m", {})
    with pytest.raises(IntegrityError), repo._engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'bogus' WHERE id = :id"), {"id": job.id})
    with pytest.raises(IntegrityError), repo._engine.begin() as conn:
        conn.execute(text("INSERT INTO evaluations (dataset, windows, seqlen, perplexity, created_at) "
                          "VALUES ('w', 1, 8, 1.0, CURRENT_TIMESTAMP)"))
    with pytest.raises(IntegrityError), repo._engine.begin() as conn:
        conn.execute(text("INSERT INTO layer_results (job_id, layer_name, proxy_loss, seconds, bits_per_weight, "
                          "created_at) VALUES (424242, 'x', 0, 0, 2, CURRENT_TIMESTAMP)"))
    assert repo.get_job(job.id).status == "queued"


def test_artifacts_and_evaluations(repo):  # noqa: F811
    job = repo.create_job("m", {})
    art = repo.record_artifact("smol-2bit", "v1", "s3://b/p/smol-2bit/v1", 1234, "c" * 64, job_id=job.id)
    assert art.ref == "smol-2bit:v1" and art.published_at.tzinfo == UTC
    with pytest.raises(StoreError, match="already registered"):
        repo.record_artifact("smol-2bit", "v1", "s3://b/p/other", 1, "d" * 64)
    repo.record_artifact("smol-2bit", "v2", "s3://b/p/smol-2bit/v2", 1, "e" * 64)
    assert [a.version for a in repo.list_artifacts("smol-2bit")] == ["v2", "v1"]
    model = repo.add_model("hf://org/model", "a" * 64)
    ev = repo.record_evaluation("wikitext2", 10, 2048, 12.5, artifact_id=art.id)
    repo.record_evaluation("wikitext2", 10, 2048, 9.5, model_id=model.id)
    with pytest.raises(StoreError, match="exactly one"):
        repo.record_evaluation("wikitext2", 10, 2048, 9.5)
    assert [e.perplexity for e in repo.evaluations(artifact_id=art.id)] == [12.5]
    assert repo.delete_artifact("smol-2bit", "v1") is True
    assert repo.get_artifact("smol-2bit", "v1") is None
    assert ev.id not in [e.id for e in repo.evaluations()]  # cascaded
    assert repo.delete_artifact("smol-2bit", "v1") is False


def test_session_scope_rolls_back_on_error(repo):  # noqa: F811
    from vptq_service.store.models import Job

    with pytest.raises(RuntimeError), repo.session() as s:
        s.add(Job(source_uri="lost", config={}, status="queued"))
        s.flush()
        raise RuntimeError("boom")
    assert repo.list_jobs() == []


def test_two_processes_updating_different_jobs_lose_no_update(repo, db_url):  # noqa: F811
    layers = 25
    a, b = repo.create_job("a", {}), repo.create_job("b", {})
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=work_on_job, args=(db_url, j.id, layers, barrier)) for j in (a, b)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    assert [p.exitcode for p in procs] == [0, 0]
    for j in (a, b):
        assert repo.get_job(j.id).status == "succeeded"
        rows = repo.layer_results(j.id)
        assert len(rows) == layers and {r.job_id for r in rows} == {j.id}


def test_credentials_never_in_errors_logs_or_rows(repo, caplog):  # noqa: F811
    from vptq_service.store.db import make_engine

    caplog.set_level(logging.DEBUG)
    with pytest.raises(StoreError) as e:
        make_engine("postgresql+psycopg://alice:hunter2pw@127.0.0.1:1/test")
    assert "hunter2pw" not in str(e.value) and "alice:***@127.0.0.1:1" in str(e.value)
    job = repo.create_job("https://bob:tok3n@example.com/model?token=tok3n", {})
    model = repo.add_model("s3://k:secretkey9@bucket/m", "a" * 64)
    with repo._engine.connect() as conn:
        dump = repr(conn.execute(text("SELECT * FROM jobs")).all()) + repr(conn.execute(text("SELECT * FROM models")).all())
    for secret in ("hunter2pw", "tok3n", "secretkey9"):
        assert secret not in dump
        assert secret not in caplog.text
    assert job.source_uri == "https://bob:***@example.com/model?token=***" and model.source_uri.startswith("s3://k:***@")
    assert mask_url("postgresql+psycopg://u:p%40ss@h/db") == "postgresql+psycopg://u:***@h/db"


@pytest.mark.parametrize("url, expect", [
    ("not a url", "is not a database URL"),
    ("mysql://u:topsecret@h/db", "unsupported database"),
    ("postgresql+psycopg://u:topsecret@127.0.0.1:1/test", "cannot reach database"),
    ("postgresql+psycopg://u:topsecret@127.0.0.1:5432", "names no database"),
])
def test_bad_db_url_is_one_clear_line(url, expect, monkeypatch, tmp_path):
    monkeypatch.setenv("VPTQ_HOME", str(tmp_path))
    monkeypatch.setenv("VPTQ_DB_URL", url)
    result = CliRunner().invoke(_cli(), ["db", "upgrade"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], result.stderr
    assert "topsecret" not in result.output + result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "vptq.db").exists()


def test_migration_0004_indexes_and_backfills_job_keys(db_url):  # noqa: F811
    """Rows written before 0004 get their config's job_key as the indexed column; find_job queries it
    (the newest not-cancelled job of the key); the downgrade drops the column again."""
    from alembic import command
    from vptq_service.store.db import make_engine
    from vptq_service.store.migrate import alembic_config, head_revision, upgrade
    from vptq_service.store.repository import Repository

    engine = make_engine(db_url)
    upgrade(engine, "0003")
    with engine.begin() as conn:
        for cfg in ('{"job_key": "k1", "spec": {}}', '{"bits": 2}', '{"job_key": "k1"}'):
            conn.execute(text("INSERT INTO jobs (source_uri, status, config, created_at, updated_at) "
                              "VALUES ('m', 'queued', :cfg, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"), {"cfg": cfg})
    assert upgrade(engine) == head_revision()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT job_key FROM jobs ORDER BY id")).scalars().all() == ["k1", None, "k1"]
        assert "ix_jobs_job_key" in {i["name"] for i in inspect(conn).get_indexes("jobs")}
    r = Repository(engine)
    first, _, newest = [j.id for j in sorted(r.list_jobs(), key=lambda j: j.id)]
    assert r.find_job("k1").id == newest and r.find_job("k2") is None
    r.set_job_status(newest, "cancelled")
    assert r.find_job("k1").id == first  # a cancelled job is never resumed
    made = r.create_job("m", {"job_key": "k2"}, job_key="k2")
    assert r.find_job("k2") == r.get_job(made.id) and made.job_key == "k2"
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003")
    with engine.connect() as conn:
        assert "job_key" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
    engine.dispose()


def test_migration_0005_reservations_and_heartbeats(db_url):  # noqa: F811
    """0005 allows `reserved` artifact rows (publisher, staging) and job heartbeats; the downgrade drops
    in-flight reservations (nothing published) and the columns, keeping published rows."""
    from alembic import command
    from vptq_service.store.db import make_engine
    from vptq_service.store.migrate import alembic_config, head_revision, upgrade

    engine = make_engine(db_url)
    upgrade(engine, "0004")
    ins = ("INSERT INTO artifacts (name, version, uri, size, sha256, published_at, status) "
           "VALUES (:n, :v, 'u', 0, '', CURRENT_TIMESTAMP, :s)")
    with engine.begin() as conn:
        conn.execute(text(ins), {"n": "a", "v": "v1", "s": "published"})
    upgrade(engine, "0005")
    with engine.begin() as conn:
        conn.execute(text(ins.replace("status)", "status, publisher, staging)").replace(":s)", ":s, 'h:1', 'a/v2/x')")),
                     {"n": "a", "v": "v2", "s": "reserved"})
        conn.execute(text("INSERT INTO jobs (source_uri, status, config, created_at, updated_at, heartbeat_at, runner) "
                          "VALUES ('m', 'running', '{}', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 'h:1')"))
        with pytest.raises(IntegrityError):  # still checked: no unknown status
            with conn.begin_nested():
                conn.execute(text(ins), {"n": "a", "v": "v3", "s": "bogus"})
    assert head_revision() >= "0005"
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM artifacts")).scalars().all() == ["v1"]
        assert not {"heartbeat_at", "runner"} & {c["name"] for c in inspect(conn).get_columns("jobs")}
        assert not {"publisher", "staging"} & {c["name"] for c in inspect(conn).get_columns("artifacts")}
    assert upgrade(engine) == head_revision()
    engine.dispose()
