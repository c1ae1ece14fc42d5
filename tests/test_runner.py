"""The shared Hessian stage and `--runner dask|ray`: a tiny random Llama through the `compress` flow.

- hessians="original": the first job computes a Hessian set (a lineage row, files in the workspace),
  a later job with another bit width / codebook on the same model and data reuses it, and the
  quantized weights equal those of the plain vptq.pipeline path, which collects every Hessian
  inside the model run.
- `--runner dask --workers 2`: the linears of each block quantized in two worker processes give
  the same checkpoint bytes as the in-process runner, in both Hessian modes; a job is resumable
  on another runner (the runner is not part of its identity).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_flow import TINY, checkpoint_bytes, run


def compress(model: Path, calib: Path, out: Path, *extra) -> dict:
    # `extra` comes after TINY: an option given in both (--hessians) takes extra's value, the last one given
    code, stdout, err = run("submit", model, "--name", "tiny", "--calib", calib, *TINY, *extra)
    assert code == 0, err
    s = json.loads(stdout)
    assert s["status"] == "succeeded", s
    from vptq_service.store.registry import Registry

    Registry.open().pull(s["artifact"], out)
    return s


LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


def task_names(flow_run_id: str, expect: set[str], seconds: float = 30.0) -> set[str]:
    """Names of the flow run's task runs (from the Prefect API), waiting (bounded) until `expect`
    is among them: task runs reach the API through its event pipeline, a moment after they ran."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + seconds
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        names = {r.name for r in runs}
        if expect <= names or time.monotonic() > deadline:
            return names
        time.sleep(0.5)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


def test_hessian_set_is_shared_and_matches_in_model_hessians(home, tiny_llama_dir, text_file, tmp_path):  # noqa: F811
    s1 = compress(tiny_llama_dir, text_file, tmp_path / "a", "--hessians", "original")
    assert s1["hessians_reused"] is False and s1["hessian_set"]
    s2 = compress(tiny_llama_dir, text_file, tmp_path / "b", "--hessians", "original", "--bits", "3",
                  "--set", "num_centroids=32")
    assert s2["hessians_reused"] is True and s2["hessian_set"] == s1["hessian_set"]
    assert s2["job_id"] != s1["job_id"] and s2["blocks_reused"] == 0

    from vptq_service.store.repository import Repository
    from vptq_service.tasks.hessians import hessian_dir, read_manifest

    with Repository.session_scope() as repo:
        sets = repo.list_hessian_sets()
        assert [(h.key, h.job_id, h.blocks, h.mode) for h in sets] == [(s1["hessian_set"], s1["job_id"], 2, "original")]
        assert repo.get_job(s2["job_id"]).config["hessian_set"] == s1["hessian_set"]
    m = read_manifest(s1["hessian_set"])
    assert m is not None and m["nsamples"] == 2 and m["seqlen"] == 64 and len(m["files"]) == 2
    # a flipped byte makes the set incomplete: the next job recomputes it instead of using it
    f = hessian_dir(s1["hessian_set"]) / m["files"][0]["path"]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    assert read_manifest(s1["hessian_set"]) is None

    # the same quantization through vptq.pipeline (Hessians collected inside the model run)
    from vptq_service.flows.spec import JobSpec

    from vptq.pipeline import compress as direct

    over = dict(o.split("=", 1) for o in TINY[TINY.index("--set") + 1::2] if "=" in o)
    spec = JobSpec(source=str(tiny_llama_dir), name="tiny", bits=2, nsamples=2, seqlen=64, hessians="original",
                   overrides={k: (int(v) if v.isdigit() else v) for k, v in over.items()})
    direct(str(tiny_llama_dir), spec.quant_config(), tmp_path / "direct", calib=text_file, nsamples=2, seqlen=64)
    ours, ref = tensors(tmp_path / "a"), tensors(tmp_path / "direct")
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], ref[k])]


