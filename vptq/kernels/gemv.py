"""Fused dequantize-matvec for decoding: y = x W^T + bias for 1..8 token rows, W never formed.

Algebra (vptq-method.md 2.2): with stored column p holding original column j = perm[p],
W[:, j] = Q[:, p] * scale[j] + wbias[j], so

    y[b, m] = sum_p (x[b, perm[p]] * scale[perm[p]]) * Q[m, p]  +  x[b] . wbias  +  bias[m].

Layout of the work (one launch per call):
* A block owns a tile of `rw * warps` rows of vectors (outputs r*v .. r*v+v-1 each) and a chunk
  of `kc` stored columns (split-K). It first stages the folded activations
  x'[b, p] = x[b, perm[p]] * scale[perm[p]] of its chunk in shared memory (fp32, in a lane-major
  order without bank conflicts) and the chunk's share of x . wbias.
* One warp walks one row of vectors over the chunk: each lane takes U = 8 consecutive codes per
  pass. For the released 2-bit format (16-bit codes, one group, no outliers) a lane loads its
  8 codes as two 64-bit words (a warp reads 512 contiguous bytes), then issues the 8 centroid
  fetches (v/4 64-bit words each, through L1/L2: the 1 MiB v8-k65536 codebook does not fit in
  shared memory) before using any of them. Other formats (residual codes, several groups,
  outlier columns, code widths that straddle words) decode code by code, same tiling.
* Lane partials are summed with xor-shuffles; with one chunk the warp writes y directly; with
  several, partials go to an fp32 workspace by atomics and the last block of a row tile
  (atomic counter) writes y (+ bias) and zeroes the workspace and the counter for the next call.
  No memset, no second kernel, no host sync: the call is capturable in a CUDA graph.

Small codebooks (one group, no outliers, codebooks <= 96 KiB: v6-k4096, v4-k4096, ...) take a
second kernel, `_kernel_smem`: the codebook is copied into shared memory and every centroid is
gathered there (see its docstring). Byte codes with small codebooks (v4-k256, v8-k256 + k256)
take a third kernel at batch 1, kernels/gemv_rows.py (a lane per row of vectors, replicated
codebook); `GemvPlan.path` says which kernel a layer uses at batch 1, `GemvPlan.base` above.

`GemvPlan` is the per-layer prepared state: folded perm/scale/bias tensors, launch configuration
and the kernel arguments of every constant tensor, marshalled once. A call then marshals only x
and y and goes straight to the driver (`host_us` in bench/results/kernels.md).
`gemv_ref` is the torch oracle (dequantize_ref then F.linear), same signature.
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch

from . import _numba as nb
from .code_columns import permute_code_columns
from .dequant import (
    CB_SMEM_MAX,
    PackedLayer,
    _perm64,
    ceil16,
    check_layer,
    dequantize_ref,
    device_helpers,
    flat_words,
    smem_codebook_bytes,
    word_view,
)
from .gemv_rows import (
    PERSIST_BITS,
    interleave_codes,
    rows_config,
    rows_launch,
    rows_path_ok,
    split_epilogue_src,
    store_sum_src,
    threads_maxreg,
)

THREADS = 256  # threads per block (8 warps)
WARP = 32
MAX_BATCH = 8
U = 8  # consecutive codes per lane per pass
SMS = 132  # H100 SXM; only steers the split-K heuristic

cuda = float32 = int64 = int32 = None  # bound lazily by _kernel(): numba is optional


def check_gemv_inputs(x: torch.Tensor, p: PackedLayer, *, kernel: bool = True) -> None:
    if x.dim() != 2 or x.shape[1] != p.in_features:
        raise ValueError(f"x: expected (batch, {p.in_features}), got {tuple(x.shape)}")
    if x.device != p.device:
        raise ValueError(f"x: on {x.device}, the layer is on {p.device}")
    if kernel:
        if not 1 <= x.shape[0] <= MAX_BATCH:
            raise ValueError(f"x: batch {x.shape[0]} outside 1..{MAX_BATCH} for the fused kernel")
        if x.dtype not in (torch.float16, torch.float32):
            raise ValueError(f"x: dtype {x.dtype} not supported by the kernel (float16/float32)")
        if not x.is_contiguous():
            raise ValueError("x: must be contiguous (call .contiguous())")


def gemv_ref(x: torch.Tensor, p: PackedLayer) -> torch.Tensor:
    """Torch oracle: x (B, N) -> y (B, M) in x.dtype."""
    check_gemv_inputs(x, p, kernel=False)
    w = dequantize_ref(p, x.dtype)
    return torch.nn.functional.linear(x, w, None if p.bias is None else p.bias.to(x.dtype))


@functools.cache
def _kernel(v: int, batch: int, has_res: bool, has_out: bool, has_perm: bool, has_norm: bool,
            has_bias: bool, fast16: bool, multi_group: bool, split: bool, kc: int, rw: int,
            threads: int, xdtype: str):
    """One compiled kernel per configuration (xdtype only keys the cache: one overload each)."""
    global cuda, float32, int64, int32
    read_code, add_centroid = device_helpers(v)
    h2f = nb.half_bits_to_float()
    ld128 = nb.load_128()
    cuda = nb.cuda()  # a module global: the simulator swaps it for its fake module inside kernels
    from numba import float32, int32, int64

    sim = nb.simulator_enabled()
    warp = 1 if sim else WARP  # the simulator has no shuffles: every thread is its own "warp"
    nwarps = threads // warp
    pw = warp * U  # columns per pass of one warp
    rt = nwarps * rw  # rows of vectors per block
    ne = batch * v
    nq = v // 4  # 64-bit codebook words per centroid (fast path: v % 4 == 0)
    ncw = U * 4  # staged codebook words per lane (nq <= 4)
    pair = nq % 2 == 0  # v = 8, 16: one 16-byte load per 8 centroid values
    nu = U
    assert kc % pw == 0

    warp_allsum = nb.warp_allsum(warp)

    @cuda.jit
    def gemv_kernel(x, xsrc, xscale, xwb, idx, idx64, cbw, rcbw, oidx, ocb, bias, ws, cnt, y,
                    bits, main_bits, outlier_size, group_size, v0, nsplit):
        n = x.shape[1]
        m = y.shape[1]
        nrows = idx.shape[1]
        tile = cuda.blockIdx.x
        k0 = cuda.blockIdx.y * kc
        tid = cuda.threadIdx.x
        lane = tid % warp
        wid = tid // warp
        xs = cuda.shared.array((batch, kc), float32)
        wbs = cuda.shared.array(batch, float32)
        flag = cuda.shared.array(1, int32)
        acc = cuda.local.array(ne, float32)
        cv = cuda.local.array(v, float32)
        cw = cuda.local.array(ncw, int64)
        wpart = cuda.local.array(batch, float32)
        if tid < batch:
            wbs[tid] = float32(0.0)
        for b in range(batch):
            wpart[b] = float32(0.0)
        cuda.syncthreads()
        # ---- stage x' of this chunk (lane-major order: pass, u, lane) and its x . wbias
        for cc in range(tid, kc, threads):
            p = k0 + cc
            pos = (cc // pw) * pw + (cc % nu) * warp + (cc % pw) // nu
            if p < n:
                j = int64(xsrc[p]) if has_perm else p
                for b in range(batch):
                    xv = float32(x[b, j])
                    if has_norm:
                        xs[b, pos] = xv * xscale[p]
                        wpart[b] += xv * xwb[p]
                    else:
                        xs[b, pos] = xv
            else:
                for b in range(batch):
                    xs[b, pos] = float32(0.0)
        if has_norm:
            for b in range(batch):
                t = warp_allsum(wpart[b])
                if lane == 0:
                    cuda.atomic.add(wbs, b, t)
        cuda.syncthreads()
        mask = (int64(1) << bits) - 1
        mmask = (int64(1) << main_bits) - 1
        # ---- rows of this tile, one warp per row
        for rr in range(rw):
            r = tile * rt + rr * nwarps + wid
            if r < nrows:
                for e in range(ne):
                    acc[e] = float32(0.0)
                for ps in range(0, kc, pw):
                    c0 = k0 + ps + lane * nu
                    if fast16 and c0 + nu <= n:
                        wa = idx64[0, r, c0 >> 2]
                        wb = idx64[0, r, (c0 >> 2) + 1]
                        for u in range(nu):
                            word = wa if u < 4 else wb
                            code = (word >> (16 * (u & 3))) & 0xFFFF
                            if pair:
                                for q2 in range(nq // 2):
                                    wlo, whi = ld128(cbw, code * nq + 2 * q2)
                                    cw[u * nq + 2 * q2] = wlo
                                    cw[u * nq + 2 * q2 + 1] = whi
                            else:
                                for q in range(nq):
                                    cw[u * nq + q] = cbw[0, code * nq + q]
                        for u in range(nu):
                            for q in range(nq):
                                wq = cw[u * nq + q]
                                for h in range(4):
                                    cv[q * 4 + h] = h2f(wq >> (16 * h))
                            for b in range(batch):
                                xv = xs[b, ps + u * warp + lane]
                                for t in range(v):
                                    acc[b * v + t] += xv * cv[t]
                    else:
                        for u in range(nu):
                            p = c0 + u
                            if p < n:
                                for t in range(v):
                                    cv[t] = float32(0.0)
                                if has_out and p < outlier_size:
                                    for t in range(v):
                                        row = r * v + t
                                        if row < m:
                                            r0 = row // v0
                                            code = int64(oidx[0, r0, p]) & 0xFFFF
                                            cv[t] = float32(ocb[0, code * v0 + row - r0 * v0])
                                else:
                                    qq = p - outlier_size
                                    g = qq // group_size if multi_group else 0
                                    c = qq - g * group_size
                                    code = read_code(idx, g, r, c, bits, mask)
                                    add_centroid(cbw, g, code & mmask, cv)
                                    if has_res:
                                        add_centroid(rcbw, g, code >> main_bits, cv)
                                for b in range(batch):
                                    xv = xs[b, ps + u * warp + lane]
                                    for t in range(v):
                                        acc[b * v + t] += xv * cv[t]
                # ---- warp reduction; lane e % warp owns output e
                for e in range(ne):
                    tot = warp_allsum(acc[e])
                    if lane == e % warp:
                        b = e // v
                        row = r * v + e - b * v
                        if row < m:
                            if has_norm:
                                tot += wbs[b]
                            if split:
                                cuda.atomic.add(ws, (b, row), tot)
                            else:
                                if has_bias:
                                    tot += bias[row]
                                y[b, row] = tot
        if split:
            # ---- the last block of this row tile writes y and leaves ws / cnt zeroed
            cuda.syncthreads()
            if tid == 0:
                cuda.threadfence()
                old = cuda.atomic.add(cnt, tile, 1)
                flag[0] = 1 if old == nsplit - 1 else 0
                cuda.threadfence()
            cuda.syncthreads()
            if flag[0] == 1:
                row0 = tile * rt * v
                nr = rt * v
                for e in range(tid, batch * nr, threads):
                    b = e // nr
                    row = row0 + e - b * nr
                    if row < m:
                        tot = cuda.atomic.add(ws, (b, row), float32(0.0))  # L2-coherent read
                        ws[b, row] = float32(0.0)
                        if has_bias:
                            tot += bias[row]
                        y[b, row] = tot
                if tid == 0:
                    cnt[tile] = 0

    return gemv_kernel


@functools.cache
def _kernel_smem(v: int, batch: int, bits: int, main_bits: int, has_res: bool, has_perm: bool, has_norm: bool,
                 has_bias: bool, u: int, threads: int, wload: int, xdtype: str, maxreg: int = 0):
    """The codebook-in-shared-memory gemv (generated source, every per-code step unrolled into
    scalar registers). Dynamic shared memory: codebook planes | x' chunk | row sums | x.wbias.

    A block owns `rt` rows of vectors x a chunk of `kc` stored columns. The chunk is cut into
    slices of warp*u columns; a warp job = one slice x `rg` consecutive rows: the lane keeps the
    folded activations of its u columns in registers, loads its u packed codes of a row as
    u*bits/32 words (16-byte loads when aligned, next row prefetched), decodes them with
    constant shifts, gathers each centroid from shared memory and accumulates in fp32; the
    warp's v*batch sums are reduced with shuffles and added to the block's row sums in shared
    memory. The block then writes y (one chunk) or adds into the fp32 workspace, the last
    block of a row tile writing y (split-K, as in the L2 kernel)."""
    from .dequant import fill_src, gather_smem_src, kernel_env, plane_bases_src

    sim = nb.simulator_enabled()
    warp = 1 if sim else WARP
    nwarps = threads // warp
    pw = warp * u
    nwl = u * bits // 32  # packed words per lane and row
    assert u * bits % 32 == 0
    bv = batch * v
    xreg = batch * u <= 64
    mask = (1 << bits) - 1
    ind = "    "
    i2, i3, i4, i5 = ind * 2, ind * 3, ind * 4, ind * 5
    L = ["def gemv_smem(x, xsrc, xscale, xwb, idx, idx64, cbg, rcbg, bias, ws, cnt, y, k, kr, kc, rt, rg, nsplit):",
         f"{ind}s64 = cuda.shared.array(0, int64)",
         f"{ind}s32 = cuda.shared.array(0, int32)",
         f"{ind}s16 = cuda.shared.array(0, int16)",
         f"{ind}sf = cuda.shared.array(0, float32)",
         f"{ind}n = x.shape[1]",
         f"{ind}m = y.shape[1]",
         f"{ind}nrows = idx.shape[1]",
         f"{ind}nwords = idx.shape[2]",
         f"{ind}tile = cuda.blockIdx.x",
         f"{ind}k0 = cuda.blockIdx.y * kc",
         f"{ind}tid = cuda.threadIdx.x",
         f"{ind}lane = tid % {warp}",
         f"{ind}wid = tid // {warp}"]
    L += plane_bases_src(v, "k", "kr" if has_res else None, ind)
    L += [f"{ind}nsl = kc // {pw}",
          f"{ind}oxs = cbbytes // 4",
          f"{ind}oys = oxs + {batch} * kc",  # per (slice, row, output) partial sums of the warps
          f"{ind}owb = oys + nsl * rt * {bv}",
          f"{ind}ofl = owb + {batch}"]
    L += fill_src(v, "cbg", "k", "m", threads, ind)
    if has_res:
        L += fill_src(v, "rcbg", "kr", "r", threads, ind)
    # ---- stage x' = x[perm] * scale of this chunk (lane-major), its x . wbias, zero the row sums
    for b in range(batch):
        L.append(f"{ind}_wp{b} = float32(0.0)")
    # NS columns per thread and step, every load issued before any use (the loop is latency-bound)
    ns = 8 if batch <= 2 else 4
    L.append(f"{ind}for _i0 in range(tid, kc, {threads * ns}):")
    for i in range(ns):
        L += [f"{i2}_c{i} = _i0 + {i * threads}",
              f"{i2}_p{i} = k0 + _c{i}",
              f"{i2}_ok{i} = _c{i} < kc and _p{i} < n",
              f"{i2}if _ok{i}:",
              f"{i3}_j{i} = int64(xsrc[_p{i}])" if has_perm else f"{i3}_j{i} = _p{i}"]
        if has_norm:
            L += [f"{i3}_s{i} = float32(xscale[_p{i}])", f"{i3}_w{i} = float32(xwb[_p{i}])"]
        L += [f"{i2}else:", f"{i3}_j{i} = int64(0)"]
        if has_norm:
            L += [f"{i3}_s{i} = float32(0.0)", f"{i3}_w{i} = float32(0.0)"]
    for i in range(ns):
        for b in range(batch):
            L.append(f"{i2}_x{i}_{b} = float32(x[{b}, _j{i}]) if _ok{i} else float32(0.0)")
    for i in range(ns):
        L += [f"{i2}if _c{i} < kc:",
              f"{i3}pos = (_c{i} // {pw}) * {pw} + (_c{i} % {u}) * {warp} + (_c{i} % {pw}) // {u}"]
        for b in range(batch):
            if has_norm:
                L += [f"{i3}sf[oxs + {b} * kc + pos] = _x{i}_{b} * _s{i}", f"{i3}_wp{b} += _x{i}_{b} * _w{i}"]
            else:
                L.append(f"{i3}sf[oxs + {b} * kc + pos] = _x{i}_{b}")
    L += [f"{ind}if tid < {batch}:",
          f"{i2}sf[owb + tid] = float32(0.0)",
          f"{ind}cuda.syncthreads()"]
    if has_norm:
        for b in range(batch):
            L += [f"{ind}_t = warp_allsum(_wp{b})", f"{ind}if lane == 0:", f"{i2}cuda.atomic.add(sf, owb + {b}, _t)"]
    L.append(f"{ind}cuda.syncthreads()")
    # ---- warp jobs: one slice x rg rows
    L += [f"{ind}rlo = tile * rt",
          f"{ind}rhi = min(rlo + rt, nrows)",
          f"{ind}ngr = (rt + rg - 1) // rg",
          f"{ind}for job in range(wid, nsl * ngr, {nwarps}):",
          f"{i2}s = job % nsl",
          f"{i2}r0 = rlo + (job // nsl) * rg",
          f"{i2}r1 = min(r0 + rg, rhi)",
          f"{i2}if r0 < r1:",
          f"{i3}c0 = k0 + s * {pw} + lane * {u}",
          f"{i3}full = c0 + {u} <= n",
          f"{i3}wb = (c0 * {bits}) >> 5",
          f"{i3}xo = oxs + s * {pw} + lane"]
    if xreg:
        for b in range(batch):
            for uu in range(u):
                L.append(f"{i3}x{b}_{uu} = sf[xo + {b} * kc + {uu * warp}]")

    def load(dst: str, row: str, i: str) -> list[str]:
        out = [f"{i}if full:"]
        j2 = i + ind
        if wload == 4:
            out.append(f"{j2}_base = ({row}) * (nwords >> 1) + (wb >> 1)")
            for jj in range(nwl // 4):
                out += [f"{j2}_lo, _hi = ld128(idx64, _base + {2 * jj})",
                        f"{j2}{dst}{4 * jj} = _lo & 0xFFFFFFFF",
                        f"{j2}{dst}{4 * jj + 1} = (_lo >> 32) & 0xFFFFFFFF",
                        f"{j2}{dst}{4 * jj + 2} = _hi & 0xFFFFFFFF",
                        f"{j2}{dst}{4 * jj + 3} = (_hi >> 32) & 0xFFFFFFFF"]
        elif wload == 2:
            for jj in range(nwl // 2):
                out += [f"{j2}_lo = idx64[0, {row}, (wb >> 1) + {jj}]",
                        f"{j2}{dst}{2 * jj} = _lo & 0xFFFFFFFF",
                        f"{j2}{dst}{2 * jj + 1} = (_lo >> 32) & 0xFFFFFFFF"]
        else:
            for jj in range(nwl):
                out.append(f"{j2}{dst}{jj} = int64(idx[0, {row}, wb + {jj}]) & 0xFFFFFFFF")
        out.append(f"{i}else:")
        for jj in range(nwl):
            out += [f"{j2}if wb + {jj} < nwords:",
                    f"{j2}    {dst}{jj} = int64(idx[0, {row}, wb + {jj}]) & 0xFFFFFFFF",
                    f"{j2}else:",
                    f"{j2}    {dst}{jj} = int64(0)"]
        return out

    L += load("w", "r0", i3)
    L += [f"{i3}r = r0", f"{i3}while r < r1:", f"{i4}if r + 1 < r1:"]
    L += load("nx", "r + 1", i5)
    L.append(f"{i4}else:")
    for jj in range(nwl):
        L.append(f"{i5}nx{jj} = int64(0)")
    for e in range(bv):
        L.append(f"{i4}a{e} = float32(0.0)")
    for uu in range(u):
        o = uu * bits
        w0, sh = o >> 5, o & 31
        if sh + bits <= 32:
            L.append(f"{i4}_c = (w{w0} >> {sh}) & {mask}")
        else:
            L.append(f"{i4}_c = ((w{w0} >> {sh}) | (w{w0 + 1} << {32 - sh})) & {mask}")
        if has_res:
            L += [f"{i4}_cm = _c & {(1 << main_bits) - 1}", f"{i4}_cr = _c >> {main_bits}"]
        else:
            L.append(f"{i4}_cm = _c")
        L += gather_smem_src(v, "_cm", "k", "m", "cv", False, i4)
        if has_res:
            L += gather_smem_src(v, "_cr", "kr", "r", "cv", True, i4)
        for b in range(batch):
            xv = f"x{b}_{uu}" if xreg else f"sf[xo + {b} * kc + {uu * warp}]"
            if not xreg:
                L.append(f"{i4}_xv = {xv}")
                xv = "_xv"
            for t in range(v):
                L.append(f"{i4}a{b * v + t} += {xv} * cv{t}")
    for e in range(bv):
        L += [f"{i4}_s = warp_allsum(a{e})",
              f"{i4}if lane == {e % warp}:",
              f"{i5}sf[oys + (s * rt + r - rlo) * {bv} + {e}] = _s"]
    for jj in range(nwl):
        L.append(f"{i4}w{jj} = nx{jj}")
    L += [f"{i4}r += 1",
          f"{ind}cuda.syncthreads()",
          # ---- block sums -> y, or -> workspace
          f"{ind}for _i in range(tid, (rhi - rlo) * {bv}, {threads}):",
          f"{i2}_rl = _i // {bv}",
          f"{i2}_e = _i - _rl * {bv}",
          f"{i2}_b = _e // {v}",
          f"{i2}row = (rlo + _rl) * {v} + _e - _b * {v}",
          f"{i2}if row < m:",
          f"{i3}tot = float32(0.0)",
          f"{i3}for _s2 in range(nsl):",
          f"{i4}tot += sf[oys + (_s2 * rt + _rl) * {bv} + _e]"]
    if has_norm:
        L.append(f"{i3}tot += sf[owb + _b]")
    L += store_sum_src("_b", "row", has_bias, i3)
    L += split_epilogue_src(batch, f"rlo * {v}", f"(rhi - rlo) * {v}", has_bias, threads, ind)
    src = "\n".join(L) + "\n"
    env = {**kernel_env(), "warp_allsum": nb.warp_allsum(warp)}
    fn = nb.compile_source(src, "gemv_smem", env,
                           f"gemv-smem-v{v}-B{batch}-b{bits}-{main_bits}-u{u}-t{threads}-w{wload}")
    return nb.cuda().jit(fn, max_registers=maxreg) if maxreg and not sim else nb.cuda().jit(fn)


def _choose(rows: int, n: int, pw: int, threads: int, warp: int) -> tuple[int, int]:
    """(kc, rw): column chunk (split-K) and rows of vectors per warp.

    From the H100 sweep of bench/kernels.py --sweep (2-bit v8-k65536, batch 1): chunks of 512
    columns and 2-4 rows per warp were within 3-7 % of the best configuration on every 7B and 70B
    shape; the time hardly depends on the tiling (the random centroid fetches from L2 dominate).
    """
    nw = threads // warp
    if warp == 1:  # simulator: small shapes, one chunk when it fits
        kc = pw
        while kc < n and kc < pw * 4:
            kc *= 2
        return kc, 1
    kc = max(pw, 512)
    tasks = rows * math.ceil(n / kc)
    rw = 2 if tasks < 8192 or tasks > 32768 else 4
    rw = min(rw, max(1, math.ceil(rows / nw)))
    return kc, rw


def _arr_args(t: torch.Tensor) -> list:
    """A torch tensor as numba's kernel ABI for an array argument (meminfo, parent, size, ...)."""
    it = t.element_size()
    return [0, 0, t.numel(), it, t.data_ptr(), *t.shape, *(s * it for s in t.stride())]


