"""The one split of wikitext-2 `valid.txt` (the quality issue): calibration windows come from its
first part, selection perplexity (every choice of a preset or a default) from the rest, so no choice is
scored on the tokens it was calibrated on; `test.txt` is only reported.

The split is at an article boundary (a top-level ` = Title = ` line): the first article that starts at
or after SELECT_FROM of the text's characters opens the selection part. On wikitext-2 valid (60
articles, 1,120,192 characters) the selection part starts at line 3118, ` = Exit Through the <unk> @-@
E @-@ Mart = `: 931,760 characters for calibration (227,178 SmolLM2 tokens), 188,432 for selection
(46,690 tokens: room for the 10 x 2048 windows of the baselines.md protocol). tests/test_splits.py pins it.
"""

from __future__ import annotations

import re
from pathlib import Path

SELECT_FROM = 0.8  # the selection part: the articles from 80 % of the characters on
_ARTICLE = re.compile(r"^ = [^=].* = $")


def split_valid(text: str, select_from: float = SELECT_FROM) -> tuple[str, str]:
    """(calibration part, selection part) of a wikitext-style text: disjoint, in order, together the
    whole text; ValueError when no article starts in the last (1 - select_from) of it."""
    lines = text.splitlines(keepends=True)
    at, pos = None, 0
    for i, line in enumerate(lines):
        if pos >= select_from * len(text) and _ARTICLE.match(line.rstrip("\n")):
            at = i
            break
        pos += len(line)
    if at is None or at == 0:
        raise ValueError(f"no article heading after {select_from:.0%} of the text: cannot split it")
    return "".join(lines[:at]), "".join(lines[at:])


def write_parts(valid: str | Path, folder: str | Path) -> tuple[Path, Path]:
    """The two parts of `valid` as files `valid-calib.txt` and `valid-select.txt` in folder (for the
    commands, which take a text file)."""
    calib, select = split_valid(Path(valid).read_text(encoding="utf-8"))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "valid-calib.txt", folder / "valid-select.txt"
    for p, body in zip(paths, (calib, select), strict=True):
        p.write_text(body, encoding="utf-8")
    return paths
