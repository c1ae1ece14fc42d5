"""The stored format of one quantized linear, and the views of it that the kernels take.

`PackedLayer` is the stored format of one `VQuantLinear` (vptq-method.md 3.2: packed indices +
codebooks + outliers + perm + scale/bias), read straight from the module's tensors without
copies; `check_layer` rejects an inconsistent one before any launch. The rest reads the format:
`unpack_codes` (the packed code stream, vptq-method.md 2.3), `perm64` (the stored permutation as
int64), `column_map` (original column -> group and column within it, for the dequantize
kernels) and the codebooks as words of fp16 values (`word_view`, `flat_words`, `flat_word_view`).
Nothing here imports numba.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _numba as nb

MAX_V = 16  # the kernels' longest vector
LOC_SHIFT = 20  # column_map packs (group + 1) above 20 bits of column-within-group
LOC_MASK = (1 << LOC_SHIFT) - 1


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
            pv = perm64(p.perm)
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


def perm64(perm: torch.Tensor) -> torch.Tensor:
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


def column_map(p: PackedLayer) -> torch.Tensor:
    """int32 (N,): original column j -> (group + 1) << LOC_SHIFT | column within the group.

    Group 0 is the outlier block. Precomputed once per layer so the kernel does no division.
    """
    n = p.in_features
    pos = torch.argsort(perm64(p.perm)) if p.perm is not None else torch.arange(n, device=p.device)
    q = pos - p.outlier_size
    g = torch.where(q < 0, 0, q // p.group_size + 1)
    c = torch.where(q < 0, pos, q % p.group_size)
    return ((g << LOC_SHIFT) | c).to(torch.int32)


def word_view(cb: torch.Tensor, v: int) -> torch.Tensor:
    """fp16 codebook (G, k*v) viewed as int64 words (v % 4 == 0) or int32 words (v even) or itself."""
    if v % 4 == 0:
        return cb.view(torch.int64)
    if v % 2 == 0:
        return cb.view(torch.int32)
    return cb.view(torch.int16)


def flat_words(cb: torch.Tensor, v: int) -> torch.Tensor:
    """fp16 codebook (G, k*v) as a flat int32 (v even: v/2 words per entry) or int16 (v odd) view."""
    return cb.reshape(-1).view(torch.int32 if v % 2 == 0 else torch.int16)


def flat_word_view(cb: torch.Tensor, v: int) -> torch.Tensor:
    """Flat global word view for gather_global_src."""
    return word_view(cb, v).reshape(-1)