def test_dask_runner_gives_the_bytes_of_the_in_process_runner(home, tiny_llama_dir, text_file, tmp_path,  # noqa: F811
                                                              monkeypatch):
    """Hessians "true-sequential" (each group of a block's linears on the quantized groups before
    it: group after group on the workers, the path a one-shot job's "sequential" takes with one
    group); the shared set's mode ("original", every block's linears queued at once: test_flow.TINY's)
    on Dask is the killed-worker test's job below, on Ray the next test's, held to the same checks."""
    local = compress(tiny_llama_dir, text_file, tmp_path / "local", "--hessians", "true-sequential")
    assert local["runner"] == "local"
    monkeypatch.setenv("VPTQ_HOME", str(tmp_path / "home-dask"))  # nothing cached from the first run
    dask = compress(tiny_llama_dir, text_file, tmp_path / "dask", "--hessians", "true-sequential", "--runner", "dask",
                    "--workers", "2")
    same_as_local(local, tmp_path / "local", dask, tmp_path / "dask")
    # the same request on the other runner is the same job, all blocks reused
    again = compress(tiny_llama_dir, text_file, tmp_path / "again", "--hessians", "true-sequential")
    assert again["job_id"] == dask["job_id"] and again["blocks_reused"] == 2


def same_as_local(local: dict, local_dir: Path, got: dict, got_dir: Path, runner: str = "dask") -> None:
    """A job run from scratch on `runner`: the in-process runner's bytes, bpw and layers, each linear a task."""
    assert got["runner"] == runner and got["blocks_reused"] == 0 and got["blocks_total"] == 2
    assert checkpoint_bytes(local_dir) == checkpoint_bytes(got_dir)
    assert (local["bpw"], local["layers"]) == (got["bpw"], got["layers"])
    per_linear = {f"quantize-{i}-{n}" for i in range(2) for n in LINEARS}
    if got["hessians"] == "true-sequential":  # q/k/v, o, gate/up, down: each group's Hessians a task
        per_linear |= {f"group-hessians-{i}-{g}" for i in range(2) for g in range(4)}
    assert per_linear <= task_names(got["prefect_run_id"], per_linear)  # the linears ran as tasks of their own


def test_ray_runner_gives_the_bytes_of_the_in_process_runner(home, tiny_llama_dir, text_file, tmp_path,  # noqa: F811
                                                             monkeypatch, tiny_flow_job):
    local_dir = tiny_flow_job.artifact  # the same request on the local runner (a session fixture)
    monkeypatch.setenv("VPTQ_HOME", str(tmp_path / "home-ray"))
    ray = compress(tiny_llama_dir, text_file, tmp_path / "ray", "--runner", "ray", "--workers", "2")
    same_as_local(dict(tiny_flow_job.summary), local_dir, ray, tmp_path / "ray", runner="ray")


KILLER = """
import os, signal
from pathlib import Path

if os.environ.get("VPTQ_TEST_KILL_MARKER"):  # a dask worker: die once, in the middle of one linear
    import vptq.driver as s

    marker, real = Path(os.environ["VPTQ_TEST_KILL_MARKER"]), s.vptq_linear

    def vptq_linear(name, *a, **kw):
        if name.endswith("layers.1.mlp.up_proj") and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return real(name, *a, **kw)

    s.vptq_linear = vptq_linear
"""


def test_dask_worker_killed_mid_block_is_retried_and_the_job_succeeds(home, tiny_llama_dir, text_file,  # noqa: F811
                                                                      tmp_path, monkeypatch, tiny_flow_job):
    """The shared Hessian set's mode (test_flow.TINY) on Dask, with a worker process SIGKILLed while it quantizes a linear of
    block 1: Dask's nanny restarts it, the scheduler reruns the task, the job succeeds with the bytes,
    bpw and layers of the undisturbed in-process run, each linear a task of its own."""
    local, local_dir = dict(tiny_flow_job.summary), tiny_flow_job.artifact  # the undisturbed run (a session fixture)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILLER)  # imported by every new (spawned) worker process
    marker = tmp_path / "killed"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), str(Path(__file__).resolve().parents[1])]))
    monkeypatch.setenv("VPTQ_TEST_KILL_MARKER", str(marker))
    monkeypatch.setenv("VPTQ_HOME", str(tmp_path / "home-dask"))
    s = compress(tiny_llama_dir, text_file, tmp_path / "dask", "--runner", "dask", "--workers", "2")
    assert marker.is_file() and int(marker.read_text()) != os.getpid()  # a worker did die
    assert s["status"] == "succeeded" and local["runner"] == "local"
    same_as_local(local, local_dir, s, tmp_path / "dask")


