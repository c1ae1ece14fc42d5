"""The `compress` Prefect flow and its CLI (`vptq submit`, `vptq jobs`): a tiny random Llama through
fetch -> calibrate -> per-block quantize -> assemble -> evaluate -> publish on SQLite and the local
artifact store, then pull and load; resume after a failure and after SIGKILL; bad input.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.store_fixtures import bucket, s3_client, s3_env  # noqa: F401 - S3 on moto

REPO = Path(__file__).resolve().parents[1]
TINY = ["--nsamples", "2", "--seqlen", "64", "--eval-windows", "1", "--eval-seqlen", "64",
        "--set", "vector_len=4", "--set", "num_centroids=16", "--set", "kmeans_iters=3",
        "--set", "refine_iters=0", "--set", "e2e_steps=0", "--hessians", "original", "--local", "--json"]


def run(*args) -> tuple[int, str, str]:
    from vptq_service.cli.main import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def submit(model: Path, calib: Path, *extra) -> tuple[int, dict | str, str]:
    code, out, err = run("submit", model, "--name", "tiny", "--calib", calib, *TINY, *extra)
    return code, (json.loads(out) if code == 0 else out), err


def checkpoint_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_flow_end_to_end_then_pull_and_generate(home, tiny_llama_dir, text_file, tmp_path):
    code, s, err = submit(tiny_llama_dir, text_file)
    assert code == 0, err
    assert s["status"] == "succeeded" and s["blocks_total"] == 2 and s["blocks_reused"] == 0
    assert s["artifact"] == "tiny:v1" and s["perplexity_after"] > 0 and s["error"] is None

    from vptq_service.store.artifacts import open_artifact_store
    from vptq_service.store.registry import Registry
    from vptq_service.store.repository import Repository

    from vptq.io import load_quantized

    repo = Repository.open()
    job = repo.get_job(s["job_id"])
    assert job.status == "succeeded" and job.model_id and job.calibration_set_id and job.prefect_run_id
    layers = repo.layer_results(job.id)
    assert len(layers) == 14 and all(r.proxy_loss >= 0 and r.bits_per_weight > 0 for r in layers)
    art = repo.get_artifact("tiny", "v1")
    assert art.job_id == job.id and len(repo.evaluations(artifact_id=art.id)) == 1
    assert len(repo.evaluations(model_id=job.model_id)) == 1
    repo.close()

    dest = tmp_path / "pulled"
    Registry(open_artifact_store()).pull("tiny:v1", dest)
    model = load_quantized(dest)
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {f"job-{job.id}-block-0", f"job-{job.id}-block-1", f"job-{job.id}-summary"} <= keys

    # the identical request is the same job: reported again, nothing recomputed
    code, again, err = submit(tiny_llama_dir, text_file)
    assert code == 0, err
    assert again["job_id"] == s["job_id"] and again["artifact"] == "tiny:v1"
    assert again["blocks_reused"] == again["blocks_total"] == 2

    code, out, err = run("jobs", "show", job.id, "--json")
    assert code == 0 and json.loads(out)["status"] == "succeeded" and len(json.loads(out)["layers"]) == 14
    code, out, err = run("jobs", "list", "--json")  # the hidden long spelling
    assert code == 0 and [j["job_id"] for j in json.loads(out)["items"]] == [job.id]
    code, out, err = run("jobs", "logs", job.id, "--json")
    assert code == 0 and any("block 2/2" in it["message"] for it in json.loads(out)["items"]), out

    # the registry from the terminal: list, pull (verified), evaluate by NAME:VERSION
    code, out, err = run("artifacts", "ls", "--json")
    assert code == 0 and [(i["ref"], i["status"], i["job_id"]) for i in json.loads(out)["items"]] == [
        ("tiny:v1", "published", job.id)]
    code, out, err = run("pull", "tiny", tmp_path / "again", "--json")
    assert code == 0 and json.loads(out) == json.loads(out) | {"path": str(tmp_path / "again"), "files": 7,
                                                               "verified": True}, out
    code, out, err = run("eval", "tiny:v1", "--text", text_file, "--windows", "1", "--seqlen", "64", "--json")
    assert code == 0 and json.loads(out)["perplexity"] == pytest.approx(s["perplexity_after"], rel=1e-4), err
    code, out, err = run("pull", "tiny:v9", tmp_path / "v9")
    assert code == 2 and "tiny:v9 not found" in err and "published versions: v1" in err
    code, out, err = run("eval", "tiny:v9", "--text", text_file)
    assert code == 2 and "tiny:v9 not found" in err


def test_resume_after_a_failure_reuses_blocks_and_is_byte_identical(home, tiny_llama_dir, text_file,
                                                                     monkeypatch, tmp_path, tiny_flow_job):
    import vptq.driver

    real = vptq.driver.quantize_linears

    def fail_on_block_1(block, x, pe, cfg, device, *a, prefix="", **kw):
        if prefix == "model.layers.1.":
            raise RuntimeError("worker lost")
        return real(block, x, pe, cfg, device, *a, prefix=prefix, **kw)

    monkeypatch.setattr(vptq.driver, "quantize_linears", fail_on_block_1)
    code, out, err = submit(tiny_llama_dir, text_file)
    assert code == 1 and "worker lost" in err and "Traceback" not in err
    code, out, _ = run("jobs", "ls", "--json")
    (job,) = json.loads(out)["items"]
    assert job["status"] == "failed" and "worker lost" in job["error"]

    monkeypatch.setattr(vptq.driver, "quantize_linears", real)
    code, out, err = run("jobs", "resume", job["job_id"], "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["status"] == "succeeded" and s["blocks_total"] == 2 and s["blocks_reused"] == 1
    resumed = checkpoint_bytes(Path(s["workspace"]) / "checkpoint")

    # an uninterrupted run of the same request elsewhere (the session's, in a VPTQ_HOME of its own)
    # writes the very same bytes
    fresh = tiny_flow_job.summary
    assert fresh["blocks_reused"] == 0 and fresh["workspace"] != s["workspace"]
    assert tiny_flow_job.checkpoint == resumed


def test_bad_input_fails_fast_with_one_line(home, tiny_llama_dir, text_file, tmp_path):
    code, out, err = submit(tmp_path / "no-such-model", text_file)
    assert code == 2 and out == "" and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "does not exist" in err

    code, out, err = run("submit", tiny_llama_dir, "--name", "bad name!", "--local")
    assert code == 2 and "bad artifact reference" in err

    code, out, err = run("submit", tiny_llama_dir, "--name", "tiny", "--set", "nope=1", "--local")
    assert code == 2 and "nope" in err

    code, out, err = run("jobs", "show", "999")
    assert code == 2 and "no job with id 999" in err

    code, out, err = run("worker")  # no Prefect server to serve the deployment on
    assert code == 2 and "PREFECT_API_URL is not set" in err

    # calibration shorter than one window: refused before a job row exists
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    code, out, err = submit(tiny_llama_dir, short)
    assert code == 2 and "calibration text has" in err and "Traceback" not in err
    code, out, _ = run("jobs", "ls", "--json")
    assert json.loads(out) == {"items": []}

    # a configuration that does not fit the layer shapes: refused from the folder's config, before a job row
    code, out, err = submit(tiny_llama_dir, text_file, "--set", "group_num=1000")
    assert code == 2 and "group_num=1000" in err
    code, out, _ = run("jobs", "ls", "--json")
    assert json.loads(out) == {"items": []}
    # a source checked only once fetched (GGUF, s3://, hf://) meets the same check in the flow's inspect step
    from vptq_service.tasks.model import inspect_model

    from vptq.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="group_num=1000"):
        inspect_model.fn(str(tiny_llama_dir), resolve(2, {"group_num": 1000})[0].to_dict())


KILLABLE = """
import sys, time
from pathlib import Path
import vptq.driver
real = vptq.driver.quantize_linears
def slow_block_1(block, x, pe, cfg, device, *a, prefix="", **kw):
    if prefix == "model.layers.1.":
        Path(sys.argv[1]).write_text("block 1 started")
        time.sleep(300)
    return real(block, x, pe, cfg, device, *a, prefix=prefix, **kw)
