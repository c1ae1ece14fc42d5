"""Stored VPTQ layer (vptq.kernels.layout.PackedLayer) -> dense weight: the dequantize kernels.

`dequantize_ref` is the torch oracle (the arithmetic of vptq-method.md 2.1, in the output dtype);
`dequantize` is the numba.cuda kernel with the same signature: one thread per (original column j,
row of vectors r) writes the v outputs W[r*v : r*v+v, j], so consecutive threads write
consecutive columns (coalesced stores); the centroid is fetched as 64-bit words (four fp16 values
per load) and computed in float32, rounded once to the output dtype. Layouts without outlier
columns take the row-staged kernel (`_kernel2`: packed rows and small codebooks in shared memory,
16-byte stores); `dequantize(..., path=...)` picks one explicitly.
"""

from __future__ import annotations

import functools

import torch

from . import _numba as nb
from .codegen import (
    CB_SMEM_MAX,
    ceil16,
    device_helpers,
    fill_src,
    gather_global_src,
    gather_smem_src,
    kernel_env,
    pair_sel,
    plane_bases_src,
    smem_codebook_bytes,
    words_global_src,
    words_smem_src,
)
from .layout import (
    LOC_MASK,
    LOC_SHIFT,
    MAX_V,
    PackedLayer,
    check_layer,
    column_map,
    flat_word_view,
    flat_words,
    perm64,
    unpack_codes,
    word_view,
)

THREADS = 128  # threads per block along the columns

cuda = float32 = int64 = None  # bound lazily by _kernel(): numba is optional


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
        w = w[:, torch.argsort(perm64(p.perm))]
    if p.weight_scale is not None:
        w = w * p.weight_scale.to(dtype)[None, :] + p.weight_bias.to(dtype)[None, :]
    return w



@functools.cache
def _kernel(v: int, has_res: bool, has_out: bool, has_norm: bool, threads: int):
    global cuda, float32, int64
    read_code, add_centroid = device_helpers(v)
    cuda = nb.cuda()  # a module global: the simulator swaps it for its fake module inside kernels
    from numba import float32, int64

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


def dequantize(p: PackedLayer, dtype: torch.dtype = torch.float16, *, colmap: torch.Tensor | None = None,
               threads: int | None = None, checked: bool = False, path: str | None = None,
               rb: int | None = None, maxreg: int | None = None, h2: bool | None = None,
               blocks: int | None = None, grid: int | None = None, ranges: bool = True,
               contig: bool | None = None) -> torch.Tensor:
    """numba.cuda dequantization; same contract as `dequantize_ref` (dtype fp16 or fp32).

    Two kernels: "staged" (rows of packed codes staged in shared memory, codebooks there too when
    they fit, 16-byte stores; every layout without outlier columns) and "columns" (one thread per
    column and row of vectors; every layout). `path` forces one; default: staged where it applies.
    """
    if not checked:
        check_layer(p, kernel=True)
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"dtype: the kernel writes float16 or float32, got {dtype}")
    dev = p.device
    m, n, v = p.out_features, p.in_features, p.vector_len
    if colmap is None:
        colmap = column_map(p)
    if path not in (None, "staged", "columns"):
        raise ValueError(f"path: {path!r} is not 'staged' or 'columns'")
    cfg = None if path == "columns" else dequant2_config(p, dtype, threads or DQ_THREADS, rb=rb, maxreg=maxreg,
                                                         h2=h2, blocks=blocks, grid=grid, ranges=ranges,
                                                         contig=contig)
    if path == "staged" and cfg is None:
        raise ValueError("path: the row-staged kernel needs no outlier columns and the packed rows in shared memory")
    if cfg is not None:
        return dequantize2(p, dtype, colmap, cfg)
    threads = threads or THREADS
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


