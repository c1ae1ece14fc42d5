"""Host allocator tuning for a `vptq` process: large freed blocks are kept for reuse.

Why: glibc hands every block above its mmap threshold (32 MiB at most by default) back to the
kernel when it is freed, so each large torch temporary of CPU quantization (k-means distances,
Hessian products) starts again on fresh, zero-filled pages. `make demo` took 115 M page faults
and 180 s of system time that way in a 10-minute job. With the mmap and trim thresholds at 1 GiB
those blocks stay in the heap and are reused: 0.9 M faults and 11 s of system time, 28 s less wall
time (bench/RESULTS.md, 2026-12-03 (6)). The cost is up to 1 GiB of freed memory kept by the
process. VPTQ_MALLOC_TUNE=0 leaves glibc's defaults; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
KEEP_BYTES = 1 << 30  # blocks below this come from the heap; free memory above it is trimmed
TOP_PAD_BYTES = 256 << 20  # the heap grows in steps of this much, not page by page
ENV = "VPTQ_MALLOC_TUNE"


def tune() -> bool:
    """Apply the thresholds above (once per process is enough); True if glibc took them. Raises
    ValueError for a value of VPTQ_MALLOC_TUNE other than 0 or 1."""
    want = os.environ.get(ENV, "1").strip()
    if want not in ("0", "1"):
        raise ValueError(f"{ENV}={want!r}: use 1 (keep large freed blocks for reuse, the default) or 0")
    if want == "0" or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((M_MMAP_THRESHOLD, KEEP_BYTES), (M_TRIM_THRESHOLD, KEEP_BYTES), (M_TOP_PAD, TOP_PAD_BYTES)))
