"""Where a batch-1 decode step's time goes on CPU (SmolLM2-135M, one torch thread): fp32 dense against the 2-bit
preset's layout on the CPU kernels (bench/cpu_decode.build), with torch.profiler. The numba kernels are not aten
ops: in the VPTQ model they are the step's time minus the aten ops (its one aten::mm is the fp32 head).

    python bench/cpu_decode_profile.py [--out bench/results/cpu_decode_profile.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]


def profile_step(fmt: str, steps: int = 8) -> dict:
    import torch
    from cpu_decode import build
    from torch.profiler import ProfilerActivity, profile

    model, _ = build(fmt)
    nxt = torch.tensor([[8]])
    with torch.no_grad():
        past = model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6, 7]]), use_cache=True).past_key_values
        for _ in range(3):  # warm-up: kernels compiled, plans built
            model(input_ids=nxt, past_key_values=past, use_cache=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                model(input_ids=nxt, past_key_values=past, use_cache=True)
            step = (time.perf_counter() - t) / steps
    ops = sorted(((e.key, e.self_cpu_time_total / steps / 1000, e.count // steps) for e in prof.key_averages()),
                 key=lambda r: -r[1])
    aten_ms = sum(ms for _, ms, _ in ops)
    return {"step_ms_profiled": step * 1000, "aten_self_ms": aten_ms, "outside_aten_ms": step * 1000 - aten_ms,
            "top_ops": [{"op": k, "self_ms_per_step": ms, "calls_per_step": n} for k, ms, n in ops[:10]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_decode_profile.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    out = {fmt: profile_step(fmt) for fmt in ("fp32", "v5k1024")}
    for fmt, r in out.items():
        print(f"{fmt}: {r['step_ms_profiled']:.1f} ms/step, aten {r['aten_self_ms']:.1f}, "
              f"outside aten (numba kernels, Python) {r['outside_aten_ms']:.1f}")
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