class DequantPlan:
    """Per-layer prepared dequantize for repeated calls (VQuantLinear above the gemv's row count):
    the launch configuration found once per dtype, the constant arguments marshalled once, so a
    call costs an allocation and one driver launch instead of the config search and numba's
    dispatcher on ~20 arguments. `p` is already checked; `colmap` is column_map(p)."""

    def __init__(self, p: PackedLayer, colmap: torch.Tensor):
        self.p, self.colmap = p, colmap
        self.sim = nb.simulator_enabled()
        self._cfg: dict = {}
        self._fast: dict = {}
        self._keep: dict = {}  # the marshalled arguments' tensors, alive as long as the record

    def __call__(self, dtype: torch.dtype) -> torch.Tensor:
        p = self.p
        fast = self._fast.get(dtype)
        if fast is not None:
            return self._launch_fast(dtype, *fast)
        if dtype not in self._cfg:
            self._cfg[dtype] = dequant2_config(p, dtype)
        cfg = self._cfg[dtype]
        if cfg is None:
            return dequantize(p, dtype, colmap=self.colmap, checked=True, path="columns")
        kern, args, out = dequant2_launch(p, dtype, self.colmap, cfg)
        nb.launch(kern, cfg["grid"], cfg["threads"], nb.stream_for(p.indices), *args, shmem=cfg["shmem"])
        # the pre-marshalled launch: out and its int64 view are the last tensors (args[-5], args[-4]; the
        # view is a placeholder without 16-byte stores); not prepared while a CUDA graph is being
        # captured (the byte check below waits for the device)
        if not self.sim and not torch.cuda.is_current_stream_capturing():
            rec = nb.prepare_tail(kern, (cfg["grid"], 1), cfg["threads"], cfg["shmem"], args[:-5], args[-3:])
            placeholder = None if cfg["vec"] else args[-4]
            # kept only if its first launch writes the dispatcher's bytes (one device sync a layer and dtype)
            if rec is not None and torch.equal(self._launch_fast(dtype, rec, placeholder), out):
                self._keep[dtype] = args[:-5]
                self._fast[dtype] = (rec, placeholder)
        return out

    def _launch_fast(self, dtype: torch.dtype, rec: tuple, placeholder: torch.Tensor | None) -> torch.Tensor:
        p = self.p
        out = torch.empty(p.out_features, p.in_features, dtype=dtype, device=p.device)
        nb.launch_tail(rec, out, out.view(torch.int64) if placeholder is None else placeholder)
        return out


# ------------------------------------------------------------- dequantize, row-staged kernel
DQ_THREADS = 256
NS_STAGE = 8  # packed words staged per thread and step (loads in flight together)
DQ_MAXREG = 128  # register cap of the row-staged kernel (0: the compiler's choice): 2 blocks per SM
DQ_BLOCKS = 2  # resident blocks per SM the staged rows leave room for
DQ_MAXREG_H2 = 80  # the half2 variant: fp16 pairs instead of fp32 values, 3 blocks per SM
DQ_BLOCKS_H2 = 3  # H100 (bench/dequant_probe.py): 28672x8192 v4-k256 225.6 (fp32 path) -> 228.8 us,
# v5-k1024 284.2 -> 229.1, v6-k4096 266.6 -> 232.7; 8192x28672 v4-k256 294.4 -> 278.2 us
MAX_ROWS_PER_STEP = 4


def _stage_words_src(tot: str, var: str, load: str, zero: str, store: str, threads: int, ind: str) -> list[str]:
    """Kernel lines: stage `tot` packed words of a block's rows in shared memory, NS_STAGE words per
    thread and step, every load issued before the stores (the loop is latency-bound). Word q ->
    (row _rr, word _k, group _g) by multiply-shifts with _M1/_M2; load/store are templates in {i}."""
    i1, i2 = ind + "    ", ind + "        "
    L = [f"{ind}_tot = {tot}", f"{ind}for _i0 in range(tid, _tot, {threads * NS_STAGE}):"]
    for i in range(NS_STAGE):
        L += [f"{i1}_q{i} = _i0 + {i * threads}",
              f"{i1}_rr{i} = (_q{i} * _M1) >> 32",
              f"{i1}_k{i} = _q{i} - _rr{i} * _dv1",
              f"{i1}_g{i} = (_k{i} * _M2) >> 32",
              f"{i1}_ok{i} = _q{i} < _tot and r0 + _rr{i} < re",
              f"{i1}{var}{i} = {load.format(i=i)} if _ok{i} else {zero}"]
    for i in range(NS_STAGE):
        L += [f"{i1}if _ok{i}:", f"{i2}{store.format(i=i)} = {var}{i}"]
    return L


