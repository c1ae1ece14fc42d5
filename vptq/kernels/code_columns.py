"""Packed codes with their columns reordered: the row kernel's copy of the codes in the original
column order.

Why: with one group and no outlier columns, the stored permutation is a relabelling of the
columns (each column has its own codes, scale and bias). The row gemv reads x' = x[perm] * scale
for every row tile it stages, a gather through the permutation that costs 4-12 % of its time on the
H200 (bench/RESULTS.md, 2026-12-03 (6), the `xperm` ablation). A plan that keeps its own copy of
the codes anyway (interleaved codes, VPTQ_INTERLEAVE_CODES=1) can keep that copy with its columns
in the original order, and then reads x and the scale in order. The module's buffers, and every
other kernel, keep the stored order.
"""

from __future__ import annotations

import torch

from .layout import unpack_codes

ROWS_PER_CHUNK = 1024  # rows of codes unpacked at a time (10-bit codes: bounded temporary memory)


def permute_code_columns(indices: torch.Tensor, bits: int, order: torch.Tensor) -> torch.Tensor:
    """indices (G, R, words) int32, every row `words * 32 / bits` codes of `bits` bits packed LSB
    first with no padding -> the same with column i holding input column order[i]."""
    g, r, words = indices.shape
    n = words * 32 // bits
    if words * 32 != n * bits:
        raise ValueError(f"indices: {words} words a row are not whole {bits}-bit codes")
    if order.shape != (n,):
        raise ValueError(f"order: expected {n} columns, got {tuple(order.shape)}")
    order = order.to(device=indices.device, dtype=torch.int64)
    if bits in (8, 16):  # whole bytes: reorder them directly
        dt = torch.uint8 if bits == 8 else torch.int16
        return indices.view(dt).index_select(2, order).contiguous().view(torch.int32)
    out = torch.empty_like(indices)
    pos = torch.arange(n, device=indices.device) * bits
    w0, sh = pos >> 5, pos & 31
    cross = sh + bits > 32  # codes that run into the next word
    for r0 in range(0, r, ROWS_PER_CHUNK):
        codes = unpack_codes(indices[:, r0:r0 + ROWS_PER_CHUNK], bits, n).index_select(2, order)
        acc = torch.zeros(*codes.shape[:2], words + 1, dtype=torch.int64, device=indices.device)
        # the codes' bits do not overlap, so adding the shifted pieces into their words packs them
        acc.index_add_(2, w0, (codes << sh) & 0xFFFFFFFF)
        acc.index_add_(2, w0[cross] + 1, codes[..., cross] >> (32 - sh[cross]))
        acc = acc[..., :words]
        out[:, r0:r0 + ROWS_PER_CHUNK] = torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)
    return out
