"""Fused dequantize-matvec for decoding: y = x W^T + bias for 1..8 token rows, W never formed.

Algebra (vptq-method.md 2.2): with stored column p holding original column j = perm[p],
W[:, j] = Q[:, p] * scale[j] + wbias[j], so

    y[b, m] = sum_p (x[b, perm[p]] * scale[perm[p]]) * Q[m, p]  +  x[b] . wbias  +  bias[m].

One block per row of vectors r (outputs r*v .. r*v+v-1): its threads walk the stored columns p,
fold the normalisation into the activation, decode the packed code, fetch the centroid (64-bit
codebook words, four fp16 values per load, served by L1/L2) and accumulate v outputs per token
row in registers. Partial sums are reduced with warp shuffles, then across warps in shared
memory; x . wbias rides along in the same reduction, the layer bias is added once.
`gemv_ref` is the torch oracle (dequantize_ref then F.linear), same signature.
"""

from __future__ import annotations

import functools

import torch

from . import _numba as nb
from .dequant import PackedLayer, check_layer, dequantize_ref, device_helpers, word_view

THREADS = 256  # threads per block (8 warps)
WARP = 32
MAX_BATCH = 8

cuda = float32 = int64 = None  # bound lazily by _kernel(): numba is optional


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
            has_bias: bool, threads: int):
    global cuda, float32, int64
    read_code, add_centroid = device_helpers(v)
    cuda = nb.cuda()  # a module global: the simulator swaps it for its fake module inside kernels
    from numba import float32, int64

    sim = nb.simulator_enabled()
    warp = 1 if sim else WARP  # the simulator has no shuffles: every thread is its own "warp"
    nwarps = threads // warp
    ne = batch * v + batch  # values reduced per block: v outputs per token row, plus x . wbias

    @cuda.jit(device=True)
    def warp_sum(val):
        if warp > 1:
            off = warp // 2
            while off > 0:
                val += cuda.shfl_down_sync(0xFFFFFFFF, val, off)
                off //= 2
        return val

    @cuda.jit(device=True)
    def load_x(x, j, scale, wbias, xv, acc):
        """xv[b] = x[b, j] * scale[j]; acc[batch*v + b] += x[b, j] * wbias[j]."""
        if has_norm:
            s = float32(scale[j])
            wb = float32(wbias[j])
            for b in range(batch):
                xj = float32(x[b, j])
                xv[b] = xj * s
                acc[batch * v + b] += xj * wb
        else:
            for b in range(batch):
                xv[b] = float32(x[b, j])

    @cuda.jit
    def gemv_kernel(x, indices, cbw, rcbw, oidx, ocb, perm, scale, wbias, bias, bits, main_bits,
                    outlier_size, group_size, v0, y):
        """Block r: y[:, r*v : r*v+v] over all stored columns."""
        m = y.shape[1]
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        red = cuda.shared.array((nwarps, ne), float32)  # per-warp partial sums
        acc = cuda.local.array(ne, float32)  # [b*v + t] outputs, [batch*v + b] x . wbias
        cv = cuda.local.array(v, float32)  # one decoded centroid (+ residual)
        xv = cuda.local.array(batch, float32)
        for e in range(ne):
            acc[e] = float32(0.0)
        mask = (int64(1) << bits) - 1
        mmask = (int64(1) << main_bits) - 1
        # outlier columns (stored first), then each group: no integer division per code
        for p in range(tid, outlier_size, threads):
            j = (int64(perm[p]) & 0xFFFF) if has_perm else int64(p)
            load_x(x, j, scale, wbias, xv, acc)
            for t in range(v):
                cv[t] = float32(0.0)
                row = r * v + t
                if row < m:
                    r0 = row // v0
                    code = int64(oidx[0, r0, p]) & 0xFFFF
                    cv[t] = float32(ocb[0, code * v0 + row - r0 * v0])
            for b in range(batch):
                for t in range(v):
                    acc[b * v + t] += xv[b] * cv[t]
        for g in range(indices.shape[0]):
            base = outlier_size + g * group_size
            for c in range(tid, group_size, threads):
                p = base + c
                j = (int64(perm[p]) & 0xFFFF) if has_perm else int64(p)
                load_x(x, j, scale, wbias, xv, acc)
                for t in range(v):
                    cv[t] = float32(0.0)
                code = read_code(indices, g, r, c, bits, mask)
                add_centroid(cbw, g, code & mmask, cv)
                if has_res:
                    add_centroid(rcbw, g, code >> main_bits, cv)
                for b in range(batch):
                    for t in range(v):
                        acc[b * v + t] += xv[b] * cv[t]
        lane = tid % warp
        wid = tid // warp
        for e in range(ne):
            tot = warp_sum(acc[e])
            if lane == 0:
                red[wid, e] = tot
        cuda.syncthreads()  # all warp partials in shared memory
        for e in range(tid, batch * v, threads):
            b = e // v
            t = e - b * v
            row = r * v + t
            if row < m:
                tot = float32(0.0)
                tb = float32(0.0)
                for w in range(nwarps):
                    tot += red[w, e]
                    tb += red[w, batch * v + b]
                if has_bias:
                    tot += float32(bias[row])
                y[b, row] = tot + tb

    return gemv_kernel


def gemv(x: torch.Tensor, p: PackedLayer, *, threads: int = THREADS, checked: bool = False) -> torch.Tensor:
    """numba.cuda fused dequantize-matvec; same contract as `gemv_ref` (x fp16/fp32, 1..8 rows)."""
    if not checked:
        check_layer(p, kernel=True)
    check_gemv_inputs(x, p, kernel=True)
    dev = p.device
    v = p.vector_len
    bsz = x.shape[0]
    y = torch.empty(bsz, p.out_features, dtype=x.dtype, device=dev)
    f16 = nb.dummy(dev, torch.float16)
    kern = _kernel(v, bsz, p.num_res_centroids > 0, p.outlier_size > 0, p.perm is not None,
                   p.weight_scale is not None, p.bias is not None, threads)
    nb.launch(
        kern, p.rows, threads, nb.stream_for(x),
        x, p.indices, word_view(p.centroids, v),
        word_view(p.res_centroids, v) if p.num_res_centroids else word_view(p.centroids, v),
        p.outlier_indices if p.outlier_size else nb.dummy(dev, torch.int16).reshape(1, 1, 1),
        p.outlier_centroids if p.outlier_size else f16.reshape(1, 1),
        p.perm if p.perm is not None else nb.dummy(dev, torch.int16),
        p.weight_scale if p.weight_scale is not None else f16,
        p.weight_bias if p.weight_bias is not None else f16,
        p.bias if p.bias is not None else f16,
        p.code_bits, p.main_bits, p.outlier_size, p.group_size, max(p.outlier_vector_len, 1), y,
    )
    return y
