"""What the kernels share: the names their generated sources compile against, the per-code device
functions of the column-per-thread dequantize and the L2 gemv, and the source generators that read
a centroid or write a gemv's sums.

Generated kernels (dequant.py's row-staged one, gemv_smem.py, gemv_rows.py) are Python source
built line by line, every per-code step unrolled into scalar variables, and compiled by
`_numba.compile_source` with `kernel_env()` as their globals. The generators here emit the pieces
more than one of them uses: copying a codebook into shared memory and gathering a centroid from
there (the "planes" layout below) or from global memory, and a gemv block's sums -> y or the
split-K workspace (`store_sum_src`, `split_epilogue_src`).
"""

from __future__ import annotations

import functools

from . import _numba as nb
from .layout import PackedLayer

WARP = 32  # lanes of a warp (the simulator has no shuffles: its gemv kernels take warps of 1)

cuda = float32 = int64 = None  # bound lazily by _jit_env(): numba is optional


def _jit_env():
    global cuda, float32, int64
    cuda = nb.cuda()  # a module global: the simulator swaps it for its fake module inside kernels
    from numba import float32, int64


def kernel_env() -> dict:
    """Names every generated kernel may use."""
    from numba import int16, int32, uint8, uint64

    _jit_env()
    return {"cuda": cuda, "int64": int64, "int32": int32, "int16": int16, "uint8": uint8, "uint64": uint64,
            "float32": float32,
            "h2f": nb.half_bits_to_float(), "ld128": nb.load_128()}


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


# ------------------------------------------------------------- codebooks in shared memory
# Small codebooks (v6-k4096: 48 KiB, v4-k4096: 32 KiB) are copied into shared memory once per
# block and gathered from there instead of from L2. Layout ("planes", one per 4/2/1 fp16 values
# of a centroid, each indexed by the code): floor(v/4) planes of int64, then one int32 plane if
# v % 4 >= 2, then one int16 plane if v is odd; main codebook (all groups: entry g*k + c) at
# byte 0, residual codebook at byte ceil16(main bytes). A v=6 centroid is then one 8-byte and
# one 4-byte shared load at entry-strided addresses (fewer bank conflicts than 3 x 4 bytes).
CB_SMEM_MAX = 96 * 1024  # codebook bytes (main + residual) the kernels keep in shared memory


