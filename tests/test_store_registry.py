"""Registry tests: real S3 over HTTP (moto server) and the local store, rows in SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner
from vptq_service.store.artifacts import LocalStore, S3Store, open_artifact_store
from vptq_service.store.errors import StoreError
from vptq_service.store.registry import MANIFEST, Registry, parse_ref

from tests.store_fixtures import (  # noqa: F401 - fixtures
    S3_SECRET,
    bucket,
    db_url,
    free_port,
    make_folder,
    repo,
    s3_client,
    s3_env,
)

FILES = {"config.json": 300, "model.safetensors": 200_000, "tokenizer/tokenizer.json": 5_000, "empty.txt": 0}
REPO_ROOT = Path(__file__).resolve().parents[1]


def _cli():
    from vptq_service.cli.db import register

    app = typer.Typer()
    register(app)
    return app


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(params=["s3", "local"])
def registry(request, repo, tmp_path, monkeypatch):  # noqa: F811
    if request.param == "s3":
        request.getfixturevalue("bucket")
        store = open_artifact_store()
        assert isinstance(store, S3Store)
    else:
        monkeypatch.setenv("VPTQ_HOME", str(tmp_path / "home"))
        monkeypatch.delenv("VPTQ_ARTIFACTS", raising=False)
        store = open_artifact_store()
        assert isinstance(store, LocalStore) and store.root == (tmp_path / "home" / "artifacts").resolve()
    store.check()
    return Registry(store, repo)


def test_publish_pull_round_trip_is_byte_identical(registry, tmp_path):
    src = make_folder(tmp_path / "src", FILES)
    job = registry.repo.create_job("smollm2", {"bits": 2})
    m = registry.publish("smol-2bit", "v1", src, lineage={"model_sha256": "a" * 64}, job_id=job.id)
    assert m.size == sum(FILES.values()) and [f.path for f in m.files] == sorted(FILES)

    r = registry.pull("smol-2bit:v1", tmp_path / "dest")
    assert (r.files, r.downloaded, r.reused) == (len(FILES), len(FILES), 0)
    got = _tree(tmp_path / "dest")
    assert got.pop(MANIFEST) == registry.store.get_bytes(f"smol-2bit/v1/{MANIFEST}")
    assert got == _tree(src)
    manifest = json.loads((tmp_path / "dest" / MANIFEST).read_bytes())
    assert manifest["lineage"] == {"model_sha256": "a" * 64, "job_id": job.id}
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        k: hashlib.sha256(v).hexdigest() for k, v in _tree(src).items()}

    row = registry.repo.get_artifact("smol-2bit", "v1")
    assert row.job_id == job.id and row.size == m.size
    assert row.sha256 == hashlib.sha256(registry.store.get_bytes(f"smol-2bit/v1/{MANIFEST}")).hexdigest()
    assert row.uri == registry.store.uri_of("smol-2bit/v1")

    again = registry.pull("smol-2bit:v1", tmp_path / "dest")  # already there and verified: a no-op
    assert (again.downloaded, again.reused) == (0, len(FILES))
    make_folder(tmp_path / "src2", {"config.json": 10}, seed=1)
    registry.publish("smol-2bit", "v2", tmp_path / "src2")
    assert registry.pull("smol-2bit", tmp_path / "latest").version == "v2"  # no version: the newest
    assert [(x.name, x.version) for x in registry.list()] == [("smol-2bit", "v2"), ("smol-2bit", "v1")]
    with pytest.raises(StoreError, match="exists and is not empty"):
        registry.pull("smol-2bit:v2", tmp_path / "src")


def test_rejected_version_is_kept_but_never_latest(registry, tmp_path):
    make_folder(tmp_path / "a", {"a.bin": 10})
    make_folder(tmp_path / "b", {"a.bin": 10}, seed=3)
    registry.publish("gate", "v1", tmp_path / "a")
    registry.publish("gate", "v2", tmp_path / "b", status="rejected")
    assert registry.resolve("gate").version == "v1"  # the newer one failed its gate
    assert registry.resolve("gate:v2").status == "rejected"  # still pullable by full name
    assert registry.repo.get_artifact("gate", "v2").status == "rejected"
    assert registry.pull("gate:v2", tmp_path / "d").files == 1
    make_folder(tmp_path / "c", {"a.bin": 10}, seed=4)
    registry.publish("only", "v1", tmp_path / "c", status="rejected")
    with pytest.raises(StoreError, match="rejected by its evaluation gate"):
        registry.resolve("only")


def test_duplicate_version_refused(registry, tmp_path):
    src = make_folder(tmp_path / "src", {"a.bin": 100})
    registry.publish("m", "1.0", src)
    before = registry.store.get_bytes(f"m/1.0/{MANIFEST}")
    make_folder(tmp_path / "other", {"a.bin": 100}, seed=7)
    with pytest.raises(StoreError, match="m:1.0 already exists"):
        registry.publish("m", "1.0", tmp_path / "other")
    assert registry.store.get_bytes(f"m/1.0/{MANIFEST}") == before
    assert registry.pull("m:1.0", tmp_path / "d").files == 1
    assert (tmp_path / "d" / "a.bin").read_bytes() == (src / "a.bin").read_bytes()


def test_flipped_byte_in_bucket_is_detected_and_nothing_is_kept(repo, bucket, tmp_path):  # noqa: F811
    registry = Registry(open_artifact_store(), repo)
    files = {"a.bin": 1000, "b.bin": 1000, "c.bin": 70_000, "d.bin": 1000}
    src = make_folder(tmp_path / "src", files)
    m = registry.publish("m", "v1", src)
    key = {f.path: f"models/{m.key_of(f)}" for f in m.files}
    assert key["c.bin"].startswith("models/m/v1/data-")  # under the upload's own staging prefix
    good = bytearray(s3_client().get_object(Bucket=bucket, Key=key["c.bin"])["Body"].read())
    bad = bytearray(good)
    bad[12_345] ^= 0x01
    s3_client().put_object(Bucket=bucket, Key=key["c.bin"], Body=bytes(bad))

    dest = tmp_path / "pulls" / "dest"
    with pytest.raises(StoreError, match=r"m:v1 is corrupted: c.bin has sha256 .*nothing was written"):
        registry.pull("m:v1", dest)
    assert list(dest.parent.iterdir()) == []  # no dest, no staging folder left

    s3_client().put_object(Bucket=bucket, Key=key["c.bin"], Body=bytes(good))  # repaired: a fresh pull
    r = registry.pull("m:v1", dest)
    assert (r.downloaded, r.reused) == (4, 0)
    assert {k: v for k, v in _tree(dest).items() if k != MANIFEST} == _tree(src)
    assert [p.name for p in dest.parent.iterdir()] == ["dest"]

    s3_client().delete_object(Bucket=bucket, Key=key["d.bin"])
    with pytest.raises(StoreError, match="m:v1 is incomplete: d.bin is missing"):
        registry.pull("m:v1", tmp_path / "dest2")
    assert not (tmp_path / "dest2").exists()


def test_killed_publish_is_invisible_and_retry_succeeds(repo, bucket, tmp_path):  # noqa: F811
    src = make_folder(tmp_path / "src", {"a.bin": 100, "b.bin": 100, "c.bin": 100, "d.bin": 100})
    code = ("import sys; from tests.store_fixtures import publish_then_die; "
            "publish_then_die(sys.argv[1], 'm', 'v1', 2)")
    proc = subprocess.run([sys.executable, "-c", code, str(src)], cwd=REPO_ROOT, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    registry = Registry(open_artifact_store(), repo)
    left = registry.store.list_keys("m/v1/")  # orphans under the dead upload's prefix, but no manifest
    assert [k.split("/", 3)[3] for k in left] == ["a.bin", "b.bin"] and left[0].startswith("m/v1/data-")
    assert registry.list() == []
    with pytest.raises(StoreError, match="artifact m:v1 not found"):
        registry.pull("m:v1", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()

    registry.publish("m", "v1", src)  # the retry is not refused as a duplicate
    assert registry.pull("m:v1", tmp_path / "dest").files == 4
    assert repo.get_artifact("m", "v1").status == "published"


def test_big_file_goes_multipart_and_back(bucket, tmp_path):  # noqa: F811
    store = S3Store(bucket, "models", multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    src = make_folder(tmp_path / "src", {"model.safetensors": 11 * 2**20 + 3})
    m = Registry(store).publish("big", "v1", src)
    etag = s3_client().head_object(Bucket=bucket, Key=f"models/{m.key_of(m.files[0])}")["ETag"]
    assert etag.strip('"').endswith("-3")  # three parts: uploaded through the transfer manager
    Registry(store).pull("big:v1", tmp_path / "dest")
    assert (tmp_path / "dest" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_delete_needs_confirmation_then_removes_everything(repo, bucket, tmp_path):  # noqa: F811
    registry = Registry(open_artifact_store(), repo)
    registry.publish("m", "v1", make_folder(tmp_path / "src", {"a.bin": 10, "b/c.bin": 10}))
    runner = CliRunner()
    refused = runner.invoke(_cli(), ["artifacts", "delete", "m:v1"])  # no terminal, no --yes
    assert refused.exit_code == 1 and "pass --yes" in refused.stderr
    assert registry.manifest("m", "v1") is not None
    ok = runner.invoke(_cli(), ["artifacts", "delete", "m:v1", "--yes"])
    assert ok.exit_code == 0, ok.output
    assert registry.store.list_keys("m/") == [] and repo.get_artifact("m", "v1") is None
    with pytest.raises(StoreError, match="not found"):
        registry.delete("m", "v1")


def test_hostile_manifest_cannot_escape_dest(bucket, tmp_path):  # noqa: F811
    registry = Registry(open_artifact_store())
    registry.publish("m", "v1", make_folder(tmp_path / "src", {"a.bin": 10}))
    doc = json.loads(registry.store.get_bytes(f"m/v1/{MANIFEST}"))
    doc["files"][0]["path"] = "../../escaped.bin"
    registry.store.put_bytes(f"m/v1/{MANIFEST}", json.dumps(doc).encode())
    with pytest.raises(StoreError, match="manifest.json is corrupted .*unsafe file path"):
        registry.pull("m:v1", tmp_path / "x" / "dest")
    assert not list(tmp_path.rglob("escaped.bin"))
    registry.store.put_bytes(f"m/v2/{MANIFEST}", registry.store.get_bytes(f"m/v1/{MANIFEST}"))  # borrowed
    with pytest.raises(StoreError, match="m:v2: manifest.json is corrupted .*it names m:v1"):
        registry.pull("m:v2", tmp_path / "y")


def test_s3_credentials_never_in_logs_or_errors(repo, bucket, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    registry = Registry(open_artifact_store(), repo)
    registry.publish("m", "v1", make_folder(tmp_path / "src", {"a.bin": 10}))
    registry.pull("m:v1", tmp_path / "dest")
    with pytest.raises(StoreError) as e:
        open_artifact_store(f"s3://AKIAXX:{S3_SECRET}@{bucket}/models")
    assert "carries credentials" in str(e.value)
    assert S3_SECRET not in str(e.value) and S3_SECRET not in caplog.text
    assert "botocore" in caplog.text  # the check saw botocore's DEBUG records, not an empty log
    with repo._engine.connect() as conn:
        from sqlalchemy import text

        assert S3_SECRET not in repr(conn.execute(text("SELECT * FROM artifacts")).all())


@pytest.mark.parametrize("ref", ["", "bad name", "a:b:c", "../up", "m:", "m:-v1", "x" * 200])
def test_bad_refs_refused(ref):
    with pytest.raises(StoreError, match="bad artifact reference"):
        parse_ref(ref)


@pytest.mark.parametrize("artifacts, expect", [
    ("s3://", "is not a valid bucket name"),
    ("s3://Bad_Bucket/p", "is not a valid bucket name"),
    ("gs://bucket/p", "unsupported scheme 'gs'"),
    ("s3://AKIA:topsecret@bucket/p", "carries credentials"),
    ("s3://no-such-bucket-here/p", "bucket 'no-such-bucket-here' does not exist"),
])
def test_bad_artifacts_setting_is_one_clear_line(artifacts, expect, s3_env, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("VPTQ_ARTIFACTS", artifacts)
    result = CliRunner().invoke(_cli(), ["pull", "m:v1", str(tmp_path / "dest")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], result.stderr
    assert "topsecret" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "dest").exists()


def test_unreachable_endpoint_and_bad_ref_via_cli(s3_env, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("VPTQ_ARTIFACTS", "s3://some-bucket/p")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    result = CliRunner().invoke(_cli(), ["pull", "m:v1", str(tmp_path / "dest")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach S3 endpoint http://127.0.0.1:"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    bad = CliRunner().invoke(_cli(), ["pull", "no good:v1", str(tmp_path / "dest")])
    assert bad.exit_code == 2 and "bad artifact reference 'no good:v1'" in bad.stderr
    assert not (tmp_path / "dest").exists()


def test_pull_never_reuses_a_found_staging_folder(registry, tmp_path):
    """A `.DEST.partial` planted beside DEST (a symlink out of it, a stray file) is ignored: nothing is
    written through the symlink, the stray file never reaches DEST, DEST holds exactly the manifest's files."""
    src = make_folder(tmp_path / "src", {"a.bin": 100, "sub/b.bin": 50})
    registry.publish("m", "v1", src)
    outside = tmp_path / "outside"
    outside.mkdir()
    planted = tmp_path / "pulls" / ".dest.partial"
    planted.mkdir(parents=True)
    (planted / "sub").symlink_to(outside)
    (planted / "stray.txt").write_text("not in the manifest")
    r = registry.pull("m:v1", tmp_path / "pulls" / "dest")
    assert _tree(r.dest) == {**_tree(src), MANIFEST: registry.store.get_bytes(f"m/v1/{MANIFEST}")}
    assert list(outside.iterdir()) == [] and not (r.dest / "stray.txt").exists()
    assert not any(p.is_symlink() for p in r.dest.rglob("*"))
    assert sorted(p.name for p in r.dest.parent.iterdir()) == [".dest.partial", "dest"]  # ours is gone
    link = tmp_path / "pulls" / "link"
    link.symlink_to(outside)
    with pytest.raises(StoreError, match="is a symbolic link"):
        registry.pull("m:v1", link)


