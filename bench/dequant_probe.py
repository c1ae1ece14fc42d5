"""H100 probe of the row-staged dequantize (kernels/dequant.py): variants of one kernel, timed.

    python -u bench/dequant_probe.py [--formats v4k256,v6k4096,...] [--shapes 0,4,5]
                                     [--variants "h2=0;h2=1;h2=1,maxreg=80,blocks=3"]

For each format, shape and variant (keyword arguments of `kernels.dequant.dequantize`: h2, maxreg,
blocks, rb, threads, grid, ranges, contig): check the fp16 result against the fp32 oracle (relative error), then time it
(CUDA-event median, inputs rotated past the L2, as bench/kernel_table.py) and print µs, GB/s over the
fp16 bytes written and % of the H100's 3.35 TB/s, with the launch configuration and registers.
The full table of every kernel is bench/kernel_table.py; this is the quick loop for tuning.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernel_table import FORMATS, SHAPES, copies_for, make_layer, peak, rel_err, time_device  # noqa: E402
from vptq.kernels.dequant import dequant2_config, dequant2_launch, dequantize, dequantize_ref  # noqa: E402
from vptq.kernels.layout import column_map  # noqa: E402


def parse_variant(s: str) -> dict:
    kw = {}
    for part in filter(None, s.split(",")):
        key, val = part.split("=")
        kw[key] = int(val)
    for b in ("h2", "ranges", "contig"):
        if b in kw:
            kw[b] = bool(kw[b])
    return kw


def registers(p, cfg, colmap) -> int:
    """Registers per thread of the kernel the timed calls ran (dequant2_launch picks it as they do)."""
    try:
        kern = dequant2_launch(p, torch.float16, colmap, cfg)[0]
        (k,) = kern.overloads.values()
        return int(k._codelibrary.get_cufunc().attrs.regs)
    except Exception:
        return -1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="v4k256,v6k4096,v5k1024,v8k65536")
    ap.add_argument("--shapes", default="0,4,5", help="shape numbers of bench/kernel_table.py SHAPES")
    ap.add_argument("--variants", default="h2=0;h2=1", help="';'-separated dequantize keyword sets")
    args = ap.parse_args()
    names = list(SHAPES)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for fkey in args.formats.split(","):
        _, v, k, kr = FORMATS[fkey]
        for si in args.shapes.split(","):
            m, n = SHAPES[names[int(si)]]
            p0 = make_layer(m, n, kr, seed=0, v=v, k=k)
            wref = dequantize_ref(p0, torch.float32)
            nbytes = p0.indices.numel() * 4
            layers = [p0] + [make_layer(m, n, kr, seed=s, v=v, k=k) for s in range(1, copies_for(nbytes + m * n * 2))]
            maps = [column_map(p) for p in layers]
            # the write ceiling: torch filling an output of this shape (the same bytes written, nothing
            # read), the most any dequantize of this shape could reach under this timing protocol
            outs = [torch.empty(m, n, dtype=torch.float16, device="cuda") for _ in range(2)]
            tf, _ = time_device([lambda o=o: o.fill_(1.0) for o in outs], iters=100)
            gf = m * n * 2 / tf / 1e3
            print(f"{fkey} {m}x{n} [torch fill_, write ceiling]: {tf:.1f} us {gf:.0f} GB/s written "
                  f"({100 * gf * 1e9 / peak():.0f}% peak)", flush=True)
            del outs
            for var in args.variants.split(";"):
                kw = parse_variant(var)
                try:
                    cfg = dequant2_config(p0, torch.float16, kw.get("threads", 256), rb=kw.get("rb"),
                                          maxreg=kw.get("maxreg"), h2=kw.get("h2"), blocks=kw.get("blocks"),
                                          grid=kw.get("grid"), ranges=kw.get("ranges", True),
                                          contig=kw.get("contig"))
                    rel = rel_err(dequantize(p0, torch.float16, **kw), wref)
                except ValueError as e:
                    print(f"{fkey} {m}x{n} {var}: {e}", flush=True)
                    continue
                calls = [lambda p=p, cm=cm, kw=kw: dequantize(p, torch.float16, colmap=cm, checked=True, **kw)
                         for p, cm in zip(layers, maps, strict=True)]
                t, _ = time_device(calls, iters=100)
                gbs = m * n * 2 / t / 1e3
                c = {a: cfg[a] for a in ("rb", "grid", "maxreg", "h2", "shmem", "ranges", "contig")} if cfg else {}
                print(f"{fkey} {m}x{n} [{var or 'default'}] {c} regs={registers(p0, cfg, maps[0]) if cfg else -1} "
                      f"rel={rel:.1e}: {t:.1f} us {gbs:.0f} GB/s written ({100 * gbs * 1e9 / peak():.0f}% peak)",
                      flush=True)
            del layers, maps, wref
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