def ceil16(b: int) -> int:
    return -(-b // 16) * 16


def smem_codebook_bytes(p: PackedLayer) -> int:
    """Bytes of the shared-memory copy of every codebook of the layer (all groups, main + residual)."""
    v, g = p.vector_len, p.group_num
    b = ceil16(g * p.num_centroids * v * 2)
    if p.num_res_centroids:
        b += ceil16(g * p.num_res_centroids * v * 2)
    return b


def planes(v: int) -> tuple[int, int, int]:
    """(int64 planes, int32 plane 0/1, int16 plane 0/1) of a centroid of v fp16 values."""
    return v // 4, (v % 4) // 2, v % 2


def plane_bases_src(v: int, kname: str, krname: str | None, ind: str) -> list[str]:
    """Kernel lines defining the plane base indices m64/m32/m16 (main) and r64/r32/r16 (residual)
    in units of each plane's dtype, and `cbbytes` (bytes of the codebooks, a multiple of 16)."""
    q, d, _ = planes(v)
    out = [f"{ind}m64 = 0",
           f"{ind}m32 = ({q} * {kname} * 8) // 4",
           f"{ind}m16 = ({q} * {kname} * 8 + {d} * {kname} * 4) // 2",
           f"{ind}mbytes = ({kname} * {2 * v} + 15) // 16 * 16"]
    if krname:
        out += [f"{ind}r64 = mbytes // 8",
                f"{ind}r32 = (mbytes + {q} * {krname} * 8) // 4",
                f"{ind}r16 = (mbytes + {q} * {krname} * 8 + {d} * {krname} * 4) // 2",
                f"{ind}cbbytes = mbytes + ({krname} * {2 * v} + 15) // 16 * 16"]
    else:
        out += [f"{ind}cbbytes = mbytes"]
    return out


def fill_src(v: int, src: str, kname: str, pre: str, threads: int, ind: str) -> list[str]:
    """Kernel lines copying a global codebook (flat word view `src`, `kname` entries) into the
    shared planes with bases {pre}64/{pre}32/{pre}16. Loads of NB entries per thread are issued
    before any store so they are in flight together."""
    q, d, o = planes(v)
    even = v % 2 == 0
    hw = v // 2 if even else v  # source words per entry
    nbt = 8 if hw <= 4 else 4
    L = [f"{ind}for _e0 in range(tid, {kname}, {threads * nbt}):"]
    i2 = ind + "    "
    i3 = i2 + "    "
    for i in range(nbt):
        L.append(f"{i2}_e{i} = _e0 + {i * threads}")
        L.append(f"{i2}if _e{i} < {kname}:")
        for j in range(hw):
            L.append(f"{i3}_f{i}_{j} = int64({src}[_e{i} * {hw} + {j}])")
        L.append(f"{i2}else:")
        for j in range(hw):
            L.append(f"{i3}_f{i}_{j} = int64(0)")
    for i in range(nbt):
        L.append(f"{i2}if _e{i} < {kname}:")
        for pl in range(q):
            if even:
                val = f"(_f{i}_{2 * pl} & 0xFFFFFFFF) | (_f{i}_{2 * pl + 1} << 32)"
            else:
                h = [f"_f{i}_{4 * pl + t}" for t in range(4)]
                val = f"({h[0]} & 0xFFFF) | (({h[1]} & 0xFFFF) << 16) | (({h[2]} & 0xFFFF) << 32) | ({h[3]} << 48)"
            L.append(f"{i3}s64[{pre}64 + {pl} * {kname} + _e{i}] = {val}")
        if d:
            val = f"_f{i}_{2 * q}" if even else f"(_f{i}_{4 * q} & 0xFFFF) | (_f{i}_{4 * q + 1} << 16)"
            L.append(f"{i3}s32[{pre}32 + _e{i}] = {val}")
        if o:
            L.append(f"{i3}s16[{pre}16 + _e{i}] = _f{i}_{4 * q + 2 * d}")
    return L


def gather_smem_src(v: int, code: str, kname: str, pre: str, out: str, add: bool, ind: str) -> list[str]:
    """Kernel lines: {out}{t} (=|+=) float32 value t of centroid `code` of the shared planes {pre}."""
    q, d, o = planes(v)
    op = "+=" if add else "="
    L = []
    for pl in range(q):
        L.append(f"{ind}_g{pl} = s64[uint64({pre}64 + {pl} * {kname} + {code})]")
        for h in range(4):
            L.append(f"{ind}{out}{4 * pl + h} {op} h2f(_g{pl} >> {16 * h})")
    if d:
        L.append(f"{ind}_gd = s32[uint64({pre}32 + {code})]")
        L.append(f"{ind}{out}{4 * q} {op} h2f(_gd)")
        L.append(f"{ind}{out}{4 * q + 1} {op} h2f(_gd >> 16)")
    if o:
        L.append(f"{ind}{out}{4 * q + 2 * d} {op} h2f(s16[uint64({pre}16 + {code})])")
    return L


def gather_global_src(v: int, cbw: str, entry: str, out: str, add: bool, ind: str) -> list[str]:
    """Kernel lines: {out}{t} (=|+=) value t of centroid `entry` (g*k + c) read from the global
    codebook word view `cbw` (flat: int64 if v % 4 == 0, int32 if v even, else int16)."""
    op = "+=" if add else "="
    L = []
    if v % 4 == 0:
        nq = v // 4
        if nq % 2 == 0:
            for q2 in range(nq // 2):
                L.append(f"{ind}_ga, _gb = ld128({cbw}, {entry} * {nq} + {2 * q2})")
                for h in range(4):
                    L.append(f"{ind}{out}{8 * q2 + h} {op} h2f(_ga >> {16 * h})")
                    L.append(f"{ind}{out}{8 * q2 + 4 + h} {op} h2f(_gb >> {16 * h})")
        else:
            for qq in range(nq):
                L.append(f"{ind}_ga = {cbw}[uint64({entry} * {nq} + {qq})]")
                for h in range(4):
                    L.append(f"{ind}{out}{4 * qq + h} {op} h2f(_ga >> {16 * h})")
    elif v % 2 == 0:
        for qq in range(v // 2):
            L.append(f"{ind}_ga = {cbw}[uint64({entry} * {v // 2} + {qq})]")
            L.append(f"{ind}{out}{2 * qq} {op} h2f(_ga)")
            L.append(f"{ind}{out}{2 * qq + 1} {op} h2f(_ga >> 16)")
    else:
        for t in range(v):
            L.append(f"{ind}{out}{t} {op} h2f({cbw}[uint64({entry} * {v} + {t})])")
    return L


def words_smem_src(v: int, code: str, kname: str, pre: str, out: str, ind: str) -> tuple[list[str], list]:
    """Kernel lines loading the raw words of centroid `code` of the shared planes {pre} into
    {out}0.. and, per value t < v, (32-bit expression, half) holding its fp16 bits (half 1: the
    high 16 bits). For the half2 kernels, which pair values up with prmt instead of converting."""
    q, d, o = planes(v)
    L, src = [], []
    for pl in range(q):
        L.append(f"{ind}{out}{pl} = s64[uint64({pre}64 + {pl} * {kname} + {code})]")
        src += [(f"{out}{pl}", 0), (f"{out}{pl}", 1), (f"({out}{pl} >> 32)", 0), (f"({out}{pl} >> 32)", 1)]
    if d:
        L.append(f"{ind}{out}d = s32[uint64({pre}32 + {code})]")
        src += [(f"{out}d", 0), (f"{out}d", 1)]
    if o:
        L.append(f"{ind}{out}o = s16[uint64({pre}16 + {code})]")
        src.append((f"{out}o", 0))
    return L, src


def words_global_src(v: int, cbw: str, entry: str, out: str, ind: str) -> tuple[list[str], list]:
    """As words_smem_src, from the global word view `cbw` (gather_global_src's layout)."""
    L, src = [], []
    if v % 4 == 0:
        nq = v // 4
        if nq % 2 == 0:
            for q2 in range(nq // 2):
                L.append(f"{ind}{out}{2 * q2}, {out}{2 * q2 + 1} = ld128({cbw}, {entry} * {nq} + {2 * q2})")
        else:
            for qq in range(nq):
                L.append(f"{ind}{out}{qq} = {cbw}[uint64({entry} * {nq} + {qq})]")
        for qq in range(nq):
            src += [(f"{out}{qq}", 0), (f"{out}{qq}", 1), (f"({out}{qq} >> 32)", 0), (f"({out}{qq} >> 32)", 1)]
    elif v % 2 == 0:
        for qq in range(v // 2):
            L.append(f"{ind}{out}{qq} = {cbw}[uint64({entry} * {v // 2} + {qq})]")
            src += [(f"{out}{qq}", 0), (f"{out}{qq}", 1)]
    else:
        for t in range(v):
            L.append(f"{ind}{out}{t} = {cbw}[uint64({entry} * {v} + {t})]")
            src.append((f"{out}{t}", 0))
    return L, src


def pair_sel(ha: int, hb: int) -> str:
    """prmt selector of the fp16 pair (half ha of a, half hb of b)."""
    return hex((0x32 if ha else 0x10) | ((0x76 if hb else 0x54) << 8))



def store_sum_src(b: str, row: str, has_bias: bool, ind: str, yo: str = "") -> list[str]:
    """Kernel lines: a block's sum `tot` of output (b, row) -> y (+ bias), or into the fp32
    workspace when the columns are split over several blocks (nsplit > 1). Shared by the gemv
    kernels of gemv_rows.py and gemv_smem.py.
    yo: "off + " when y and the workspace hold several layers' outputs side by side."""
    out = [f"{ind}if nsplit > 1:", f"{ind}    cuda.atomic.add(ws, ({b}, {yo}{row}), tot)", f"{ind}else:"]
    if has_bias:
        out.append(f"{ind}    tot += float32(bias[{row}])")
    return out + [f"{ind}    y[{b}, {yo}{row}] = tot"]


def split_epilogue_src(batch: int, base: str, count: str, has_bias: bool, threads: int, ind: str,
                       yo: str = "", ct: str = "tile") -> list[str]:
    """Kernel lines of the split-K epilogue: the last block of a row tile (atomic counter `cnt`,
    flag in s32[ofl]) writes y[:, base:base+count] (+ bias) from the workspace and leaves the
    workspace and its counter zeroed for the next call. Shared by the gemv kernels. yo: output offset
    (as in store_sum_src); ct: the counter's index (the tile across every layer of a group)."""
    i2, i3, i4, i5 = (ind + "    " * k for k in (1, 2, 3, 4))
    # one fence by one thread after the barrier, as cooperative groups' grid sync does: a fence by
    # every thread (membar.sc each) cost more than the rest of the epilogue
    out = [f"{ind}if nsplit > 1:",
           f"{i2}cuda.syncthreads()",
           f"{i2}if tid == 0:",
           f"{i3}cuda.threadfence()",
           f"{i3}old = cuda.atomic.add(cnt, {ct}, 1)",
           f"{i3}s32[ofl] = 1 if old == nsplit - 1 else 0",
           f"{i3}cuda.threadfence()",
           f"{i2}cuda.syncthreads()",
           f"{i2}if s32[ofl] == 1:",
           f"{i3}nr = {count}",
           f"{i3}for _i in range(tid, {batch} * nr, {threads}):",
           f"{i4}_b = _i // nr",
           f"{i4}row = {base} + _i - _b * nr",
           f"{i4}if row < m:",
           f"{i5}tot = cuda.atomic.add(ws, (_b, {yo}row), float32(0.0))",  # L2-coherent read
           f"{i5}ws[_b, {yo}row] = float32(0.0)"]
    if has_bias:
        out.append(f"{i5}tot += float32(bias[row])")
    return out + [f"{i5}y[_b, {yo}row] = tot", f"{i3}if tid == 0:", f"{i4}cnt[{ct}] = 0"]