def test_interrupted_pull_of_v1_then_pull_of_v2_carries_nothing_over(bucket, tmp_path):  # noqa: F811
    registry = Registry(open_artifact_store())
    registry.publish("m", "v1", make_folder(tmp_path / "v1", {"0-old.bin": 100, "a.bin": 100, "c.bin": 100}))
    v2 = make_folder(tmp_path / "v2", {"a.bin": 100, "c.bin": 100}, seed=2)
    registry.publish("m", "v2", v2)
    dest = tmp_path / "pulls" / "dest"
    code = ("import os, sys; from pathlib import Path; from vptq_service.store.artifacts import open_artifact_store; "
            "from vptq_service.store.registry import Registry; "
            "Registry(open_artifact_store()).pull('m:v1', Path(sys.argv[1]), progress=lambda d, t, f: d >= 2 and os._exit(17))")
    proc = subprocess.run([sys.executable, "-c", code, str(dest)], cwd=REPO_ROOT, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    assert not dest.exists()
    r = registry.pull("m:v2", dest)
    assert (r.version, r.downloaded, r.reused) == ("v2", 2, 0)
    assert _tree(dest) == {**_tree(v2), MANIFEST: registry.store.get_bytes(f"m/v2/{MANIFEST}")}


def test_unknown_manifest_format_locks_out_only_that_version(bucket, tmp_path):  # noqa: F811
    """A newer client's manifest under m:v3 (the newest): `artifacts ls` lists the rest with one warning,
    `pull m:v3` is refused with one line, `pull m` takes v2, publishing m (next vN) still works."""
    registry = Registry(open_artifact_store())
    for v, seed in (("v1", 1), ("v2", 2), ("v3", 3)):
        registry.publish("m", v, make_folder(tmp_path / v, {"a.bin": 10}, seed=seed))
    registry.publish("other", "v1", make_folder(tmp_path / "o", {"a.bin": 10}))
    doc = json.loads(registry.store.get_bytes(f"m/v3/{MANIFEST}"))
    doc["format"] = "vptq-artifact/99"
    registry.store.put_bytes(f"m/v3/{MANIFEST}", json.dumps(doc).encode())

    ls = CliRunner().invoke(_cli(), ["artifacts", "ls", "--json"])
    assert ls.exit_code == 0, ls.output
    listed = json.loads(ls.stdout)
    assert [it["ref"] for it in listed["items"]] == ["m:v2", "m:v1", "other:v1"] and len(listed["skipped"]) == 1
    warn = ls.stderr.strip().splitlines()
    assert len(warn) == 1 and warn[0].startswith("warning: skipped m:v3: ") and "vptq-artifact/99" in warn[0]
    refused = CliRunner().invoke(_cli(), ["pull", "m:v3", str(tmp_path / "d3")])
    assert refused.exit_code == 1 and refused.stderr.count("\n") == 1 and "upgrade vptq" in refused.stderr
    latest = CliRunner().invoke(_cli(), ["pull", "m", str(tmp_path / "d"), "--json"])
    assert latest.exit_code == 0 and json.loads(latest.stdout)["artifact"] == "m:v2", latest.output
    assert registry.publish("m", None, tmp_path / "v1").version == "v4"  # compress --name m: the next vN
    assert registry.store.get_bytes(f"m/v3/{MANIFEST}") == json.dumps(doc).encode()  # never touched


def test_local_store_and_pulls_honour_the_umask(tmp_path):
    """A group-shared store (umask 002): files 0664, folders 0775 in the store and in a pulled folder."""
    old = os.umask(0o002)
    try:
        registry = Registry(open_artifact_store(str(tmp_path / "store")))
        registry.publish("m", "v1", make_folder(tmp_path / "src", {"a.bin": 10, "sub/b.bin": 10}))
        r = registry.pull("m:v1", tmp_path / "dest")
    finally:
        os.umask(old)
    for root in (tmp_path / "store", r.dest):
        for p in [root, *root.rglob("*")]:
            assert (p.stat().st_mode & 0o777) == (0o775 if p.is_dir() else 0o664), p


def test_gc_removes_old_orphans_only_and_delete_removes_a_row_without_files(registry, tmp_path):
    """Orphans of a killed upload go after the grace period (not before); a row whose files are gone can
    be deleted (it blocked republishing with "already exists")."""
    from vptq_service.store.upkeep import gc

    src = make_folder(tmp_path / "src", {"a.bin": 10})
    registry.publish("m", "v1", src)
    registry.store.put_bytes("m/v2/data-20260101T000000Z-0123456789ab/a.bin", b"orphan")  # a killed upload
    assert gc(registry.store, registry.repo).removed == []  # younger than the default hour
    result = CliRunner().invoke(_cli(), ["artifacts", "gc", "--grace", "0", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["objects"] == 1, result.output
    assert registry.store.list_keys("m/v2/") == [] and registry.pull("m:v1", tmp_path / "d").files == 1
    bad = CliRunner().invoke(_cli(), ["artifacts", "gc", "--grace", "soon"])
    assert bad.exit_code == 2 and "is not a duration" in bad.stderr

    registry.store.delete_prefix("m/v1/")  # the files vanish behind the database's back
    with pytest.raises(StoreError, match="manifest is missing .* fsck --repair"):
        registry.publish("m", "v1", src)
    registry.delete("m", "v1")
    assert registry.repo.get_artifact("m", "v1") is None
    registry.publish("m", "v1", src)


def test_the_check_at_publish_removes_old_orphans_beside_a_published_version(registry, tmp_path):
    """A loser's upload beside a committed version: kept while young, removed once older than the grace
    period by the next publish of the name (local: its mtime set back two hours; S3: grace 0)."""
    import time
    from datetime import timedelta

    from vptq_service.store.upkeep import gc

    src = make_folder(tmp_path / "src", {"a.bin": 10})
    registry.publish("m", "v1", src)
    orphan = "m/v1/data-20260101T000000Z-0123456789ab/a.bin"
    registry.store.put_bytes(orphan, b"a loser's upload")
    assert gc(registry.store, registry.repo, quick=True).kept_recent == 1  # young: kept
    if isinstance(registry.store, LocalStore):
        old = time.time() - 2 * 3600
        os.utime(registry.store.root / orphan, (old, old))
        registry.publish("m", "v2", src)
    else:
        assert [o.objects for o in gc(registry.store, registry.repo, grace=timedelta(0), quick=True).removed] == [1]
    assert registry.store.list_keys("m/v1/data-20260101T000000Z-0123456789ab/") == []
    assert registry.pull("m:v1", tmp_path / "d").files == 1


def test_pull_under_a_file_or_into_proc_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("VPTQ_ARTIFACTS", str(tmp_path / "store"))
    Registry(open_artifact_store()).publish("m", "v1", make_folder(tmp_path / "src", {"a.bin": 10}))
    (tmp_path / "file").write_text("x")
    for dest, code, needle in ((tmp_path / "file" / "d", 2, "is a file, not a folder"), ("/proc/vptq-d", 1, "cannot pull")):
        r = CliRunner().invoke(_cli(), ["pull", "m:v1", str(dest)])
        assert r.exit_code == code and r.stderr.count("\n") == 1 and needle in r.stderr, r.output
        assert "Traceback" not in r.output


def test_concurrent_pulls_into_one_dest_all_succeed(tmp_path, monkeypatch):
    """Four pulls of one version into one DEST at once: each succeeds (the later ones find it complete)."""
    import threading

    monkeypatch.setenv("VPTQ_ARTIFACTS", str(tmp_path / "store"))
    registry = Registry(open_artifact_store())
    src = make_folder(tmp_path / "src", {"a.bin": 300_000, "b.bin": 10})
    registry.publish("m", "v1", src)
    dest, results = tmp_path / "pulls" / "dest", []
    threads = [threading.Thread(target=lambda: results.append(Registry(open_artifact_store()).pull("m:v1", dest)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and {r.files for r in results} == {2}
    assert _tree(dest) == {**_tree(src), MANIFEST: registry.store.get_bytes(f"m/v1/{MANIFEST}")}
    assert [p.name for p in dest.parent.iterdir()] == ["dest"]


def test_local_listing_survives_folders_removed_while_it_walks(tmp_path):
    """A publish's gc lists the store while another publisher removes its staging folder: the listing
    skips what vanished (it raised FileNotFoundError from pathlib's rglob, failing a losing publisher
    with exit 1 instead of its one-line race error; seen in test_publish_race under load)."""
    import shutil
    import threading

    store = LocalStore(tmp_path / "store")
    store.put_bytes("keep/a.bin", b"a")
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            d = tmp_path / "store" / "race" / f"data-{i % 4}" / "x" / "y"
            d.mkdir(parents=True, exist_ok=True)
            (d / "f").write_bytes(b"f")
            shutil.rmtree(tmp_path / "store" / "race" / f"data-{i % 4}", ignore_errors=True)
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(300):
            assert "keep/a.bin" in [o.key for o in store.list_objects("")]
            assert "keep/a.bin" in store.list_keys("")
    finally:
        stop.set()
        t.join()
