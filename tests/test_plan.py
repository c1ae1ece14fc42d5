"""`vptq plan`: estimates before a job; bpw must equal what the job reports."""

import json

import pytest
from typer.testing import CliRunner
from vptq_service.cli.main import app

from vptq.config import preset

KEYS = {"bpw", "output_bytes", "peak_device_bytes", "peak_host_bytes", "workspace_bytes", "hessian_bytes",
        "seconds_per_block", "seconds_total", "blocks", "linears", "fits", "reasons"}
CHEAP = ["--set", "num_centroids=64", "--set", "vector_len=4", "--set", "kmeans_iters=3", "--set", "refine_iters=0"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VPTQ_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _plan(args):
    return CliRunner().invoke(app, ["plan", *args])


def test_plan_json_matches_actual_compress(tiny_llama_dir, text_file, home, tmp_path):
    from vptq.pipeline import compress

    r = _plan([str(tiny_llama_dir), "--bits", "2", *CHEAP, "--finetune-steps", "0", "--nsamples", "4",
               "--seqlen", "64", "--calib", str(text_file), "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert KEYS <= set(p)
    assert p["blocks"] == 2 and p["linears"] == 14
    cfg = preset(2).with_(num_centroids=64, vector_len=4, kmeans_iters=3, refine_iters=0, e2e_steps=0)
    out = tmp_path / "q"
    res, _, _ = compress(str(tiny_llama_dir), cfg, out, calib=text_file, nsamples=4, seqlen=64)
    assert p["bpw"] == pytest.approx(res.report.bpw, rel=1e-12)  # exact bit accounting
    assert p["bits"] == res.report.bits and p["weights"] == res.report.weights
    written = (out / "model.safetensors").stat().st_size
    assert abs(p["output_bytes"] - written) / written < 0.02  # tensor bytes; the header is the rest
    # memory / disk / time are positive and ordered sensibly
    assert 0 < p["hessian_bytes"] < p["peak_device_bytes"] <= p["peak_host_bytes"]  # device = host on cpu
    assert p["workspace_bytes"] > p["output_bytes"] > 0
    assert 0 < p["seconds_per_block"] <= p["seconds_total"] < 3600
    assert p["fits"] is True and len(p["reasons"]) >= 2
    assert p["probe"]["linears"] and p["probe"]["linears"][0]["seconds"] > 0
    assert p["probe"]["model_loaded"] != "whole"  # safetensors folder: only block 0 + embeddings read
    assert "e2e" not in p["probe"] and p["time"]["seconds_e2e"] == 0
    assert p["probe"]["hessian_passes"] == 1


def test_plan_counts_a_hessian_pass_per_group_with_true_sequential(tiny_llama_dir, text_file, home):
    """q/k/v, o, gate/up, down: four passes of each block (vptq.callorder), in the time estimate too."""
    args = [str(tiny_llama_dir), "--bits", "2", *CHEAP, "--finetune-steps", "0", "--nsamples", "4", "--seqlen", "64",
            "--calib", str(text_file), "--json"]
    r = _plan([*args, "--hessians", "true-sequential"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    pr = p["probe"]
    assert pr["hessian_passes"] == 4
    per_window = pr["hessian_forward_seconds"] / pr["windows"]
    assert p["time"]["seconds_hessians"] == pytest.approx(4 * 4 * per_window * 2, rel=0.05)  # 4 windows, 2 blocks


def test_plan_human_with_finetune_probe(tiny_llama_dir, text_file, home):
    r = _plan([str(tiny_llama_dir), "--bits", "3", *CHEAP, "--set", "num_res_centroids=16", "--finetune-steps",
               "5", "--nsamples", "4", "--seqlen", "64", "--calib", str(text_file)])
    assert r.exit_code == 0, r.output
    assert "bpw all-in" in r.stdout and "e2e fine-tuning" in r.stdout and "verdict" in r.stdout


def test_plan_says_when_it_does_not_fit(tiny_llama_dir, text_file, home):
    r = _plan([str(tiny_llama_dir), "--bits", "2", *CHEAP, "--finetune-steps", "0", "--nsamples", "200000",
               "--seqlen", "64", "--calib", str(text_file), "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    if p["free"]["host_available_bytes"] < p["peak_host_bytes"] or p["free"]["disk_free_bytes"] < p["disk_bytes"]:
        assert p["fits"] is False and any("NOT fit" in x for x in p["reasons"])


@pytest.mark.parametrize("args, needle", [
    (["--bits", "5"], "--bits 5"),
    (["--bits", "2", "--set", "bogus=1"], "bogus"),
    (["--bits", "2", "--device", "tpu"], "--device tpu"),
])
def test_plan_bad_input(tiny_llama_dir, home, args, needle):
    r = _plan([str(tiny_llama_dir), *args])
    assert r.exit_code == 2
    assert needle in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_plan_bad_source_and_config(tmp_path, home):
    r = _plan([str(tmp_path / "nope"), "--bits", "2"])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"not_a_field": 1}))
    r = _plan(["smollm2", "--bits", "2", "--config", str(cfg)])
    assert r.exit_code == 2 and "unknown key" in r.output and len(r.output.strip().splitlines()) == 1


def test_plan_an_already_quantized_folder_or_broken_weights(tiny_llama_dir, text_file, home, tmp_path):
    """The request checks of compress (vptq.pipeline.check_request) and its loading errors, one line each."""
    q = tmp_path / "q"
    q.mkdir()
    (q / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "vptq"}}))
    r = _plan([str(q), "--bits", "2", "--calib", str(text_file)])
    assert r.exit_code == 2 and "already VPTQ-quantized: plan the original model" in r.output
    assert len(r.output.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    r = _plan([str(broken), "--bits", "2", "--calib", str(text_file), "--nsamples", "4", "--seqlen", "64"])
    assert r.exit_code == 2 and "cannot load the model from" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
