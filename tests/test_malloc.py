"""cli/malloc.py: the allocator thresholds a `vptq` process sets, and what they change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from vptq_service.cli.malloc import tune

ROOT = Path(__file__).resolve().parents[1]
# 64 MiB temporaries (above glibc's largest default mmap threshold, 32 MiB), page faults counted
LOOP = ("import resource, torch; from vptq_service.cli.malloc import tune; t = tune(); torch.set_num_threads(1); "
        "x = torch.randn(2048, 8192); r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; "
        "[float((x * 2.0).sum()) for _ in range(60)]; "
        "print(t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)")


def _faults(value: str) -> tuple[str, int]:
    env = {**os.environ, "VPTQ_MALLOC_TUNE": value}
    out = subprocess.run([sys.executable, "-c", LOOP], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0], int(out[1])


def test_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv("VPTQ_MALLOC_TUNE", "yes")
    with pytest.raises(ValueError, match="VPTQ_MALLOC_TUNE='yes': use 1"):
        tune()
    monkeypatch.setenv("VPTQ_MALLOC_TUNE", "0")
    assert tune() is False


def test_cli_refuses_a_bad_value_in_one_line():
    env = {**os.environ, "VPTQ_MALLOC_TUNE": "2"}
    r = subprocess.run([sys.executable, "-m", "vptq_service.cli.main", "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: VPTQ_MALLOC_TUNE='2': use 1 (keep large freed blocks for reuse, the default) or 0"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_temporaries_reuse_their_pages():
    """Tuned, a loop of 64 MiB temporaries reuses the heap's pages instead of faulting in fresh ones."""
    on, tuned = _faults("1")
    off, default = _faults("0")
    assert (on, off) == ("True", "False")
    assert default > 60 * 16384 // 2  # ~16 k fresh pages a temporary by default
    assert tuned * 4 < default  # tuned: the first few temporaries' pages, then reuse (35-115 k measured)
