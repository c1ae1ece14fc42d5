"""Stored VPTQ layer (packed indices + codebooks + outliers + perm + scale/bias) -> dense weight.

`PackedLayer` is the stored format of one `VQuantLinear` (vptq-method.md 3.2), read straight from
the module's tensors without copies. `dequantize_ref` is the torch oracle (the arithmetic of
vptq-method.md 2.1, in the output dtype); `dequantize` is the numba.cuda kernel with the same
signature: one thread per (original column j, row of vectors r) writes the v outputs
W[r*v : r*v+v, j], so consecutive threads write consecutive columns (coalesced stores); the
centroid is fetched as 64-bit words (four fp16 values per load) and computed in float32,
rounded once to the output dtype.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from . import _numba as nb

THREADS = 128  # threads per block along the columns
MAX_V = 16
LOC_SHIFT = 20  # column_map packs (group + 1) above 20 bits of column-within-group
LOC_MASK = (1 << LOC_SHIFT) - 1

cuda = float32 = int64 = None  # bound lazily by _jit_env(): numba is optional


def _jit_env():
    global cuda, float32, int64
    cuda = nb.cuda()  # a module global: the simulator swaps it for its fake module inside kernels
    from numba import float32, int64


@dataclass(frozen=True)
class PackedLayer:
    """Tensors of one quantized linear in the published layout (shapes: vptq-method.md 3.2)."""

    in_features: int
    out_features: int
    vector_len: int
    num_centroids: int
    group_num: int
    group_size: int
    indices: torch.Tensor  # (G, ceil(M/v), ceil(group_size*code_bits/32)) int32
    centroids: torch.Tensor  # (G, k*v)
    num_res_centroids: int = 0  # 0 = no residual codebook
    res_centroids: torch.Tensor | None = None  # (G, k_res*v)
    outlier_size: int = 0
    outlier_vector_len: int = -1
    outlier_num_centroids: int = -1
    outlier_indices: torch.Tensor | None = None  # (1, ceil(M/v0), outlier_size) int16 (uint16 bits)
    outlier_centroids: torch.Tensor | None = None  # (1, k0*v0)
    perm: torch.Tensor | None = None  # (N,) int16 (uint16 bits) or int64: stored column p = original perm[p]
    weight_scale: torch.Tensor | None = None  # (N,) original column order
    weight_bias: torch.Tensor | None = None  # (N,)
    bias: torch.Tensor | None = None  # (M,) the linear's own bias

    @property
    def main_bits(self) -> int:
        return nb.log2i(self.num_centroids)

    @property
    def code_bits(self) -> int:
        return self.main_bits + (nb.log2i(self.num_res_centroids) if self.num_res_centroids > 0 else 0)

    @property
    def rows(self) -> int:
        return math.ceil(self.out_features / self.vector_len)

    @property
    def device(self) -> torch.device:
        return self.indices.device

    @classmethod
    def from_module(cls, mod) -> PackedLayer:
        """View of a `vptq.layers.VQuantLinear` (duck-typed: kernels/ does not import vptq/)."""
        v, k, kr = mod.vector_lens[1], mod.num_centroids[1], mod.num_res_centroids[1]
        has_out = getattr(mod, "has_outliers", False)
        return cls(
            in_features=mod.in_features, out_features=mod.out_features, vector_len=v, num_centroids=k,
            group_num=mod.group_num, group_size=mod.group_size, indices=mod.indices,
            centroids=mod.centroids.weight.detach(),
            num_res_centroids=kr if kr > 0 else 0,
            res_centroids=mod.res_centroids.weight.detach() if kr > 0 else None,
            outlier_size=mod.outlier_size if has_out else 0,
            outlier_vector_len=mod.vector_lens[0] if has_out else -1,
            outlier_num_centroids=mod.num_centroids[0] if has_out else -1,
            outlier_indices=mod.outlier_indices if has_out else None,
            outlier_centroids=mod.outlier_centroids.weight.detach() if has_out else None,
            perm=mod.perm if mod.enable_perm else None,
            weight_scale=mod.weight_scale.detach() if mod.enable_norm else None,
            weight_bias=mod.weight_bias.detach() if mod.enable_norm else None,
            bias=mod.bias.detach() if mod.bias is not None else None,
        )


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def check_layer(p: PackedLayer, *, kernel: bool = False, check_values: bool = True) -> None:
    """ValueError naming the tensor when the stored layer is inconsistent (before any launch).

    check_values also scans outlier indices and perm for out-of-range values (one device sync).
    """
    m, n, v, k = p.out_features, p.in_features, p.vector_len, p.num_centroids
    g, gs, o = p.group_num, p.group_size, p.outlier_size
    dev = p.indices.device

    def need(name, t, shape, dtypes, contiguous=kernel):
        if t is None:
            raise ValueError(f"{name}: missing")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise ValueError(f"{name}: dtype {t.dtype} not one of {dtypes}")
        if t.device != dev:
            raise ValueError(f"{name}: on {t.device}, indices are on {dev}")
        if contiguous and not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous (call .contiguous())")

    if v < 1 or (kernel and v > MAX_V):
        raise ValueError(f"vector_len: {v} not supported (1..{MAX_V})")
    if not nb.is_pow2(k):
        raise ValueError(f"centroids: num_centroids {k} is not a power of two")
    if p.num_res_centroids and not nb.is_pow2(p.num_res_centroids):
        raise ValueError(f"res_centroids: num_res_centroids {p.num_res_centroids} is not a power of two")
    if p.code_bits > 32:
        raise ValueError(f"indices: code width {p.code_bits} bits > 32")
    if o + g * gs != n:
        raise ValueError(f"indices: outlier_size + group_num*group_size = {o + g * gs} != in_features {n}")
    c = p.centroids
    if c.dim() == 2 and c.shape[0] == g and c.shape[1] != k * v:
        if c.shape[1] % v:
            raise ValueError(f"centroids: row length {c.shape[1]} is not a multiple of vector_len {v}")
        raise ValueError(f"centroids: holds {c.shape[1] // v} codes, num_centroids says {k} "
                         "(indices would fall outside the codebook)")
    need("indices", p.indices, (g, p.rows, math.ceil(gs * p.code_bits / 32)), (torch.int32,))
    need("centroids", c, (g, k * v), _FLOATS)
    if p.num_res_centroids:
        need("res_centroids", p.res_centroids, (g, p.num_res_centroids * v), (c.dtype,))
    if o:
        v0, k0 = p.outlier_vector_len, p.outlier_num_centroids
        if v0 < 1 or k0 < 1:
            raise ValueError(f"outlier_centroids: outlier_size {o} needs vector_len and num_centroids")
        need("outlier_indices", p.outlier_indices, (1, math.ceil(m / v0), o), (torch.int16,))
        need("outlier_centroids", p.outlier_centroids, (1, k0 * v0), (c.dtype,))
        if check_values and int(p.outlier_indices.to(torch.int64).bitwise_and(0xFFFF).max()) >= k0:
            raise ValueError(f"outlier_indices: values out of range for a codebook of {k0} entries")
    if p.perm is not None:
        need("perm", p.perm, (n,), (torch.int16, torch.int64, torch.int32))
        if check_values:
            pv = _perm64(p.perm)
            if int(pv.max()) >= n or int(pv.min()) < 0:
                raise ValueError(f"perm: values out of range for {n} input channels")
    if (p.weight_scale is None) != (p.weight_bias is None):
        raise ValueError("weight_scale: weight_scale and weight_bias come together")
    if p.weight_scale is not None:
        need("weight_scale", p.weight_scale, (n,), _FLOATS)
        need("weight_bias", p.weight_bias, (n,), _FLOATS)
    if p.bias is not None:
        need("bias", p.bias, (m,), _FLOATS)
    if kernel:
        for name, t in (("weight_scale", p.weight_scale), ("weight_bias", p.weight_bias), ("bias", p.bias)):
            if t is not None and t.dtype not in (torch.float16, torch.float32):
                raise ValueError(f"{name}: the kernels read float16/float32, got {t.dtype}")
        for name, t in (("centroids", c), ("res_centroids", p.res_centroids),
                        ("outlier_centroids", p.outlier_centroids)):
            if t is not None and t.dtype != torch.float16:
                raise ValueError(f"{name}: the kernels read fp16 codebooks, got {t.dtype}")


def _perm64(perm: torch.Tensor) -> torch.Tensor:
    return perm.to(torch.int64) & 0xFFFF if perm.dtype == torch.int16 else perm.to(torch.int64)


def unpack_codes(indices: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """(..., words) int32 -> (..., count) int64 codes of `bits` bits (vptq-method.md 2.3)."""
    words = indices.to(torch.int64) & 0xFFFFFFFF
    pos = torch.arange(count, device=indices.device) * bits
    w0 = pos >> 5
    sh = pos & 31
    lo = words[..., w0]
    hi = words[..., (w0 + 1).clamp_max(words.shape[-1] - 1)]
    return (((hi << 32) | lo) >> sh) & ((1 << bits) - 1)


def _gather_rows(cb: torch.Tensor, idx: torch.Tensor, m: int) -> torch.Tensor:
    """Codebook (k, v), indices (R, C) -> dense (m, C): vectors run along the rows."""
    r, c = idx.shape
    v = cb.shape[1]
    return cb[idx.t()].reshape(c, r * v).t()[:m]


def dequantize_ref(p: PackedLayer, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Torch oracle: dense (M, N) weight in `dtype`, arithmetic of vptq-method.md 2.1."""
    check_layer(p)
    m, v = p.out_features, p.vector_len
    codes = unpack_codes(p.indices, p.code_bits, p.group_size)  # (G, R, group_size)
    main = codes & ((1 << p.main_bits) - 1)
    res = codes >> p.main_bits
    parts = []
    if p.outlier_size:
        v0 = p.outlier_vector_len
        oc = p.outlier_centroids.reshape(-1, v0).to(dtype)
        parts.append(_gather_rows(oc, p.outlier_indices[0].to(torch.int64) & 0xFFFF, m))
    cbs = p.centroids.reshape(p.group_num, -1, v)
    for g in range(p.group_num):
        wg = _gather_rows(cbs[g].to(dtype), main[g], m)
        if p.num_res_centroids:
            rc = p.res_centroids.reshape(p.group_num, -1, v)[g].to(dtype)
            wg = wg + _gather_rows(rc, res[g], m)
        parts.append(wg)
    w = torch.cat(parts, dim=1)  # (M, N), stored (permuted) column order
    if p.perm is not None:
        w = w[:, torch.argsort(_perm64(p.perm))]
    if p.weight_scale is not None:
        w = w * p.weight_scale.to(dtype)[None, :] + p.weight_bias.to(dtype)[None, :]
    return w