@functools.lru_cache(maxsize=64)
def _core_stream(ptr: int):
    """cuda.core stream object for a raw CUDA stream handle (torch's current stream)."""
    from numba.cuda.cudadrv import driver

    return driver._to_core_stream(nb._external_stream(ptr))


SMEM_THREADS = 256  # threads per block of the shared-memory-codebook kernel
SMEM_U = 32  # consecutive codes per lane (batch <= 2; 16 above)
SMEM_MAXREG = 128  # register cap of the shared-memory kernel (0: the compiler's choice): 2 blocks per SM
X_CHUNK = 8192  # floats of x' staged per block (batch x chunk)


def smem_path_ok(p: PackedLayer) -> bool:
    """The layer's codebooks fit in shared memory and the layout is the plain one (one group, no
    outlier columns): the codebook-in-shared-memory kernel applies."""
    return p.outlier_size == 0 and p.group_num == 1 and smem_codebook_bytes(p) <= CB_SMEM_MAX


def _pick_rg(rt: int, nsl: int, nwarps: int) -> int:
    """Rows per warp job: balance the jobs over the warps, few x' reloads."""
    best, best_cost = 1, None
    for rg in range(1, rt + 1):
        jobs = nsl * nb.cdiv(rt, rg)
        cost = nb.cdiv(jobs, nwarps) * (rg + 0.15)
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = rg, cost
    return best


