"""H100 probe of the row-per-lane gemv (kernels/gemv_rows.py), batch 1: timings, registers, variants.

    python -u bench/gemv_rows_probe.py [--formats v4k256,v8k256r256] [--shapes 4096x4096,...]
                                       [--kc auto,512] [--maxreg 0,64] [--fp32]

For each format and shape: build the plan (per --kc / --maxreg variant), check the result against
the fp32 oracle (relative error), then time the kernel (CUDA-event median of 100 calls, rotated
over enough layers to defeat the L2) against torch fp16 x @ W.T of the same shape in the same run.
Also prints the event-timed floor of an empty numba kernel (launch + two event records), the
compiled kernel's registers per thread, and the GB/s over the bytes read. The full table of every
kernel is bench/kernel_table.py; this probe is the quick loop for tuning the row kernel.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernel_table import FORMATS, copies_for, layer_bytes, make_layer, rel_err, time_device  # noqa: E402
from vptq.kernels import _numba as nb  # noqa: E402
from vptq.kernels import gemv_rows  # noqa: E402
from vptq.kernels.dequant import dequantize_ref  # noqa: E402
from vptq.kernels.gemv import GemvPlan  # noqa: E402

SHAPES = "4096x4096,11008x4096,4096x11008,8192x8192,28672x8192,8192x28672"


def regs(plan: GemvPlan) -> int:
    """Registers per thread of the plan's compiled batch-1 kernel (-1 when unknown)."""
    try:
        kern = plan._launch_args(1, torch.float16)[0]
        (k,) = kern.overloads.values()
        return int(k._codelibrary.get_cufunc().attrs.regs)
    except Exception:
        return -1


def time_graph(calls, reps: int = 20) -> float:
    """Device µs per call when the calls run back to back from one captured CUDA graph (how the
    decode loop runs them): no per-call host cost or event records in between."""
    for c in calls:
        c()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / (reps * len(calls))


def empty_floor() -> float:
    c = nb.cuda()

    @c.jit
    def nop(a):
        if c.threadIdx.x == 9999:
            a[0] = 1.0

    t = torch.zeros(1, device="cuda")
    s = nb.stream_for(t)
    arr = nb.as_array(t)
    return time_device([lambda: nop[132, 256, s](arr)], iters=100)[0]


CAPS = (gemv_rows.REPLICAS, gemv_rows.REPLICAS_10BIT, gemv_rows.CB_ROWS_MAX, gemv_rows.PERSIST_REPLICAS)
VARIANT_KEYS = ("kc", "maxreg", "lpr", "rw", "threads", "r", "cbmax", "persist", "gx", "ahead", "ilv")


def parse_variants(text: str) -> list[dict]:
    """--variants: ';'-separated variants, each a ','-list of key=value (VARIANT_KEYS); '' = the plan."""
    out = []
    for v in text.split(";"):
        var = dict(kv.split("=", 1) for kv in v.split(",") if kv)
        bad = sorted(set(var) - set(VARIANT_KEYS))
        if bad:
            raise SystemExit(f"--variants: unknown key(s) {', '.join(bad)} (known: {', '.join(VARIANT_KEYS)})")
        out.append(var)
    return out


