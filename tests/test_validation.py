"""Bad input and broken environments at the edge (issue 26, items 9, 10 and 11).

Each bad request exits 2 with one line on stderr before a job row exists (checked through
`vptq jobs ls --json`, the repository's listing); each environment failure (a path under a file or
/proc, a full disk, two first-time migrations at once) is one line, never a traceback. S3 model
sources run on moto over HTTP; PostgreSQL is the real server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner
from vptq_service.cli.main import app

from tests.store_fixtures import bucket, db_url, s3_client, s3_env  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
FAST = ["--nsamples", "2", "--seqlen", "64", "--eval-windows", "1", "--eval-seqlen", "64"]


@pytest.fixture
def home(tmp_path, monkeypatch, prefect_harness):  # noqa: F811
    """A fresh VPTQ_HOME per test; the variables the CLI sets for its process are dropped after."""
    for k in ("VPTQ_DB_URL", "VPTQ_ARTIFACTS", "PREFECT_API_URL"):
        monkeypatch.delenv(k, raising=False)
    saved = dict(os.environ)
    monkeypatch.setenv("VPTQ_HOME", str(tmp_path / "home"))
    yield tmp_path / "home"
    for k in set(os.environ) - set(saved):
        os.environ.pop(k, None)


def run(*args) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def vptq(*args, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    """The real command in a real process."""
    return subprocess.run([sys.executable, "-m", "vptq_service.cli.main", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}, **kw)


def one_line(code: int, err: str, expected: int, *needles: str) -> str:
    assert code == expected, (code, err)
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def no_jobs() -> None:
    code, out, err = run("jobs", "ls", "--json")
    assert code == 0 and json.loads(out) == {"items": []}, out + err


@pytest.fixture(scope="module")
def calib(tmp_path_factory, text_file) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(text_file.read_text()[:30_000])
    return p


# ----------------------------------------------------------------------------- item 10: validation


@pytest.mark.parametrize("args, needles", [
    (["--name", "a:b"], ["--name 'a:b'", "--version b"]),
    (["--name", ""], ["--name ''"]),
    (["--name", "a b"], ["--name 'a b'"]),
    (["--name", "ok", "--version", "v 1"], ["--version"]),
    (["--eval-windows", "100000"], ["--eval-windows"]),
    (["--eval-windows", "1000", "--eval-seqlen", "64"], ["--eval-windows 1000", "tokens"]),
    (["--seed", "99999999999999999999"], ["--seed"]),
    (["--seed", "-1"], ["--seed"]),
    (["--nsamples", "1000000000000"], ["--nsamples"]),
    (["--nsamples", "20000", "--seqlen", "64"], ["--nsamples 20000", "--calib"]),
    (["--seqlen", "99999999999"], ["--seqlen"]),
    (["--workers", "99999999999999999999"], ["--workers"]),
])
def test_bad_request_is_refused_before_a_job_row(home, tiny_llama_dir, calib, args, needles):
    for cmd in ("compress", "submit"):
        code, out, err = run(cmd, tiny_llama_dir, "--calib", calib, *FAST, *args)
        one_line(code, err, 2, *needles)
    no_jobs()


def test_bad_request_on_an_s3_source_is_refused_before_a_job_row(home, tmp_path):
    """No tokenizer before the fetch: the window checks use the text's size as a bound."""
    src, calib = "s3://bucket/models/tiny", tmp_path / "calib.txt"
    calib.write_text("word " * 1000)  # 5000 bytes: at most 10016 tokens
    one_line(*run("submit", src, "--calib", calib, *FAST, "--eval-windows", "200")[::2], 2, "--eval-windows 200")
    one_line(*run("submit", src, "--calib", calib, "--nsamples", "20000", "--seqlen", "64")[::2], 2, "--nsamples")
    one_line(*run("submit", src, "--name", "a:b", "--calib", calib, *FAST)[::2], 2, "--name")
    one_line(*run("submit", f"{src}?versionId=3", "--calib", calib, *FAST)[::2], 2, "?query")
    no_jobs()


def test_huge_calibration_text_is_one_line(home, tiny_llama_dir, tmp_path):
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:  # sparse: no disk used, but read whole it would not fit in memory
        f.truncate(64 * 2**30)
    for opt in ("--calib", "--eval-text"):
        one_line(*run("compress", tiny_llama_dir, opt, huge, *FAST)[::2], 2, "MiB", opt)
    no_jobs()


@pytest.mark.parametrize("content", ["[]", "3", '"llama"', '{"quantization_config": []}'])
def test_model_config_json_that_is_not_an_object(home, tmp_path, calib, content):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(content)
    one_line(*run("compress", tmp_path / "m", "--calib", calib)[::2], 2, "config.json")
    one_line(*run("eval", tmp_path / "m", "--text", calib)[::2], 2, "config.json")
    no_jobs()


def test_jobs_commands_bad_arguments_exit_2(home):
    one_line(*run("jobs", "show", "99999999999999999999")[::2], 2, "2147483647")
    one_line(*run("jobs", "show", "12345")[::2], 2, "12345")  # in range, not there
    one_line(*run("jobs", "ls", "--status", "bogus")[::2], 2, "--status 'bogus'", "succeeded")
    one_line(*run("jobs", "ls", "--limit", "99999999999999999999")[::2], 2, "--limit")
    for cmd in ("cancel", "logs", "resume"):
        one_line(*run("jobs", cmd, "-5")[::2], 2)
    for bad in ("0", "99999999999"):  # worker --limit: flow runs at once, 1..1024
        one_line(*run("worker", "--limit", bad)[::2], 2, "--limit")
    code, out, err = run("jobs", "ls", "--status", "failed", "--json")
    assert code == 0 and json.loads(out) == {"items": []}


