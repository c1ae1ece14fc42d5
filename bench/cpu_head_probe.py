"""What a compressed lm_head would give a batch-1 CPU decode step (issue 28's >= 2x fp32 target): timing only.

    python bench/cpu_head_probe.py [--heads v4k1024r64,v5k1024r32,v5k1024] [--rounds 3] [--new 32] [--out FILE]

SmolLM2-135M: `fp32` dense; `v5k1024` (the 2-bit preset's layout on every block linear, random codes, the CPU
kernels; the tied fp32 lm_head over 49,152 tokens kept, as every preset keeps it); and `v5k1024+head:<format>`, the
same with the lm_head also a VQuantLinear of <format> on the CPU kernels (random codes: speed does not depend on
the values; what quantizing the head would cost in quality is not measured here). All models are built first and
timed in interleaved rounds (min per configuration of `rounds` runs of `new` greedy steps after a warm-up, dynamic
cache: bench/cpu_decode.decode), so that the VM's drift hits every configuration alike. Threads: torch's and numba's,
all cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

# bench/ itself off the path: bench/kernels.py would shadow Hugging Face's `kernels`, which transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", default="v4k1024r64,v5k1024r32,v5k1024")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out")
    a = ap.parse_args()

    import re

    import torch

    from bench import cpu_decode as cd
    from vptq.kernels.dispatch import use_cpu_kernels

    configs = ["fp32", "v5k1024"] + [f"v5k1024+head:{h}" for h in a.heads.split(",") if h]
    models, tok = {}, None
    for c in configs:
        model, tok = cd.build(c.split("+")[0])
        if "+head:" in c:
            v, k, kr = (int(x or 0) for x in re.fullmatch(r"v(\d+)k(\d+)(?:r(\d+))?", c.split(":")[1]).groups())
            model.lm_head = cd.random_layer(model.lm_head, v, k, kr, torch.Generator().manual_seed(1))
            use_cpu_kernels(model)
        models[c] = model.eval()
    ids = tok(cd.PROMPT, return_tensors="pt").input_ids
    for m in models.values():
        cd.decode(m, ids, 8)  # warm-up: kernels loaded, caches sized
    runs: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(a.rounds):
        for c, m in models.items():
            runs[c].append(cd.decode(m, ids, a.new) / a.new * 1000)
            print(f"round {r} {c}: {runs[c][-1]:.2f} ms/step", flush=True)
    best = {c: min(v) for c, v in runs.items()}
    rec = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "threads": torch.get_num_threads(),
           "new": a.new, "rounds": a.rounds, "ms_per_step": runs, "min_ms": best,
           "x_fp32": {c: best["fp32"] / v for c, v in best.items()}, "versions": cd.versions()}
    for c in configs:
        print(f"{c:28s} {best[c]:7.2f} ms/step  {rec['x_fp32'][c]:.2f}x fp32")
    if a.out:
        Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
