"""The import roots: two names in site-packages, Hugging Face's `kernels` beside ours, a cache key
that covers every source file a block's bytes depend on."""

import ast
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = ("vptq", "cli", "store", "tasks", "flows")
OLD_ROOTS = ("cli", "store", "tasks", "flows", "kernels")


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_no_code_imports_a_generic_top_level_name():
    """`import store` would load a second copy of a module beside vptq_service.store (two ORMs)."""
    bad = []
    for folder in (*OURS, "tests", "bench"):
        for p in sorted((REPO / folder).rglob("*.py")):
            bad += [f"{p.relative_to(REPO)}: {m}" for m in _imports(p) if m.split(".")[0] in OLD_ROOTS]
    assert bad == []


def test_the_distribution_installs_two_import_roots():
    dist = importlib.metadata.distribution("vptq-service")
    tops = set((dist.read_text("top_level.txt") or "").split())
    assert tops == {"vptq", "vptq_service"}, tops
    entry = {e.name: e.value for e in dist.entry_points}
    assert entry["vptq"] == "vptq_service.cli.main:main"


def test_hugging_face_kernels_imports_beside_ours(tmp_path):
    """transformers >= 5.25 imports the `kernels` distribution when installed: it must be theirs."""
    code = ("import json, kernels, vptq.kernels, transformers, vptq_service.cli.main\n"
            "from transformers.integrations import hub_kernels\n"
            "print(json.dumps([kernels.__file__, vptq.kernels.__file__, transformers.__version__]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs, ours, _ = json.loads(r.stdout.strip().splitlines()[-1])
    assert "site-packages" in theirs and Path(ours).resolve().is_relative_to(REPO / "vptq" / "kernels")


def test_code_version_covers_the_kernels(tmp_path, monkeypatch):
    """A change in vptq/kernels/ (the quantizer's CUDA assignment) must not reuse cached blocks."""
    import shutil

    from vptq_service.tasks import workspace

    tree = tmp_path / "vptq"
    shutil.copytree(REPO / "vptq", tree, ignore=shutil.ignore_patterns("__pycache__", "data"))
    monkeypatch.setattr(workspace, "VPTQ_DIR", tree)
    workspace.code_version.cache_clear()
    try:
        before = workspace.code_version()
        workspace.code_version.cache_clear()
        assert workspace.code_version() == before
        k = tree / "kernels" / "assign.py"
        k.write_text(k.read_text() + "\n# touched\n")
        workspace.code_version.cache_clear()
        assert workspace.code_version() != before
    finally:
        workspace.code_version.cache_clear()