def test_bad_runner_options_are_refused_before_a_job(home, tiny_llama_dir, text_file):  # noqa: F811
    code, out, err = run("submit", tiny_llama_dir, "--name", "tiny", "--calib", text_file, *TINY, "--runner", "spark")
    assert code == 2 and "--runner spark: use one of local, dask, ray" in err
    code, out, err = run("submit", tiny_llama_dir, "--name", "tiny", "--calib", text_file, *TINY, "--runner", "dask",
                         "--workers", "0")
    assert code == 2 and "--workers 0" in err
    from vptq_service.store.repository import Repository

    with Repository.session_scope() as repo:
        assert repo.list_jobs() == []
    assert os.environ.get("VPTQ_HOME")


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listeners() -> set[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening socket of this process and its children."""
    import psutil

    me = psutil.Process()
    out = set()
    for p in [me, *me.children(recursive=True)]:
        try:
            out |= {(p.pid, p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # exited meanwhile
            pass
    return out


@pytest.mark.parametrize("runner", ["dask", "ray"])
def test_local_cluster_listens_on_localhost_only(runner, monkeypatch):
    """The local Dask / Ray cluster the runner starts (scheduler, workers, nannies; GCS, raylet,
    agents, workers) accepts connections from this machine only: their wire format is pickle."""
    pytest.importorskip("psutil")
    pytest.importorskip(f"prefect_{runner}")
    from vptq_service.tasks.runner import make_task_runner

    for k in ("RAY_ADDRESS", "DASK_SCHEDULER_ADDRESS"):  # no cluster of the user's: a local one
        monkeypatch.delenv(k, raising=False)
    before = _listeners()
    with make_task_runner(runner, 2, "cpu") as tr:
        if runner == "dask":
            assert tr.client  # prefect-dask starts its cluster on first use
        deadline = time.monotonic() + 30
        while True:  # agents and workers come up a moment after the runner's start returns
            new = _listeners() - before
            if len({pid for pid, *_ in new}) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        time.sleep(2)
        new = _listeners() - before
    assert new, "the cluster listens nowhere?"
    exposed = sorted((name, ip, port) for _, name, ip, port in new if ip not in LOOPBACK)
    assert exposed == [], exposed


# one process building a Hessian set (block 0 saved, then held until `<marker>.go` exists, when
# argv[4] == "hold"), printing the set's summary as JSON
BUILD_SET = """
import json, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from vptq_service.tasks import hessians
from vptq_service.tasks.calibration import sample_calibration
model, text, marker, mode = sys.argv[1:5]
real = hessians.save_block_hessians
def held(hs, path, index):
    p = real(hs, path, index)
    if mode == "hold" and index == 0:
        Path(marker).write_text(str(p))
        while not Path(marker + ".go").exists():
            time.sleep(0.05)
    return p
hessians.save_block_hessians = held
calib = sample_calibration.fn(model, text, 2, 64, 0)
print(json.dumps(hessians.collect_hessian_set.fn(model, "tiny-sha", calib["path"], calib["hash"], 2, 64)))
"""


def test_a_hessian_set_being_built_is_never_removed_by_another_job(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    """Two jobs need the same Hessian set at once: the second waits for the first's build (a lock)
    and reuses it; it never deletes the files the first is writing (each builds in a private folder,
    renamed into place when complete)."""
    import subprocess
    import sys

    env = dict(os.environ, VPTQ_HOME=str(tmp_path / "home"), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    marker = tmp_path / "held"
    cmd = [sys.executable, "-c", BUILD_SET, str(tiny_llama_dir), str(text_file), str(marker)]
    first = subprocess.Popen([*cmd, "hold"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        in_progress = Path(marker.read_text())
        written, inode = in_progress.read_bytes(), in_progress.stat().st_ino
        second = subprocess.Popen([*cmd, "go"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []
        while second.poll() is None and not any("waiting" in ln for ln in lines):  # it waits for the first
            lines.append(second.stderr.readline())
        assert in_progress.is_file() and in_progress.stat().st_ino == inode and in_progress.read_bytes() == written, \
            "the set being built was removed"
        assert second.poll() is None, "the second job did not wait for the first's build"
        (tmp_path / "held.go").touch()
        out1, err1 = first.communicate(timeout=120)
        out2, err2 = second.communicate(timeout=120)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    a, b = json.loads(out1), json.loads(out2)
    assert (a["reused"], b["reused"]) == (False, True) and a["key"] == b["key"] and a["path"] == b["path"]

    from vptq_service.tasks.hessians import hessian_dir, read_manifest

    monkeypatch.setenv("VPTQ_HOME", str(tmp_path / "home"))
    assert read_manifest(a["key"]) is not None  # complete, and nothing left behind beside it
    assert sorted(p.name for p in hessian_dir(a["key"]).parent.iterdir() if p.is_dir()) == [a["key"]]