def contig_codes_src(bits: int, ind: str) -> list[str]:
    """Kernel lines loading the 8 consecutive codes of columns jb..jb+7 of staged row rr (jb a multiple
    of 8; the row starts on an 8-byte boundary): 8-bit: one int64 (_k0); 16-bit: two (_k0, _k1);
    10-bit: the three int32 words holding their 80 bits, which start at bit 16 * (jb / 8 % 2) of the
    first, shifted down into _k0 (bits 0-63) and _k1 (the 16 above)."""
    if bits == 8:
        return [f"{ind}_k0 = s64[uint64((wb + jb) >> 3)]"]
    if bits == 16:
        return [f"{ind}_kq = uint64((wb + jb) >> 2)", f"{ind}_k0 = s64[_kq]", f"{ind}_k1 = s64[_kq + 1]"]
    return [f"{ind}_kq = uint64(ww + (((jb >> 3) * 5) >> 1))",
            f"{ind}_x0 = int64(s32[_kq]) & 0xFFFFFFFF",
            f"{ind}_x1 = int64(s32[_kq + 1]) & 0xFFFFFFFF",
            f"{ind}_x2 = int64(s32[_kq + 2]) & 0xFFFFFFFF",
            f"{ind}if (jb >> 3) & 1:",
            f"{ind}    _k0 = (_x0 >> 16) | (_x1 << 16) | (_x2 << 48)",
            f"{ind}    _k1 = _x2 >> 16",
            f"{ind}else:",
            f"{ind}    _k0 = _x0 | (_x1 << 32)",
            f"{ind}    _k1 = _x2"]


def contig_code(bits: int, u: int) -> str:
    """Expression of code u (0..7) of contig_codes_src's words (masked: the shifts are arithmetic)."""
    if bits == 8:
        return f"((_k0 >> {8 * u}) & 255)"
    if bits == 16:
        return f"((_k{u // 4} >> {16 * (u % 4)}) & 65535)"
    if u < 6:
        return f"((_k0 >> {10 * u}) & 1023)"
    if u == 6:
        return "(((_k0 >> 60) & 15) | ((_k1 & 63) << 4))"
    return "((_k1 >> 6) & 1023)"


