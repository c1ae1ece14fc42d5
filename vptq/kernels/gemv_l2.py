"""The L2 gemv: the fused dequantize-matvec of every layout (v8-k65536, residual codes, several
groups, outlier columns), its centroids gathered through L1/L2. Algebra and oracle: gemv.py.

Layout of the work (one launch per call):
* A block owns a tile of `rw * warps` rows of vectors (outputs r*v .. r*v+v-1 each) and a chunk
  of `kc` stored columns (split-K). It first stages the folded activations
  x'[b, p] = x[b, perm[p]] * scale[perm[p]] of its chunk in shared memory (fp32, in a lane-major
  order without bank conflicts) and the chunk's share of x . wbias.
* One warp walks one row of vectors over the chunk: each lane takes L2_U = 8 consecutive codes per
  pass. For the released 2-bit format (16-bit codes, one group, no outliers) a lane loads its
  8 codes as two 64-bit words (a warp reads 512 contiguous bytes), then issues the 8 centroid
  fetches (v/4 64-bit words each, through L1/L2: the 1 MiB v8-k65536 codebook does not fit in
  shared memory) before using any of them. Other formats (residual codes, several groups,
  outlier columns, code widths that straddle words) decode code by code, same tiling.
* Lane partials are summed with xor-shuffles; with one chunk the warp writes y directly; with
  several, partials go to an fp32 workspace by atomics and the last block of a row tile
  (atomic counter) writes y (+ bias) and zeroes the workspace and the counter for the next call.
  No memset, no second kernel, no host sync: the call is capturable in a CUDA graph.
"""

from __future__ import annotations

import functools
import math

from . import _numba as nb
from .codegen import WARP, device_helpers

L2_THREADS = 256  # threads per block (8 warps)
L2_U = 8  # consecutive codes per lane per pass

cuda = float32 = int64 = int32 = None  # bound lazily by kernel_l2(): numba is optional


@functools.cache
def kernel_l2(v: int, batch: int, has_res: bool, has_out: bool, has_perm: bool, has_norm: bool,
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
    pw = warp * L2_U  # columns per pass of one warp
    rt = nwarps * rw  # rows of vectors per block
    ne = batch * v
    nq = v // 4  # 64-bit codebook words per centroid (fast path: v % 4 == 0)
    ncw = L2_U * 4  # staged codebook words per lane (nq <= 4)
    pair = nq % 2 == 0  # v = 8, 16: one 16-byte load per 8 centroid values
    nu = L2_U
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


def l2_tiling(rows: int, n: int, pw: int, threads: int, warp: int) -> tuple[int, int]:
    """(kc, rw): column chunk (split-K) and rows of vectors per warp.

    From the H100 sweep of bench/kernel_table.py (then bench/kernels.py) --sweep (2-bit v8-k65536, batch 1): chunks of 512
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
