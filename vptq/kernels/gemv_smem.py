"""The shared-memory gemv: the fused dequantize-matvec for small codebooks (one group, no outlier
columns, codebooks <= 96 KiB: v6-k4096, v4-k4096, ...), the codebook copied into shared memory and
every centroid gathered there. Algebra and oracle: gemv.py; at batch 1 the byte and 10-bit codes
take gemv_rows.py instead.
"""

from __future__ import annotations

import functools

from . import _numba as nb
from .codegen import (
    CB_SMEM_MAX,
    WARP,
    fill_src,
    gather_smem_src,
    kernel_env,
    plane_bases_src,
    smem_codebook_bytes,
    split_epilogue_src,
    store_sum_src,
)
from .layout import PackedLayer

SMEM_THREADS = 256  # threads per block of the shared-memory-codebook kernel
SMEM_U = 32  # consecutive codes per lane (batch <= 2; 16 above)
SMEM_MAXREG = 128  # register cap of the shared-memory kernel (0: the compiler's choice): 2 blocks per SM
X_CHUNK = 8192  # floats of x' staged per block (batch x chunk)


def smem_path_ok(p: PackedLayer) -> bool:
    """The layer's codebooks fit in shared memory and the layout is the plain one (one group, no
    outlier columns): the codebook-in-shared-memory kernel applies."""
    return p.outlier_size == 0 and p.group_num == 1 and smem_codebook_bytes(p) <= CB_SMEM_MAX


def pick_rg(rt: int, nsl: int, nwarps: int) -> int:
    """Rows per warp job: balance the jobs over the warps, few x' reloads."""
    best, best_cost = 1, None
    for rg in range(1, rt + 1):
        jobs = nsl * nb.cdiv(rt, rg)
        cost = nb.cdiv(jobs, nwarps) * (rg + 0.15)
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = rg, cost
    return best


@functools.cache
def kernel_smem(v: int, batch: int, bits: int, main_bits: int, has_res: bool, has_perm: bool, has_norm: bool,
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
