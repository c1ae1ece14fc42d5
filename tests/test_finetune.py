"""End-to-end fine-tuning on a tiny random Llama: loss, fixed indices, determinism, checkpoint and
resume (stop raised from the progress callback, and a SIGKILLed subprocess), the discrete
re-assignment step, bad input."""

import copy
import json
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vptq.config import ConfigError, QuantConfig
from vptq.evaluate import calibration_windows, tokenize_text
from vptq.finetune import finetune_model
from vptq.io import load_quantized, save_quantized
from vptq.layers import VQuantLinear
from vptq.pipeline import compress

TINY = QuantConfig(vector_len=4, num_centroids=64, kmeans_iters=10)
FT = TINY.with_(e2e_steps=8, e2e_lr=3e-4, e2e_batch=2)
CPU = torch.device("cpu")


# Always the packaged calibration text (wikitext-2 valid): the same windows on every machine, so
# the loss figures below do not depend on whether ../shared/data is present.
CALIB = Path(__file__).resolve().parents[1] / "vptq" / "data" / "wikitext2-valid.txt"


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    text_file = CALIB
    """(quantized student without fine-tuning, fp teacher, calibration windows, saved student folder)."""
    from transformers import AutoModelForCausalLM

    _, student, tok = compress(str(tiny_llama_dir), TINY, None, calib=text_file, nsamples=4, seqlen=32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    windows = calibration_windows(tokenize_text(tok, text_file.read_text()[:20000]), 4, 32, 0)
    folder = save_quantized(student, tmp_path_factory.mktemp("ft") / "student", tok)
    return student, teacher, windows, folder


def tune(setup, cfg=FT, **kw):
    student, teacher, windows, _ = setup
    s = copy.deepcopy(student)
    res = finetune_model(s, teacher, windows, cfg, CPU, **kw)
    return s, res


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def indices(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith("indices")}


def test_loss_decreases_indices_fixed_and_seed_deterministic(setup):
    a, ra = tune(setup)
    assert ra["steps"] == 8 and ra["kl_after"] < ra["kl_before"]
    assert_same(indices(a), indices(setup[0]))  # continuous-only mode: codes never move
    assert any(not torch.equal(x, y) for (n, x), (_, y) in zip(a.named_parameters(), setup[0].named_parameters(),
                                                              strict=True) if "centroids" in n)
    b, rb = tune(setup)
    assert_same(state(a), state(b))  # same seed, same tensors
    assert rb["kl_after"] == ra["kl_after"]
    c, _ = tune(setup, FT.with_(seed=1))
    assert any(not torch.equal(x, y) for x, y in zip(state(a).values(), state(c).values(), strict=True))


def test_progress_reports_loss_and_eta(setup):
    seen = []
    tune(setup, FT.with_(e2e_steps=2), progress=lambda d, t, info: seen.append((d, t, info)))
    assert [s[:2] for s in seen] == [(1, 2), (2, 2)]
    assert all("loss " in s[2] and " eta " in s[2] for s in seen)


class Stop(Exception):
    pass


def test_stopped_run_resumes_to_the_uninterrupted_result(setup, tmp_path):
    """Discrete step on (indices change and are checkpointed); a stop after step 7 resumes from
    the checkpoint of step 6 and ends with the tensors of a run never stopped (nor checkpointed)."""
    cfg = FT.with_(e2e_reassign_every=4)
    ref, rref = tune(setup, cfg)

    def stop_at(n):
        def progress(done, steps, info):
            if done == n:
                raise Stop
        return progress

    with pytest.raises(Stop):
        tune(setup, cfg, checkpoint_dir=tmp_path, checkpoint_every=3, progress=stop_at(7))
    meta = json.loads((tmp_path / "finetune.json").read_text())
    assert meta["step"] == 6 and [p.name for p in tmp_path.glob("*.safetensors")] == ["finetune-000006.safetensors"]
    resumed, r = tune(setup, cfg, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert r["resumed_from"] == 6 and r["kl_before"] == rref["kl_before"]
    assert [e["step"] for e in r["reassign"]] == [4]
    assert_same(state(resumed), state(ref))
    # a finished run resumes at its end: nothing more is trained
    again, r2 = tune(setup, cfg, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert r2["resumed_from"] == 8
    assert_same(state(again), state(ref))


def test_sigkilled_subprocess_resumes_to_the_same_tensors(setup, tmp_path):
    """Killed at step 5 of 8 (checkpoints every 2 steps), resumed in a new process, it ends with the
    tensors of an uninterrupted run. The resume and the reference run in a fresh process, as a resumed
    worker does: a reference computed in this long-lived pytest worker (other tests' state) once
    differed in the last bits."""
    student, teacher, windows, folder = setup
    ckpt = tmp_path / "ckpt"
    from safetensors.torch import load_file, save_file

    save_file({"windows": windows.contiguous()}, tmp_path / "w.safetensors")
    teacher.save_pretrained(tmp_path / "teacher")

    def run(body: str) -> subprocess.CompletedProcess:
        script = textwrap.dedent(f"""
            import os, signal, torch
            from safetensors.torch import load_file, save_file
            from transformers import AutoModelForCausalLM
            from vptq.config import QuantConfig
            from vptq.finetune import finetune_model
            from vptq.io import load_quantized
            torch.set_num_threads({torch.get_num_threads()})  # as here: CPU sums may split by thread count
            cfg = QuantConfig.from_dict({FT.to_dict()!r})
            teacher = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'teacher')!r}, dtype=torch.float32)
            w = load_file({str(tmp_path / 'w.safetensors')!r})["windows"]
            def tune(progress=None, ckpt=None):  # the student as saved, trained with checkpoints every 2 steps
                student = load_quantized({str(folder)!r})
                r = finetune_model(student, teacher, w, cfg, torch.device("cpu"), progress, ckpt, 2)
                return student, r
            def save(student, name):
                save_file({{k: v.clone().contiguous() for k, v in student.state_dict().items()}},
                          os.path.join({str(tmp_path)!r}, name))
        """) + textwrap.dedent(body)
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)

    p = run(f"""
        def progress(done, steps, info):
            if done == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        tune(progress, {str(ckpt)!r})
    """)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert json.loads((ckpt / "finetune.json").read_text())["step"] == 4
    # resumed from the killed process's checkpoint, and uninterrupted, in one new process
    p = run(f"""
        s, r = tune(None, {str(ckpt)!r})
        assert r["resumed_from"] == 4, r
        save(s, "resumed.safetensors")
        save(tune()[0], "ref.safetensors")
    """)
    assert p.returncode == 0, p.stderr[-2000:]
    assert_same(load_file(tmp_path / "resumed.safetensors"), load_file(tmp_path / "ref.safetensors"))


def test_reassign_lowers_hessian_error_and_keeps_the_format(setup, tmp_path):
    s, r = tune(setup, FT.with_(e2e_reassign_every=3))
    ev = r["reassign"]
    assert [e["step"] for e in ev] == [3, 6]
    assert all(e["h_error_after"] <= e["h_error_before"] for e in ev)
    assert any(e["changed"] > 0 for e in ev)
    assert any(not torch.equal(a, b) for a, b in zip(indices(s).values(), indices(setup[0]).values(), strict=True))
    for k, v in indices(s).items():
        assert v.dtype == indices(setup[0])[k].dtype and v.shape == indices(setup[0])[k].shape
    out = save_quantized(s, tmp_path / "q", None)
    loaded = load_quantized(out)
    ids = setup[2][:2]
    with torch.no_grad():
        assert torch.equal(s(ids).logits, loaded(ids).logits)


def test_bad_input_is_refused_with_a_clear_error(setup, tiny_llama_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    for kw, field in (({"e2e_steps": -1}, "e2e_steps"), ({"e2e_lr": 0.0}, "learning rate"),
                      ({"e2e_lr": float("nan")}, "learning rate"), ({"e2e_lr": "fast"}, "e2e_lr"),
                      ({"e2e_reassign_every": -2}, "e2e_reassign_every")):
        with pytest.raises(ConfigError, match=field):
            FT.with_(**kw)
    student, teacher, windows, _ = setup
    with pytest.raises(ValueError, match="checkpoint_every"):
        finetune_model(copy.deepcopy(student), teacher, windows, FT, CPU, checkpoint_every=-1)
    with pytest.raises(ValueError, match="calibration windows"):
        finetune_model(copy.deepcopy(student), teacher, windows[:0], FT, CPU)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=teacher.config.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="teacher does not match the student.s architecture"):
        finetune_model(copy.deepcopy(student), other, windows, FT, CPU)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=teacher.config.vocab_size, hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True))
    with pytest.raises(ValueError, match=r"architecture: model.layers.0.mlp.gate_proj is \(128, 64\) in the student"):
        finetune_model(copy.deepcopy(student), other, windows, FT, CPU)
    assert sum(isinstance(m, VQuantLinear) for m in student.modules()) == 14