# ----------------------------------------------------------------------------- item 9: one line


def test_server_port_out_of_range():
    r = vptq("server", "--port", "70000")
    one_line(r.returncode, r.stderr, 2, "--port", "65535")


def test_pull_under_a_file_or_proc_is_one_line(home, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "w.bin").write_bytes(os.urandom(4096))
    code, out, err = run("artifacts", "publish", "m:v1", folder)
    assert code == 0, err
    (tmp_path / "file").write_text("x")
    for dest in (tmp_path / "file" / "dest", Path("/proc/vptq-pull-test"), Path("/proc/self/dest")):
        code, out, err = run("pull", "m:v1", dest)
        assert code in (1, 2), err
        line = one_line(code, err, code)
        assert str(dest) in line or str(dest.parent) in line, line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ as on Linux")
def test_full_disk_is_one_line(home, tmp_path):
    """`ulimit -f` with SIGXFSZ ignored: writes fail with EFBIG, as on a full disk (ENOSPC)."""
    import resource
    import signal

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "w.bin").write_bytes(os.urandom(4 << 20))
    code, out, err = run("artifacts", "publish", "m:v1", folder)
    assert code == 0, err

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    r = vptq("pull", "m:v1", tmp_path / "dest", env={"VPTQ_HOME": str(home)}, preexec_fn=limit)
    one_line(r.returncode, r.stderr, 1, "too large")
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_concurrent_db_upgrades_on_postgresql(db_url, tmp_path):  # noqa: F811
    env = {"VPTQ_HOME": str(tmp_path), "VPTQ_DB_URL": db_url}
    procs = [subprocess.Popen([sys.executable, "-m", "vptq_service.cli.main", "db", "upgrade"], cwd=REPO,
                              env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    for code, _, err in results:
        assert code == 0 and "Traceback" not in err, err
    # exactly one migrated; the others waited and say the schema was already there (read under the lock)
    outs = sorted(out.strip().split(": ", 1)[-1] for _, out, _ in results)
    assert [o.startswith("empty -> ") for o in outs].count(True) == 1, outs
    assert sum(o.startswith("already at ") for o in outs) == 2, outs
    r = vptq("db", "current", env=env)
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr


FIRST_START = "from vptq_service.cli.jobs import prefect_ready; prefect_ready(); print('ready')"


def test_first_time_prefect_setup_is_serialized(tmp_path):
    """Every command without PREFECT_API_URL starts a temporary Prefect server, which migrates the SQLite
    database in PREFECT_HOME; two first-time starts at once raced there (`sqlite3.OperationalError: index
    ... already exists` and ~190 lines of tracebacks). The first start now holds a lock file until its
    server answers: starts wait while the lock is held, then two at once on a fresh PREFECT_HOME print
    no error and leave the marker that later starts skip the lock by."""
    import fcntl

    home = tmp_path / "prefect"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="240")
    with open(home / ".vptq-setup.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a first start that has not finished would
        procs = [subprocess.Popen([sys.executable, "-c", FIRST_START], cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        with pytest.raises(subprocess.TimeoutExpired):
            procs[0].wait(timeout=6)
        assert procs[1].poll() is None and not list(home.glob(".vptq-ready-*"))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "ready" in out, err[-3000:]
        assert "OperationalError" not in err and "Traceback" not in err, err[-3000:]
    assert list(home.glob(".vptq-ready-*")), "the first start leaves its marker"


# ----------------------------------------------------------------------------- item 11: S3 sources


def upload_model(bucket: str, folder: Path, prefix: str) -> None:  # noqa: F811
    client = s3_client()
    for f in folder.iterdir():
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")


def test_s3_source_with_folder_markers(home, bucket, tiny_llama_dir):  # noqa: F811
    """Consoles (S3, MinIO) create `prefix/` objects of zero bytes for folders: skipped, not fetched."""
    from vptq_service.tasks.model import fetch_model

    upload_model(bucket, tiny_llama_dir, "src/tiny")
    client = s3_client()
    client.put_object(Bucket=bucket, Key="src/tiny/", Body=b"")
    client.put_object(Bucket=bucket, Key="src/tiny/extra/", Body=b"")
    got = fetch_model.fn(f"s3://{bucket}/src/tiny")
    path = Path(got["path"])
    assert got["kind"] == "hf" and (path / "config.json").is_file()
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in tiny_llama_dir.iterdir())


@pytest.mark.parametrize("key", ["../../../escaped/x.json", "a/../../../../escaped/x.json", "a/./b.json", "a//b.json"])
def test_s3_source_key_escaping_the_workspace_is_refused_first(home, bucket, tiny_llama_dir, tmp_path, key):  # noqa: F811
    from vptq_service.tasks.model import fetch_model

    from vptq.source import SourceError

    upload_model(bucket, tiny_llama_dir, "src/tiny")
    client = s3_client()
    client.put_object(Bucket=bucket, Key=f"src/tiny/{key}", Body=b"{}")
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="src/tiny/")["Contents"]]
    assert f"src/tiny/{key}" in listed, listed  # the endpoint kept the key as written
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(SourceError, match="unsafe"):
        fetch_model.fn(f"s3://{bucket}/src/tiny")
    created = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in created if "escaped" in str(p)], created
    assert not (home / "work" / "models").exists() or not any((home / "work" / "models").iterdir())