@functools.cache
def _kernel2(v: int, bits: int, main_bits: int, has_res: bool, has_norm: bool, cb_smem: bool, half: bool,
             vec: bool, cpt: int, threads: int, maxreg: int = 0, h2: bool = False, colvec: bool = False,
             one_group: bool = False, ranges: bool = True, contig: bool = False):
    """Row-staged dequantization: a block walks a contiguous range of rows of vectors (`rb` per step),
    stages their packed words in shared memory with coalesced 8-byte loads, then each thread
    produces `cpt` consecutive original columns x v output rows: one code per column read from
    shared memory (perm and groups through the column map), the centroid from the shared
    planes (small codebooks) or from global memory (16-byte loads), scale/bias in fp32, and
    one 16-byte (fp16, cpt = 8) or 8-byte (cpt = 4) store per output row.

    h2 (fp16 output, 8 columns per thread, N a multiple of 8): the centroid words are not
    converted: each output row's 8 values are built as 4 fp16 pairs of neighbouring columns
    (one prmt each), the residual added and scale/bias applied in half2 (`add.rn.f16x2`,
    `fma.rn.f16x2`: rounded once, as the fp32 path) and stored as one 16-byte word. 8- and 16-bit
    codes are read with one byte-addressed shared load instead of a word load and a shift.
    colvec (h2 with fp16 scale/bias): colmap, scale and bias arrive as int64 views and a thread's
    8 columns of them are 4 16-byte loads, the scale/bias pairs used as loaded (no conversion).
    one_group (G = 1, every preset): no group arithmetic (the column map's group field is ignored).
    ranges: each block walks one contiguous range of rows (else rb-row steps grid-stride).
    contig (h2, one group, no permutation: the column map is the identity, every preset's stored
    layout): a thread's 8 columns have 8 consecutive codes, read with one or two 8-byte shared loads
    (8- and 16-bit codes) or three 4-byte ones (10-bit) instead of one load per code, and no column map."""
    c = nb.cuda()
    if contig and not (h2 and one_group and bits in (8, 10, 16)):
        raise ValueError("contig: needs the half2 kernel, one group and 8-, 10- or 16-bit codes")
    byte_codes = bits in (8, 16)
    per_word = 32 // bits  # codes per 32-bit staged word (byte_codes)
    mask = (1 << bits) - 1
    cross = 32 % bits != 0 and bits % 32 != 0  # codes may straddle two words
    ind = "    "
    L = ["def dequant2(indices, idx64, cbg, rcbg, cbw, rcbw, colmap, scale, wbias, out, out64, k, kr, rb):",
         f"{ind}s64 = cuda.shared.array(0, int64)",
         f"{ind}s32 = cuda.shared.array(0, int32)",
         f"{ind}s16 = cuda.shared.array(0, int16)",
         f"{ind}s8 = cuda.shared.array(0, uint8)",
         f"{ind}m = out.shape[0]",
         f"{ind}n = out.shape[1]",
         f"{ind}n4 = n >> 2",
         f"{ind}nrows = indices.shape[1]",
         f"{ind}ngroups = indices.shape[0]",
         f"{ind}nwords = indices.shape[2]",
         f"{ind}tid = cuda.threadIdx.x",
         f"{ind}K = ngroups * k",
         f"{ind}KR = ngroups * kr"]
    if cb_smem:
        L += plane_bases_src(v, "K", "KR" if has_res else None, ind)
        L += fill_src(v, "cbg", "K", "m", threads, ind)
        if has_res:
            L += fill_src(v, "rcbg", "KR", "r", threads, ind)
    else:
        L.append(f"{ind}cbbytes = 0")
    L += [f"{ind}ow = cbbytes // 4",  # int32 index of the staged words
          f"{ind}nwr = ngroups * nwords",
          f"{ind}even = nwords % 2 == 0",
          f"{ind}nw2 = nwords // 2",
          # staged word q -> (row, group, word): a multiply by ceil(2^32 / d) and a shift instead of
          # two 64-bit divisions per word (exact: q < 2^32 / d here); the divisions were ~3
          # instructions per output value, more than the rest of the kernel (Nsight Compute)
          f"{ind}_dv1 = ngroups * nw2 if even else nwr",
          f"{ind}_dv2 = max(nw2, 1) if even else nwords",
          f"{ind}_M1 = ((int64(1) << 32) + _dv1 - 1) // _dv1",
          f"{ind}_M2 = ((int64(1) << 32) + _dv2 - 1) // _dv2"]
    if ranges:
        # a block's rows are one contiguous range, the ranges of the blocks a row apart in length: with
        # rb-row steps dealt out grid-stride, some blocks took a step more than others (8192x8192:
        # 512 steps over 396 blocks), and the last of them set the time. H200 (bench/RESULTS.md,
        # 2026-12-03 (6)): v5-k1024 8192x8192 65.4 -> 57.0 us, 28672x8192 176.6 -> 161.9; v4-k256
        # 8192x8192 55.8 -> 51.8; the rest within -3..+5 %
        L += [f"{ind}rs = (int64(cuda.blockIdx.x) * nrows) // cuda.gridDim.x",
              f"{ind}re = (int64(cuda.blockIdx.x + 1) * nrows) // cuda.gridDim.x",
              f"{ind}for r0 in range(rs, re, rb):"]
    else:  # rb-row steps dealt out grid-stride (the kernel before 2026-12-03 (6); kept for the probe)
        L += [f"{ind}re = nrows", f"{ind}for r0 in range(cuda.blockIdx.x * rb, nrows, cuda.gridDim.x * rb):"]
    L += [f"{ind * 2}cuda.syncthreads()", f"{ind * 2}if even:"]
    L += _stage_words_src("rb * ngroups * nw2", "_d", "idx64[_g{i}, r0 + _rr{i}, _k{i} - _g{i} * nw2]", "int64(0)",
                          "s64[ow // 2 + _rr{i} * (nwr // 2) + _k{i}]", threads, ind * 3)
    L.append(f"{ind * 2}else:")
    L += _stage_words_src("rb * nwr", "_e", "indices[_g{i}, r0 + _rr{i}, _k{i} - _g{i} * nwords]", "int32(0)",
                          "s32[ow + _q{i}]", threads, ind * 3)
    L += [f"{ind * 2}cuda.syncthreads()",
          f"{ind * 2}for jb in range(tid * {cpt}, n, {threads * cpt}):",
          f"{ind * 3}full = jb + {cpt} <= n"]
    i3, i4, i5, i6 = ind * 3, ind * 4, ind * 5, ind * 6

    def grp(u: int) -> str:
        """The group's offset in the staged row (none for one group)."""
        return "" if one_group else f" + g{u} * nwords * {per_word if byte_codes else 32}"

    for u in range(cpt if colvec and not contig else 0):
        if u % 4 == 0:
            L.append(f"{i3}_ca, _cb = ld128(colmap, (jb >> 1) + {u // 2})")
        w = "_ca" if u % 4 < 2 else "_cb"
        L += [f"{i3}_l = {w} >> 32" if u % 2 else f"{i3}_l = {w} & 0xFFFFFFFF",
              f"{i3}g{u} = {0 if one_group else f'(_l >> {LOC_SHIFT}) - 1'}",
              f"{i3}bo{u} = (_l & {LOC_MASK}){grp(u)}" if byte_codes else
              f"{i3}bo{u} = (_l & {LOC_MASK}) * {bits}{grp(u)}"]
    if colvec and has_norm:
        L += [f"{i3}s2_0, s2_2 = ld128(scale, jb >> 2)", f"{i3}s2_1 = s2_0 >> 32", f"{i3}s2_3 = s2_2 >> 32",
              f"{i3}b2_0, b2_2 = ld128(wbias, jb >> 2)", f"{i3}b2_1 = b2_0 >> 32", f"{i3}b2_3 = b2_2 >> 32"]
    for u in range(0 if colvec or (contig and not has_norm) else cpt):
        L.append(f"{i3}if jb + {u} < n:")
        if not contig:
            L += [f"{i4}_l = int64(colmap[jb + {u}])",
                  f"{i4}g{u} = {0 if one_group else f'(_l >> {LOC_SHIFT}) - 1'}",
                  f"{i4}bo{u} = (_l & {LOC_MASK}){grp(u)}" if byte_codes else
                  f"{i4}bo{u} = (_l & {LOC_MASK}) * {bits}{grp(u)}"]
        if has_norm:
            L += [f"{i4}sc{u} = float32(scale[jb + {u}])", f"{i4}bi{u} = float32(wbias[jb + {u}])"]
        L += [f"{i3}else:", f"{i4}g{u} = 0", f"{i4}bo{u} = 0"]
        if has_norm:
            L += [f"{i4}sc{u} = float32(0.0)", f"{i4}bi{u} = float32(0.0)"]
    for u in range(0 if contig else cpt):
        # per column, not per row: a staged row starts on a word, so the code's word within the row
        # and its shift are the column's; and the group's first centroid (bench/sass.py: the row loop's
        # 64-bit bit arithmetic was half of its instructions)
        if not byte_codes:
            L += [f"{i3}bw{u} = int32(bo{u} >> 5)", f"{i3}bs{u} = int32(bo{u} & 31)"]
            if cross:
                L.append(f"{i3}cr{u} = bs{u} > {32 - bits}")
        if not one_group:
            L.append(f"{i3}gk{u} = g{u} * k")
            if has_res:
                L.append(f"{i3}gr{u} = g{u} * kr")
    wide_store = h2 or (half and vec and cpt == 8)  # the output rows are stored 16 bytes at a time
    if wide_store:
        L.append(f"{i3}jb4 = jb >> 2")
    if h2 and has_norm and not colvec:  # fp16 pairs of neighbouring columns' scale and bias
        for i in range(cpt // 2):
            L += [f"{i3}s2_{i} = f2h(sc{2 * i}) | (f2h(sc{2 * i + 1}) << 16)",
                  f"{i3}b2_{i} = f2h(bi{2 * i}) | (f2h(bi{2 * i + 1}) << 16)"]
    L += [f"{i3}for rr in range(rb):",
          f"{i4}r = r0 + rr",
          f"{i4}if r < re:",
          f"{i5}wb = (ow + rr * nwr) * {per_word}" if byte_codes else f"{i5}ww = ow + rr * nwr"]
    if wide_store:  # 16-byte index of (row r * v, column jb) of the output (its rows are whole 16-byte words)
        L.append(f"{i5}ob = r * {v} * n4 + jb4")
    if contig:
        L += contig_codes_src(bits, i5)
    srcs, rsrcs = [], []
    for u in range(cpt):
        if contig:
            L.append(f"{i5}_c = {contig_code(bits, u)}")
        elif byte_codes:
            ld = f"int64(s8[uint64(wb + bo{u})])" if bits == 8 else f"(int64(s16[uint64(wb + bo{u})]) & 0xFFFF)"
            L.append(f"{i5}_c = {ld}")
        else:
            L += [f"{i5}_w = ww + bw{u}",
                  f"{i5}_x = int64(s32[uint64(_w)]) & 0xFFFFFFFF"]
            if cross:
                L += [f"{i5}if cr{u}:",
                      f"{i6}_x |= (int64(s32[uint64(_w + 1)]) & 0xFFFFFFFF) << 32"]
            L.append(f"{i5}_c = (_x >> bs{u}) & {mask}")
        main = f"(_c & {(1 << main_bits) - 1})" if has_res else "_c"
        L.append(f"{i5}_cm = {main}" if one_group else f"{i5}_cm = gk{u} + {main}")
        if has_res:
            L.append(f"{i5}_cr = (_c >> {main_bits})" if one_group else f"{i5}_cr = gr{u} + (_c >> {main_bits})")
        if h2:
            if cb_smem:
                lm, sm = words_smem_src(v, "_cm", "K", "m", f"_m{u}_", i5)
            else:
                lm, sm = words_global_src(v, "cbw", "_cm", f"_m{u}_", i5)
            L += lm
            srcs.append(sm)
            if has_res:
                if cb_smem:
                    lr, sr = words_smem_src(v, "_cr", "KR", "r", f"_r{u}_", i5)
                else:
                    lr, sr = words_global_src(v, "rcbw", "_cr", f"_r{u}_", i5)
                L += lr
                rsrcs.append(sr)
            continue
        if cb_smem:
            L += gather_smem_src(v, "_cm", "K", "m", f"v{u}_", False, i5)
            if has_res:
                L += gather_smem_src(v, "_cr", "KR", "r", f"v{u}_", True, i5)
        else:
            L += gather_global_src(v, "cbw", "_cm", f"v{u}_", False, i5)
            if has_res:
                L += gather_global_src(v, "rcbw", "_cr", f"v{u}_", True, i5)
        if has_norm:
            for t in range(v):
                L.append(f"{i5}v{u}_{t} = v{u}_{t} * sc{u} + bi{u}")
    for t in range(v):
        L += [f"{i5}row = r * {v} + {t}", f"{i5}if row < m:"]
        if h2:
            for i in range(cpt // 2):
                (ea, ha), (eb, hb) = srcs[2 * i][t], srcs[2 * i + 1][t]
                L.append(f"{i6}_p{i} = hpair({ea}, {eb}, {pair_sel(ha, hb)})")
                if has_res:
                    (ea, ha), (eb, hb) = rsrcs[2 * i][t], rsrcs[2 * i + 1][t]
                    L.append(f"{i6}_p{i} = hadd2(_p{i}, hpair({ea}, {eb}, {pair_sel(ha, hb)}))")
                if has_norm:
                    L.append(f"{i6}_p{i} = hfma2(_p{i}, s2_{i}, b2_{i})")
            L.append(f"{i6}st128w(out64, ob + {t} * n4, _p0, _p1, _p2, _p3)")
            continue
        if half and vec:
            L.append(f"{i6}if full:")
            hs = ", ".join(f"f2h(v{u}_{t})" for u in range(cpt))
            if cpt == 8:
                L += [f"{i6}    _lo, _hi = pack8({hs})", f"{i6}    st128(out64, ob + {t} * n4, _lo, _hi)"]
            else:  # cpt == 4: one 8-byte store
                L += [f"{i6}    out64[row, jb >> 2] = pack4({hs})"]
            L.append(f"{i6}else:")
            for u in range(cpt):
                L += [f"{i6}    if jb + {u} < n:", f"{i6}        out[row, jb + {u}] = v{u}_{t}"]
        else:
            for u in range(cpt):
                L += [f"{i6}if jb + {u} < n:", f"{i6}    out[row, jb + {u}] = v{u}_{t}"]
    src = "\n".join(L) + "\n"
    hpair, hadd2, hfma2 = nb.half2_ops()
    env = {**kernel_env(), "f2h": nb.float_to_half_bits(), "st128": nb.store_128(), "pack4": _packers()[0],
           "pack8": _packers()[1], "hpair": hpair, "hadd2": hadd2, "hfma2": hfma2, "st128w": nb.store_128w()}
    fn = nb.compile_source(src, "dequant2", env,
                           f"dequant2-v{v}-b{bits}-{main_bits}-{has_res}-{cb_smem}-{half}-{'h2' if h2 else ''}{'-g1' if one_group else ''}"
                           f"{'' if ranges else '-gs'}{'-c' if contig else ''}")
    return c.jit(fn, max_registers=maxreg) if maxreg and not nb.simulator_enabled() else c.jit(fn)


@functools.cache
def _packers():
    """(pack4, pack8): four / eight 16-bit values -> one / two int64 words, value 0 in the low bits."""
    c = nb.cuda()
    if nb.simulator_enabled():
        @c.jit(device=True)
        def pack4(a, b, d, e):
            return nb.wrap64(int(a) | (int(b) << 16) | (int(d) << 32) | (int(e) << 48))
    else:
        @c.jit(device=True, forceinline=True)
        def pack4(a, b, d, e):
            return a | (b << 16) | (d << 32) | (e << 48)

    @c.jit(device=True)
    def pack8(a0, a1, a2, a3, a4, a5, a6, a7):
        return pack4(a0, a1, a2, a3), pack4(a4, a5, a6, a7)

    return pack4, pack8


def dequant2_config(p: PackedLayer, dtype: torch.dtype, threads: int = DQ_THREADS, *, rb: int | None = None,
                    maxreg: int | None = None, h2: bool | None = None, blocks: int | None = None,
                    grid: int | None = None, ranges: bool = True, contig: bool | None = None) -> dict | None:
    """Launch configuration of the row-staged kernel for this layer, or None (old kernel).

    h2: the half2 variant (default: wherever it applies: fp16 out, v <= 8, N % 8 == 0). blocks:
    resident blocks per SM aimed at (default DQ_BLOCKS / DQ_BLOCKS_H2); rb (rows of vectors staged
    per step) defaults to the most that leaves them room; maxreg caps the registers (0: the
    compiler's choice). The grid (default) is what is resident at once (registers and shared memory
    both counted: a second partial wave costs more than walking more rows saves), at most one
    block per rb rows; each block walks a contiguous range of rows (ranges=False: rb-row steps
    grid-stride, the earlier kernel, for comparison). contig: read a thread's 8 consecutive codes
    together (default: wherever the column map is the identity: h2, one group, no permutation, 8-,
    10- or 16-bit codes; False: a code at a time through the column map, for comparison)."""
    if p.outlier_size or p.vector_len > MAX_V:
        return None
    v = p.vector_len
    cb = smem_codebook_bytes(p)
    cb_smem = cb <= CB_SMEM_MAX
    cbb = cb if cb_smem else 0
    row_bytes = ceil16(p.group_num * p.indices.shape[2] * 4)
    limit = nb.smem_optin()
    half = dtype == torch.float16
    cpt = (8 if v <= 8 else 4) if half else 4
    vec = half and p.in_features % cpt == 0
    h2_ok = vec and cpt == 8
    if h2 and not h2_ok:
        raise ValueError("h2: the half2 kernel needs fp16 output, vector_len <= 8 and in_features % 8 == 0")
    h2 = h2_ok if h2 is None else bool(h2)
    if blocks is None:
        blocks = DQ_BLOCKS_H2 if h2 else DQ_BLOCKS
    if maxreg is None:
        maxreg = DQ_MAXREG_H2 if h2 else DQ_MAXREG
    if rb is None:
        rb = MAX_ROWS_PER_STEP
        while rb > 1 and cbb + rb * row_bytes > max(limit // blocks - 2048, cbb + row_bytes):
            rb //= 2
    if rb < 1:
        raise ValueError(f"rb: {rb} rows per step")
    shmem = cbb + rb * row_bytes
    if shmem > limit:
        return None
    if nb.simulator_enabled():
        sms, per_sm = 2, 1
    else:
        sms = nb.sm_count()
        by_regs = 65536 // ((maxreg or 255) * threads)  # maxreg 0: assume the worst
        per_sm = max(1, min(limit // max(shmem + 1024, 1), 2048 // threads, by_regs))
    if grid is None:
        grid = max(1, min(nb.cdiv(p.rows, rb), sms * per_sm))
    elif grid < 1:
        raise ValueError(f"grid: {grid} blocks")
    # 8- and 16-bit codes are read 8 bytes at a time: every staged row must start on an 8-byte boundary
    contig_ok = bool(h2 and p.perm is None and p.group_num == 1 and (
        p.code_bits == 10 or (p.code_bits in (8, 16) and p.indices.shape[2] % 2 == 0)))
    if contig and not contig_ok:
        raise ValueError("contig: needs the half2 kernel, one group, no permutation and 8-, 10- or 16-bit codes")
    contig = contig_ok if contig is None else bool(contig)
    return dict(cb_smem=cb_smem, rb=rb, shmem=shmem, half=half, cpt=cpt, vec=vec, grid=grid, threads=threads,
                maxreg=maxreg, h2=h2, ranges=bool(ranges), contig=contig)


def dequantize2(p: PackedLayer, dtype: torch.dtype, colmap: torch.Tensor, cfg: dict) -> torch.Tensor:
    kern, args, out = dequant2_launch(p, dtype, colmap, cfg)
    nb.launch(kern, cfg["grid"], cfg["threads"], nb.stream_for(p.indices), *args, shmem=cfg["shmem"])
    return out


def dequant2_launch(p: PackedLayer, dtype: torch.dtype, colmap: torch.Tensor, cfg: dict) -> tuple:
    """(compiled row-staged kernel, its arguments, the output they write) for dequant2_config's cfg."""
    dev = p.device
    v = p.vector_len
    m, n = p.out_features, p.in_features
    out = torch.empty(m, n, dtype=dtype, device=dev)
    out64 = out.view(torch.int64) if cfg["vec"] else torch.zeros(1, 1, dtype=torch.int64, device=dev)
    words = p.indices.shape[2]
    idx64 = p.indices.view(torch.int64) if words % 2 == 0 else torch.zeros(1, 1, 1, dtype=torch.int64, device=dev)
    has_res = p.num_res_centroids > 0
    res = p.res_centroids if has_res else p.centroids
    # 16-byte column loads: fp16 scale/bias (or none), every column array 16-byte aligned
    norm = [t for t in (p.weight_scale, p.weight_bias) if t is not None]
    colvec = bool(cfg["h2"] and all(t.dtype == torch.float16 for t in norm)
                  and all(t.data_ptr() % 16 == 0 for t in (colmap, *norm)))
    kern = _kernel2(v, p.code_bits, p.main_bits, has_res, p.weight_scale is not None, cfg["cb_smem"], cfg["half"],
                    cfg["vec"], cfg["cpt"], cfg["threads"], cfg["maxreg"], cfg["h2"], colvec, p.group_num == 1,
                    cfg["ranges"], cfg["contig"])
    f16 = nb.dummy(dev, torch.float16)
    cols = [colmap, p.weight_scale if p.weight_scale is not None else f16,
            p.weight_bias if p.weight_bias is not None else f16]
    if colvec:
        cols = [t.view(torch.int64) if t.numel() > 1 else t for t in cols]
    args = [p.indices, idx64, flat_words(p.centroids, v), flat_words(res, v), flat_word_view(p.centroids, v),
            flat_word_view(res, v), *cols, out, out64, p.num_centroids, p.num_res_centroids, cfg["rb"]]
    return kern, args, out