class GemvPlan:
    """Per-layer prepared state for the fused gemv; build once (check + fold), call many times.

    Three kernels: `base == "smem"` (codebooks <= 96 KiB, one group, no outliers: v6-k4096, v4-k4096,
    ...) copies the codebooks into shared memory and gathers centroids there; `base == "l2"`
    (v8-k65536 and every other layout) gathers them through L1/L2; `path == "rows"` (8-bit codes,
    kernels/gemv_rows.py) serves batch 1 where it applies, `base` the other batches. `path` forces
    one ("rows" / "smem" only where they apply). kc / rw tune the L2 kernel; kc / rt / u tune the shared-memory one
    (kc = columns per block; rt = rows of vectors per block; u = codes per lane). Where the rows kernel
    applies, kc is its column chunk (used where it is whole units of it) and the base kernel keeps its
    default (path="smem" / "l2" tunes a base kernel alone). ilv: the rows kernel reads
    a copy of the codes in its load order and the original column order (3-19 % faster on an H200,
    as many GPU bytes again as the codes).

    Holds strong references to every tensor it reads; rebuild it when the layer's tensors change
    (kernels.dispatch keys the cached plan on the tensors' data_ptr and _version).
    """

    def __init__(self, p: PackedLayer, *, threads: int | None = None, kc: int | None = None,
                 rw: int | None = None, rt: int | None = None, u: int | None = None, path: str | None = None,
                 maxreg: int | None = None, ilv: bool = False, checked: bool = False):
        if not checked:
            check_layer(p, kernel=True)
        if path not in (None, "rows", "smem", "l2"):
            raise ValueError(f"path: {path!r} is not 'rows', 'smem' or 'l2'")
        if path == "rows" and not rows_path_ok(p):
            raise ValueError("path: the row-per-lane kernel needs 8-bit codes (optionally + an 8-bit residual) "
                             "or 10-bit codes (optionally + a 6-bit residual, or a 5-bit one at v = 5), v a "
                             "multiple of 4 (or one more), one group, no outliers and rows of whole steps")
        rows = path in (None, "rows") and rows_path_ok(p)
        path = None if path == "rows" else path
        # kc tunes the kernel that serves batch 1: the rows kernel where it applies (the base kernel then
        # takes its own default; a rows chunk need not be a multiple of the base kernel's warp x u)
        kc_asked, kc = kc, (None if rows else kc)
        if path == "smem" and not smem_path_ok(p):
            raise ValueError("path: the shared-memory kernel needs one group, no outliers and codebooks "
                             f"<= {CB_SMEM_MAX} bytes (this layer: {smem_codebook_bytes(p)} bytes)")
        self.p = p
        dev = p.device
        self.sim = nb.simulator_enabled()
        # base: the kernel of every batch size ("rows" then takes batch 1 when it applies)
        self.path = self.base = path or ("smem" if smem_path_ok(p) else "l2")
        self.warp = 1 if self.sim else WARP
        self.threads = threads or (SMEM_THREADS if self.path == "smem" else THREADS)
        if self.threads % self.warp:
            raise ValueError(f"threads: {self.threads} is not a multiple of the warp size")
        v, n = p.vector_len, p.in_features
        nw = self.threads // self.warp
        words = p.indices.shape[2]
        self.maxreg = SMEM_MAXREG if maxreg is None else maxreg
        if self.path == "smem":
            self.u = u or SMEM_U
            if self.u * p.code_bits % 32:
                raise ValueError(f"u: {self.u} codes of {p.code_bits} bits are not whole 32-bit words")
            pw = self.warp * self.u
            if kc is None:
                nsl = nb.cdiv(n, pw)
                per = max(1, X_CHUNK // pw)
                kc = nb.cdiv(nsl, nb.cdiv(nsl, per)) * pw
            if kc % pw:
                raise ValueError(f"kc: {kc} is not a multiple of {pw}")
            self.kc = kc
            if rt is None:
                codes = p.rows * n
                cpb = min(max(codes / (2 * SMS), 16384), 262144)
                rt = max(1, round(cpb / min(kc, n)))
            self.rt = min(rt, p.rows)
            self.tiles = nb.cdiv(p.rows, self.rt)
            self.nsplit = nb.cdiv(n, self.kc)
            self.fast16 = False
        else:
            pw = self.warp * U
            kc0, rw0 = _choose(p.rows, n, pw, self.threads, self.warp)
            self.kc = kc or kc0
            self.rw = rw or rw0
            if self.kc % pw:
                raise ValueError(f"kc: {self.kc} is not a multiple of {pw}")
            self.rt = nw * self.rw
            self.tiles = nb.cdiv(p.rows, self.rt)
            self.nsplit = nb.cdiv(n, self.kc)
            self.fast16 = (p.code_bits == 16 and p.num_res_centroids == 0 and p.group_num == 1
                           and p.outlier_size == 0 and v % 4 == 0 and words % 2 == 0)
        self.split = self.nsplit > 1
        f32 = torch.float32
        one = torch.zeros(1, dtype=f32, device=dev)
        # folded per stored column p: source column, scale and wbias of that column
        if p.perm is not None:
            src = _perm64(p.perm)
            self.xsrc = src.to(torch.int32).contiguous()
        else:
            src = None
            self.xsrc = torch.zeros(1, dtype=torch.int32, device=dev)
        if p.weight_scale is not None:
            sc, wb = p.weight_scale.to(f32), p.weight_bias.to(f32)
            self.xscale = (sc[src] if src is not None else sc).contiguous()
            self.xwb = (wb[src] if src is not None else wb).contiguous()
        else:
            self.xscale = self.xwb = one
        self.bias = p.bias.to(f32).contiguous() if p.bias is not None else one
        self.idx64 = (p.indices.view(torch.int64) if (self.fast16 or (self.path == "smem" and words % 2 == 0))
                      else torch.zeros(1, 1, 1, dtype=torch.int64, device=dev))
        if self.path == "smem":
            self.cbg = flat_words(p.centroids, v)
            self.rcbg = flat_words(p.res_centroids, v) if p.num_res_centroids else self.cbg
        else:
            self.cbw = word_view(p.centroids, v)
            self.rcbw = word_view(p.res_centroids, v) if p.num_res_centroids else self.cbw
            self.oidx = p.outlier_indices if p.outlier_size else torch.zeros(1, 1, 1, dtype=torch.int16, device=dev)
            self.ocb = p.outlier_centroids if p.outlier_size else torch.zeros(1, 1, dtype=torch.float16, device=dev)
        self.cnt = torch.zeros(self.tiles, dtype=torch.int32, device=dev)
        self._ws: dict[int, torch.Tensor] = {}
        self._fast: dict[tuple, tuple] = {}
        if rows:
            self._init_rows(kc_asked, ilv)
        self.bytes_read = sum(t.numel() * t.element_size() for t in
                              (p.indices, p.centroids, p.res_centroids, p.outlier_indices, p.outlier_centroids,
                               p.perm, p.weight_scale, p.weight_bias, p.bias) if t is not None)

    def _init_rows(self, kc: int | None, ilv: bool = False) -> None:
        """State of the row-per-lane kernel (kernels/gemv_rows.py), used for batch 1."""
        p = self.p
        self.path = "rows"
        # persistent blocks where they pay (PERSIST_BITS); the simulator's tests ask for them
        persist = p.main_bits in PERSIST_BITS and not self.sim
        threads, self.rows_maxreg = threads_maxreg(persist)  # maxreg 0: the compiler's choice
        self.rows_threads = 16 if self.sim else threads
        self.rows_ablate = ""  # bench probes only: see kernel_rows
        # a kc that is not a whole number of the row kernel's units (column runs x codes a step) is ignored;
        # the shape is settled first so the plan's tensors (counters, interleaved codes) are built once
        unit = rows_config(p, self.rows_threads, self.warp, persist=persist)
        if kc is not None and kc % (unit["cs"] * unit["cps"]):
            kc = None
        self.configure_rows(kc, persist=persist, ilv=ilv)
        self.rcbw_main = word_view(p.centroids, p.vector_len)
        self.rcbw_res = word_view(p.res_centroids, p.vector_len) if p.num_res_centroids else self.rcbw_main

    def configure_rows(self, kc: int | None = None, threads: int | None = None, **kw) -> dict:
        """Set the row kernel's launch shape (`rows_config` with this plan's threads and warp; kw:
        lpr, rw, persist, gx, ahead, ilv) and the split-K counters of its row tiles; returns the shape."""
        self.rows_threads = threads or self.rows_threads
        p = self.p
        cfg = self.rows_cfg = rows_config(p, self.rows_threads, self.warp, kc, **kw)
        self.rcnt = torch.zeros(cfg["tiles"], dtype=torch.int32, device=p.device)
        # ilv: a copy of the codes in the kernel's load order (as many bytes again as the codes); being
        # a copy, its columns may as well be in the original order (kernels/code_columns.py): x' is
        # then read in order, not gathered through the permutation for every row tile
        codes = p.indices
        self.rxsrc, self.rxscale, self.rxwb = self.xsrc, self.xscale, self.xwb
        if cfg["ilv"] and p.perm is not None:
            codes = permute_code_columns(codes, p.code_bits, torch.argsort(_perm64(p.perm)))
            if p.weight_scale is not None:  # scale and bias are per original column already
                self.rxscale = p.weight_scale.to(torch.float32).contiguous()
                self.rxwb = p.weight_bias.to(torch.float32).contiguous()
        idx64 = codes.view(torch.int64)
        self.ridx64 = interleave_codes(idx64, cfg, p.code_bits) if cfg["ilv"] else idx64
        self._fast = {}
        return cfg

    def rows_static(self) -> list[torch.Tensor]:
        """This layer's tensors as the row kernel takes them (after x, before the workspace)."""
        return [self.rxsrc, self.rxscale, self.rxwb, self.ridx64, self.rcbw_main, self.rcbw_res, self.bias]

    # ------------------------------------------------------------------ launch configuration
    def smem_config(self, bsz: int) -> dict:
        """kc, nsplit, rg, u, wload and dynamic shared memory bytes of the shared-memory kernel."""
        p = self.p
        u = self.u if bsz <= 2 or (16 * p.code_bits) % 32 else min(self.u, 16)
        pw = self.warp * u
        kc = self.kc if self.kc % pw == 0 else nb.cdiv(self.kc, pw) * pw
        cap = max(pw, (X_CHUNK // bsz) // pw * pw)
        if kc > cap:
            kc = cap
        nsplit = nb.cdiv(p.in_features, kc)
        nsl = kc // pw
        rg = _pick_rg(self.rt, nsl, self.threads // self.warp)
        nwl = u * p.code_bits // 32
        words = p.indices.shape[2]
        wload = 4 if nwl % 4 == 0 and words % 4 == 0 else (2 if nwl % 2 == 0 and words % 2 == 0 else 1)
        shmem = ceil16(smem_codebook_bytes(p) + 4 * (bsz * kc + nsl * self.rt * bsz * p.vector_len + bsz + 1))
        return dict(u=u, kc=kc, nsplit=nsplit, rg=rg, wload=wload, shmem=shmem, maxreg=self.maxreg)

    def _launch_args(self, bsz: int, dtype: torch.dtype):
        """(kernel, grid, shmem, static tensors, scalars) for a call with bsz rows of dtype."""
        p = self.p
        if self.path == "rows" and bsz == 1:
            c = self.rows_cfg
            kern, scalars = rows_launch(p, c, dtype, self.rows_maxreg, self.rows_ablate)
            static = [*self.rows_static(), self.workspace(1, c["nsplit"] > 1), self.rcnt]
            return kern, (c["gx"], c["nsplit"]), c["shmem"], static, scalars, self.rows_threads
        if self.base == "smem":
            c = self.smem_config(bsz)
            split = c["nsplit"] > 1
            kern = _kernel_smem(p.vector_len, bsz, p.code_bits, p.main_bits, p.num_res_centroids > 0,
                                p.perm is not None, p.weight_scale is not None, p.bias is not None,
                                c["u"], self.threads, c["wload"], str(dtype), c["maxreg"])
            static = [self.xsrc, self.xscale, self.xwb, p.indices, self.idx64, self.cbg, self.rcbg, self.bias,
                      self.workspace(bsz, split), self.cnt]
            scalars = [p.num_centroids, p.num_res_centroids, c["kc"], self.rt, c["rg"], c["nsplit"]]
            return kern, (self.tiles, c["nsplit"]), c["shmem"], static, scalars, self.threads
        kern = _kernel(p.vector_len, bsz, p.num_res_centroids > 0, p.outlier_size > 0, p.perm is not None,
                       p.weight_scale is not None, p.bias is not None, self.fast16, p.group_num > 1,
                       self.split, self.kc, self.rw, self.threads, str(dtype))
        static = [self.xsrc, self.xscale, self.xwb, p.indices, self.idx64, self.cbw, self.rcbw, self.oidx,
                  self.ocb, self.bias, self.workspace(bsz, self.split), self.cnt]
        scalars = [p.code_bits, p.main_bits, p.outlier_size, p.group_size, max(p.outlier_vector_len, 1),
                   self.nsplit]
        return kern, (self.tiles, self.nsplit), 0, static, scalars, self.threads

    def workspace(self, bsz: int, split: bool | None = None) -> torch.Tensor:
        split = self.split if split is None else split
        ws = self._ws.get((bsz, split))
        if ws is None:
            n = bsz * self.p.out_features if split else 1
            ws = torch.zeros(n, dtype=torch.float32, device=self.p.device)
            ws = ws.view(bsz, self.p.out_features) if split else ws.view(1, 1)
            self._ws[(bsz, split)] = ws
        return ws

    def __call__(self, x: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        if check:
            check_gemv_inputs(x, self.p, kernel=True)
        bsz = x.shape[0]
        y = torch.empty(bsz, self.p.out_features, dtype=x.dtype, device=x.device)
        fast = self._fast.get((bsz, x.dtype))
        if fast is not None:
            launch_fast(fast, x, y)
            return y
        kern, grid, shmem, static, scalars, threads = self._launch_args(bsz, x.dtype)
        nb.launch(kern, grid, threads, nb.stream_for(x), x, *static, y, *scalars, shmem=shmem)
        if not self.sim:
            self._fast[(bsz, x.dtype)] = prepare_fast(kern, grid, threads, shmem, static, scalars)
        return y


def prepare_fast(disp, grid, threads: int, shmem: int, static_t: list, scalars_i: list):
    """Marshal a launch's constant arguments once (None when numba's internals moved: the caller
    keeps the slower dispatcher path). The call then passes x, y and these to `launch_fast`."""
    try:
        from numba.cuda._compat import CUDA_CORE_GE_1_0
        from numba.cuda.dispatcher import LaunchConfig, launch

        (kern,) = disp.overloads.values()
        static = []
        for t in static_t:
            static += _arr_args(t)
        scalars = [ctypes.c_int64(s) for s in scalars_i]
        grid3, block3 = (*grid, 1), (threads, 1, 1)
        if CUDA_CORE_GE_1_0:
            cfg = LaunchConfig(grid=grid3, block=block3, shmem_size=shmem, is_cooperative=False)
        else:
            cfg = LaunchConfig(grid=grid3, block=block3, shmem_size=shmem, cooperative_launch=False)
        return (launch, cfg, kern._codelibrary.get_cufunc().kernel, static, scalars)
    except Exception:  # numba internals moved: keep the (slower) dispatcher path
        return None


def launch_fast(fast: tuple, x: torch.Tensor, y: torch.Tensor) -> None:
    """Launch a `prepare_fast` record on torch's current stream: only x and y are marshalled."""
    launch, cfg, kern, static, scalars = fast
    stream = _core_stream(torch.cuda.current_stream(x.device).cuda_stream)
    launch(stream, cfg, kern, *_arr_args(x), *static, *_arr_args(y), *scalars)


def gemv(x: torch.Tensor, p: PackedLayer, *, threads: int | None = None, checked: bool = False,
         kc: int | None = None, rw: int | None = None, rt: int | None = None, u: int | None = None,
         path: str | None = None, maxreg: int | None = None) -> torch.Tensor:
    """numba.cuda fused dequantize-matvec; same contract as `gemv_ref` (x fp16/fp32, 1..8 rows).

    One-off form: builds a GemvPlan per call (checks included). Hot paths keep the plan.
    """
    if not checked:
        check_layer(p, kernel=True)
    check_gemv_inputs(x, p, kernel=True)
    return GemvPlan(p, threads=threads, kc=kc, rw=rw, rt=rt, u=u, path=path, maxreg=maxreg,
                    checked=True)(x, check=False)
