"""Quick H100 probe of the row-per-lane gemv (kernels/gemv_rows.py), batch 1, 2-bit v4-k256.

    python -u bench/gemv_rows_probe.py

For each shape: build the plan, check the result against the fp32 oracle (relative error), then
time the kernel (CUDA-event median of 100 calls, rotated over enough layers to defeat the L2)
against torch fp16 x @ W.T of the same shape in the same run. The full table is bench/kernels.py
(--formats v4k256,v8k256r256); this probe is what fitted in the session's remaining device time.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernels import copies_for, layer_bytes, make_layer, rel_err, time_device  # noqa: E402
from kernels.dequant import dequantize_ref  # noqa: E402
from kernels.gemv import GemvPlan  # noqa: E402

SHAPES = [(4096, 4096), (28672, 8192), (8192, 28672), (11008, 4096)]


def main() -> None:
    t0 = time.time()

    def log(*a):
        print(f"[{time.time() - t0:6.1f}s]", *a, flush=True)

    v, k, kr = 4, 256, 0
    for m, n in SHAPES:
        p = make_layer(m, n, kr, seed=1, v=v, k=k)
        plan = GemvPlan(p, checked=True)
        log("plan", m, n, v, plan.path, plan.rows_cfg if plan.path == "rows" else None)
        x = torch.randn(1, n, device="cuda", dtype=torch.float16)
        plan(x)
        torch.cuda.synchronize()
        log("first call done")
        wref = dequantize_ref(p, torch.float32)
        log("rel", rel_err(plan(x), x.float() @ wref.t()))
        del wref
        ws = [torch.randn(m, n, device="cuda", dtype=torch.float16) for _ in range(3)]
        tf, _ = time_device([lambda w=w, x=x: x @ w.t() for w in ws], iters=100)
        plans = [plan] + [GemvPlan(make_layer(m, n, kr, seed=s, v=v, k=k), checked=True)
                          for s in range(2, 1 + copies_for(layer_bytes(p)))]
        t, _ = time_device([lambda pl=pl, x=x: pl(x) for pl in plans], iters=100)
        log(f"gemv {t:.1f} us  fp16 {tf:.1f} us  speedup {tf / t:.2f}x")


if __name__ == "__main__":
    main()
