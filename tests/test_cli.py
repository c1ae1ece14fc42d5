"""`vptq compress` / `vptq eval` operability: bad input, --json contracts, interrupted runs.

`compress` runs the `compress` Prefect flow in-process (a session-wide Prefect test harness, a
fresh VPTQ_HOME per test). Bad input: one line on stderr ("error: ..."), exit 2 (usage) or 1
(failure), no traceback, nothing at --out, no job row, and no model loaded first. The --json and signal tests run the real
command in a subprocess (real stdout/stderr file descriptors); the rest use typer's CliRunner.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import vptq_service.tasks.workspace
from typer.testing import CliRunner
from vptq_service.cli.main import app
from vptq_service.cli.output import progress

import vptq.driver
import vptq.pipeline

REPO = Path(__file__).resolve().parents[1]
TINY = ["--nsamples", "2", "--seqlen", "64", "--set", "num_centroids=16", "--set", "kmeans_iters=3",
        "--finetune-steps", "2", "--eval-windows", "1", "--eval-seqlen", "64"]
EVAL_TINY = ["--windows", "1", "--seqlen", "64"]
pytestmark = pytest.mark.usefixtures("home")  # every test: a fresh VPTQ_HOME (tests/conftest.py)


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def vptq_proc(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vptq_service.cli.main", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, **kw)


def assert_one_line_error(code: int, out: str, err: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, (code, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    assert out == ""


def siblings(out: Path) -> list[str]:
    """Temporary or backup folders save_quantized may have left next to --out."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def jobs_in(home: Path) -> list:
    """The job rows of VPTQ_HOME's database (none when it was never created)."""
    if not (home / "vptq.db").exists():
        return []
    from vptq_service.store.repository import Repository

    with Repository.session_scope() as repo:
        return repo.list_jobs()


