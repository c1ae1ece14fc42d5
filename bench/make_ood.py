"""Build the out-of-domain evaluation corpora (the quality issue, part 0) from the running CPython:

    python bench/make_ood.py          # -> bench/data/ood/{python-code,python-docs}.txt + README.md

- python-code.txt: source code, a fixed list of pure-Python standard-library modules, concatenated;
- python-docs.txt: technical prose, the Python Language Reference topics that `pydoc` ships
  (`pydoc_data.topics`, the reference manual's text), in sorted topic order.

Both are Python Software Foundation material under the PSF License Version 2 (redistribution with
the notice; docs/ood-corpora.md). The files are committed, so every machine scores the same bytes
whatever its Python; this script says how they were made. Never calibrate or select on them.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "data" / "ood"
CODE_MODULES = ["argparse.py", "difflib.py", "statistics.py", "fractions.py", "textwrap.py", "json/__init__.py",
                "json/decoder.py", "json/encoder.py", "csv.py", "heapq.py", "shlex.py", "pprint.py"]
DOCS_BYTES = 400_000  # the first topics (sorted) up to this many characters


def build() -> dict[str, str]:
    from pydoc_data.topics import topics

    lib = Path(sysconfig.get_paths()["stdlib"])
    code = "".join(f"# ---- Lib/{m}\n{(lib / m).read_text(encoding='utf-8')}\n" for m in CODE_MODULES)
    docs, n = [], 0
    for key in sorted(topics):
        body = topics[key].strip() + "\n\n"
        if n + len(body) > DOCS_BYTES and docs:
            break
        docs.append(body)
        n += len(body)
    return {"python-code.txt": code, "python-docs.txt": "".join(docs)}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, text in build().items():
        (OUT / name).write_text(text, encoding="utf-8")
        rows.append(f"| {name} | {len(text):,} | {hashlib.sha256(text.encode()).hexdigest()} |")
    (OUT / "README.md").write_text(
        "# Out-of-domain evaluation text (never calibration, never selection)\n\n"
        f"Made by `python bench/make_ood.py` from CPython {platform.python_version()}'s standard library; "
        "origin and licence: docs/ood-corpora.md (PSF License Version 2; Copyright (c) 2001 Python Software "
        "Foundation; All Rights Reserved).\n\n| file | characters | sha256 |\n|---|---|---|\n"
        + "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
