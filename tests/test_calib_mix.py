"""The calibration mix (docs/calibration-mix.md) and its selection parts: the mix holds wikitext-2 valid's
calibration part and never a passage of any selection part or out-of-domain corpus; the committed bytes
are the ones bench/data/select/README.md lists."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from vptq.pipeline import PACKAGE_CALIB
from vptq.splits import split_valid

REPO = Path(__file__).resolve().parents[1]
MIX = REPO / "vptq" / "data" / "calib-mix.txt"
SELECT = sorted((REPO / "bench" / "data" / "select").glob("*.txt"))
OOD = sorted((REPO / "bench" / "data" / "ood").glob("*.txt"))


def passages(text: str, every: int = 2000, width: int = 200) -> list[str]:
    """Non-blank passages of `width` characters every `every` characters (long enough to be unique)."""
    return [p for p in (text[i:i + width] for i in range(0, len(text) - width, every)) if len(p.split()) > 10]


def test_the_mix_starts_with_valid_calibration_part_only():
    mix = MIX.read_text(encoding="utf-8")
    calib, select = split_valid(PACKAGE_CALIB.read_text(encoding="utf-8"))
    assert mix.startswith(calib) and len(mix) > 1.3 * len(calib)  # and other domains after it
    assert not any(p in mix for p in passages(select))


@pytest.mark.parametrize("held_out", SELECT + OOD, ids=lambda p: p.name)
def test_no_selection_or_out_of_domain_passage_is_in_the_mix(held_out):
    mix = MIX.read_text(encoding="utf-8")
    found = [p for p in passages(held_out.read_text(encoding="utf-8")) if p in mix]
    assert len(passages(held_out.read_text(encoding="utf-8"))) > 20 and not found, found[:1]


def test_committed_bytes_are_the_listed_ones():
    rows = dict(re.findall(r"^\| (\S+) \| [\d,]+ \| ([0-9a-f]{64}) \|$",
                           (REPO / "bench" / "data" / "select" / "README.md").read_text(), re.M))
    assert set(rows) == {"vptq/data/calib-mix.txt", *(str(p.relative_to(REPO)) for p in SELECT)}
    for rel, sha in rows.items():
        assert hashlib.sha256((REPO / rel).read_text(encoding="utf-8").encode()).hexdigest() == sha, rel


def test_a_job_without_calib_calibrates_on_the_mix():
    from vptq.pipeline import default_calibration_text

    assert default_calibration_text() == MIX