def plans_for(layers: list, var: dict, threads: int = 0) -> list[GemvPlan]:
    """GemvPlans of the layers with one variant applied (VARIANT_KEYS): kc (a number, "auto" or
    "all": one chunk), maxreg ("plan" or a number), lpr, rw, threads, r (codebook copies), cbmax
    (KiB), persist (0/1; default: the plan's choice), gx, ahead, ilv (0/1: codes in the warp-interleaved
    order, kernels/gemv_rows.py interleave_codes). The module caps a variant sets are
    reset first, and the plans read them when built."""
    kc, mr, lpr = var.get("kc", "auto"), var.get("maxreg", "plan"), int(var.get("lpr", 0))
    rw, threads = int(var.get("rw", 0)), int(var.get("threads", threads))
    gemv_rows.REPLICAS, gemv_rows.REPLICAS_10BIT, gemv_rows.CB_ROWS_MAX, gemv_rows.PERSIST_REPLICAS = CAPS
    if "r" in var:
        gemv_rows.REPLICAS = gemv_rows.REPLICAS_10BIT = gemv_rows.PERSIST_REPLICAS = int(var["r"])
    if "cbmax" in var:
        gemv_rows.CB_ROWS_MAX = int(var["cbmax"]) * 1024
    plans = [GemvPlan(q, checked=True) for q in layers]
    if plans[0].path != "rows":
        return plans
    persist = var["persist"] == "1" if "persist" in var else plans[0].rows_cfg["persist"]
    kw = dict(lpr=lpr or None, rw=rw or None, persist=persist, gx=int(var["gx"]) if "gx" in var else None,
              ahead=int(var.get("ahead", 0)), ilv=var.get("ilv", "0") == "1")
    if mr != "plan" and persist:  # the persistent grid: as many blocks as fit at this register cap
        kw["maxreg"] = int(mr)
    tdef, mdef = gemv_rows.threads_maxreg(persist)
    n = layers[0].in_features
    if kc != "auto" or threads or lpr or rw or set(var) & {"r", "persist", "ahead", "gx", "ilv"} or "maxreg" in kw:
        for pl in plans:  # the row kernel only
            c0 = pl.configure_rows(threads=threads or tdef, **kw)
            pl.rows_maxreg = mdef
            if kc == "all":  # one column chunk: no split-K
                kc = str(nb.cdiv(n, c0["cs"] * c0["cps"]) * c0["cs"] * c0["cps"])
            if kc != "auto":
                pl.configure_rows(int(kc), **kw)
    for pl in plans:
        pl.rows_maxreg = pl.rows_maxreg if mr == "plan" else int(mr)
    return plans


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="v4k256,v8k256r256")
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--kc", default="auto", help="comma list of column chunks (auto = the plan's choice)")
    ap.add_argument("--maxreg", default="plan",
                    help="comma list of register caps (0 = the compiler's choice; default: the plan's)")
    ap.add_argument("--ablate", default="", help="comma list of kernel_rows ablations to time too (main, fill, epi, xperm, xall)")
    ap.add_argument("--lpr", default="0", help="comma list of lanes per row (0: the default, LANES_PER_ROW)")
    ap.add_argument("--variants", default="", help="';'-separated variants, each a ','-list of key=value "
                    "(kc, maxreg, lpr, rw, threads, r = codebook copies, cbmax = KiB for them, persist = 0/1 (default: "
                    "the plan's), gx, ahead = steps of codes loaded ahead, ilv = 0/1 warp-interleaved codes); replaces the "
                    "--kc x --maxreg x --lpr product")
    ap.add_argument("--flush", type=int, default=0, help="codes summed in half2 between fp32 flushes (0: FLUSH)")
    ap.add_argument("--threads", type=int, default=0, help="threads per block of the row kernel (0: ROWS_THREADS)")
    ap.add_argument("--cb-max", type=int, default=0, help="KiB for the codebook copies (0: CB_ROWS_MAX)")
    ap.add_argument("--graph", action="store_true", help="also time calls replayed from a CUDA graph")
    ap.add_argument("--fp32", action="store_true", help="also time fp32 x (the fp32-arithmetic variant)")
    a = ap.parse_args()
    t0 = time.time()
    if a.flush:
        gemv_rows.FLUSH = a.flush
    if a.cb_max:
        gemv_rows.CB_ROWS_MAX = a.cb_max * 1024

    def log(*args):
        print(f"[{time.time() - t0:6.1f}s]", *args, flush=True)

    log(f"{torch.cuda.get_device_name()} torch {torch.__version__}; empty numba kernel {empty_floor():.1f} us")
    for fkey in a.formats.split(","):
        _, v, k, kr = FORMATS[fkey]
        for shape in a.shapes.split(","):
            m, n = (int(s) for s in shape.split("x"))
            p = make_layer(m, n, kr, seed=1, v=v, k=k)
            nbytes = layer_bytes(p) + 2 * n + 2 * m
            others = [make_layer(m, n, kr, seed=s, v=v, k=k) for s in range(2, 1 + copies_for(layer_bytes(p)))]
            x = torch.randn(1, n, device="cuda", dtype=torch.float16)
            wsf = [torch.randn(m, n, device="cuda", dtype=torch.float16) for _ in range(3)]
            fcalls = [lambda w=w, x=x: x @ w.t() for w in wsf]
            tf, _ = time_device(fcalls, iters=100)
            tfg = time_graph(fcalls * 4) if a.graph else 0.0
            del wsf
            wref = dequantize_ref(p, torch.float32)
            yref = x.float() @ wref.t()
            del wref
            variants = (parse_variants(a.variants) if a.variants else
                        [dict(kc=kc, maxreg=mr, lpr=lpr) for kc in a.kc.split(",") for mr in a.maxreg.split(",")
                         for lpr in a.lpr.split(",")])
            for var in variants:
                plans = plans_for([p, *others], var, a.threads)
                if plans[0].path != "rows":
                    log(fkey, shape, "not the row kernel:", plans[0].path)
                    continue
                rel = rel_err(plans[0](x), yref)
                dtypes = [torch.float16] + ([torch.float32] if a.fp32 else [])
                runs = [(dt, "") for dt in dtypes] + [(torch.float16, ab) for ab in a.ablate.split(",") if ab]
                for dt, ab in runs:
                    for pl in plans:
                        pl.rows_ablate, pl._fast = ab, {}
                    xx = x.to(dt)
                    calls = [lambda pl=pl, xx=xx: pl(xx) for pl in plans]
                    t, _ = time_device(calls, iters=100)
                    graph = ""
                    if a.graph:
                        tg = time_graph(calls)
                        graph = f"  | graph: {tg:.1f} us vs fp16 {tfg:.1f} us = {tfg / tg:.2f}x"
                    c = plans[0].rows_cfg
                    log(f"{fkey} {shape} x={str(dt)[6:]} kc={c['kc']} nsplit={c['nsplit']} tiles={c['tiles']} "
                        f"R={c['replicas']} ahead={c['ahead'] or 'default'} shmem={c['shmem']} gx={c['gx']}{' persist' if c['persist'] else ''} rw={c['rw']} lpr={c['lpr']} t={plans[0].rows_threads} flush={gemv_rows.FLUSH} maxreg={plans[0].rows_maxreg} ablate={ab or '-'} regs={regs(plans[0])} rel={rel:.1e}: "
                        f"{t:.1f} us ({nbytes / t / 1e3:.0f} GB/s)  fp16 {tf:.1f} us  speedup {tf / t:.2f}x{graph}")


if __name__ == "__main__":
    main()