vptq.driver.quantize_linears = slow_block_1
from vptq_service.cli.main import app
app(sys.argv[2:])
"""


def test_sigkill_midway_then_resume_recomputes_no_finished_block(home, tiny_llama_dir, text_file, tmp_path,
                                                                   tiny_flow_job):
    from prefect.settings import PREFECT_API_URL

    marker = tmp_path / "block-1-started"
    env = dict(os.environ, VPTQ_HOME=str(home), PREFECT_API_URL=PREFECT_API_URL.value())
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(marker), "submit", str(tiny_llama_dir),
                             "--name", "tiny", "--calib", str(text_file), *TINY], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"block 1 never started (exit {proc.poll()})"
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the worker dies without a word
        proc.wait(timeout=30)

    code, out, _ = run("jobs", "ls", "--json")
    (job,) = json.loads(out)["items"]
    assert job["status"] == "running"  # nobody marked it: `resume` takes it over
    code, out, err = run("jobs", "resume", job["job_id"], "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["status"] == "succeeded" and s["blocks_total"] == 2 and s["blocks_reused"] == 1
    assert s["artifact"] == "tiny:v1"
    killed_then_resumed = checkpoint_bytes(Path(s["workspace"]) / "checkpoint")
    fresh = tiny_flow_job.summary  # an uninterrupted run of the same request (the session's, elsewhere)
    assert fresh["blocks_reused"] == 0 and fresh["workspace"] != s["workspace"]
    assert tiny_flow_job.checkpoint == killed_then_resumed


def test_model_from_s3_published_to_s3(home, bucket, tiny_llama_dir, text_file, tmp_path):  # noqa: F811
    client = s3_client()
    for f in tiny_llama_dir.iterdir():
        client.upload_file(str(f), bucket, f"sources/tiny/{f.name}")
    code, s, err = submit(f"s3://{bucket}/sources/tiny", text_file, "--eval-windows", "0")
    assert code == 0, err
    assert s["status"] == "succeeded" and s["artifact"] == "tiny:v1" and s["blocks_total"] == 2

    from vptq_service.store.artifacts import open_artifact_store
    from vptq_service.store.registry import Registry

    from vptq.io import load_quantized

    assert Registry(open_artifact_store()).store.uri.startswith("s3://")
    dest = tmp_path / "pulled"
    Registry(open_artifact_store()).pull("tiny:v1", dest)
    assert load_quantized(dest)(torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)


def test_worker_serves_the_deployment_and_submit_queues(home, tiny_llama_dir, text_file, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from vptq_service.store.repository import Repository

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    worker = subprocess.Popen([sys.executable, "-m", "vptq_service.cli.main", "worker"], cwd=REPO, env=dict(os.environ),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                try:
                    client.read_deployment_by_name("compress/compress")
                    break
                except Exception:  # noqa: BLE001 - not served yet
                    assert worker.poll() is None, "vptq worker exited"
                    time.sleep(0.5)
        args = [a for a in TINY if a != "--local"]
        code, out, err = run("submit", tiny_llama_dir, "--name", "tiny", "--calib", text_file, *args)
        assert code == 0, err
        queued = json.loads(out)
        assert queued["status"] == "queued" and queued["flow_run_id"]
        repo = Repository.open()
        deadline = time.monotonic() + 240
        while repo.get_job(queued["job_id"]).status not in ("succeeded", "failed") and time.monotonic() < deadline:
            time.sleep(0.5)
        job = repo.get_job(queued["job_id"])
        repo.close()
        assert job.status == "succeeded", job.error
        assert job.prefect_run_id == queued["flow_run_id"]
        code, out, _ = run("jobs", "show", job.id, "--json")
        assert json.loads(out)["artifact"] == "tiny:v1"
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=20)


def test_cancel_stops_a_running_job_before_its_next_block(home, tiny_llama_dir, text_file, monkeypatch):
    """`vptq jobs cancel` from another terminal: the flow stops at the next block, nothing is published."""
    import vptq.driver

    real = vptq.driver.quantize_linears

    def cancel_during_block_0(block, x, pe, cfg, device, *a, prefix="", **kw):
        if prefix == "model.layers.0.":
            code, out, err = run("jobs", "cancel", "1", "--json")
            assert code == 0 and json.loads(out)["status"] == "cancelled", err
        return real(block, x, pe, cfg, device, *a, prefix=prefix, **kw)

    monkeypatch.setattr(vptq.driver, "quantize_linears", cancel_during_block_0)
    code, out, err = submit(tiny_llama_dir, text_file)
    assert code == 1 and "cancelled after 1 of 2 blocks" in err and "Traceback" not in err
    code, out, _ = run("jobs", "show", "1", "--json")
    s = json.loads(out)
    assert (s["status"], s["blocks_done"], s["blocks_total"], s["artifact"]) == ("cancelled", 1, 2, None)
    code, out, err = run("jobs", "cancel", "1")
    assert code == 2 and "already cancelled" in err
    code, out, err = run("jobs", "cancel", "42")
    assert code == 2 and "no job with id 42" in err


def test_max_ppl_ratio_publishes_a_rejected_version_never_latest(home, tiny_llama_dir, text_file, tmp_path):
    code, s, err = submit(tiny_llama_dir, text_file)
    assert code == 0 and s["artifact"] == "tiny:v1", err
    # a gate no quantized model passes: kept as v2 but rejected, so `tiny` still means v1
    code, s, err = submit(tiny_llama_dir, text_file, "--max-ppl-ratio", "0.5")
    assert code == 0, err
    assert (s["status"], s["artifact"], s["artifact_status"]) == ("succeeded", "tiny:v2", "rejected")
    assert s["perplexity_ratio"] > 0.5
    code, out, err = run("artifacts", "ls", "--json")
    assert {i["ref"]: i["status"] for i in json.loads(out)["items"]} == {"tiny:v1": "published", "tiny:v2": "rejected"}
    code, out, err = run("pull", "tiny", tmp_path / "latest", "--json")
    assert code == 0 and json.loads(out)["artifact"] == "tiny:v1"


def test_config_show_masks_secrets(home, monkeypatch):
    monkeypatch.setenv("VPTQ_DB_URL", "postgresql://vptq:hunter2@127.0.0.1:5432/test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    code, out, err = run("config", "show", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["home"] == str(home) and s["database"] == "postgresql://vptq:***@127.0.0.1:5432/test"
    assert s["env"]["AWS_SECRET_ACCESS_KEY"] == "***" and "hunter2" not in out
    # the CLI's wait for Prefect's ephemeral API (Prefect's own default of 20 s is too short on a cold start)
    assert s["env"]["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "120"
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # a user's own value wins
    code, out, err = run("config", "show", "--json")
    assert json.loads(out)["env"]["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "300"
    code, out, err = run("config", "show")
    assert code == 0 and "hunter2" not in out and str(home) in out


def test_bad_hf_source_is_refused_before_a_job(home, text_file):
    code, out, err = run("submit", "hf://just-a-name", "--name", "x", "--calib", text_file, "--local")
    assert code == 2 and "hf://ORG/NAME" in err
    code, out, err = run("jobs", "ls", "--json")
    assert json.loads(out) == {"items": []}
