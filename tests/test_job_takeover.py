"""The same job run twice at once (issue 26, item 7): one process runs it, a second command attaches
(waits and reports the first's result); a job is taken over only when its runner is gone (its
heartbeat is older than VPTQ_HEARTBEAT_TIMEOUT, or its process on this host is dead), and a runner
that was taken over stops without touching the job row. Real processes; SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from tests.store_fixtures import db_url, repo  # noqa: F401 - fixtures
from tests.test_flow import REPO, TINY

# `vptq ...` whose block 1 waits for `<marker>.go` (after writing its pid to <marker>)
GATED = """
import os, sys, time
from pathlib import Path
import vptq.driver
real = vptq.driver.quantize_linears
def gated_block_1(block, x, pe, cfg, device, *a, prefix="", **kw):
    if prefix == "model.layers.1.":
        marker = Path(sys.argv[1])
        marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + 300
        while not Path(str(marker) + ".go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return real(block, x, pe, cfg, device, *a, prefix=prefix, **kw)
vptq.driver.quantize_linears = gated_block_1
from vptq_service.cli.main import app
app(sys.argv[2:])
"""


# one process claiming job argv[2] as runner argv[3] the moment `argv[4]` exists (once connected it
# says so with `<argv[4]>.<runner>`); prints how
CLAIM = """
import json, os, sys, time
from datetime import timedelta
from vptq_service.store.migrate import open_database
from vptq_service.store.models import utcnow
from vptq_service.store.repository import Repository
url, job_id, runner, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
repo = Repository(open_database(url))
repo.get_job(job_id)  # connected
open(go + "." + runner.replace(":", "_"), "w").close()  # ready
while not os.path.exists(go):
    time.sleep(0.01)
job, how = repo.claim_job(job_id, runner, stale_before=utcnow() - timedelta(seconds=60))
print(json.dumps([runner, how, job.runner]))
"""


def test_one_claim_wins_and_a_stale_runner_is_taken_over(repo, db_url, tmp_path):  # noqa: F811
    from vptq_service.store.models import utcnow
    from vptq_service.store.repository import JobTakenOver

    job = repo.create_job("src", {})
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM, db_url, str(job.id), f"host:{i}:r{i}", str(go)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    _wait_for(lambda: len(list(tmp_path.glob("go.*"))) == 4 or any(p.poll() is not None for p in procs), 90,
              "the claimers to be ready")
    go.touch()  # all four claim at once
    outs = [p.communicate(timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e for _, e in outs]
    results = [json.loads(o) for o, _ in outs]
    winners = [r for r, how, _ in results if how == "started"]
    assert len(winners) == 1 and all(how is None for r, how, _ in results if r != winners[0]), results
    row = repo.get_job(job.id)
    assert (row.status, row.runner) == ("running", winners[0]) and row.heartbeat_at is not None
    assert repo.beat_job(job.id, winners[0]) and not repo.beat_job(job.id, "host:9:other")

    # a live runner keeps it; one whose heartbeat is stale, or whose process is gone, loses it
    fresh = utcnow() - timedelta(seconds=60)
    assert repo.claim_job(job.id, "host:9:other", stale_before=fresh)[1] is None
    assert repo.claim_job(job.id, "host:9:other", stale_before=fresh, gone=lambda r: r == winners[0])[1] == "taken_over"
    assert repo.claim_job(job.id, "host:8:third", stale_before=utcnow() + timedelta(seconds=1))[1] == "taken_over"
    assert not repo.beat_job(job.id, "host:9:other")  # the old runner learns it lost the job ...
    with pytest.raises(JobTakenOver, match="taken over by host:8:third"):  # ... and cannot finish it
        repo.set_job_status(job.id, "succeeded", runner="host:9:other")
    assert repo.set_job_status(job.id, "succeeded", runner="host:8:third").status == "succeeded"
    assert repo.claim_job(job.id, "host:9:other", stale_before=utcnow())[1] is None  # finished: reported


def _env(home: Path, **extra: str) -> dict[str, str]:  # noqa: F811 - a path, not the fixture
    from prefect.settings import PREFECT_API_URL

    return dict(os.environ, VPTQ_HOME=str(home), PREFECT_API_URL=PREFECT_API_URL.value(), **extra)


def _start(args: list[str], env: dict[str, str], gated: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", GATED, str(gated)] if gated else [sys.executable, "-m", "vptq_service.cli.main"]
    return subprocess.Popen(cmd + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _running_flow_runs(job_id: int, since) -> int:
    """Flow runs of job `job_id` created since `since` (other tests' job 1 share the Prefect server) now running."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"compress-job-{job_id}"])))
    return sum(r.created >= since and r.state_name == "Running" for r in runs)


def _job(job_id: int = 1):
    from vptq_service.store.repository import Repository

    with Repository.session_scope() as r:
        return r.get_job(job_id)


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.wait(timeout=30)


def _freeze(pid: int, db: Path) -> None:
    """SIGSTOP the process outside a database transaction: one frozen inside its heartbeat's
    transaction would hold SQLite's write lock, which stops every SQLite user (not what this tests)."""
    import sqlite3

    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        try:
            con = sqlite3.connect(db, timeout=0.2, isolation_level=None)
            try:
                con.execute("BEGIN IMMEDIATE")
                con.execute("ROLLBACK")
                return
            finally:
                con.close()
        except sqlite3.OperationalError:  # locked: let it finish its transaction
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
    raise AssertionError("could not stop the runner outside a transaction")


def test_the_same_command_twice_attaches_to_the_running_job(home, tiny_llama_dir, text_file, tmp_path):  # noqa: F811
    args = ["submit", str(tiny_llama_dir), "--name", "tiny", "--calib", str(text_file), *TINY]
    from datetime import UTC, datetime

    env = _env(home, VPTQ_HEARTBEAT_SECONDS="0.5")
    gate = tmp_path / "block-1"
    since = datetime.now(UTC)
    first = _start(args, env, gated=gate)
    second = None
    try:
        _wait_for(gate.exists, 240, "the first command's block 1")
        second = _start(args, env)
        # the second command's flow run started (it found the job running) ... and it waits
        _wait_for(lambda: second.poll() is not None or _running_flow_runs(1, since) == 2, 120,
                  "the second command's flow run")
        time.sleep(3)
        job = _job()
        assert second.poll() is None, second.communicate()
        assert job.status == "running" and job.runner.split(":")[1] == gate.read_text(), job
        Path(str(gate) + ".go").touch()  # the first one finishes
        out1, err1 = first.communicate(timeout=240)
        out2, err2 = second.communicate(timeout=120)
    finally:
        _stop(first, *([second] if second else []))
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    s1, s2 = json.loads(out1), json.loads(out2)
    assert s1["status"] == s2["status"] == "succeeded" and s1["job_id"] == s2["job_id"] == 1
    assert s1["artifact"] == s2["artifact"] == "tiny:v1" and s1["blocks_reused"] == 0

    from vptq_service.store.repository import Repository

    with Repository.session_scope() as r:
        assert [a.ref for a in r.list_artifacts()] == ["tiny:v1"]
        assert len(r.layer_results(1)) == 14


def test_a_frozen_runner_is_taken_over_after_its_heartbeat_timeout_and_then_stops(
        home, tiny_llama_dir, text_file, tmp_path):  # noqa: F811
    args = ["submit", str(tiny_llama_dir), "--name", "tiny", "--calib", str(text_file), *TINY]
    env = _env(home, VPTQ_HEARTBEAT_SECONDS="0.5", VPTQ_HEARTBEAT_TIMEOUT="4")
    gate = tmp_path / "block-1"
    first = _start(args, env, gated=gate)
    second = None
    try:
        _wait_for(gate.exists, 240, "the first command's block 1")
        _freeze(first.pid, home / "vptq.db")  # alive (its pid exists) but silent: its heartbeat goes stale
        second = _start(args, env)
        out2, err2 = second.communicate(timeout=240)
        assert second.returncode == 0, err2
        s2 = json.loads(out2)
        assert s2["status"] == "succeeded" and s2["blocks_reused"] == 1 and s2["artifact"] == "tiny:v1"
        job = _job()
        assert job.status == "succeeded" and job.runner.split(":")[1] == str(second.pid)

        Path(str(gate) + ".go").touch()
        os.kill(first.pid, signal.SIGCONT)  # the first one wakes up, finishes its block, learns it lost the job
        out1, err1 = first.communicate(timeout=240)
    finally:
        _stop(first, *([second] if second else []))
    assert first.returncode == 1 and "taken over" in err1 and len(err1.strip().splitlines()) == 1, err1
    assert "Traceback" not in err1
    job = _job()
    assert job.status == "succeeded" and job.runner.split(":")[1] == str(second.pid) and job.error is None
    r = subprocess.run([sys.executable, "-m", "vptq_service.cli.main", "jobs", "show", "1", "--json"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    shown = json.loads(r.stdout)  # who ran it and its last heartbeat, as the operator sees them
    assert shown["runner"] == job.runner and shown["heartbeat_at"], r.stdout + r.stderr

    from vptq_service.store.repository import Repository

    with Repository.session_scope() as r:
        assert [a.ref for a in r.list_artifacts()] == ["tiny:v1"]
