"""The shared Hessian stage (issue 7): cost of computing a Hessian set against reusing it.

    python bench/hessian_stage.py [--source smollm2] [--nsamples 64] [--seqlen 512] [--device cpu]

Runs tasks.hessians.collect_hessian_set (the stage a `--hessians original` job runs first) twice in
a fresh VPTQ_HOME: the first call computes the set (one pass of the original model over the
calibration windows, float64 accumulation, files + sha256 manifest), the second finds it complete
and reuses it (manifest read, every file's size and sha256 checked). Also times the per-block
Hessian collection that a job without the shared stage repeats inside each block task. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="smollm2")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    os.environ["VPTQ_HOME"] = tempfile.mkdtemp(prefix="vptq-hstage-")
    import torch
    from vptq_service.tasks.calibration import sample_calibration
    from vptq_service.tasks.hessians import collect_hessian_set
    from vptq_service.tasks.model import fetch_model

    fetched = fetch_model.fn(a.source)
    calib = sample_calibration.fn(fetched["path"], None, a.nsamples, a.seqlen, 0)
    args = (fetched["path"], fetched["sha256"], calib["path"], calib["hash"], a.nsamples, a.seqlen, a.device)
    t0 = time.perf_counter()
    first = collect_hessian_set.fn(*args)
    t1 = time.perf_counter()
    second = collect_hessian_set.fn(*args)
    t2 = time.perf_counter()
    out = {"bench": "hessian_stage", "date": str(date.today()), "source": a.source, "nsamples": a.nsamples,
           "seqlen": a.seqlen, "device": a.device, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__, "loadavg_after": os.getloadavg(),
           "blocks": first["blocks"], "set_megabytes": round(first["bytes"] / 1e6, 1),
           "compute_seconds": round(t1 - t0, 2), "reused": second["reused"], "reuse_seconds": round(t2 - t1, 2)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