@pytest.fixture(autouse=True)
def _restore_environ():
    """The commands set TQDM_DISABLE & co. for their process; keep them out of the other tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def calib(tmp_path_factory, text_file) -> Path:
    """A short calibration/evaluation text (enough for 64-token windows, quick to tokenize)."""
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(text_file.read_text()[:30_000])
    return p


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input must be refused before the model is loaded: loading now fails the test."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr(vptq.pipeline, "load_model", boom)
    monkeypatch.setattr(vptq_service.tasks.workspace, "load_fp_model", boom)


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, calib, tmp_path_factory, prefect_harness) -> Path:  # noqa: F811
    """A quantized tiny Llama written by the command (also the in-process happy path)."""
    saved = os.environ.get("VPTQ_HOME")
    os.environ["VPTQ_HOME"] = str(tmp_path_factory.mktemp("home"))
    out = tmp_path_factory.mktemp("ckpt") / "q"
    code, stdout, err = run("compress", tiny_llama_dir, "--bits", "2", "--out", out, "--calib", calib, *TINY)
    if saved is None:
        os.environ.pop("VPTQ_HOME", None)
    else:
        os.environ["VPTQ_HOME"] = saved
    assert code == 0, err
    assert "wrote" in stdout and (out / "config.json").is_file()
    return out


# ----------------------------------------------------------------------------- bad input


@pytest.mark.usefixtures("no_model_load")
class TestBadInput:
    @pytest.fixture(autouse=True)
    def _no_job_row(self, home):
        yield
        assert jobs_in(home) == [], "bad input created a job row"

    def test_source_does_not_exist(self, tmp_path, calib):
        out = tmp_path / "q"
        r = run("compress", tmp_path / "nope", "--out", out, "--calib", calib)
        assert_one_line_error(*r, 2, "does not exist")
        assert not out.exists()

    def test_folder_is_not_a_model(self, tmp_path, calib):
        (tmp_path / "notes").mkdir()
        out = tmp_path / "q"
        r = run("compress", tmp_path / "notes", "--out", out, "--calib", calib)
        assert_one_line_error(*r, 2, "not a model folder")
        assert not out.exists()

    def test_file_is_not_a_model(self, tmp_path, calib):
        (tmp_path / "model.bin").write_bytes(b"\0" * 16)
        r = run("compress", tmp_path / "model.bin", "--out", tmp_path / "q", "--calib", calib)
        assert_one_line_error(*r, 2, ".gguf")

    def test_folder_with_a_broken_config(self, tmp_path, calib):
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text("{not json")
        r = run("compress", tmp_path / "m", "--out", tmp_path / "q", "--calib", calib)
        assert_one_line_error(*r, 2, "config.json")
        r = run("eval", tmp_path / "m", "--text", calib)
        assert_one_line_error(*r, 2, "config.json")

    def test_folder_with_a_config_but_no_tokenizer(self, tmp_path, calib):
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text('{"model_type": "llama"}')
        r = run("compress", tmp_path / "m", "--out", tmp_path / "q", "--calib", calib)
        assert_one_line_error(*r, 2, "cannot load")
        assert not (tmp_path / "q").exists()

    def test_bits_5(self, tiny_llama_dir, tmp_path, calib):
        r = run("compress", tiny_llama_dir, "--bits", "5", "--out", tmp_path / "q", "--calib", calib)
        assert_one_line_error(*r, 2, "--bits 5", "2, 3 or 4")
        assert not (tmp_path / "q").exists()

    def test_bits_not_a_number(self, tiny_llama_dir, tmp_path):
        r = run("compress", tiny_llama_dir, "--bits", "two", "--out", tmp_path / "q")
        assert_one_line_error(*r, 2, "--bits", "--help")

    def test_missing_source(self):
        assert_one_line_error(*run("compress"), 2, "source")

    def test_version_that_exists_is_refused(self, tiny_llama_dir, calib, home):
        from vptq_service.store.repository import Repository

        with Repository.session_scope() as repo:
            repo.record_artifact("taken", "v1", "file:///x", 1, "0" * 64)
        r = run("compress", tiny_llama_dir, "--calib", calib, "--name", "taken", "--version", "v1")
        assert_one_line_error(*r, 2, "taken:v1 already exists")
        assert jobs_in(home) == []

    @pytest.mark.parametrize("name, text, needle", [
        ("bad.toml", "vector_len = [", "not valid TOML"),
        ("bad.json", "{not json", "not valid JSON"),
        ("unknown.toml", "vector_len = 4\nbogus_key = 1\n", "unknown key(s) ['bogus_key']"),
        ("type.toml", 'vector_len = "four"\n', "vector_len = 'four' is not a int"),
        ("list.json", "[1, 2]", "expected a mapping"),
    ])
    def test_bad_config_file(self, tiny_llama_dir, calib, tmp_path, home, name, text, needle):
        (tmp_path / name).write_text(text)
        r = run("compress", tiny_llama_dir, "--calib", calib, "--config", tmp_path / name)
        assert_one_line_error(*r, 2, needle)
        assert jobs_in(home) == []

    def test_wrong_database_url(self, tiny_llama_dir, calib, monkeypatch):
        monkeypatch.setenv("VPTQ_DB_URL", "postgresql://nobody@127.0.0.1:1/nowhere")
        assert_one_line_error(*run("compress", tiny_llama_dir, "--calib", calib), 1, "127.0.0.1:1")
        assert_one_line_error(*run("jobs", "ls"), 1, "127.0.0.1:1")

    def test_unreachable_s3_endpoint(self, tiny_llama_dir, calib, monkeypatch):
        monkeypatch.setenv("VPTQ_ARTIFACTS", "s3://bucket/prefix")
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
        assert_one_line_error(*run("compress", tiny_llama_dir, "--calib", calib), 1, "cannot reach S3 endpoint")

    def test_unknown_artifact(self):
        assert_one_line_error(*run("eval", "nothing:v1", "--text", "x.txt"), 2, "nothing:v1 not found")

    def test_config_file_that_does_not_exist(self, tiny_llama_dir, calib, tmp_path):
        assert_one_line_error(*run("compress", tiny_llama_dir, "--config", tmp_path / "nope.toml"), 2, "no such file")

    def test_max_ppl_ratio_needs_an_evaluation(self, tiny_llama_dir, calib):
        r = run("compress", tiny_llama_dir, "--calib", calib, "--max-ppl-ratio", "1.5", "--eval-windows", "0")
        assert_one_line_error(*r, 2, "--max-ppl-ratio")
        assert_one_line_error(*run("compress", tiny_llama_dir, "--calib", calib, "--max-ppl-ratio", "-1"), 2,
                              "--max-ppl-ratio")

    def test_unknown_option_and_device(self, tiny_llama_dir, tmp_path):
        assert_one_line_error(*run("compress", tiny_llama_dir, "--out", tmp_path / "q", "--bogus"), 2, "--bogus")
        assert_one_line_error(*run("compress", tiny_llama_dir, "--out", tmp_path / "q", "--device", "tpu"),
                              2, "--device")

    def test_bad_finetune_settings(self, tiny_llama_dir, tmp_path, calib):
        r = run("compress", tiny_llama_dir, "--out", tmp_path / "q", "--calib", calib, "--finetune-steps", "-1")
        assert_one_line_error(*r, 2, "--finetune-steps")
        r = run("compress", tiny_llama_dir, "--out", tmp_path / "q", "--calib", calib, "--set", "e2e_lr=0")
        assert_one_line_error(*r, 2, "positive")

    def test_bad_set_override(self, tiny_llama_dir, tmp_path, calib):
        r = run("compress", tiny_llama_dir, "--out", tmp_path / "q", "--calib", calib, "--set", "nonsense=1")
        assert_one_line_error(*r, 2, "--set")
        r = run("compress", tiny_llama_dir, "--out", tmp_path / "q", "--calib", calib, "--set", "num_centroids=15")
        assert_one_line_error(*r, 2, "num_centroids")

    def test_empty_calibration(self, tiny_llama_dir, tmp_path):
        (tmp_path / "empty.txt").write_text("  \n\n")
        out = tmp_path / "q"
        r = run("compress", tiny_llama_dir, "--out", out, "--calib", tmp_path / "empty.txt")
        assert_one_line_error(*r, 2, "empty", "--calib")
        assert not out.exists()

    def test_missing_calibration(self, tiny_llama_dir, tmp_path):
        r = run("compress", tiny_llama_dir, "--out", tmp_path / "q", "--calib", tmp_path / "nope.txt")
        assert_one_line_error(*r, 2, "does not exist", "--calib")

    def test_too_short_calibration(self, tiny_llama_dir, tmp_path):
        (tmp_path / "short.txt").write_text("A few words of text, far too few for a window.")
        out = tmp_path / "q"
        r = run("compress", tiny_llama_dir, "--out", out, "--calib", tmp_path / "short.txt", *TINY)
        assert_one_line_error(*r, 2, "tokens", "--calib")
        assert not out.exists()

    @pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
    def test_cuda_without_gpu(self, tiny_llama_dir, tmp_path, calib):
        out = tmp_path / "q"
        r = run("compress", tiny_llama_dir, "--out", out, "--calib", calib, "--device", "cuda")
        assert_one_line_error(*r, 2, "--device cuda", "--device cpu")
        assert not out.exists()
        assert_one_line_error(*run("eval", tiny_llama_dir, "--text", calib, "--device", "cuda"), 2, "cuda")

    def test_existing_out_is_refused_and_left_alone(self, tiny_llama_dir, tmp_path, calib):
        out = tmp_path / "q"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        r = run("compress", tiny_llama_dir, "--out", out, "--calib", calib)
        assert_one_line_error(*r, 2, "already exists", "--overwrite")
        assert [p.name for p in out.iterdir()] == ["keep.txt"]

    def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(self, tiny_llama_dir, tmp_path, calib):
        out = tmp_path / "q"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        r = run("compress", tiny_llama_dir, "--out", out, "--calib", calib, "--overwrite")
        assert_one_line_error(*r, 2, "not a VPTQ checkpoint")
        assert (out / "keep.txt").read_text() == "mine"

    def test_overwrite_refuses_a_file(self, tiny_llama_dir, tmp_path, calib):
        (tmp_path / "q").write_text("mine")
        r = run("compress", tiny_llama_dir, "--out", tmp_path / "q", "--calib", calib, "--overwrite")
        assert_one_line_error(*r, 2, "not a folder")
        assert (tmp_path / "q").read_text() == "mine"

    def test_out_cannot_be_created(self, tiny_llama_dir, tmp_path, calib):
        (tmp_path / "file").write_text("x")
        r = run("compress", tiny_llama_dir, "--out", tmp_path / "file" / "q", "--calib", calib)
        assert_one_line_error(*r, 2, "--out")

    def test_compress_an_already_quantized_folder(self, checkpoint, tmp_path, calib):
        r = run("compress", checkpoint, "--out", tmp_path / "q", "--calib", calib)
        assert_one_line_error(*r, 2, "already VPTQ-quantized")

    def test_eval_bad_inputs(self, tmp_path, tiny_llama_dir, calib):
        assert_one_line_error(*run("eval", tmp_path / "nope", "--text", calib), 2, "does not exist")
        assert_one_line_error(*run("eval", tmp_path, "--text", calib), 2, "not a model folder")
        assert_one_line_error(*run("eval", tiny_llama_dir, "--text", tmp_path / "nope.txt"), 2, "--text")
        assert_one_line_error(*run("eval", tiny_llama_dir), 2, "--text")
        assert_one_line_error(*run("eval", tiny_llama_dir, "--text", calib, "--windows", "0"), 2, "--windows")
        (tmp_path / "empty.txt").write_text("")
        assert_one_line_error(*run("eval", tiny_llama_dir, "--text", tmp_path / "empty.txt"), 2, "empty")

    def test_eval_text_too_short(self, tiny_llama_dir, calib):
        r = run("eval", tiny_llama_dir, "--text", calib, "--windows", "10", "--seqlen", "2048")
        assert_one_line_error(*r, 2, "tokens", "--windows")

    def test_debug_shows_the_traceback(self, tmp_path, calib):
        proc = vptq_proc("compress", tmp_path / "nope", "--out", tmp_path / "q", "--calib", calib, "--debug")
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "SourceError" in proc.stderr


def test_failure_mid_run_is_exit_1_one_line_nothing_at_out(monkeypatch, tiny_llama_dir, tmp_path, calib):
    def broken(*a, **k):
        raise RuntimeError("out of memory\nwith a second line")

    monkeypatch.setattr(vptq.driver, "quantize_linears", broken)
    out = tmp_path / "q"
    r = run("compress", tiny_llama_dir, "--out", out, "--calib", calib, *TINY)
    assert_one_line_error(*r, 1, "RuntimeError: out of memory")
    assert not out.exists() and siblings(out) == []
    [job] = jobs_in(tmp_path / "home")
    assert job.status == "failed" and "RuntimeError: out of memory" in job.error


def test_bare_vptq_shows_help_exit_2():
    code, out, err = run()
    assert code == 2 and "compress" in out + err and "Traceback" not in err


# ----------------------------------------------------------------------------- --json


def test_compress_and_eval_json_contracts(tiny_llama_dir, calib, tmp_path):
    """The real command: stdout is exactly one JSON object, no progress bars on a non-tty stderr."""
    out = tmp_path / "q"
    proc = vptq_proc("compress", tiny_llama_dir, "--bits", "2", "--out", out, "--calib", calib, *TINY, "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert proc.stdout.strip().count("\n") == 0
    assert isinstance(s["out"], str) and Path(s["out"]) == out
    assert isinstance(s["bpw"], float) and 0 < s["bpw"] < 4
    assert isinstance(s["seconds"], float) and s["seconds"] > 0
    assert s["layers"] == 14
    assert "%|" not in proc.stderr and "━" not in proc.stderr  # no tqdm / rich bars in a log
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert siblings(out) == []
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode

    proc = vptq_proc("eval", out, "--text", calib, *EVAL_TINY, "--json")
    assert proc.returncode == 0, proc.stderr
    e = json.loads(proc.stdout)
    assert proc.stdout.strip().count("\n") == 0
    assert isinstance(e["perplexity"], float) and e["perplexity"] > 1
    assert (e["windows"], e["seqlen"], e["tokens"]) == (1, 64, 63)


def test_json_stdout_stays_clean_when_a_library_prints(monkeypatch, checkpoint, calib):
    real = vptq.pipeline.perplexity

    def chatty(*a, **k):
        print("a library talking on stdout")
        return real(*a, **k)

    monkeypatch.setattr(vptq.pipeline, "perplexity", chatty)
    code, out, err = run("eval", checkpoint, "--text", calib, *EVAL_TINY, "--json")
    assert code == 0, err
    assert set(json.loads(out)) >= {"perplexity", "windows", "seqlen", "tokens"}
    assert "a library talking" in err


def test_eval_human_output_on_original_model(tiny_llama_dir, calib):
    code, out, err = run("eval", tiny_llama_dir, "--text", calib, *EVAL_TINY)
    assert code == 0, err
    assert out.startswith("perplexity ") and "1 x 64" in out


def test_eval_scores_several_texts_with_one_load(tiny_llama_dir, calib, tmp_path, monkeypatch):
    """`--text A --text B`: the first text's figures stay the top-level keys, `texts` has each; the model
    loads once; a short text is refused (exit 2, naming it) before the model loads."""
    import vptq.source

    other = tmp_path / "other.txt"
    other.write_text("def f(x):\n    return x + 1\n" * 200)
    loads = []
    real = vptq.source.load_model
    monkeypatch.setattr(vptq.pipeline, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    code, out, err = run("eval", tiny_llama_dir, "--text", calib, "--text", other, *EVAL_TINY, "--json")
    assert code == 0, err
    e = json.loads(out)
    one = json.loads(run("eval", tiny_llama_dir, "--text", calib, *EVAL_TINY, "--json")[1])
    assert e["perplexity"] == one["perplexity"] and "texts" not in one
    assert [t["text"] for t in e["texts"]] == [str(calib), str(other)] and e["texts"][0]["perplexity"] == e["perplexity"]
    assert e["texts"][1]["perplexity"] != e["perplexity"] and loads == [1, 1]
    short = tmp_path / "short.txt"
    short.write_text("too short")
    code, out, err = run("eval", tiny_llama_dir, "--text", calib, "--text", short, *EVAL_TINY)
    assert code == 2 and f"evaluation text {short} has" in err and loads == [1, 1], err


def test_progress_bar_only_on_a_terminal(checkpoint, calib):
    assert progress(True, "x").__enter__() is None  # pytest's stderr is not a terminal
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vptq_service.cli.main", "eval", str(checkpoint), "--text", str(calib),
                             *EVAL_TINY, "--json"], cwd=REPO, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # read the terminal while the child writes: a full pty would block it
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO once the child has closed its end
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=600)
    reader.join(timeout=60)
    os.close(master)
    assert proc.returncode == 0
    assert "perplexity" in json.loads(stdout)
    assert b"evaluate" in b"".join(chunks)  # the rich bar went to the terminal on stderr


# ----------------------------------------------------------------------------- --overwrite, interrupts


def test_overwrite_replaces_an_earlier_checkpoint(tiny_llama_dir, calib, checkpoint, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    for f in checkpoint.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "stale.txt").write_text("from the old run")
    code, _, err = run("compress", tiny_llama_dir, "--out", out, "--calib", calib, *TINY, "--seed", "1",
                       "--overwrite", "--json")
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert json.loads((out / "vptq_report.json").read_text())["config"]["seed"] == 1
    assert siblings(out) == []


def test_ctrl_c_while_quantizing_leaves_nothing(monkeypatch, tiny_llama_dir, calib, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(vptq.driver, "quantize_linears", interrupted)
    out = tmp_path / "q"
    code, stdout, err = run("compress", tiny_llama_dir, "--out", out, "--calib", calib, *TINY, "--json")
    assert code == 130 and "interrupted" in err and "Traceback" not in err and stdout == ""
    assert not out.exists() and siblings(out) == []
    [job] = jobs_in(tmp_path / "home")
    assert job.status == "cancelled"


def test_ctrl_c_while_saving_with_overwrite_keeps_the_old_checkpoint(monkeypatch, tiny_llama_dir, calib,
                                                                     checkpoint, tmp_path):
    import vptq.io

    out = tmp_path / "q"
    out.mkdir()
    for f in checkpoint.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def half_written(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(vptq.io, "save_file", half_written)
    code, _, err = run("compress", tiny_llama_dir, "--out", out, "--calib", calib, *TINY, "--overwrite")
    assert code == 130 and "interrupted" in err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert siblings(out) == []


SLOW_SAVE = """
import sys, time
import vptq.io

