"""End to end with real processes: `vptq server` (a real `prefect server start` on a free loopback
port), `vptq worker`, then `vptq submit` -> its flow run on the API until it ends -> `vptq jobs show`
-> `vptq pull` -> load; then `vptq submit --cron` and one firing of that schedule, run by the same worker.
Every wait is bounded; the processes are ended by process group in a finally.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from vptq_service.serve.launch import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = ["--nsamples", "2", "--seqlen", "64", "--eval-windows", "1", "--eval-seqlen", "64",
        "--set", "vector_len=4", "--set", "num_centroids=16", "--set", "kmeans_iters=3",
        "--set", "refine_iters=0", "--set", "e2e_steps=0", "--json"]


FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")  # flow-run state types that end a run


def get_json(url: str, timeout: float = 5.0):
    """The JSON at url, or None when it does not answer 200 (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read()) if r.status == 200 else None
    except (OSError, ValueError):
        return None


def post_json(url: str, body: dict, tries: int = 5) -> dict:
    """POST body, the answer's JSON. A 503 is retried after a pause, as Prefect's own client does: the
    server answers it while its database is busy (seen on a slow 2-core VM right after a schedule was
    created, with the worker writing a run); any other error, or a fifth 503, is raised."""
    for attempt in range(tries):
        req = urllib.request.Request(url, method="POST", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == tries - 1:
                raise
            time.sleep(2 ** attempt)
    raise AssertionError("unreachable")


def ended(api: str, flow_run_id: str) -> dict | None:
    """The flow run once its state is final (COMPLETED, FAILED, ...), else None."""
    run = get_json(f"{api}/flow_runs/{flow_run_id}")
    return run if run and run.get("state_type") in FINAL else None


def wait_for(what: str, check, procs: dict[str, subprocess.Popen], timeout: float, every: float = 0.5):
    """check() until it is truthy; fail when a process exits or after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for name, p in procs.items():
            assert p.poll() is None, f"{name} exited with {p.returncode} while waiting for {what}"
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def vptq(env: dict[str, str], *args, timeout: float = 120) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-m", "vptq_service.cli.main", *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A `vptq ...` process in its own process group (so its children end with it)."""
    return subprocess.Popen([sys.executable, "-m", "vptq_service.cli.main", *args], cwd=REPO, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(p: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it after 20 s."""
    if p.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(log: Path, n: int = 2000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def test_server_worker_submit_pull_load(tiny_llama_dir, text_file, tmp_path):
    t0 = time.monotonic()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "VPTQ_")) and k not in ("TQDM_DISABLE",)}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "VPTQ_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1"}  # the worker notices a queued run within a second
    client_env = env | {"PREFECT_API_URL": api}
    logs = {"server": tmp_path / "server.log", "worker": tmp_path / "worker.log"}
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["server"] = start(["server", "--port", str(port)], env, logs["server"])
        wait_for("the Prefect API /health", lambda: get_json(f"{api}/health") is True, procs, timeout=120)
        procs["worker"] = start(["worker"], client_env, logs["worker"])
        for dep in ("compress/compress", "compress-scheduled/scheduled"):
            wait_for(f"the {dep} deployment", lambda dep=dep: get_json(f"{api}/deployments/name/{dep}"), procs, timeout=120)

        t_submit = time.monotonic()
        code, out, err = vptq(client_env, "submit", tiny_llama_dir, "--name", "tiny", "--calib", text_file, *TINY)
        submit_s = time.monotonic() - t_submit
        assert code == 0, err
        queued = json.loads(out)
        assert queued["status"] == "queued" and queued["flow_run_id"] and queued["job_id"] == 1

        # poll the API (cheap), not `vptq jobs show`: a CLI process a second took a core from the worker
        state = wait_for("the job's flow run to end", lambda: ended(api, queued["flow_run_id"]), procs,
                         timeout=300, every=1.0)
        assert state["state_type"] == "COMPLETED", tail(logs["worker"])
        assert state["name"] == f"compress-job-{queued['job_id']}"
        code, out, err = vptq(client_env, "jobs", "show", queued["job_id"], "--json")
        assert code == 0, err
        s = json.loads(out)
        assert s["status"] == "succeeded", (s["error"], tail(logs["worker"]))
        assert s["artifact"] == "tiny:v1" and s["blocks_total"] == 2 and s["prefect_run_id"] == queued["flow_run_id"]

        dest = tmp_path / "pulled"
        code, out, err = vptq(client_env, "pull", "tiny:v1", dest, "--json")
        assert code == 0, err
        pulled = json.loads(out)
        assert pulled["path"] == str(dest) and pulled["verified"] is True and pulled["files"] > 0, pulled

        import vptq as vptq_pkg
        from vptq.io import load_quantized

        ids = torch.tensor([[1, 2, 3]])
        logits = load_quantized(dest)(ids).logits
        assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()
        assert torch.equal(vptq_pkg.from_pretrained(dest)(ids).logits, logits)
        # `vptq submit --cron`: a schedule on the served compress-scheduled deployment; one firing of
        # it, triggered now with the schedule's parameters, runs on the worker (blocks reused: same model)
        code, out, err = vptq(client_env, "submit", tiny_llama_dir, "--name", "tiny", "--calib", text_file, *TINY,
                              "--cron", "0 3 * * *")
        assert code == 0, err
        sched = json.loads(out)
        assert sched["deployment"] == "compress-scheduled/scheduled" and sched["next_run"]
        dep = get_json(f"{api}/deployments/name/{sched['deployment']}")
        (schedule,) = [x for x in dep["schedules"] if x["slug"] == sched["schedule"]]
        assert schedule["schedule"]["cron"] == "0 3 * * *"
        fired = post_json(f"{api}/deployments/{dep['id']}/create_flow_run", {"parameters": schedule["parameters"]})
        done = wait_for("the scheduled run", lambda: ended(api, fired["id"]), procs, timeout=300, every=1.0)
        assert done["state_type"] == "COMPLETED", tail(logs["worker"])
        code, out, err = vptq(client_env, "jobs", "show", 2, "--json")
        job2 = json.loads(out)
        assert code == 0 and job2["status"] == "succeeded" and job2["artifact"] == "tiny:v2", (err, job2)
        print(f"e2e: submit returned in {submit_s:.1f} s, whole test {time.monotonic() - t0:.1f} s")
    except BaseException:
        for name, log in logs.items():
            sys.stderr.write(f"--- {name} log (tail) ---\n{tail(log)}\n")
        raise
    finally:
        for p in reversed(list(procs.values())):
            stop(p)
