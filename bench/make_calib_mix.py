"""Build the calibration mix (the quality issue, part 0) and its selection parts from installed packages:

    python bench/make_calib_mix.py     # -> vptq/data/calib-mix.txt, bench/data/select/{code,docs}.txt + README.md

Three domains, each with a calibration part (in the mix) and a disjoint selection part (other packages,
other files: never calibrated on), so a calibration default is chosen without the out-of-domain corpora
of docs/ood-corpora.md (CPython's standard library and Language Reference: never calibration, never
selection):

- encyclopedic prose: wikitext-2 valid's calibration part (vptq/splits.py; its selection part is the
  existing one);
- source code: the Python modules of permissively licensed packages (calibration: click; selection:
  pluggy, tomlkit), each file after a `# ---- PACKAGE/PATH` line;
- technical prose: the long descriptions (READMEs) packages publish in their metadata (calibration:
  pydantic, dateparser, python-dotenv, rich, tblib; selection: fastapi, openai, psutil).

Licences and copyright notices: docs/calibration-mix.md. The files are committed, so every machine
calibrates on the same bytes whatever is installed; this script says how they were made (run it in the
project's .venv; the versions it read are in the README it writes).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vptq.splits import split_valid  # noqa: E402

MIX = ROOT / "vptq" / "data" / "calib-mix.txt"
SELECT = ROOT / "bench" / "data" / "select"
WIKITEXT = ROOT / "vptq" / "data" / "wikitext2-valid.txt"
# (packages, characters at most) per domain and part
CODE = {"calib": (["click"], 300_000), "select": (["pluggy", "tomlkit"], 120_000)}
DOCS = {"calib": (["pydantic", "dateparser", "python-dotenv", "rich", "tblib"], 300_000),
        "select": (["fastapi", "openai", "psutil"], 120_000)}


def _take(chunks: list[str], limit: int) -> str:
    """Whole chunks in order while they fit in limit characters (at least one)."""
    out, n = [], 0
    for c in chunks:
        if out and n + len(c) > limit:
            break
        out.append(c)
        n += len(c)
    return "".join(out)


def code(packages: list[str], limit: int) -> str:
    chunks = []
    for pkg in packages:
        files = sorted(f for f in md.files(pkg) or [] if f.suffix == ".py")
        for f in files:
            body = Path(f.locate()).read_text(encoding="utf-8").strip()
            if body:
                chunks.append(f"# ---- {pkg}/{f}\n{body}\n\n")
    return _take(chunks, limit)


def docs(packages: list[str], limit: int) -> str:
    chunks = []
    for pkg in packages:
        body = (md.metadata(pkg).get_payload() or "").strip()  # the description after the headers
        chunks += [p.strip() + "\n\n" for p in body.split("\n\n") if p.strip()]
    return _take(chunks, limit)


def build() -> dict[Path, str]:
    wiki, _ = split_valid(WIKITEXT.read_text(encoding="utf-8"))
    return {MIX: wiki + code(*CODE["calib"]) + docs(*DOCS["calib"]),
            SELECT / "code.txt": code(*CODE["select"]), SELECT / "docs.txt": docs(*DOCS["select"])}


def main() -> None:
    SELECT.mkdir(parents=True, exist_ok=True)
    rows = []
    for path, text in build().items():
        path.write_text(text, encoding="utf-8")
        rows.append(f"| {path.relative_to(ROOT)} | {len(text):,} | {hashlib.sha256(text.encode()).hexdigest()} |")
    pkgs = sorted({p for d in (CODE, DOCS) for ps, _ in d.values() for p in ps})
    (SELECT / "README.md").write_text(
        "# Selection text of the calibration mix's domains (selection only, never calibration)\n\n"
        "Made by `python bench/make_calib_mix.py` (docs/calibration-mix.md: origin, licences) from "
        + ", ".join(f"{p} {md.version(p)}" for p in pkgs) + ".\n\n| file | characters | sha256 |\n|---|---|---|\n"
        + "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