# ---------------------------------------------------------------------------------- kernel
def word_view(cb: torch.Tensor, v: int) -> torch.Tensor:
    """fp16 codebook (G, k*v) viewed as int64 words (v % 4 == 0) or int32 words (v even) or itself."""
    if v % 4 == 0:
        return cb.view(torch.int64)
    if v % 2 == 0:
        return cb.view(torch.int32)
    return cb.view(torch.int16)


@functools.cache
def device_helpers(v: int):
    """(read_code, add_centroid) device functions specialised for vector length v."""
    _jit_env()
    h2f = nb.half_bits_to_float()
    hw = 4 if v % 4 == 0 else (2 if v % 2 == 0 else 1)  # fp16 values per codebook word
    nw = v // hw

    @cuda.jit(device=True)
    def read_code(words, g, r, c, bits, mask):
        """Code c of packed row (g, r): bits [c*bits, (c+1)*bits) of the LSB-first stream."""
        o = c * bits
        w0 = o >> 5
        sh = o & 31
        val = int64(words[g, r, w0]) & 0xFFFFFFFF
        if sh + bits > 32:
            val |= (int64(words[g, r, w0 + 1]) & 0xFFFFFFFF) << 32
        return (val >> sh) & mask

    pair = hw == 4 and nw % 2 == 0  # v = 8, 16: 16-byte loads (one instruction per 8 values)
    ld128 = nb.load_128()

    @cuda.jit(device=True)
    def add_centroid(cbw, g, idx, acc):
        """acc[t] += C_g[idx, t] for t < v, reading the codebook as words of hw fp16 values."""
        if pair:
            base = g * cbw.shape[1] + idx * nw
            for q2 in range(nw // 2):
                wa, wb = ld128(cbw, base + 2 * q2)
                for h in range(4):
                    acc[q2 * 8 + h] += h2f(wa >> (16 * h))
                    acc[q2 * 8 + 4 + h] += h2f(wb >> (16 * h))
        else:
            for q in range(nw):
                w = int64(cbw[g, idx * nw + q])
                for h in range(hw):
                    acc[q * hw + h] += h2f(w >> (16 * h))

    return read_code, add_centroid


@functools.cache
def _kernel(v: int, has_res: bool, has_out: bool, has_norm: bool, threads: int):
    read_code, add_centroid = device_helpers(v)

    @cuda.jit
    def dequant_kernel(indices, cbw, rcbw, oidx, ocb, colmap, scale, wbias, bits, main_bits, v0, out):
        """Thread (j, r): W[r*v : r*v+v, j] for original column j."""
        m = out.shape[0]
        n = out.shape[1]
        j = cuda.blockIdx.x * threads + cuda.threadIdx.x
        r = cuda.blockIdx.y
        if j >= n:
            return
        loc = int64(colmap[j])  # (group + 1) << LOC_SHIFT | column in group; group 0 = outliers
        gp = loc >> LOC_SHIFT
        c = loc & LOC_MASK
        acc = cuda.local.array(v, float32)
        for t in range(v):
            acc[t] = float32(0.0)
        if has_out and gp == 0:
            for t in range(v):
                row = r * v + t
                if row < m:
                    r0 = row // v0
                    code = int64(oidx[0, r0, c]) & 0xFFFF
                    acc[t] = float32(ocb[0, code * v0 + row - r0 * v0])
        else:
            g = gp - 1
            code = read_code(indices, g, r, c, bits, (int64(1) << bits) - 1)
            add_centroid(cbw, g, code & ((int64(1) << main_bits) - 1), acc)
            if has_res:
                add_centroid(rcbw, g, code >> main_bits, acc)
        s = float32(scale[j]) if has_norm else float32(1.0)
        b = float32(wbias[j]) if has_norm else float32(0.0)
        for t in range(v):
            row = r * v + t
            if row < m:
                out[row, j] = acc[t] * s + b

    return dequant_kernel


def column_map(p: PackedLayer) -> torch.Tensor:
    """int32 (N,): original column j -> (group + 1) << LOC_SHIFT | column within the group.

    Group 0 is the outlier block. Precomputed once per layer so the kernel does no division.
    """
    n = p.in_features
    pos = torch.argsort(_perm64(p.perm)) if p.perm is not None else torch.arange(n, device=p.device)
    q = pos - p.outlier_size
    g = torch.where(q < 0, 0, q // p.group_size + 1)
    c = torch.where(q < 0, pos, q % p.group_size)
    return ((g << LOC_SHIFT) | c).to(torch.int32)


def dequantize(p: PackedLayer, dtype: torch.dtype = torch.float16, *, colmap: torch.Tensor | None = None,
               threads: int = THREADS, checked: bool = False) -> torch.Tensor:
    """numba.cuda dequantization; same contract as `dequantize_ref` (dtype fp16 or fp32)."""
    if not checked:
        check_layer(p, kernel=True)
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"dtype: the kernel writes float16 or float32, got {dtype}")
    dev = p.device
    m, n, v = p.out_features, p.in_features, p.vector_len
    if colmap is None:
        colmap = column_map(p)
    out = torch.empty(m, n, dtype=dtype, device=dev)
    f16 = nb.dummy(dev, torch.float16)
    kern = _kernel(v, p.num_res_centroids > 0, p.outlier_size > 0, p.weight_scale is not None, threads)
    nb.launch(
        kern, (nb.grid_1d(n, threads), p.rows), threads, nb.stream_for(p.indices),
        p.indices, word_view(p.centroids, v),
        word_view(p.res_centroids, v) if p.num_res_centroids else word_view(p.centroids, v),
        p.outlier_indices if p.outlier_size else nb.dummy(dev, torch.int16).reshape(1, 1, 1),
        p.outlier_centroids if p.outlier_size else f16.reshape(1, 1),
        colmap,
        p.weight_scale if p.weight_scale is not None else f16,
        p.weight_bias if p.weight_bias is not None else f16,
        p.code_bits, p.main_bits, max(p.outlier_vector_len, 1), out,
    )
    return out