def test_assemble_task_resumes_fine_tuning_from_the_run_workspace(setup, tiny_llama_dir, tmp_path, monkeypatch):
    """tasks.blocks.assemble_model keeps the checkpoint in the run's workspace: a rerun after a
    stop mid-fine-tune resumes there and saves the tensors of an uninterrupted run."""
    import vptq_service.tasks.blocks as tb
    from vptq_service.tasks.workspace import load_fp_model, save_tensors

    monkeypatch.setenv("VPTQ_HOME", str(tmp_path / "home"))
    calib = save_tensors({"input_ids": setup[2]}, tmp_path / "calib.safetensors")
    cfg, run = FT.to_dict(), "testrun"
    for i in range(2):
        tb.quantize_block.fn(run, str(tiny_llama_dir), "sha", str(calib), "calib", cfg, i)
    real = tb._finetune_progress

    def stopping(run_key):
        log = real(run_key)

        def progress(done, steps, info):
            log(done, steps, info)
            if done == 5:
                raise Stop
        return progress

    monkeypatch.setattr(tb, "_finetune_progress", stopping)
    with pytest.raises(Stop):
        tb.assemble_model.fn(run, str(tiny_llama_dir), str(calib), cfg, 2, {}, checkpoint_every=3)
    assert json.loads((tb.finetune_dir(run) / "finetune.json").read_text())["step"] == 3
    monkeypatch.setattr(tb, "_finetune_progress", real)
    out = tb.assemble_model.fn(run, str(tiny_llama_dir), str(calib), cfg, 2, {}, checkpoint_every=3)
    assert out["e2e"]["resumed_from"] == 3
    resumed = state(load_quantized(out["path"]))
    for p in tb.finetune_dir(run).iterdir():
        p.unlink()
    ref = tb.assemble_model.fn(run, str(tiny_llama_dir), str(calib), cfg, 2, {}, checkpoint_every=3)
    assert "resumed_from" not in ref["e2e"]
    assert_same(resumed, state(load_quantized(ref["path"])))
    load_fp_model.cache_clear()