def slow_save(tensors, path, metadata=None):
    open(path, "wb").write(b"half a file")
    print("SAVING", file=sys.stderr, flush=True)
    time.sleep(120)

vptq.io.save_file = slow_save
from vptq_service.cli.main import main
sys.argv = ["vptq", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_killed_while_saving_leaves_nothing_at_out(sig, code, tiny_llama_dir, calib, tmp_path):
    out = tmp_path / "q"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "compress", str(tiny_llama_dir), "--out", str(out),
                             "--calib", str(calib), *TINY, "--json"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    for line in proc.stderr:
        if "SAVING" in line or time.monotonic() > deadline:
            break
    if sig == signal.SIGKILL:  # the whole process group, as a dying machine would: the temporary
        os.killpg(proc.pid, sig)  # Prefect server child would otherwise hold the pipes open
    else:
        proc.send_signal(sig)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert stdout == "" and "Traceback" not in err
    assert not out.exists()
    if sig != signal.SIGKILL:  # a hard kill cannot clean up: a hidden .q.tmp-* sibling may remain
        assert "terminated" in err and siblings(out) == []


def test_request_defaults_follow_the_preset():
    """Hessian mode and calibration windows left out of a request come from the preset, and the
    stored spec is explicit: leaving them out or spelling the defaults is the same job."""
    from vptq_service.flows.spec import JobSpec

    from vptq.config import calib_windows, preset

    s = JobSpec(source="smollm2", name="x", bits=3)
    assert s.hessians == preset(3).hessians == "original"
    assert s.nsamples == calib_windows(preset(3).e2e_steps) == 256
    assert JobSpec(source="smollm2", name="x", bits=3, overrides={"e2e_steps": 0}).nsamples == 64
    assert JobSpec(source="smollm2", name="x", bits=3, nsamples=256, hessians="original").key() == s.key()
    mine = JobSpec(source="smollm2", name="x", bits=3, nsamples=8, hessians="sequential")
    assert (mine.nsamples, mine.hessians) == (8, "sequential") and mine.key() != s.key()


def test_import_error_from_a_clashing_kernels_distribution_says_what_to_do(capsys):
    """An installed Hugging Face `kernels` (which transformers >= 5.25 imports) is found instead of our
    `kernels` package: one line that names the clash and the fix, exit 1; other errors get no hint."""
    import typer
    from vptq_service.cli.errors import errors

    for exc, hint in ((ImportError("cannot import name 'CUDAProperties' from 'kernels' (/x/kernels/__init__.py)",
                                   name="kernels"), True), (ValueError("something else"), False)):
        with pytest.raises(typer.Exit) as ei, errors(False):
            raise exc
        err = capsys.readouterr().err
        assert ei.value.exit_code == 1 and err.count("\n") == 1 and err.startswith("error: ")
        assert ("pip uninstall kernels" in err) == hint, err
