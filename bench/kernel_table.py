"""Kernel benchmark on one GPU: fused gemv, dequantize, nearest-centroid assignment.

    python bench/kernel_table.py [--out DIR] [--quick] [--formats v8k65536,v6k4096,...] [--shapes 0,3]
    python bench/kernel_table.py --check        odd shapes, every kernel path vs the torch oracles
    python bench/kernel_table.py --sweep-smem   launch shapes of the shared-memory-codebook gemv

Timing: CUDA events around each call, median over >= 100 calls after warm-up. The GPU is first
stalled with torch.cuda._sleep so that the host has queued all timed calls before the first one
runs: the numbers are device time (launch gaps and Python overhead excluded; the host cost per
call is reported separately as `host_us`). Inputs rotate over enough copies that the working set
exceeds the 50 MB L2, for our kernels and for torch alike. Bytes "read" are what the kernel must
fetch from memory: packed indices + codebooks + perm + scale + bias + x (gemv), or packed indices
+ codebooks (dequantize; bandwidth there is counted over the fp16 bytes written, as the issue asks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vptq.kernels.assign import assign  # noqa: E402
from vptq.kernels.dequant import dequantize, dequantize_ref  # noqa: E402
from vptq.kernels.gemv import GemvPlan, gemv  # noqa: E402
from vptq.kernels.layout import PackedLayer, column_map  # noqa: E402

PEAKS = {"H200": 4.8e12, "H100": 3.35e12}  # HBM bytes/s: H200 HBM3e, H100 SXM HBM3


def gpu_tag(device_name: str) -> str:
    """Short GPU name for record files: "NVIDIA H200" -> "h200" (runs on other GPUs don't overwrite)."""
    words = device_name.split()
    return words[1].lower() if len(words) > 1 else "gpu"


def peak() -> float:
    """Peak HBM bandwidth of this GPU (the H100's where the name is not known)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((b for k, b in PEAKS.items() if k in name), PEAKS["H100"])


L2_BYTES = 50 * 2**20
SHAPES = {  # (out, in)
    "7B q/k/v/o 4096x4096": (4096, 4096),
    "7B gate/up 11008x4096": (11008, 4096),
    "7B down 4096x11008": (4096, 11008),
    "70B q/o 8192x8192": (8192, 8192),
    "70B gate/up 28672x8192": (28672, 8192),
    "70B down 8192x28672": (8192, 28672),
}
FORMATS = {  # key: (label, v, k, k_res)
    "v8k65536": ("2 bit v8-k65536 (released)", 8, 65536, 0),
    "v6k4096": ("2 bit v6-k4096 (paper)", 6, 4096, 0),
    "v5k1024": ("2 bit v5-k1024 (our 2-bit preset)", 5, 1024, 0),
    "v8k65536r256": ("3 bit v8-k65536-256 (released)", 8, 65536, 256),
    "v4k4096": ("3 bit v4-k4096", 4, 4096, 0),
    "v6k4096r64": ("3 bit v6-k4096-64", 6, 4096, 64),
    # the 3- and 4-bit presets (vptq/config.py PRESETS): a residual codebook, 15- and 16-bit codes
    "v5k1024r32": ("3 bit v5-k1024-32 (our 3-bit preset)", 5, 1024, 32),
    "v4k1024r64": ("4 bit v4-k1024-64 (our 4-bit preset)", 4, 1024, 64),
    # byte codes, small codebooks: the row-per-lane kernel (kernels/gemv_rows.py) at batch 1
    "v4k256": ("2 bit v4-k256", 4, 256, 0),
    "v8k256r256": ("2 bit v8-k256+256", 8, 256, 256),
}
DEFAULT_FORMATS = "v8k65536,v6k4096,v8k65536r256,v4k4096"
BATCH_FORMATS = ("v8k65536", "v6k4096")  # also timed at batch 2, 4, 8 on the 4096x4096 shape


# VPTQ_BENCH_PERM=0: benchmark layers without a permutation, the layout the quantizer stores for
# one group and no outliers (every preset, vptq/quantizer.py); default 1: a random one, as before
PERM = os.environ.get("VPTQ_BENCH_PERM", "1") != "0"
# VPTQ_BENCH_NORM=0: no per-column scale/bias either, the presets' layout (enable_norm=False in every preset,
# vptq/config.py); with VPTQ_BENCH_PERM=0 the kernels then read x as is. Default 1: scale and bias, as before
NORM = os.environ.get("VPTQ_BENCH_NORM", "1") != "0"
LAYOUT = "+".join(["perm"] * PERM + ["norm"] * NORM) or "no perm, no norm"  # how the records name it


def make_layer(m: int, n: int, k_res: int = 0, seed: int = 0, v: int = 8, k: int = 65536,
               device: str = "cuda", perm: bool | None = None) -> PackedLayer:
    """G=1, norm unless VPTQ_BENCH_NORM=0, a random permutation unless perm is false (default PERM), no outliers; random
    packed words (every bit pattern is a valid code of the stored format: main index = low log2 k
    bits, residual = the rest) and random codebooks."""
    g = torch.Generator(device=device).manual_seed(seed)
    bits = int(math.log2(k)) + (int(math.log2(k_res)) if k_res else 0)
    rows, words = math.ceil(m / v), math.ceil(n * bits / 32)
    idx = torch.randint(-(2**31), 2**31 - 1, (1, rows, words), device=device, dtype=torch.int32, generator=g)
    cb = (0.02 * torch.randn(1, k * v, device=device, generator=g)).half()
    res = (0.005 * torch.randn(1, k_res * v, device=device, generator=g)).half() if k_res else None
    pv = torch.randperm(n, device=device, generator=g)
    perm16 = torch.where(pv >= 2**15, pv - 2**16, pv).to(torch.int16) if (PERM if perm is None else perm) else None
    scale = (torch.rand(n, device=device, generator=g) + 0.5).half() if NORM else None
    wb = (0.01 * torch.randn(n, device=device, generator=g)).half() if NORM else None
    return PackedLayer(in_features=n, out_features=m, vector_len=v, num_centroids=k, group_num=1,
                       group_size=n, indices=idx, centroids=cb, num_res_centroids=k_res, res_centroids=res,
                       perm=perm16, weight_scale=scale, weight_bias=wb)


def layer_bytes(p: PackedLayer) -> int:
    t = [p.indices, p.centroids, p.res_centroids, p.perm, p.weight_scale, p.weight_bias]
    return sum(x.numel() * x.element_size() for x in t if x is not None)


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(3 * L2_BYTES / max(nbytes, 1)))


def time_device(calls, iters: int = 120, warmup: int = 10) -> tuple[float, float]:
    """(median device µs, host µs per call). calls: list of zero-arg callables, rotated.

    Every callable runs at least once in the warm-up (first calls compile and prepare). Host µs =
    wall time of queueing the timed calls while the GPU is stalled (two event records included),
    so it is the Python + launch cost per call, not the kernel time.
    """
    for i in range(max(warmup, len(calls))):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(20):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) / 20
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    # stall the GPU long enough for the host to queue every timed call (2x the measured time)
    torch.cuda._sleep(int(min(2.0, 2 * iters * est + 0.01) * 1.98e9))
    t0 = time.perf_counter()
    for i in range(iters):
        starts[i].record()
        calls[i % len(calls)]()
        ends[i].record()
    host = (time.perf_counter() - t0) / iters
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True)]
    return statistics.median(times), host * 1e6


class _NoFastPath(dict):
    """Plan cache that never keeps the pre-marshalled launch: every call goes through numba's dispatcher."""

    def get(self, *a):
        return None

    def __setitem__(self, k, v):
        pass


def host_overhead() -> dict:
    """Host µs per call of one 4096x4096 2-bit layer: GemvPlan fast path, the same plan through
    numba's dispatcher, the VQuantLinear module path (kernels.dispatch), and torch fp16 F.linear."""
    from vptq.layers import VQuantLinear

    p = make_layer(4096, 4096, 0, seed=0, perm=True)  # the module below has a perm buffer
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    fast = GemvPlan(p, checked=True)
    fast6 = GemvPlan(make_layer(4096, 4096, 0, seed=0, v=6, k=4096), checked=True)
    slow = GemvPlan(p, checked=True)
    slow._fast = _NoFastPath()
    with torch.device("cuda"):
        mod = VQuantLinear(4096, 4096, [-1, 8], [-1, 65536], [-1, -1], 1, 4096, 0, enable_norm=NORM,
                           enable_perm=True)
    with torch.no_grad():
        mod.indices.copy_(p.indices)
        mod.centroids.weight.copy_(p.centroids)
        mod.perm.copy_(p.perm)
        if NORM:
            mod.weight_scale.copy_(p.weight_scale)
            mod.weight_bias.copy_(p.weight_bias)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    x3 = x[None]
    res = {}
    with torch.no_grad():
        for name, fn in (("plan_fast_path", lambda: fast(x)), ("plan_fast_path_smem", lambda: fast6(x)),
                         ("plan_numba_dispatcher", lambda: slow(x)),
                         ("VQuantLinear_forward", lambda: mod(x3)),
                         ("torch_fp16_F_linear", lambda: torch.nn.functional.linear(x3, w))):
            res[name + "_host_us"] = time_device([fn], iters=200)[1]
    print(json.dumps(res), flush=True)
    return res


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench_matvec(quick: bool, formats: list[str], shapes: list[str]) -> list[dict]:
    """Every shape: torch fp16 x @ W.T once, then every format (gemv batch 1, dequantize fp16)."""
    rows = []
    for sname in shapes:
        m, n = SHAPES[sname]
        # torch fp16 baseline, same shape, rotated weights, measured in this run
        nw = copies_for(m * n * 2)
        ws = [torch.randn(m, n, device="cuda", dtype=torch.float16) * 0.02 for _ in range(nw)]
        x = torch.randn(1, n, device="cuda", dtype=torch.float16)
        t_fp16, h_fp16 = time_device([lambda w=w, x=x: x @ w.t() for w in ws])
        del ws
        torch.cuda.empty_cache()
        for fkey in formats:
            fname, v, k, k_res = FORMATS[fkey]
            p0 = make_layer(m, n, k_res, seed=0, v=v, k=k)
            nl = copies_for(layer_bytes(p0))
            layers = [p0] + [make_layer(m, n, k_res, seed=s, v=v, k=k) for s in range(1, nl)]
            invs = [column_map(p) for p in layers]
            # correctness on this shape: fused kernel and dequantize vs the torch oracle
            xr = torch.randn(1, n, device="cuda", dtype=torch.float16)
            wref = dequantize_ref(p0, torch.float32)
            rel = rel_err(gemv(xr, p0), xr.float() @ wref.t())
            drel = rel_err(dequantize(p0, torch.float16), wref)
            del wref
            read = layer_bytes(p0) + n * 2
            plans = [GemvPlan(p, checked=True) for p in layers]  # per-layer prepared state
            t, h = time_device([lambda pl=pl, x=x: pl(x) for pl in plans])
            td, hd = time_device([lambda p=p, iv=iv: dequantize(p, torch.float16, colmap=iv, checked=True)
                                  for p, iv in zip(layers, invs, strict=True)])
            pl0 = plans[0]
            if pl0.path == "rows":
                cfg = dict(pl0.rows_cfg, rt=pl0.rows_cfg["rw"], threads=pl0.rows_threads)
            else:
                cfg = dict(pl0.smem_config(1) if pl0.path == "smem" else {"kc": pl0.kc, "rw": pl0.rw},
                           rt=pl0.rt, threads=pl0.threads)
            rows.append({
                "shape": sname, "m": m, "n": n, "format": fname, "format_key": fkey, "batch": 1,
                "bits_per_weight_indices": p0.code_bits / v, "gemv_path": pl0.path,
                "launch": {**cfg, "grid": [cfg.get("tiles", pl0.tiles), cfg.get("nsplit", pl0.nsplit)]},
                "gemv_us": t, "gemv_host_us": h, "bytes_read": read, "gemv_GBps": read / t / 1e3,
                "gemv_pct_peak": 100 * read / (t * 1e-6) / peak(), "fp16_us": t_fp16, "fp16_host_us": h_fp16,
                "speedup_vs_fp16": t_fp16 / t, "gemv_rel_err": rel, "dequant_rel_err": drel,
                "dequant_us": td, "dequant_GBps_written": m * n * 2 / td / 1e3,
                "dequant_pct_peak_written": 100 * m * n * 2 / (td * 1e-6) / peak(),
            })
            print(json.dumps(rows[-1]), flush=True)
            if sname.startswith("7B q") and fkey in BATCH_FORMATS and not quick:
                for bsz in (2, 4, 8):
                    xb = torch.randn(bsz, n, device="cuda", dtype=torch.float16)
                    tb, hb = time_device([lambda pl=pl, xb=xb: pl(xb) for pl in plans])
                    tf, _ = time_device([lambda w=w, xb=xb: xb @ w.t() for w in
                                         [torch.randn(m, n, device="cuda", dtype=torch.float16) for _ in range(5)]])
                    rows.append({"shape": sname, "m": m, "n": n, "format": fname, "format_key": fkey, "batch": bsz,
                                 "gemv_us": tb, "gemv_host_us": hb, "fp16_us": tf, "speedup_vs_fp16": tf / tb})
                    print(json.dumps(rows[-1]), flush=True)
            del layers, invs, plans
            torch.cuda.empty_cache()
    return rows


def sweep() -> None:
    """Split-K chunk / rows-per-warp configurations of the 2-bit v8-k65536 gemv, batch 1, every shape."""
    for sname, (m, n) in SHAPES.items():
        layers = [make_layer(m, n, 0, seed=s) for s in range(copies_for(m * n // 4))]
        x = torch.randn(1, n, device="cuda", dtype=torch.float16)
        auto = GemvPlan(layers[0], checked=True)
        res = {"shape": sname, "auto": (auto.kc, auto.rw)}
        for kc in (512, 1024, 2048, 4096):
            for rw in (1, 2, 4):
                plans = [GemvPlan(p, checked=True, kc=kc, rw=rw) for p in layers]
                res[f"{kc}/{rw}"] = round(time_device([lambda pl=pl, x=x: pl(x) for pl in plans], iters=100)[0], 1)
        print(json.dumps(res), flush=True)


SMEM_SWEEP = [  # (threads, u, rt scale, kc, maxreg): launch shapes of the shared-memory-codebook gemv
    (256, 32, 1.0, None, 0), (256, 32, 1.0, None, 128), (256, 16, 1.0, None, 0), (128, 32, 1.0, None, 0),
    (512, 16, 1.0, None, 0), (256, 32, 0.5, None, 128), (256, 32, 2.0, None, 128),
]
DQ_SWEEP = [  # (threads, rb, maxreg) of the row-staged dequantize
    (256, None, 0), (256, None, 128), (256, 1, 128), (512, None, 128),
]


def sweep_smem(formats: list[str], shapes: list[str]) -> list[dict]:
    """Time the shared-memory gemv (batch 1) over SMEM_SWEEP and the row-staged dequantize over
    DQ_SWEEP on the given formats and shapes."""
    out = []
    for sname in shapes:
        m, n = SHAPES[sname]
        for fkey in formats:
            _, v, k, kr = FORMATS[fkey]
            layers = [make_layer(m, n, kr, seed=s, v=v, k=k) for s in range(copies_for(m * n * v // 32 + 1))]
            x = torch.randn(1, n, device="cuda", dtype=torch.float16)
            auto = GemvPlan(layers[0], checked=True)
            res = {"shape": sname, "format": fkey, "auto_rt": auto.rt,
                   "auto": auto.smem_config(1) if auto.path == "smem" else {"kc": auto.kc, "rw": auto.rw}}
            if auto.path == "smem":
                for threads, u, scale, kc, maxreg in SMEM_SWEEP:
                    rt = max(1, round(auto.rt * scale))
                    key = f"gemv t{threads}/u{u}/rt{rt}/reg{maxreg}"
                    try:
                        plans = [GemvPlan(p, checked=True, threads=threads, u=u, rt=rt, kc=kc, maxreg=maxreg)
                                 for p in layers]
                        res[key] = round(time_device([lambda pl=pl, x=x: pl(x) for pl in plans], iters=100)[0], 2)
                    except Exception as e:  # report, keep sweeping
                        res[key] = f"{type(e).__name__}: {str(e)[:160]}"
                    print(key, res[key], flush=True)
            invs = [column_map(p) for p in layers]
            for threads, rb, maxreg in DQ_SWEEP:
                key = f"dequant t{threads}/rb{rb}/reg{maxreg}"
                try:
                    kw = dict(colmap=None, checked=True, threads=threads, rb=rb, maxreg=maxreg)
                    res[key] = round(time_device([lambda p=p, kw={**kw, "colmap": iv}: dequantize(p, torch.float16, **kw)
                                                  for p, iv in zip(layers, invs, strict=True)], iters=60)[0], 2)
                except Exception as e:  # report, keep sweeping
                    res[key] = f"{type(e).__name__}: {str(e)[:160]}"
                print(key, res[key], flush=True)
            print(json.dumps(res), flush=True)
            out.append(res)
            del layers, invs
            torch.cuda.empty_cache()
    return out


CHECKS = [  # (m, n, v, k, k_res, [(gemv path, batch, plan kwargs)], [(dequant path, dtype)])
    (37, 70, 6, 4096, 0, [("smem", 1, {}), ("smem", 3, {}), ("l2", 1, {})],
     [("staged", torch.float16), ("staged", torch.float32), ("columns", torch.float16)]),
    (1000, 1536, 6, 4096, 0, [("smem", 1, {}), ("smem", 1, {"threads": 128, "rt": 5, "kc": 1024})],
     [("staged", torch.float16)]),
    (513, 2999, 6, 4096, 64, [("smem", 1, {}), ("smem", 8, {})], [("staged", torch.float16)]),
    (45, 100, 8, 65536, 0, [("l2", 1, {})], [("staged", torch.float16)]),
    (301, 333, 4, 4096, 0, [("smem", 2, {})], [("staged", torch.float32)]),
    (19, 27, 8, 65536, 256, [], [("staged", torch.float16)]),
    (64, 4104, 12, 1024, 0, [("smem", 1, {})], [("staged", torch.float16)]),
    # row-per-lane kernel: partial row tiles, split-K with the last-block epilogue, residual bytes
    (1001, 1536, 4, 256, 0, [("rows", 1, {}), ("rows", 1, {"kc": 256}), ("smem", 2, {})], []),
    (45, 4096, 8, 256, 256, [("rows", 1, {}), ("rows", 1, {"kc": 512})], []),
]


def check() -> list[dict]:
    """Odd shapes (M not a multiple of v, N not a multiple of the tiles or of 8, split-K, warp jobs
    of several rows) through the kernel paths on the GPU, against dequantize_ref / the fp32
    matmul. Prints and returns the relative errors."""
    res = []
    for m, n, v, k, kr, gemvs, deqs in CHECKS:
        p = make_layer(m, n, kr, seed=1, v=v, k=k)
        wref = dequantize_ref(p, torch.float32)
        r = {"m": m, "n": n, "v": v, "k": k, "kr": kr}
        for path, dt in deqs:
            r[f"dequant_{path}_{str(dt)[6:]}"] = rel_err(dequantize(p, dt, path=path), wref)
        for path, bsz, kw in gemvs:
            plan = GemvPlan(p, path=path, **kw)
            x = torch.randn(bsz, n, device="cuda", dtype=torch.float16)
            errs = [rel_err(plan(x), x.float() @ wref.t()) for _ in range(2)]
            tag = f"gemv_{path}_b{bsz}" + ("_" + "_".join(f"{a}{b}" for a, b in kw.items()) if kw else "")
            r[tag] = max(errs)
            if path == "rows":
                r[tag + "_cfg"] = dict(plan.rows_cfg)
                r[tag + "_clean"] = bool(not plan.rcnt.any())
            if path == "smem":
                r[tag + "_cfg"] = {**plan.smem_config(bsz), "rt": plan.rt, "tiles": plan.tiles}
                r[tag + "_clean"] = bool(not plan.cnt.any())
        print(json.dumps(r), flush=True)
        res.append(r)
    return res


def one(spec: str) -> None:
    """--one FORMAT:SHAPE[:dequant|:lprN]: 3 launches of one kernel (for a profiler), then a sync;
    lprN: the row kernel with N lanes per row."""
    fkey, shape, *rest = spec.split(":")
    m, n = SHAPES[list(SHAPES)[int(shape)]]
    _, v, k, kr = FORMATS[fkey]
    p = make_layer(m, n, kr, seed=0, v=v, k=k)
    if rest and rest[0] == "dequant":
        cm = column_map(p)
        for _ in range(3):
            dequantize(p, torch.float16, colmap=cm, checked=True)
    else:
        plan = GemvPlan(p, checked=True)
        if rest and rest[0].startswith("lpr") and plan.path == "rows":
            plan.configure_rows(lpr=int(rest[0][3:]))
        x = torch.randn(1, n, device="cuda", dtype=torch.float16)
        for _ in range(3):
            plan(x)
        print(json.dumps({"path": plan.path, "rt": plan.rt, "tiles": plan.tiles,
                          **(plan.smem_config(1) if plan.path == "smem" else {})}), flush=True)
    torch.cuda.synchronize()


def graph_check() -> None:
    """The fused gemv (both kernels) captured in a torch CUDA graph replays to the eager result."""
    for v, k in ((8, 65536), (6, 4096)):
        _graph_check(make_layer(4096, 11008, 0, seed=0, v=v, k=k))


def _graph_check(p: PackedLayer) -> None:
    plan = GemvPlan(p)
    x = torch.randn(1, p.in_features, device="cuda", dtype=torch.float16)
    y0 = plan(x).clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        plan(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = plan(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    ok = torch.allclose(yg.float(), plan(x).float(), rtol=1e-3, atol=1e-3)
    print(json.dumps({"kernel": plan.path, "v": p.vector_len, "k": p.num_centroids, "graph_capture": True,
                      "replay_matches_eager": bool(ok),
                      "changed_input": not torch.equal(y0, yg)}), flush=True)


def bench_assign(quick: bool) -> dict:
    n, k, v = (1 << 18 if quick else 1 << 22), 65536, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, v, device="cuda", generator=g)
    c = torch.randn(k, v, device="cuda", generator=g)
    chunk = 1 << 13  # 8192 x 65536 fp32 distance tile = 2 GiB

    def cdist_argmin():
        out = torch.empty(n, dtype=torch.long, device="cuda")
        for s in range(0, n, chunk):
            out[s:s + chunk] = torch.cdist(x[s:s + chunk], c).argmin(1)
        return out

    c_sq = (c * c).sum(1)

    def mm_argmin():
        out = torch.empty(n, dtype=torch.long, device="cuda")
        for s in range(0, n, chunk):
            out[s:s + chunk] = torch.addmm(c_sq[None], x[s:s + chunk], c.t(), beta=1, alpha=-2).argmin(1)
        return out

    def ours():
        return assign(x, c)[0]

    res = {"n": n, "k": k, "v": v}
    for name, fn, reps in (("numba", ours, 5), ("torch_cdist_argmin", cdist_argmin, 2),
                           ("torch_mm_argmin", mm_argmin, 2)):
        fn()  # warm-up / compile
        ts = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        res[f"{name}_s"] = statistics.median(ts)
        res[f"{name}_reps"] = reps
        res[f"{name}_Mvec_per_s"] = n / statistics.median(ts) / 1e6
        print(name, res[f"{name}_s"], flush=True)
    a, b = ours(), mm_argmin()
    res["agree_with_mm"] = float((a == b).float().mean())
    res["speedup_vs_cdist"] = res["torch_cdist_argmin_s"] / res["numba_s"]
    res["speedup_vs_mm"] = res["torch_mm_argmin_s"] / res["numba_s"]
    return res


def versions() -> dict:
    import platform
    from importlib.metadata import version

    import numpy

    d = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("numba", "numba-cuda", "transformers"):
        try:
            d[name] = version(name)
        except Exception:
            pass
    return d


def markdown(rows: list[dict], asg: dict | None, device: str, hostc: dict | None, meta: dict) -> str:
    vs = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    out = [f"Kernels on {device} ({vs}); `{meta['command']}`, {meta['date']}. CUDA-event medians of 120 calls "
           "after warm-up, inputs rotated over > 150 MB; device time (host launch cost separate). "
           "GB/s read = packed indices + codebooks + perm + scale/bias + x over the gemv time; dequantize "
           "bandwidth counts the fp16 bytes written.", "",
           f"| shape (out x in) | format | gemv kernel | batch | fused gemv µs | GB/s read | % of {peak() / 1e12:.2f} TB/s "
           "| torch fp16 µs | speedup | dequant µs | dequant GB/s written (% peak) | host µs/call (gemv) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["batch"] == 1:
            out.append(f"| {r['shape']} | {r['format']} | {r['gemv_path']} | 1 | {r['gemv_us']:.1f} | "
                       f"{r['gemv_GBps']:.0f} | {r['gemv_pct_peak']:.1f}% | {r['fp16_us']:.1f} | "
                       f"**{r['speedup_vs_fp16']:.2f}x** | {r['dequant_us']:.1f} | {r['dequant_GBps_written']:.0f} "
                       f"({r['dequant_pct_peak_written']:.0f}%) | {r['gemv_host_us']:.0f} |")
        else:
            out.append(f"| {r['shape']} | {r['format']} | | {r['batch']} | {r['gemv_us']:.1f} | | | "
                       f"{r['fp16_us']:.1f} | {r['speedup_vs_fp16']:.2f}x | | | {r['gemv_host_us']:.0f} |")
    errs = [r for r in rows if r["batch"] == 1]
    if errs:
        out.append(f"\nRelative error vs the torch oracle (fp32 dequantize_ref): gemv ≤ "
                   f"{max(r['gemv_rel_err'] for r in errs):.1e}, dequantize ≤ {max(r['dequant_rel_err'] for r in errs):.1e}.")
    if asg:
        out += ["", f"Nearest centroid, K={asg['k']}, v={asg['v']}, N={asg['n']} fp32 vectors:", "",
                "| method | seconds (median) | M vectors/s |", "|---|---|---|"]
        for name, label in (("numba", "numba.cuda kernel (kernels/assign.py)"),
                            ("torch_cdist_argmin", "torch cdist + argmin (chunked)"),
                            ("torch_mm_argmin", "torch ‖c‖² − 2x·c addmm + argmin (chunked)")):
            out.append(f"| {label} | {asg[name + '_s']:.3f} (of {asg[name + '_reps']}) | "
                       f"{asg[name + '_Mvec_per_s']:.2f} |")
        out.append(f"\nSpeedup {asg['speedup_vs_cdist']:.2f}x vs cdist, {asg['speedup_vs_mm']:.2f}x vs the matmul "
                   f"form; index agreement with the matmul form {100 * asg['agree_with_mm']:.3f}% (float32 near-ties).")
    if hostc:
        out += ["", "Host cost per call, one 4096x4096 layer, batch 1 (Python + launch, GPU stalled):", "",
                "| path | host µs/call |", "|---|---|"]
        for k, label in (("plan_fast_path", "GemvPlan v8-k65536, pre-marshalled launch (what VQuantLinear uses)"),
                         ("plan_fast_path_smem", "GemvPlan v6-k4096 (shared-memory kernel), pre-marshalled launch"),
                         ("plan_numba_dispatcher", "same v8 plan through numba's dispatcher"),
                         ("VQuantLinear_forward", "VQuantLinear.forward (kernels.dispatch.vq_linear_forward + plan)"),
                         ("torch_fp16_F_linear", "torch fp16 F.linear, same shape")):
            if k + "_host_us" in hostc:
                out.append(f"| {label} | {hostc[k + '_host_us']:.1f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    from datetime import UTC, datetime

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--formats", default=DEFAULT_FORMATS, help=f"comma list of {', '.join(FORMATS)}")
    ap.add_argument("--shapes", default="", help="comma list of shape numbers 0..5 (default: all)")
    ap.add_argument("--no-assign", action="store_true", help="skip the nearest-centroid benchmark")
    ap.add_argument("--sweep", action="store_true", help="only the kc/rw sweep of the v8-k65536 gemv")
    ap.add_argument("--sweep-smem", action="store_true", help="only the launch-shape sweep of the smem gemv")
    ap.add_argument("--check", action="store_true", help="only the odd-shape correctness check of every path")
    ap.add_argument("--graph-check", action="store_true", help="only the CUDA-graph capture check")
    ap.add_argument("--one", default="", help="FORMAT:SHAPE[:dequant]: 3 launches of one kernel, for a profiler")
    args = ap.parse_args()
    if args.one:
        one(args.one)
        return
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        if f not in FORMATS:
            ap.error(f"--formats: unknown {f!r} (choose from {', '.join(FORMATS)})")
    names = list(SHAPES)
    shapes = [names[int(i)] for i in args.shapes.split(",") if i] if args.shapes else names
    if args.quick and not args.shapes:
        shapes = names[:1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": ("" if PERM else "VPTQ_BENCH_PERM=0 ") + ("" if NORM else "VPTQ_BENCH_NORM=0 ") + "python bench/kernel_table.py " + " ".join(sys.argv[1:]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "versions": versions()}
    print(json.dumps(meta), flush=True)
    if args.sweep or args.graph_check or args.check or args.sweep_smem:
        extra = {}
        if args.check:
            extra["check"] = check()
        if args.graph_check:
            graph_check()
        if args.sweep:
            sweep()
        if args.sweep_smem:
            extra["sweep_smem"] = sweep_smem(formats, shapes)
        (out / "kernels_extra.json").write_text(json.dumps({**meta, **extra}, indent=1))
        return
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    hostc = host_overhead()
    rows = bench_matvec(args.quick, formats, shapes)
    asg = None if args.no_assign else bench_assign(args.quick)
    (out / f"kernels_{gpu_tag(dev)}.json").write_text(json.dumps({**meta, "device": dev, "matvec": rows, "assign": asg,
                                                        "host_overhead": hostc}, indent=1))
    md = markdown(rows, asg, dev, hostc, meta)
    (out / "kernels.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