def test_plain_pipeline_resumes_fine_tuning_from_its_checkpoint_dir(tiny_llama_dir, tmp_path):
    """vptq.pipeline.compress(checkpoint_dir=...) (no Prefect): a crash mid-fine-tune, then the same
    call resumes from the last checkpoint and ends with the tensors of an uninterrupted run."""
    cfg = TINY.with_(e2e_steps=6, e2e_lr=3e-4, e2e_batch=2, kmeans_iters=3)
    ckpt = tmp_path / "ckpt"

    def stop_at_fine_tune_step_5(done, total, info):
        if info.startswith("fine-tune") and done == 5:
            raise Stop

    args, kw = (str(tiny_llama_dir), cfg, None), {"calib": CALIB, "nsamples": 4, "seqlen": 32, "checkpoint_every": 3}
    with pytest.raises(Stop):
        compress(*args, **kw, checkpoint_dir=ckpt, progress=stop_at_fine_tune_step_5)
    assert json.loads((ckpt / "finetune.json").read_text())["step"] == 3
    resumed, m1, _ = compress(*args, **kw, checkpoint_dir=ckpt)
    assert resumed.report.e2e["resumed_from"] == 3
    plain, m2, _ = compress(*args, **kw)
    assert "resumed_from" not in plain.report.e2e
    assert_same(state(m1), state(m2))


def test_half_precision_model_fine_tunes_without_nan_and_keeps_its_norms(setup):
    """A float16 student (a 7B checkpoint's dtype): the codebooks train in fp32 and go back to fp16;
    its fp16 norms stay frozen (fp16 Adam would divide by an eps that rounds to 0: NaN)."""
    student, teacher, windows, _ = setup
    s, t = copy.deepcopy(student).half(), copy.deepcopy(teacher).half()
    norms = {k: v.clone() for k, v in s.state_dict().items() if "norm" in k}
    r = finetune_model(s, t, windows, FT.with_(e2e_steps=4), CPU)
    assert math.isfinite(r["kl_after"]) and r["kl_after"] < r["kl_before"]
    assert all(torch.equal(v, s.state_dict()[k]) for k, v in norms.items())
    assert all(p.dtype == torch.float16 for p in s.parameters())
