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


# ----------------------------------------------------------------------------- the import graph

ROOT_NAMES = {"vptq": "vptq", "cli": "vptq_service.cli", "store": "vptq_service.store",
              "tasks": "vptq_service.tasks", "flows": "vptq_service.flows", "serve": "vptq_service.serve"}
# which layer may import which (README, "Layout"): cli -> flows -> tasks -> {vptq, store}, vptq -> vptq.kernels;
# a layer may skip the ones below it, never import one above it or beside it
MAY_IMPORT = {"cli": {"cli", "serve", "flows", "tasks", "store", "vptq", "kernels"},
              "serve": {"serve", "vptq", "kernels"},  # the HTTP server: the model, never the job machinery
              "flows": {"flows", "tasks", "store", "vptq", "kernels"},
              "tasks": {"tasks", "store", "vptq", "kernels"},
              "store": {"store"}, "vptq": {"vptq", "kernels"}, "kernels": {"kernels"}}


def _our_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of ours (a package is its __init__.py)."""
    mods = {}
    for folder, name in ROOT_NAMES.items():
        for p in sorted((REPO / folder).rglob("*.py")):
            parts = [name, *p.relative_to(REPO / folder).with_suffix("").parts]
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _import_graph(mods: dict[str, Path]) -> dict[str, dict[str, list[str]]]:
    """module -> {imported module of ours: [names it imports from it]}, from every import statement in
    the file (inside functions too: a lazy import still ties the two files together)."""
    def ours(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, list[str]]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: dict[str, list[str]] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if (target := ours(a.name)) is not None:
                        edges.setdefault(target, [])
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package, one level up per extra dot
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    target = sub if sub in mods else ours(base)
                    if target is not None:
                        edges.setdefault(target, []).append("" if sub in mods else a.name)
        edges.pop(mod, None)
        graph[mod] = edges
    return graph


def _layer(mod: str) -> str:
    if mod.startswith("vptq.kernels"):
        return "kernels"
    return mod.split(".")[1] if mod.startswith("vptq_service.") else "vptq"


def _cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                found.append(sorted([v, *comp]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_finds_a_cycle_and_resolves_every_form(tmp_path):
    """The checker itself: absolute, relative and `vptq_service.*` imports resolve to our modules, and a
    cycle through a function-level import is found."""
    mods = {"vptq_service.cli.a": tmp_path / "a.py", "vptq_service.cli.b": tmp_path / "b.py",
            "vptq.x": tmp_path / "x.py", "vptq": tmp_path / "__init__.py", "vptq.kernels._k": tmp_path / "k.py"}
    mods["vptq_service.cli.a"].write_text("from vptq_service.cli.b import thing\nimport vptq.x\n")
    mods["vptq_service.cli.b"].write_text("def f():\n    from vptq_service.cli.a import _private\n")
    mods["vptq.x"].write_text("from .kernels import _k\nfrom . import x\n")
    mods["vptq"].write_text("")
    mods["vptq.kernels._k"].write_text("import os\n")
    graph = _import_graph(mods)
    assert graph["vptq_service.cli.a"] == {"vptq_service.cli.b": ["thing"], "vptq.x": []}
    assert graph["vptq.x"] == {"vptq.kernels._k": [""]}
    assert _cycles(graph) == [["vptq_service.cli.a", "vptq_service.cli.b"]]
    assert graph["vptq_service.cli.b"] == {"vptq_service.cli.a": ["_private"]}


def test_no_import_cycle_between_our_modules():
    """Every file of vptq/, cli/, store/, tasks/, flows/ can be read without the one that imports it."""
    assert _cycles(_import_graph(_our_modules())) == []


def test_imports_point_down_the_layers():
    """cli -> flows -> tasks -> {vptq, store}; vptq -> vptq.kernels: never upwards nor sideways."""
    bad = [f"{m} -> {t}" for m, edges in _import_graph(_our_modules()).items() for t in edges
           if _layer(t) not in MAY_IMPORT[_layer(m)]]
    assert bad == []


def test_no_private_name_is_imported_across_modules():
    """`from M import _name` couples a file to another's internals; a package's own private module
    (vptq.kernels._numba, imported by its siblings) is the one exception."""
    bad = []
    for m, edges in _import_graph(_our_modules()).items():
        for t, names in edges.items():
            bad += [f"{m}: from {t} import {n}" for n in names if n.startswith("_")]
            if any(part.startswith("_") for part in t.split(".")) and t.rpartition(".")[0] != m.rpartition(".")[0]:
                bad.append(f"{m}: imports {t}, private to its package")
    assert bad == []


def test_no_module_on_a_script_path_shadows_hugging_face_kernels():
    """`python bench/X.py` puts bench/ first on sys.path (pytest puts the repository root): a
    `kernels.py` or `kernels/` there would be imported by transformers instead of Hugging Face's."""
    for folder in (REPO, REPO / "bench", REPO / "tests"):
        assert not (folder / "kernels.py").exists() and not (folder / "kernels").is_dir(), folder


def test_every_module_of_ours_imports(tmp_path):
    """A moved or renamed module leaves no dangling import: every module of vptq/ and the service
    packages imports, and every bench script's `bench.X` imports name an existing file."""
    import importlib
    import pkgutil

    import vptq_service

    import vptq

    for root in (vptq, vptq_service):
        for m in pkgutil.walk_packages(root.__path__, root.__name__ + "."):
            if m.name.startswith("vptq_service.store.migrations"):
                continue  # Alembic loads these with its own context
            importlib.import_module(m.name)
    for p in sorted((REPO / "bench").glob("*.py")) + sorted((REPO / "tests").glob("*.py")):
        for mod in _imports(p):
            if mod.startswith("bench."):
                assert (REPO / "bench" / (mod.split(".")[1] + ".py")).is_file(), f"{p.name}: {mod}"
