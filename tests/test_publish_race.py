"""Publish races and crashes with real processes (issue 26 items 1 and 6).

Publishers are separate Python processes released together by a file barrier; they publish through
the real CLI (`vptq artifacts publish`, database + store) or, without a database, through the
Registry alone. Stores: the local folder store and S3 (moto over HTTP); databases: SQLite and the
real PostgreSQL. Crashes use the test-only fault point VPTQ_TEST_CRASH_AT=<stage> (SIGKILL).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner
from vptq_service.store.artifacts import open_artifact_store
from vptq_service.store.errors import StoreError
from vptq_service.store.manifest import STAGES
from vptq_service.store.registry import MANIFEST, Registry

from tests.store_fixtures import PG_URL, bucket, make_folder, moto_server, s3_env  # noqa: F401 - fixtures

REPO_ROOT = Path(__file__).resolve().parents[1]



def _publish_child(env: dict, barrier, mode: str, ref: str, folder: str, job_id: int | None, out: str) -> None:
    """One publisher process: connect, wait for the others, publish; exit 0 (version in out) or 2 (the
    one-line error in out). mode "nodb": the store alone decides; "db": with the database of env."""
    os.environ.clear()
    os.environ.update(env)
    from vptq_service.store.repository import Repository

    repo = None if mode == "nodb" else Repository.open()
    registry = Registry(open_artifact_store(), repo)
    name, _, version = ref.partition(":")
    if barrier is not None:
        barrier.wait(60)
    try:
        m = registry.publish(name, version or None, Path(folder), job_id=job_id)
    except StoreError as e:
        Path(out).write_text(f"error: {e}\n")
        os._exit(2)
    Path(out).write_text(m.version)
    os._exit(0)


def _processes():
    """A forkserver with the registry, database and boto3 code loaded: each publisher is a real process
    that starts in milliseconds (a fresh interpreter spends a second importing on 2 busy cores)."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.test_publish_race", "vptq_service.store.repository", "boto3"])
    return ctx


