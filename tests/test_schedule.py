"""`vptq submit --cron`: a schedule of the `compress-scheduled/scheduled` deployment per request
(idempotent), bad cron and missing Prefect server refused with exit 2; a scheduled run makes a new
job only when the model at the path changed.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

TINY = ["--nsamples", "2", "--seqlen", "64", "--eval-windows", "1", "--eval-seqlen", "64",
        "--set", "vector_len=4", "--set", "num_centroids=16", "--set", "kmeans_iters=3",
        "--set", "refine_iters=0", "--set", "e2e_steps=0", "--json"]


@pytest.fixture
def home(tmp_path, monkeypatch, prefect_harness):  # noqa: F811
    """A fresh VPTQ_HOME per test; PREFECT_API_URL as the harness set it (the --cron path needs it)."""
    from prefect.settings import PREFECT_API_URL

    for k in ("VPTQ_DB_URL", "VPTQ_ARTIFACTS"):
        monkeypatch.delenv(k, raising=False)
    saved = dict(os.environ)
    monkeypatch.setenv("VPTQ_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    yield tmp_path / "home"
    for k in set(os.environ) - set(saved):  # the CLI sets TQDM_DISABLE & co. for its process
        os.environ.pop(k, None)


def run(*args) -> tuple[int, str, str]:
    from vptq_service.cli.main import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def schedules():
    from prefect.client.orchestration import get_client
    from vptq_service.flows.schedule import FULL_NAME

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(FULL_NAME)
        return dep, client.read_deployment_schedules(dep.id)


def test_cron_creates_a_scheduled_deployment_idempotently(home, tiny_llama_dir, text_file):
    from vptq_service.flows.schedule import DEPLOYMENT, compress_scheduled

    args = ["submit", tiny_llama_dir, "--name", "nightly", "--calib", text_file, *TINY]
    code, out, err = run(*args, "--cron", "0 3 * * *")
    assert code == 0, err
    data = json.loads(out)
    assert data["deployment"] == "compress-scheduled/scheduled" and data["cron"] == "0 3 * * *"
    assert data["created"] is True and data["next_run"].endswith("T03:00:00+00:00") and data["job_spec_key"]
    dep, (sched,) = schedules()
    assert dep.name == DEPLOYMENT and sched.schedule.cron == "0 3 * * *" and sched.active
    assert sched.slug == data["schedule"] and sched.parameters["spec"]["name"] == "nightly"
    assert sched.parameters["spec"]["source"] == str(tiny_llama_dir)
    code, out, _ = run("jobs", "ls", "--json")
    assert json.loads(out) == {"items": []}  # no job until the schedule fires

    # the same request again: the same schedule, with its cron updated
    code, out, err = run(*args, "--cron", "30 2 * * 1")
    again = json.loads(out)
    assert code == 0 and again["created"] is False and again["schedule"] == data["schedule"], err
    assert again["job_spec_key"] == data["job_spec_key"]
    _, (sched,) = schedules()
    assert sched.schedule.cron == "30 2 * * 1"

    # another request is another schedule of the same deployment
    code, out, err = run("submit", tiny_llama_dir, "--name", "other", "--calib", text_file, *TINY, "--cron", "@daily")
    assert code == 0 and json.loads(out)["schedule"] != data["schedule"], err
    assert len(schedules()[1]) == 2

    # what `vptq worker` does at start (apply the deployment without schedules) keeps them
    compress_scheduled.to_deployment(name=DEPLOYMENT).apply()
    assert sorted(s.schedule.cron for s in schedules()[1]) == ["30 2 * * 1", "@daily"]

    # human output
    code, out, err = run("submit", tiny_llama_dir, "--name", "other", "--calib", text_file, *TINY[:-1],
                         "--cron", "@daily")
    assert code == 0 and out.startswith("scheduled compress-scheduled/scheduled on '@daily' (next: "), err


@pytest.mark.parametrize("cron", ["not a cron", "0 3 * *", "61 3 * * *", "0 3 * * * *", "H 3 * * *", ""])
def test_bad_cron_is_exit_2_one_line(home, tiny_llama_dir, text_file, cron):
    code, out, err = run("submit", tiny_llama_dir, "--name", "nightly", "--calib", text_file, *TINY, "--cron", cron)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: --cron") and "e.g. '0 3 * * *'" in err


def test_cron_needs_a_prefect_server_and_no_version(home, tiny_llama_dir, text_file, monkeypatch):
    code, out, err = run("submit", tiny_llama_dir, "--name", "nightly", "--calib", text_file, *TINY,
                         "--version", "v7", "--cron", "0 3 * * *")
    assert code == 2 and "leave out --version" in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.delenv("PREFECT_API_URL")
    code, out, err = run("submit", tiny_llama_dir, "--name", "nightly", "--calib", text_file, *TINY,
                         "--cron", "0 3 * * *")
    assert code == 2 and "--cron needs a Prefect server" in err and len(err.strip().splitlines()) == 1, err


def test_scheduled_run_makes_a_new_job_only_when_the_model_changed(home, tiny_llama_dir, text_file, tmp_path):
    """What each firing of the schedule runs: unchanged model -> the finished job is reported;
    the model at the path replaced -> a new job and the next version."""
    import torch
    from safetensors.torch import load_file, save_file
    from vptq_service.flows.request import build_spec
    from vptq_service.flows.schedule import compress_scheduled, scheduled_job_key

    model = tmp_path / "moving-model"
    shutil.copytree(tiny_llama_dir, model)
    over = {"vector_len": 4, "num_centroids": 16, "kmeans_iters": 3, "refine_iters": 0, "e2e_steps": 0}
    spec = build_spec(str(model), "nightly", 2, calib=str(text_file), nsamples=2, seqlen=64, overrides=over,
                      eval_windows=1, eval_seqlen=64)
    params = spec.model_dump(mode="json")

    first = compress_scheduled(params)
    assert first["status"] == "succeeded" and first["artifact"] == "nightly:v1"
    again = compress_scheduled(params)
    assert (again["job_id"], again["artifact"]) == (first["job_id"], "nightly:v1")

    weights = model / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name] + 0.01 * torch.randn_like(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    moved = compress_scheduled(params)
    assert moved["status"] == "succeeded" and moved["job_id"] != first["job_id"]
    assert moved["artifact"] == "nightly:v2"

    from vptq_service.store.repository import Repository

    with Repository.session_scope() as repo:
        jobs = {j.id: j for j in repo.list_jobs()}
    assert jobs[first["job_id"]].config["job_key"] == scheduled_job_key(spec, jobs[first["job_id"]].config["model_sha256"])
    assert jobs[first["job_id"]].config["job_key"] != jobs[moved["job_id"]].config["job_key"] != spec.key()
