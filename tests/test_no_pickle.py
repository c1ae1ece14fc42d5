"""No pickle anywhere (issue 26, item 2): the workspace under VPTQ_HOME/work is often shared (one
VPTQ_HOME on NFS for several workers), so nothing there may be unpickled.

- A crafted pickle planted where a job reads a reused block (its descriptor, its tensors, a Prefect
  result record, the shared Hessian set) never runs: the job recomputes what it cannot verify.
- Our code and settings name no pickle serializer (a source scan), and every Prefect flow and task
  of ours neither reads a cached result nor persists one with a pickle serializer.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

from tests.test_flow import REPO, TINY, checkpoint_bytes

PACKAGES = ("vptq", "store", "tasks", "flows", "cli", "serve")


class Payload:
    """Unpickling this writes `marker` (what an attacker's code would do) and yields `value`."""

    def __init__(self, marker: Path, value: object = None) -> None:
        self.marker, self.value = str(marker), value

    def __reduce__(self):
        expr = f"(__import__('pathlib').Path({self.marker!r}).write_text('payload ran'), {self.value!r})[1]"
        return eval, (expr,)


def plant(path: Path, marker: Path) -> None:
    """Replace `path` with a crafted pickle: a Prefect result record keeps its JSON envelope (the
    pickle inside, as Prefect 3 writes it, yielding the original value), anything else becomes raw
    pickle bytes."""
    try:
        record = json.loads(path.read_bytes())
    except ValueError:
        record = None
    if isinstance(record, dict) and "result" in record and "metadata" in record:
        import cloudpickle

        value = cloudpickle.loads(base64.b64decode(record["result"]))  # our own file, from the fixture
        record["result"] = base64.b64encode(pickle.dumps(Payload(marker, value))).decode()
        path.write_text(json.dumps(record))
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def test_a_planted_pickle_in_the_workspace_never_runs(home, tiny_llama_dir, text_file, tmp_path,  # noqa: F811
                                                      tiny_flow_job):
    # a shared workspace: the session's finished job wrote every block (and the Hessian set) there
    work = Path(tiny_flow_job.summary["workspace"]).parents[1]
    shutil.copytree(work, home / "work")
    ws = home / "work" / "runs" / Path(tiny_flow_job.summary["workspace"]).name
    marker = tmp_path / "pwned"
    planted = [p for p in (ws / "results").rglob("*") if p.is_file()] if (ws / "results").is_dir() else []
    planted += [ws / "block_000.json", ws / "block_001.safetensors"]
    planted += sorted((home / "work" / "hessians").glob("*/block_000.safetensors"))
    for p in planted:
        plant(p, marker)

    # another request on the same model, data and config reuses that workspace; in a process of its
    # own whose Prefect settings ask for pickled, persisted results everywhere
    from prefect.settings import PREFECT_API_URL

    storage = tmp_path / "prefect-storage"
    env = dict(os.environ, VPTQ_HOME=str(home), PREFECT_API_URL=PREFECT_API_URL.value(),
               PREFECT_RESULTS_DEFAULT_SERIALIZER="pickle", PREFECT_RESULTS_PERSIST_BY_DEFAULT="true",
               PREFECT_TASKS_DEFAULT_PERSIST_RESULT="true", PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(storage))
    proc = subprocess.run([sys.executable, "-m", "vptq_service.cli.main", "submit", str(tiny_llama_dir), "--name",
                           "tiny2", "--calib", str(text_file), *TINY], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert not marker.exists(), "a pickle planted in the workspace was unpickled"
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(proc.stdout)
    assert s["status"] == "succeeded" and s["blocks_reused"] == 0 and s["hessians_reused"] is False
    assert checkpoint_bytes(Path(s["workspace"]) / "checkpoint") == tiny_flow_job.checkpoint
    # whatever Prefect persisted for our flows and tasks (nothing, as they are) is JSON: never a pickle
    records = [json.loads(p.read_text()) for p in storage.rglob("*") if p.is_file()] if storage.is_dir() else []
    assert all(r["metadata"]["serializer"]["type"] == "json" for r in records), records[:1]
    assert not any(p.name.startswith("block-") for p in ws.rglob("*"))  # no Prefect result in the workspace


def _serializer_strings(tree: ast.AST) -> list[str]:
    """Pickle named as a serializer, a pickle-family import, torch.load without weights_only=True,
    a persisted Prefect result (persist_result=True)."""
    bad = []
    prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}  # docstrings: words, not settings
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"import {n}" for n in names if n and n.split(".")[0] in ("pickle", "cloudpickle", "dill",
                                                                              "joblib", "shelve")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose and \
                "pickle" in node.value.lower():
            if node.value.strip().lower() in ("pickle", "cloudpickle", "compressed/pickle", "dill") or \
                    "serializer" in node.value.lower():
                bad.append(repr(node.value))
        elif isinstance(node, ast.keyword) and node.arg == "persist_result" and \
                isinstance(node.value, ast.Constant) and node.value.value is True:
            bad.append("persist_result=True")
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
            kw = {k.arg: k.value for k in node.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad.append("torch.load without weights_only=True")
    return bad


def test_no_pickle_serializer_in_our_code_or_settings():
    found = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            bad = _serializer_strings(ast.parse(f.read_text(), str(f)))
            if bad:
                found[f.relative_to(REPO).as_posix()] = bad
    assert found == {}
    text = (REPO / "pyproject.toml").read_text().lower()
    assert "pickle" not in text and "persist_by_default" not in text


def test_our_flows_and_tasks_never_read_or_pickle_a_result():
    """Every Prefect flow and task of ours: no cache policy (nothing is ever read back from result
    storage, whose records name their own serializer), results not persisted, JSON if they were."""
    import importlib
    import pkgutil

    from prefect import Flow, Task
    from prefect.cache_policies import NO_CACHE

    flows, tasks = {}, {}
    for pkg in ("tasks", "flows"):
        base = importlib.import_module(f"vptq_service.{pkg}")
        for m in pkgutil.iter_modules(base.__path__):
            mod = importlib.import_module(f"vptq_service.{pkg}.{m.name}")
            for name, obj in vars(mod).items():
                if isinstance(obj, Flow):
                    flows[f"{mod.__name__}.{name}"] = obj
                elif isinstance(obj, Task):
                    tasks[f"{mod.__name__}.{name}"] = obj
    assert {"vptq_service.flows.compress.compress", "vptq_service.flows.schedule.compress_scheduled"} <= set(flows)
    assert "vptq_service.tasks.blocks.quantize_block" in tasks
    for name, f in flows.items():
        assert f.persist_result is False and f.result_serializer == "json", name
    for name, t in tasks.items():
        assert t.cache_policy in (NO_CACHE, None) and t.cache_key_fn is None, name
        assert t.persist_result in (False, None) and t.result_serializer in ("json", None), name
