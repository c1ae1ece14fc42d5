"""Per-call time of the CPU kernels on SmolLM2's and Qwen2.5-0.5B's layer groups at batch 1 (and 2-4 rows), the packed
code stream against the same codes widened to 16-bit fields (two to a word: a shift and a mask decode one, where a
10-bit stream spills across words), interleaved A/B, medians. The widened copy would sit beside the packed stream
the module holds as its state (its bytes are the last column); bench/RESULTS.md says why the kernels do not use it.

    python bench/cpu_wide_probe.py [--formats v5k1024,v5k1024r32] [--rows 1,2,4] [--calls 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.decode import parse_format  # noqa: E402
from tests.vq_layers import random_layer  # noqa: E402
from vptq.kernels import cpu  # noqa: E402
from vptq.kernels.layout import PackedLayer  # noqa: E402

# (name, members' out features, in features): the groups one decode step calls per block
SHAPES = {"smollm2": [("qkv", (576, 192, 192), 576), ("o", (576,), 576), ("gate_up", (1536, 1536), 576),
                      ("down", (576,), 1536)],
          "qwen2.5-0.5b": [("qkv", (896, 128, 128), 896), ("o", (896,), 896), ("gate_up", (4864, 4864), 896),
                           ("down", (896,), 4864)]}


def widened(p: PackedLayer):
    """The layer's codes as 16-bit fields, two to an int32 word (the packed stream's layout at width 16)."""
    import numpy as np

    from vptq.packing import unpack_indices

    g, rows, _ = p.indices.shape
    out = np.zeros((g, rows, 2 * ((p.group_size + 1) // 2)), np.uint16)
    for i in range(g):
        for r in range(0, rows, 256):  # unpacking is bitwise: 8 bytes a bit
            out[i, r : r + 256, : p.group_size] = unpack_indices(p.indices[i, r : r + 256], p.code_bits,
                                                                 p.group_size).numpy()
    return out.reshape(-1).view(np.int32)


class WidePlan(cpu.CpuPlan):
    """A CpuPlan reading the widened codes: the kernels' stream at width 16 (main and residual index as stored)."""

    def __init__(self, layers):
        from numba.typed import List

        super().__init__(layers)
        self.idxs = List([widened(q) for q in layers])
        self.bits, self.words = 16, (self.p.group_size + 1) // 2
        a = list(self.args)
        a[4], a[5], a[11] = self.idxs, self.words, self.bits  # idxs, words, bits (CpuPlan.args' order)
        self.args = tuple(a)

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(a.nbytes for a in self.idxs)


def plans(outs, n, v, k, kr):
    mods = [random_layer(m=m, n=n, v=v, k=k, kr=kr, o=0, g=1, perm=False, norm=False, bias=False, seed=i)
            for i, m in enumerate(outs)]
    layers = [PackedLayer.from_module(m) for m in mods]
    return cpu.CpuPlan(layers), WidePlan(layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="v5k1024,v5k1024r32")
    ap.add_argument("--models", default="smollm2,qwen2.5-0.5b")
    ap.add_argument("--rows", default="1,2,4")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cpu.available()
    print(f"threads {a.threads}, median µs per call over {a.calls} calls, A/B interleaved in rounds of 10")
    print("| model | group | format | rows | packed µs | widened µs | packed / widened | widened extra KiB |")
    print("|---|---|---|---|---|---|---|---|")
    for model in a.models.split(","):
        for fmt in a.formats.split(","):
            v, k, kr = parse_format(fmt)
            for name, outs, n in SHAPES[model]:
                pa, pw = plans(outs, n, v, k, kr)
                for rows in map(int, a.rows.split(",")):
                    x = torch.randn(rows, n)
                    torch.testing.assert_close(pa(x), pw(x), rtol=1e-4, atol=1e-4)
                    ta, tw = [], []
                    for _ in range(a.calls // 10):
                        for plan, ts in ((pa, ta), (pw, tw)):
                            for _ in range(10):
                                t0 = time.perf_counter()
                                plan(x)
                                ts.append(time.perf_counter() - t0)
                    ma, mw = statistics.median(ta) * 1e6, statistics.median(tw) * 1e6
                    extra = (pw.nbytes - pa.nbytes) / 1024
                    print(f"| {model} | {name} | {fmt} | {rows} | {ma:.1f} | {mw:.1f} | {ma / mw:.2f} | {extra:.0f} |",
                          flush=True)


if __name__ == "__main__":
    main()
