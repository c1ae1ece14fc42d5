import os
import tempfile
from pathlib import Path

# Under pytest-xdist the processes the tests start (`vptq ...` commands, Prefect and Dask workers) get one
# OpenMP thread and one numba thread too, and so does numba here: with the other worker holding the second
# core, every parallel region of a two-thread process waited for its second thread to be scheduled (a tiny
# `vptq compress` took 32 s instead of 15 s beside a busy core). Set before torch and numba are imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
# a `vptq worker` the tests start looks for flow runs every second, not Prefect's default 10 s (each test
# that queues a run waited up to that long for the worker to notice it)
os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Session fixtures are registered here, once: a module importing one would get its own instance
# (pytest keys a fixture by where it is defined), e.g. a Prefect test server per test module.
from tests.prefect_fixtures import prefect_harness, tiny_flow_job  # noqa: F401
from tests.store_fixtures import moto_server  # noqa: F401

# one torch thread per pytest-xdist worker (`make test` runs two on CI's two cores: two threads each would
# oversubscribe them), two in a single process
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

# SmolLM2's GGUF is parsed once per machine, not in each test that loads it (seconds a load on one core;
# vptq/gguf_cache.py; tests/test_gguf_cache.py checks the cached folder loads the same model). Shared by the
# xdist workers and the commands the tests start (they inherit the environment).
os.environ.setdefault("VPTQ_GGUF_CACHE", os.path.join(tempfile.gettempdir(), f"vptq-tests-gguf-cache-{os.getuid()}"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def correlated_problem(m=64, n=48, tokens=2048, seed=0):
    """A weight and a strongly correlated input covariance (so error feedback matters)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n**0.5
    scales = torch.logspace(0, -2, n)
    x = (torch.randn(tokens, n, generator=g) * scales) @ mix + 0.3 * torch.randn(tokens, 1, generator=g)
    h = x.t() @ x / tokens
    w = torch.randn(m, n, generator=g)
    return w, h


@pytest.fixture(scope="session")
def smol_tokenizer():
    from vptq.source import load_tokenizer, resolve

    return load_tokenizer(resolve("smollm2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer):
    """A 2-block random Llama with SmolLM2's tokenizer, saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """Evaluation/calibration text: wikitext-2 when the shared data is there, else the packaged copy."""
    p = SHARED_DATA / "test.txt"
    if p.is_file():
        return p
    return REPO / "vptq" / "data" / "wikitext2-valid.txt"


@pytest.fixture(scope="session")
def quantized_dir(tiny_llama_dir, smol_tokenizer, tmp_path_factory):
    """tiny_llama_dir with its 14 linears quantized (random Hessians), saved: the folder that
    test_generate and test_serve read (read only; a test that edits it works on a copy)."""
    from tests.vq_layers import quantized_folder
    from vptq.config import QuantConfig

    cfg = QuantConfig(vector_len=4, num_centroids=64, kmeans_iters=3, refine_iters=0)
    return quantized_folder(tiny_llama_dir, cfg, smol_tokenizer, tmp_path_factory.mktemp("gen") / "q")


@pytest.fixture
def home(tmp_path, monkeypatch, request):
    """A fresh VPTQ_HOME (SQLite lineage DB, local artifact store, workspaces) for one test, on the
    session's Prefect server; what a command sets in the environment for its process (TQDM_DISABLE
    & co.) is undone afterwards."""
    request.getfixturevalue("prefect_harness")
    for k in ("VPTQ_DB_URL", "VPTQ_ARTIFACTS", "PREFECT_API_URL"):
        monkeypatch.delenv(k, raising=False)
    saved = dict(os.environ)
    monkeypatch.setenv("VPTQ_HOME", str(tmp_path / "home"))
    yield tmp_path / "home"
    os.environ.clear()
    os.environ.update(saved)


# The suite's longest modules, longest first: pytest-xdist deals tests out in collection order, and one of
# these collected in file order started late on one of the two workers and ran alone at the end.
LONGEST_FIRST = ("tests/test_quality_gate.py", "tests/test_server.py")


def pytest_collection_modifyitems(config, items):
    """LONGEST_FIRST's modules first (in that order), every other test in file order after them."""
    rank = {m: i for i, m in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