def _run_together(jobs: list[tuple[str, str, str, int | None]], tmp_path: Path, env: dict | None = None,
                  barrier: bool = True) -> list[tuple[int, str]]:
    """Run one publisher process per (mode, ref, folder, job_id), released together; (exitcode, out) each."""
    ctx = _processes()
    gate = ctx.Barrier(len(jobs)) if barrier else None
    outs = [tmp_path / f"out-{uuid.uuid4().hex[:8]}" for _ in jobs]
    procs = [ctx.Process(target=_publish_child, args=(dict(env or os.environ), gate, mode, ref, folder, job_id, str(o)))
             for (mode, ref, folder, job_id), o in zip(jobs, outs, strict=True)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return [(p.exitcode, o.read_text() if o.exists() else "") for p, o in zip(procs, outs, strict=True)]


def _cli():
    from vptq_service.cli.db import register

    app = typer.Typer()
    register(app)
    return app


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


@pytest.fixture
def world(request, tmp_path, monkeypatch):
    """(store, database) as the test's parameter names: VPTQ_* set for child processes too."""
    store_kind, db_kind = request.param
    monkeypatch.setenv("VPTQ_HOME", str(tmp_path / "home"))
    if store_kind == "s3":
        request.getfixturevalue("bucket")  # sets VPTQ_ARTIFACTS=s3://... and AWS_*
    else:
        monkeypatch.setenv("VPTQ_ARTIFACTS", str(tmp_path / "store"))
    schema = None
    if db_kind == "postgresql":
        import psycopg

        schema = f"vptq_race_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as c:
            c.execute(f'CREATE SCHEMA "{schema}"')
        url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    else:
        url = f"sqlite:///{tmp_path / 'lineage.db'}"
    monkeypatch.setenv("VPTQ_DB_URL", url)
    from vptq_service.store.db import make_engine
    from vptq_service.store.migrate import upgrade
    from vptq_service.store.repository import Repository

    engine = make_engine(url)
    upgrade(engine)
    repo = Repository(engine)
    store = open_artifact_store()
    store.check()
    yield SimpleNamespace(store=store, repo=repo if db_kind else None, db=db_kind,
                          registry=Registry(store, repo if db_kind else None), full=Registry(store, repo))
    repo.close()
    if schema:
        import psycopg

        with psycopg.connect(PG_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


WORLDS = [("local", "sqlite"), ("s3", "postgresql"), ("local", None), ("s3", None)]


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"{w[0]}-{w[1] or 'nodb'}", indirect=True)
def test_eight_concurrent_publishers_of_one_version_exactly_one_wins(world, tmp_path):
    """Eight processes publish different folders as race:v1 at once: one wins, seven are refused with one
    line; the version pulls and verifies as the winner's bytes; the losers left nothing behind."""
    folders = [make_folder(tmp_path / f"src{i}", {"model.safetensors": 600_000, "config.json": 200}, seed=i)
               for i in range(8)]
    results = _run_together([("db" if world.db else "nodb", "race:v1", str(f), None) for f in folders], tmp_path)
    winners = [i for i, (rc, _) in enumerate(results) if rc == 0]
    assert len(winners) == 1, results
    for i, (rc, out) in enumerate(results):
        if i != winners[0]:
            lines = out.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: artifact race:v1 "), (rc, out)
    r = world.registry.pull("race:v1", tmp_path / "pulled")
    assert _tree(r.dest) == _tree(folders[winners[0]])
    manifest = world.store.get_bytes(f"race/v1/{MANIFEST}")
    assert len(world.store.list_keys("race/")) == 3  # the manifest and the winner's two files: no orphans
    if world.db:
        rows = world.repo.list_artifacts("race", include_reserved=True)
        assert [(a.version, a.status) for a in rows] == [("v1", "published")]
        assert rows[0].sha256 == hashlib.sha256(manifest).hexdigest()


@pytest.mark.parametrize("world", [("local", "sqlite")], ids=["local-sqlite"], indirect=True)
def test_the_issue_repro_two_cli_publishes_one_wins_with_one_line(world, tmp_path):
    """`vptq artifacts publish race:v1 A & vptq artifacts publish race:v1 B & wait`, as the issue ran it."""
    a = make_folder(tmp_path / "A", {"model.safetensors": 2_000_000}, seed=1)
    b = make_folder(tmp_path / "B", {"model.safetensors": 2_000_000}, seed=2)
    vptq = str(Path(sys.executable).parent / "vptq")
    procs = [subprocess.Popen([vptq, "artifacts", "publish", "race:v1", str(f)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for f in (a, b)]
    results = [(p.wait(120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 2], results
    (_, won, _), (_, _, lost) = sorted(results, key=lambda r: r[0])
    assert won.startswith("published race:v1: 1 files")
    assert len(lost.strip().splitlines()) == 1 and lost.startswith("error: artifact race:v1 "), lost
    winner = a if results[0][0] == 0 else b
    pulled = CliRunner().invoke(_cli(), ["pull", "race:v1", str(tmp_path / "d"), "--json"])
    assert pulled.exit_code == 0 and json.loads(pulled.stdout)["verified"] is True, pulled.output
    assert _tree(tmp_path / "d") == _tree(winner)
    # while a publisher holds the version, another is refused at once with one line
    me = f"{os.uname().nodename[:100]}:{os.getpid()}"
    world.repo.reserve_artifact("race", "v2", "x", publisher=me, staging="data-20260101T000000Z-000000000000")
    held = CliRunner().invoke(_cli(), ["artifacts", "publish", "race:v2", str(a)])
    assert held.exit_code == 2 and held.stderr.count("\n") == 1 and "is being published by" in held.stderr


@pytest.mark.parametrize("world", [("s3", "postgresql")], ids=["s3-postgresql"], indirect=True)
def test_concurrent_next_version_allocation_gives_distinct_versions(world, tmp_path):
    """`compress --name N` without --version: four publishers at once get four distinct vN, each intact."""
    folders = [make_folder(tmp_path / f"src{i}", {"a.bin": 50_000}, seed=10 + i) for i in range(4)]
    results = _run_together([("db", "auto", str(f), None) for f in folders], tmp_path)
    assert all(rc == 0 for rc, _ in results), results
    versions = [out.strip() for _, out in results]
    assert sorted(versions) == ["v1", "v2", "v3", "v4"]
    for v, f in zip(versions, folders, strict=True):
        assert _tree(world.registry.pull(f"auto:{v}", tmp_path / f"d-{v}").dest) == _tree(f)


@pytest.mark.parametrize("world", [("local", "sqlite"), ("s3", "postgresql")], ids=["local-sqlite", "s3-postgresql"],
                         indirect=True)
def test_kill_9_at_every_publish_stage_then_fsck_loses_nothing(world, tmp_path):
    """A publisher killed (SIGKILL) at each stage: before the manifest the version is invisible, after it
    the version pulls intact; `fsck --repair` then finalizes the committed one, removes the dead
    reservations and their staged files; the store and database agree and every version republishes."""
    src = make_folder(tmp_path / "src", {"model.safetensors": 300_000, "tokenizer/t.json": 1_000, "c.json": 10})
    for stage in STAGES:
        [(rc, out)] = _run_together([("db", f"crash:{stage}", str(src), None)], tmp_path,
                                    env={**os.environ, "VPTQ_TEST_CRASH_AT": stage}, barrier=False)
        assert rc == -9, (stage, rc, out)
    committed = {"committed", "finalized"}
    assert {m.version for m in world.registry.list("crash")} == committed  # the manifest is the commit point
    for stage in STAGES:
        if stage in committed:
            assert _tree(world.registry.pull(f"crash:{stage}", tmp_path / f"d-{stage}").dest) == _tree(src)
        else:
            with pytest.raises(StoreError, match="not found"):
                world.registry.pull(f"crash:{stage}", tmp_path / f"d-{stage}")
    rows = {a.version: a.status for a in world.repo.list_artifacts("crash", include_reserved=True)}
    assert rows == {"reserved": "reserved", "uploading": "reserved", "uploaded": "reserved",
                    "committed": "reserved", "finalized": "published"}

    found = CliRunner().invoke(_cli(), ["artifacts", "fsck", "--json"])  # report only: drift -> exit 1
    assert found.exit_code == 1, found.output
    kinds = {f["ref"]: f["kind"] for f in json.loads(found.stdout)["findings"]}
    assert kinds == {"crash:committed": "reserved-committed", "crash:reserved": "stale-reservation",
                     "crash:uploading": "stale-reservation", "crash:uploaded": "stale-reservation"}
    fixed = CliRunner().invoke(_cli(), ["artifacts", "fsck", "--repair", "--json"])
    assert fixed.exit_code == 0 and json.loads(fixed.stdout)["clean"], fixed.output
    again = CliRunner().invoke(_cli(), ["artifacts", "fsck"])
    assert again.exit_code == 0 and again.stdout.strip() == "store and database agree", again.output

    rows = {a.version: a.status for a in world.repo.list_artifacts("crash", include_reserved=True)}
    assert rows == {"committed": "published", "finalized": "published"}
    keys = world.store.list_keys("crash/")
    assert {k.split("/")[1] for k in keys} == committed and len(keys) == 2 * 4  # manifest + 3 files each
    for stage in STAGES:
        if stage not in committed:  # nothing blocks a retry
            world.full.publish("crash", stage, src)
            assert _tree(world.full.pull(f"crash:{stage}", tmp_path / f"r-{stage}").dest) == _tree(src)


@pytest.mark.parametrize("world", [("local", "sqlite")], ids=["local-sqlite"], indirect=True)
def test_resume_after_crash_between_manifest_and_row_publishes_no_second_version(world, tmp_path):
    """The publish task of a job killed after its manifest (row still reserved, or the row lost) finishes
    that same version when the job is resumed: never a second version."""
    from vptq_service.tasks.publish import publish_artifact

    src = make_folder(tmp_path / "src", {"model.safetensors": 20_000})
    for name in ("keep", "lost"):
        job = world.repo.create_job("tiny", {})
        [(rc, out)] = _run_together([("db", name, str(src), job.id)], tmp_path,
                                    env={**os.environ, "VPTQ_TEST_CRASH_AT": "committed"}, barrier=False)
        assert rc == -9, (rc, out)
        assert world.repo.get_artifact(name, "v1").status == "reserved"
        if name == "lost":  # the row is gone too (an older client, a manual cleanup): the manifest says whose
            world.repo.release_artifact(world.repo.get_artifact(name, "v1").id)
        first = publish_artifact.fn(str(src), name, None, job.id, {})  # what `vptq jobs resume` runs
        second = publish_artifact.fn(str(src), name, None, job.id, {})
        assert first["version"] == second["version"] == "v1" and first["status"] == "published"
        assert [m.version for m in world.registry.list(name)] == ["v1"]
        assert [(a.version, a.status, a.job_id) for a in world.repo.list_artifacts(name, include_reserved=True)] == [
            ("v1", "published", job.id)]
        assert _tree(world.registry.pull(f"{name}:v1", tmp_path / f"d-{name}").dest) == _tree(src)


@pytest.mark.parametrize("world", [("s3", "sqlite")], ids=["s3-sqlite"], indirect=True)
def test_fsck_repairs_drift_between_store_and_database(world, tmp_path):
    """A manifest without a row gets its row (with its job); a row whose manifest is gone and a version
    with missing files are removed (and can be republished); a newer format is reported, never touched."""
    from vptq_service.store.upkeep import fsck

    src = make_folder(tmp_path / "src", {"a.bin": 1000, "b.bin": 10})
    job = world.repo.create_job("tiny", {})
    Registry(world.store).publish("d", "nodb", src, job_id=job.id)  # published without the database
    world.full.publish("d", "gone", src)
    world.store.delete_key(f"d/gone/{MANIFEST}")
    holes = world.full.publish("d", "holes", src)
    world.store.delete_key(holes.key_of(holes.files[0]))
    world.full.publish("d", "ok", src)
    future = json.dumps({"format": "vptq-artifact/99"}).encode()
    world.store.put_bytes(f"d/future/{MANIFEST}", future)

    report = fsck(world.store, world.repo)
    assert {f.ref: f.kind for f in report.findings} == {
        "d:nodb": "manifest-without-row", "d:gone": "row-without-files", "d:holes": "incomplete",
        "d:future": "unreadable"}
    assert not report.clean and world.repo.get_artifact("d", "gone") is not None  # reporting changes nothing
    fixed = CliRunner().invoke(_cli(), ["artifacts", "fsck", "--repair"])
    assert fixed.exit_code == 0, fixed.output
    rows = {a.version: (a.status, a.job_id) for a in world.repo.list_artifacts("d", include_reserved=True)}
    assert rows == {"nodb": ("published", job.id), "ok": ("published", None)}
    assert {k.split("/")[1] for k in world.store.list_keys("d/")} == {"nodb", "ok", "future"}
    assert world.store.get_bytes(f"d/future/{MANIFEST}") == future
    assert [f.kind for f in fsck(world.store, world.repo).findings] == ["unreadable"]
    for v in ("gone", "holes"):
        world.full.publish("d", v, src)
        assert _tree(world.full.pull(f"d:{v}", tmp_path / v).dest) == _tree(src)


@pytest.mark.parametrize("world", [("local", "sqlite")], ids=["local-sqlite"], indirect=True)
def test_retry_after_a_killed_publish_takes_over_and_drops_its_upload(world, tmp_path):
    """A publisher killed mid-upload holds race:v1 as reserved; the retry (no fsck first) takes the
    reservation over from the dead process, removes its partial upload, and publishes."""
    src = make_folder(tmp_path / "src", {"a.bin": 1000, "b.bin": 1000})
    [(rc, _)] = _run_together([("db", "race:v1", str(src), None)], tmp_path,
                              env={**os.environ, "VPTQ_TEST_CRASH_AT": "uploading"}, barrier=False)
    assert rc == -9 and world.repo.get_artifact("race", "v1").status == "reserved"
    dead = world.store.list_keys("race/v1/")
    assert len(dead) == 1
    m = world.full.publish("race", "v1", src)
    assert sorted(world.store.list_keys("race/v1/")) == sorted([f"race/v1/{MANIFEST}", *(m.key_of(f) for f in m.files)])
    assert dead[0] not in world.store.list_keys("race/v1/")
    assert world.repo.get_artifact("race", "v1").status == "published"
