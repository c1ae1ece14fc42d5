"""Row-per-lane fused gemv for small codebooks: byte codes (v4-k256, v8-k256 + k256, ...), the
2-bit preset's 10-bit codes (v5-k1024), the 3-bit preset's 10 + 5-bit codes (v5-k1024-32) and the
4-bit preset's 10 + 6-bit codes (v4-k1024-64).

Why a third kernel: in the two others a warp walks one row of vectors, each lane a few columns,
so every row ends in a shuffle reduction of v sums, and the centroid gathers of a warp land on
random shared-memory banks (or random L2 sectors for v8-k65536). Here a lane owns one row of
vectors (v outputs) and walks a run of columns, so

* no cross-lane reduction per row: the v sums stay in registers until the end of the chunk;
* x' (= x[perm] * scale) of a column is the same for the 32 lanes: one broadcast shared load;
* the codebook is small (8-bit codes: <= 256 centroids per codebook), so shared memory holds R
  copies of it, interleaved so that lane l reads copy l % R: a centroid word lives at
  (code * Q + h) * R + copy, and the 16 lanes of a half-warp (one 64-bit wavefront) hit 16
  different bank pairs whatever their codes (R = 16; 8 when the codebooks would not fit);
* a lane loads its row's codes a step at a time (32 codes: 32 bytes for 8-bit codes, two 16-byte
  loads, whole DRAM sectors; 40 bytes for the 2-bit preset's 10-bit codes, five 8-byte loads);
* 10-bit codes (1024 centroids of v = 5: 10 KiB a copy) run persistent blocks, one per SM: each
  fills 8 copies of 16-byte centroid slots (one 16-byte shared load a code, a quarter-warp never
  conflicts) and stages x' once, then walks row tiles. With 2 copies refilled by every block,
  6 of every 10 shared wavefronts were bank conflicts (bench/RESULTS.md).

Block: rw rows of vectors (ROWS_RW: 64 on a GPU; LANES_PER_ROW lanes share a row, taking turns
over its steps) x cs = threads / rw column runs of a chunk of kc stored columns; optionally the
codes in the warp-interleaved order (interleave_codes: a plan's copy, VPTQ_INTERLEAVE_CODES=1), whose
columns are then in the original order too (kernels/code_columns.py; x' read without the permutation).
The cs partial sums of a row are added through shared memory, then
written to y, or (split-K, several chunks) added into the fp32 workspace, the last block of a row
tile writing y, exactly as in kernels/gemv_smem.py (kernels/codegen.py `split_epilogue_src`). Batch
1 only (decode); GemvPlan hands larger batches to the shared-memory kernel. Same algebra and oracle
as kernels/gemv.py.
"""

from __future__ import annotations

import functools
import math

import torch

from . import _numba as nb
from .codegen import kernel_env, split_epilogue_src, store_sum_src
from .layout import PackedLayer

ROWS_THREADS = 256  # 8 warps: 64 rows x 4 column runs (ROWS_RW)
ROWS_MAXREG = 64  # H100: 70B shapes 84 -> 70 us (occupancy), 7B shapes unchanged
REPLICAS = 16  # copies of the codebook words, one per 64-bit bank pair
REPLICAS_10BIT = 2
CB_ROWS_MAX = 96 * 1024  # shared memory for the replicated codebooks
KC_MAX = 2048  # stored columns per block at most (more blocks beat longer runs per lane at 70B)
SMS = 132  # H100 SXM; steers the split-K heuristic only
SIM_WARP = 4  # the simulator's stand-in for a warp (rows of a tile by default; keeps blocks small)
# lanes sharing a row of vectors, by code width. H200 (bench/gemv_rows_probe.py --variants): v4-k256
# 28672x8192 1 lane 51.8 us, 2: 44.6, 4: 45.3 (7B shapes: 2 best or equal); v5-k1024 (10-bit)
# 28672x8192 1: 112.0, 2: 101.6, 4: 93.9; 8192x8192 2: 41.8, 4: 39.5
# Keyed by the main code's width (8: also 8 + 8-bit residual codes). 10-bit main codes with a 6-bit
# residual (the 4-bit preset, 16-bit codes), H200 (2026-12-04, persistent): 2 lanes 14.2/26.7/27.2/26.3/
# 78.1/76.3 us on the 7B/70B shapes, 4 lanes 13.8/25.5/25.3/25.1/71.5/68.2
LANES_PER_ROW = {8: 2, 10: 4}
# rows of vectors per block on a GPU, by code width (default: a warp's lanes). H200 (bench/gpu_session.sh
# probe, 2026-12-03), 64-row tiles stage x' half as often: v4-k256 28672x8192 42.6 -> 39.8 us,
# 8192x28672 47.3 -> 41.4, 8192x8192 18.2 -> 17.7, 7B shapes 2-4 % faster (128 rows: 70B 3-5 % faster
# again, 7B 3-7 % slower); v5-k1024 (persistent) 28672x8192 54.9 -> 53.0, 8192x8192 26.3 -> 24.8,
# 7B shapes 1-5 % faster (both with interleaved codes)
ROWS_RW = {8: 64, 10: 64}
XB = 4  # x' columns a thread stages at a time (all loads issued, then the stores)
FLUSH = 8  # fp16 x: codes summed in half2 before the sums are added into fp32
# persistent blocks (rows_config(persist=True)): threads, register cap, codebook copies and their
# shared memory. H200, v5-k1024 (bench/gemv_rows_probe.py --variants): 28672x8192 93.9 us (not
# persistent, 2 copies) -> 1024 threads 70.2, 512 threads at 128 registers 64.0; 8192x8192 39.5 -> 29.6
PERSIST_THREADS = 512
PERSIST_MAXREG = 128
PERSIST_REPLICAS = 16  # as many as fit PERSIST_CB_MAX (v5-k1024's 16-byte slots: 8)
PERSIST_CB_MAX = 160 * 1024
PERSIST_KC_MAX = 8192  # x' of a chunk stays in shared memory next to the copies
ITEM_COLS = 256  # a row tile's fixed cost (prefetch, reduction, epilogue) in columns, for the kc choice
SMEM_SM = 227 * 1024  # shared memory an SM gives its blocks (H100/H200)
# main code widths whose plans persist by default (GemvPlan): 10-bit main codes (v5-k1024, 10 KiB
# codebooks: the 8 copies need one block per SM; v4-k1024-64: 8.5 KiB, 16 copies). Byte codes are
# faster without (H200 v4-k256 28672x8192 44.9 us against 57.6-73.3 persistent: their 16 copies fit
# 4 blocks per SM anyway)
PERSIST_BITS = frozenset({10})


def step_codes(code_bits: int) -> int:
    """Codes a lane takes per step: 32 (8- and 10-bit codes: 32 / 40 bytes), 16 (16-bit codes), 64
    (15-bit codes: 120 bytes, the least whole number of 64-bit words)."""
    return {16: 16, 15: 64}.get(code_bits, 32)


def rows_path_ok(p: PackedLayer) -> bool:
    """The row-per-lane kernel applies (batch 1): one group, no outliers, and either 8-bit codes
    (optionally + an 8-bit residual), 10-bit codes (k = 1024, the 2-bit preset's v5-k1024), 10-bit
    codes + a 6-bit residual (the 4-bit preset's v4-k1024-64: 16-bit codes) or + a 5-bit residual at
    v = 5 (the 3-bit preset's v5-k1024-32: 15-bit codes), v a multiple of 4 or one more (v = 5: a
    4-value word + one fp16 value per centroid, or one 16-byte slot: wide_slots), rows of whole steps
    and no padding words."""
    v, b = p.vector_len, p.code_bits
    codes = ((p.main_bits == 8 and b in (8, 16)) or (p.main_bits == 10 and b in (10, 16))
             or (p.main_bits == 10 and b == 15 and v == 5))
    # v = 4j + 1: the last value in an fp16 plane (no residual), or v = 5 in 16-byte slots (wide_slots)
    shape = v % 4 == 0 or (v % 4 == 1 and b != 16 and (p.num_res_centroids == 0 or v == 5))
    return (p.outlier_size == 0 and p.group_num == 1 and codes and shape and v >= 4
            and p.in_features % step_codes(b) == 0 and (p.in_features * b) % 64 == 0
            and p.indices.shape[2] * 32 == p.in_features * b)


def wide_slots(p: PackedLayer, persist: bool) -> bool:
    """The centroids sit in 16-byte slots (kernel_rows(wide=True)): v = 5, in a persistent launch, or
    with a residual in any launch (the fp16 plane of the narrow layout holds the main codebook's fifth
    values only)."""
    return p.vector_len == 5 and (persist or p.num_res_centroids > 0)


def replica_bytes(p: PackedLayer, wide: bool = False) -> int:
    """Bytes of one copy of the codebooks: q 64-bit words per centroid (main + residual), plus one
    fp16 value per main centroid when v % 4 == 1; wide: 16 bytes per centroid (main + residual)."""
    if wide:
        return 16 * (p.num_centroids + p.num_res_centroids)
    q = p.vector_len // 4
    extra = 2 * p.num_centroids if p.vector_len % 4 == 1 else 0
    return (p.num_centroids + p.num_res_centroids) * q * 8 + extra


def replicas(p: PackedLayer, persist: bool = False) -> int:
    """Copies of the codebooks that fit in CB_ROWS_MAX (16, else 8, 4, ...); 2 for 10-bit codes,
    whose 10 KiB codebook copies cost more in occupancy than they save in bank conflicts (H100,
    v5-k1024 28672x8192: 8 copies 119.8 us, 4: 121.2, 2: 112.0; 4096x4096 25.5 / 21.1 / 19.6)."""
    nbytes = replica_bytes(p, wide_slots(p, persist))
    if persist:  # one block per SM: room for more copies
        r = PERSIST_REPLICAS
        while r > 1 and nbytes * r > PERSIST_CB_MAX:
            r //= 2
        return r
    r = REPLICAS_10BIT if p.main_bits == 10 else REPLICAS
    while r > 1 and nbytes * r > CB_ROWS_MAX:
        r //= 2
    return r


def lanes_per_row(p: PackedLayer, rw: int, gsz: int, threads: int, want: int | None = None) -> int:
    """Lanes that share a row of vectors (`lpr`): the larger of `want` (LANES_PER_ROW) and the
    least that lets a warp (gsz lanes: 32, the tile's rows in the simulator) hold whole rows of
    the tile, halved while the warp's rows do not tile the block or the row is not whole steps of
    lpr lanes. Raises when no lpr fits (rw too small for the warp)."""
    lpr = max(want or LANES_PER_ROW.get(p.main_bits, 1), nb.cdiv(gsz, rw))

    def fits(q: int) -> bool:
        rpw = gsz // q  # rows of a warp
        return (gsz % q == 0 and rpw <= rw and rw % rpw == 0 and (threads // gsz) % (rw // rpw) == 0
                and p.in_features % (q * step_codes(p.code_bits)) == 0)

    while lpr > 1 and not fits(lpr):
        lpr //= 2
    if not fits(lpr):
        raise ValueError(f"rw: {rw} rows per tile do not fit warps of {gsz} lanes for in_features {p.in_features}")
    return lpr


def warp_lanes(warp: int) -> int:
    """Lanes of a warp as the row kernel maps rows onto them (the simulator's warp is 1 thread:
    a stand-in of SIM_WARP lanes)."""
    return warp if warp > 1 else SIM_WARP


def x_skewed(lpr: int) -> bool:
    """x' is stored with 4 words of skew after every 32 columns (4 or more lanes per row): the lanes
    of a row read x' 16 columns apart, and without it lanes 0 and 2 (32 columns apart) share banks."""
    return lpr >= 4


def x_words(kc: int, lpr: int) -> int:
    """32-bit words of shared memory for x' of a chunk: one per column, plus the skew."""
    return kc + (kc // 32) * 4 if x_skewed(lpr) else kc


def threads_maxreg(persist: bool) -> tuple[int, int]:
    """Threads per block and register cap of the row kernel on a GPU, persistent or not."""
    return (PERSIST_THREADS, PERSIST_MAXREG) if persist else (ROWS_THREADS, ROWS_MAXREG)


def blocks_per_sm(shmem: int, threads: int, maxreg: int = ROWS_MAXREG) -> int:
    """Blocks of the row kernel an SM holds (shared memory, threads, registers at the cap)."""
    return max(1, min(SMEM_SM // max(shmem, 1), 2048 // threads, 65536 // (threads * (maxreg or 255))))


def persist_kc(n: int, unit: int, tiles: int, slots: int) -> int:
    """Column chunk of a persistent launch: the least modelled time, cdiv(tiles, blocks a chunk
    gets) x (kc + ITEM_COLS), over chunks of unit x 2^j columns (and the whole row) up to
    PERSIST_KC_MAX; ties go to the larger chunk (fewer split-K atomics)."""
    cands, kc = [], unit
    while kc < n and kc <= PERSIST_KC_MAX:
        cands.append(kc)
        kc *= 2
    whole = nb.cdiv(n, unit) * unit
    if whole <= max(PERSIST_KC_MAX, unit):
        cands.append(whole)
    best = None
    for kc in cands:
        ns = nb.cdiv(n, kc)
        gx = max(1, min(tiles, slots // ns))
        cost = nb.cdiv(tiles, gx) * (kc + ITEM_COLS) * nb.cdiv(ns * gx, slots)
        if best is None or cost <= best[0]:
            best = (cost, kc)
    return best[1]


def rows_config(p: PackedLayer, threads: int, warp: int, kc: int | None = None, tiles: int | None = None,
                lpr: int | None = None, rw: int | None = None, persist: bool = False, gx: int | None = None,
                ahead: int = 0, ilv: bool = False, maxreg: int | None = None) -> dict:
    """Launch shape: rows of vectors per block (rw), column runs (cs), lanes per row (lpr), chunk
    (kc), splits, smem, blocks on grid x (gx). tiles: row tiles of the launch when it covers
    several layers (kernels/gemv_group.py). persist: gx blocks per chunk, each walking row tiles
    (kernel_rows(persist=True)); gx: their number (default: as many as fill the SMs); ahead: steps
    of codes loaded ahead (0: kernel_rows' choice); ilv: codes in the warp-interleaved order
    (interleave_codes) the plan keeps a copy in; maxreg: the register cap the persistent grid is
    sized for (blocks resident per SM; default PERSIST_MAXREG, what plans compile with)."""
    gsz = warp_lanes(warp)
    # the simulator runs one thread per "lane": keep its blocks small
    rw = rw or (ROWS_RW.get(p.code_bits, gsz) if warp > 1 else gsz)
    cs = threads // rw
    cps = step_codes(p.code_bits)
    lpr = lanes_per_row(p, rw, gsz, threads, lpr)
    unit = cs * cps
    tiles = tiles or nb.cdiv(p.rows, rw)
    n = p.in_features
    wide = wide_slots(p, persist)
    r = (replicas(p, persist) if warp > 1 else 1)  # copies only avoid bank conflicts; the simulator has none

    def smem(kc: int) -> int:
        cbb = nb.cdiv(replica_bytes(p, wide) * r, 8) * 8
        return nb.cdiv(cbb + 4 * (x_words(kc, lpr) + cs * rw * p.vector_len + 2), 16) * 16

    if persist:  # fewer copies where a block may take less shared memory than an H100/H200's 227 KiB
        while r > 1 and smem(min(nb.cdiv(n, unit) * unit, max(unit, PERSIST_KC_MAX))) > nb.smem_optin():
            r //= 2
        # blocks resident at once, on the device's SMs: the persistent grid
        slots = nb.sm_count() * blocks_per_sm(smem(min(n, KC_MAX)), threads, maxreg or PERSIST_MAXREG)
        if kc is None:
            kc = persist_kc(n, unit, tiles, slots)
    elif gx is not None:
        raise ValueError("gx: only a persistent launch takes a block count")
    if kc is None:
        # ~3 blocks per SM in all, the chunk rounded to the nearest power of two, at most KC_MAX
        # columns: H100 sweep (bench/gemv_rows_probe.py --kc): 28672x8192 62.0 -> 53.4 us,
        # 8192x28672 74.6 -> 55.5, 8192x8192 23.5 -> 21.3, 4096x11008 20.0 -> 18.3; 7B others equal
        nsplit = max(1, nb.cdiv(3 * SMS, tiles))
        kc = 1 << max(0, round(math.log2(max(1.0, n / nsplit))))
        kc = min(max(unit, kc // unit * unit), max(unit, KC_MAX // unit * unit))
    if kc % unit:
        raise ValueError(f"kc: {kc} is not a multiple of {unit} (column runs x codes per step)")
    nsplit = nb.cdiv(n, kc)
    if persist:
        gx = gx or max(1, min(tiles, slots // nsplit))
    # xperm: x' gathered through the permutation; an interleaved copy of the codes has its columns in the
    # original order instead (GemvPlan.configure_rows, kernels/code_columns.py)
    return dict(rw=rw, cs=cs, cps=cps, lpr=lpr, kc=kc, tiles=tiles, nsplit=nsplit, replicas=r, shmem=smem(kc),
                gx=gx or tiles, persist=persist, wide=wide, ahead=ahead, ilv=ilv, gsz=gsz,
                xperm=p.perm is not None and not ilv)


@functools.cache
def kernel_rows(v: int, code_bits: int, has_res: bool, has_perm: bool, has_norm: bool, has_bias: bool,
                rw: int, cs: int, r: int, kc: int, k: int, kr: int, xdtype: str, maxreg: int = 0,
                ablate: str = "", group: tuple = (), lpr: int = 1, persist: bool = False, wide: bool = False,
                ahead: int = 0, ilv: bool = False):
    """Generated source, every per-code step unrolled into scalar registers.

    fp16 x: x' is staged as fp16 pairs and every centroid word is multiplied into packed half2
    sums (kernels/_numba.py `half2_fma_pair`), added into fp32 every FLUSH codes; fp32 x keeps
    fp32 arithmetic throughout. At 7B shapes a block does little work, so the latency chain is
    kept short: the first two steps' codes and the codebook words are requested before anything
    else, the codebook is loaded once per word (then stored R times, lanes rotating over the
    copies so the stores do not share banks), and each step loads the codes two steps ahead.
    x' is staged XB columns per thread at a time (bounded registers: occupancy is what keeps
    enough bytes in flight at 70B shapes). `ablate` (bench probes only) drops parts to time the
    rest: "main" (no column loop), "fill" (no codebook stores), "epi" (no split-K epilogue), "xperm"
    (x' read in stored order: no gather through the permutation), "xall" (no x' loads at all).

    group = ((tiles, out_features), ...) for two or more layers that share x (q/k/v, gate/up):
    one launch, the row tiles of every layer side by side on grid x, each layer's tensors passed
    as its own arguments (suffix 0, 1, ...) and y / the workspace holding the outputs side by side.
    A block picks its layer's tensors first; the rest of the kernel is the one-layer kernel.

    lpr > 1 lanes per row: the lpr neighbouring lanes of a row take turns over its codes a piece
    (16 bytes; a whole step for 10-bit codes) at a time, so one warp-wide load reads whole sectors
    of 32 / lpr rows instead of half sectors of 32 rows (fewer L1 wavefronts per byte); each lane
    keeps its own partial sums, added with the column runs' at the end.

    persist: the block fills its codebook copies and stages x' of its column chunk (grid y) once,
    then walks row tiles blockIdx.x, + gridDim.x, ... (a group: group[l][2] blocks for layer l walk
    its tiles, the counters of layer l starting at the tiles before it): with 8 copies of a 10-bit
    codebook (128 KiB, one block per SM) the fill would otherwise cost as much as the tile.
    wide (v = 5): a centroid is one 16-byte slot per copy (values 0-3, then value 4 in the low
    16 bits of the second word), read with one 16-byte shared load; with 8 copies and lane l
    reading copy l % 8, a quarter-warp's 8 loads hit 8 different bank quads whatever the codes
    (the fp16 plane of the narrow layout conflicts ~3-way at any affordable number of copies).
    With a residual (v5-k1024-32, persistent or not) its centroids take slots k, k + 1, ...: a code
    is two 16-byte loads.

    ilv: idx64 holds the codes in interleave_codes' order, so that each load instruction of a warp
    reads one contiguous run (512 bytes of 16-byte pieces, 256 of 8-byte words) instead of a piece
    of every row of the warp (1-2 cache lines per row: an L1 wavefront each); the codes a lane
    gets, and the rest of the kernel, are the same."""
    assert not wide or v == 5
    assert not (v % 4 == 1 and has_res) or wide, "v = 4j + 1 with a residual: 16-byte slots only"
    assert r & (r - 1) == 0, "copies of the codebook: a power of two (lanes pick theirs with a mask)"

    half = xdtype == "torch.float16"
    warp = 1 if nb.simulator_enabled() else 32
    mb = nb.log2i(k)  # main code bits; a residual code sits above them (16-bit codes: 8 + 8 or 10 + 6)
    assert not has_res or code_bits == mb + nb.log2i(kr)
    q = v // 4
    odd = v % 4 == 1  # the last value of each main centroid in an fp16 plane (16-bit units at o16)
    cps = step_codes(code_bits)
    nws = cps * code_bits // 64  # 64-bit words of codes per step
    # steps of codes loaded ahead (registers: 10-bit steps are 5 words); `ahead` > 0 asks for another
    # depth (a probe knob: bench/gemv_rows_probe.py --variants ahead=N)
    ahead = ahead or (2 if nws <= 4 else 1)
    bufs = [f"w{'' if j == 0 else chr(ord('a') + j)}" for j in range(ahead + 1)]
    threads = rw * cs
    nl = lpr
    gsz = warp_lanes(warp)
    rpw = gsz // nl  # rows of a warp
    ngr = rw // rpw  # warps side by side over the tile's rows
    run = kc // (cs // nl)  # columns of a column run, walked by the nl lanes of each row in turn
    npc = nws // 2 if nws % 2 == 0 else 1  # pieces a lane loads per step (16 bytes; 10-bit: one)
    wpp = nws // npc  # 64-bit words per piece
    cpp = cps // npc  # codes per piece
    sub_w = f" + sub * {wpp}" if nl > 1 else ""  # this lane's first piece
    sw = 2 if nws % 2 == 0 else 1  # 64-bit words of a lane's load (16 or 8 bytes)
    sub_c = f" + sub * {cpp}" if nl > 1 else ""
    kq, krq = k * q, kr * q
    nf = nb.cdiv((k + kr) if odd else kq + krq, threads)
    cbn = kq * r
    o16 = (kq + krq) * r * 4
    oxs = (kq + krq) * r * 2 + (nb.cdiv(k * r, 4) * 2 if odd else 0)  # x' after the codebooks (32-bit; even)
    if wide:
        oxs = (k + kr) * r * 4  # 16-byte slots: main centroids, then residual ones
    odd_plane = odd and not wide

    def code_base(cx: str) -> str:
        """Flat idx64 index of this lane's first word of the step starting at column cx."""
        if ilv:  # the row block's words, then the step's, then this lane's
            return f"(row - rl % {rpw}) * nw64 + ((({cx}) * {code_bits}) >> 6) * {rpw} + _t * {sw}"
        return f"row * nw64 + ((({cx}) * {code_bits}) >> 6){sub_w}"

    step_words = nws * gsz if ilv else nl * nws  # idx64 words from one step of a lane to its next
    gap = gsz if ilv else 0
    skew = x_skewed(nl)
    ored = oxs + x_words(kc, nl)
    owb = ored + cs * rw * v
    ofl = owb + 1
    ind = "    "
    i2, i3, i4 = ind * 2, ind * 3, ind * 4
    names = ("xsrc", "xscale", "xwb", "idx64", "cbw", "rcbw", "bias")
    if group:
        per = ", ".join(f"{a}{li}" for li in range(len(group)) for a in names)
        L = [f"def gemv_rows(x, {per}, ws, cnt, y, nsplit):",
             f"{ind}gt = cuda.blockIdx.x"]
        t0 = m0 = b0 = 0
        for li, (tl, ml, *blk) in enumerate(group):
            bl = blk[0] if persist else tl  # blocks of this layer on grid x (persist: they walk its tiles)
            head = "if" if li == 0 else ("elif" if li < len(group) - 1 else "else")
            L.append(f"{ind}{head} gt < {b0 + bl}:" if head != "else" else f"{ind}else:")
            if persist:
                L += [f"{i2}tb = gt - {b0}", f"{i2}tst = {bl}", f"{i2}ntl = {tl}", f"{i2}tofs = {t0}"]
            else:
                L.append(f"{i2}tile = gt - {t0}")
            L += [f"{i2}yo = {m0}", f"{i2}m = {ml}"]
            L += [f"{i2}{a} = {a}{li}" for a in names]
            t0, m0, b0 = t0 + tl, m0 + ml, b0 + bl
        yo, ct = "yo + ", ("tofs + tile" if persist else "gt")
    else:
        L = ["def gemv_rows(x, xsrc, xscale, xwb, idx64, cbw, rcbw, bias, ws, cnt, y, nsplit):",
             f"{ind}m = y.shape[1]"]
        if not persist:
            L.append(f"{ind}tile = cuda.blockIdx.x")
        yo, ct = "", "tile"
    if odd_plane:
        L.append(f"{ind}s16 = cuda.shared.array(0, int16)")
    L += [f"{ind}s64 = cuda.shared.array(0, int64)",
          f"{ind}sf = cuda.shared.array(0, float32)",
          f"{ind}s32 = cuda.shared.array(0, int32)",
          f"{ind}n = x.shape[1]",
          f"{ind}nrows = idx64.shape[1]",
          f"{ind}nw64 = idx64.shape[2]",
          f"{ind}k0 = cuda.blockIdx.y * {kc}",
         f"{ind}tid = cuda.threadIdx.x",
         # a warp: rpw rows x nl lanes each (the lanes of a row adjacent); ngr warps cover the tile's rows
         f"{ind}_q = tid // {gsz}",
         f"{ind}_t = tid % {gsz}",
         f"{ind}sub = _t % {nl}",
         f"{ind}rl = (_q % {ngr}) * {rpw} + _t // {nl}",
         f"{ind}sc = _q // {ngr}",
         f"{ind}ci = sc * {nl} + sub",
         f"{ind}ofl = {ofl}"]
    head = L
    # ---- the first two steps' codes of this lane's row, requested first (the longest latency)
    L = [f"{ind}row = tile * {rw} + rl",
         f"{ind}c = k0 + sc * {run}",
         f"{ind}cend = min(c + {run}, n)",
         f"{ind}live = row < nrows and c < cend",
         f"{ind}{' = '.join(f'{b}{i}' for b in bufs[:ahead] for i in range(nws))} = int64(0)",
         f"{ind}if live:",
         f"{i2}_b = {code_base('c')}"]
    L += load_words(bufs[0], "_b", nws, i2, nl, gap)
    for j in range(1, ahead):
        L += [f"{i2}if c + {j * nl * cps} < cend:"] + load_words(bufs[j], f"_b + {j * step_words}", nws, i3, nl, gap)
    tile_head = L
    L = []
    # ---- codebook words, once each
    for i in range(nf if odd else 0):  # cbw: int16 view (G, k * v); centroid _e's values
        L += [f"{ind}_e{i} = tid + {i * threads}", f"{ind}if _e{i} < {k}:"]
        for t in range(v):
            L.append(f"{i2}_h{i}_{t} = int64(cbw[0, _e{i} * {v} + {t}]) & 0xFFFF")
        if has_res:  # the residual centroids (wide slots k, k + 1, ...)
            L.append(f"{ind}elif _e{i} < {k + kr}:")
            for t in range(v):
                L.append(f"{i2}_h{i}_{t} = int64(rcbw[0, (_e{i} - {k}) * {v} + {t}]) & 0xFFFF")
        L.append(f"{ind}else:")
        for t in range(v):
            L.append(f"{i2}_h{i}_{t} = int64(0)")
    for i in range(0 if odd else nf):
        L += [f"{ind}_e{i} = tid + {i * threads}",
              f"{ind}if _e{i} < {kq}:",
              f"{i2}_g{i} = cbw[0, _e{i}]"]
        if has_res:
            L += [f"{ind}elif _e{i} < {kq + krq}:", f"{i2}_g{i} = rcbw[0, _e{i} - {kq}]"]
        L += [f"{ind}else:", f"{i2}_g{i} = int64(0)"]
    # ---- x' of the chunk, XB columns per thread at a time, and its x . wbias
    L += [f"{ind}if tid == 0:", f"{i2}sf[{owb}] = float32(0.0)", f"{ind}_wp = float32(0.0)",
          f"{ind}for _i0 in range(tid, {kc}, {threads * XB}):"]
    for j in range(XB):
        L += [f"{i2}_c{j} = _i0 + {j * threads}",
              f"{i2}_p{j} = k0 + _c{j}",
              f"{i2}_ok{j} = _c{j} < {kc} and _p{j} < n",
              f"{i2}_j{j} = (int64(xsrc[_p{j}]) if _ok{j} else int64(0))" if has_perm and "xperm" not in ablate
              else f"{i2}_j{j} = _p{j}"]
        if has_norm and "xall" not in ablate:
            L += [f"{i2}_s{j} = float32(xscale[_p{j}]) if _ok{j} else float32(0.0)",
                  f"{i2}_w{j} = float32(xwb[_p{j}]) if _ok{j} else float32(0.0)"]
        elif has_norm:
            L += [f"{i2}_s{j} = float32(1.0)", f"{i2}_w{j} = float32(0.0)"]
    for j in range(XB):
        L.append(f"{i2}_x{j} = float32(x[0, _j{j}]) if _ok{j} else float32(0.0)" if "xall" not in ablate
                 else f"{i2}_x{j} = float32(_c{j})")
    for j in range(XB):
        xv = f"_x{j} * _s{j}" if has_norm else f"_x{j}"
        L += [f"{i2}if _c{j} < {kc}:",
              f"{i3}_y{j} = _c{j} + ((_c{j} >> 5) << 2)" if skew else f"{i3}_y{j} = _c{j}",
              f"{i3}s32[{oxs} + _y{j}] = f2h2({xv})" if half else f"{i3}sf[{oxs} + _y{j}] = {xv}"]
        if has_norm:
            L.append(f"{i2}_wp += _x{j} * _w{j}")
    # ---- R copies of every codebook word (lane-rotated copies: the stores do not share banks)
    if "fill" not in ablate and wide:
        for i in range(nf):  # slot (centroid, copy): word 0 = values 0-3, word 1 = value 4
            w = " | ".join(f"(_h{i}_{t} << {16 * t})" for t in range(4))
            L += [f"{ind}if _e{i} < {k + kr}:", f"{i2}_gw = {w}"]
            for t in range(r):
                L += [f"{i2}_sl = (_e{i} * {r} + ((tid + {t}) & {r - 1})) * 2",
                      f"{i2}s64[_sl] = _gw", f"{i2}s64[_sl + 1] = _h{i}_{v - 1}"]
    if "fill" not in ablate and odd_plane:
        for i in range(nf):
            L.append(f"{ind}if _e{i} < {k}:")
            for h in range(q):
                w = " | ".join(f"(_h{i}_{4 * h + t} << {16 * t})" for t in range(4))
                L.append(f"{i2}_gw = {w}")
                for t in range(r):
                    L.append(f"{i2}s64[(_e{i} * {q} + {h}) * {r} + ((tid + {t}) & {r - 1})] = _gw")
            for t in range(r):
                L.append(f"{i2}s16[{o16} + _e{i} * {r} + ((tid + {t}) & {r - 1})] = int16(_h{i}_{v - 1} - "
                         f"((_h{i}_{v - 1} & 0x8000) << 1))")
    if "fill" not in ablate and not odd:
        for i in range(nf):
            L.append(f"{ind}if _e{i} < {kq + krq}:")
            for t in range(r):
                L.append(f"{i2}s64[_e{i} * {r} + ((tid + {t}) & {r - 1})] = _g{i}")
    L.append(f"{ind}cuda.syncthreads()")
    if has_norm:
        # one shared atomic per warp (a float atomic on one address from every thread is a CAS spin)
        L += [f"{ind}_wp = warp_allsum(_wp)", f"{ind}if tid % {warp} == 0:", f"{i2}cuda.atomic.add(sf, {owb}, _wp)",
              f"{ind}cuda.syncthreads()"]
    setup = L
    L = []
    # ---- this lane's row over its column run; each step loads the codes two steps ahead
    for t in range(v):
        L.append(f"{ind}a{t} = float32(0.0)")
    if half:
        for j in range(2 * q):
            L.append(f"{ind}h{j} = int32(0)")
        if odd:
            L.append(f"{ind}hx = int32(0)")
    L += [f"{ind}cp = tid & {r - 1}",
          # wide: this lane's copy of slot 0 as a 32-bit shared address; a code adds code * 16 * r
          *([f"{ind}sbc = sbase(s64) + cp * 16"] if wide else []),
          f"{ind}if live:" if "main" not in ablate else f"{ind}if live and cend < 0:",
          f"{i2}while c < cend:",
          f"{i3}c2 = c + {ahead * nl * cps}",
          f"{i3}if c2 < cend:",
          f"{i4}_b = {code_base('c2')}"]
    L += load_words(bufs[ahead], "_b", nws, i4, nl, gap)
    L += [f"{i3}else:",
          f"{i4}{' = '.join(f'{bufs[ahead]}{i}' for i in range(nws))} = int64(0)",
          # unsigned: numba adds a negative-index wraparound (4 instructions) to every signed index
          f"{i3}_xx = c - k0{sub_c}",
          *([f"{i3}_xx += (_xx >> 5) << 2"] if skew else []),
          f"{i3}xo = uint64({oxs // 2} + (_xx >> 1))" if half else f"{i3}xo = uint64({oxs} + _xx)"]

    def col(u: int) -> int:
        """x' word of code u of a lane's step, from the lane's first (xo): piece u // cpp is the
        (u // cpp)-th piece of this lane, nl pieces of the row apart (pieces are 8, 16, 32 or 64
        columns, aligned: a 64-column piece crosses one 32-column skew boundary)."""
        gap = nl * cpp * 9 // 8 if skew else nl * cpp
        w = u % cpp
        return (u // cpp) * gap + w + ((w >> 5) << 2 if skew else 0)

    def flush(i: str) -> list[str]:
        out = []
        for j in range(2 * q):
            out += [f"{i}a{2 * j} += h2f(h{j})", f"{i}a{2 * j + 1} += h2f(h{j} >> 16)", f"{i}h{j} = int32(0)"]
        if odd:
            out += [f"{i}a{v - 1} += h2f(hx) + h2f(hx >> 16)", f"{i}hx = int32(0)"]
        return out

    for u in range(cps):
        if half:
            if u % 2 == 0:
                L += [f"{i3}_xw = s64[xo + uint64({col(u) // 2})]", f"{i3}_x = _xw"]
            else:
                L.append(f"{i3}_x = _xw >> 32")
        else:
            L.append(f"{i3}_x = sf[xo + uint64({col(u)})]")
        if has_res:  # main (8 or 10 bits), then the residual (wide: both as slot byte offsets)
            sh = nb.log2i(16 * r) if wide else 0
            L += [f"{i3}{'_co' if wide else '_cm'} = {field_src(u * code_bits, mb, sh)}",
                  f"{i3}_cr = {field_src(u * code_bits + mb, code_bits - mb, sh)}"]
            if wide:
                L.append(f"{i3}_cro = _cr + {k * 16 * r}")
        elif wide:  # the slot's byte offset: code * 16 * r
            L.append(f"{i3}_co = {code_src(u, code_bits, nb.log2i(16 * r))}")
        else:
            L.append(f"{i3}_cm = {code_src(u, code_bits)}")
        for h in range(0 if wide else q):
            L.append(f"{i3}_m = s64[(_cm * {q} + {h}) * {r} + cp]")
            if has_res:
                L.append(f"{i3}_r = s64[{cbn} + (_cr * {q} + {h}) * {r} + cp]")
            if half:
                L.append(f"{i3}h{2 * h}, h{2 * h + 1} = hf2(_m, _x, h{2 * h}, h{2 * h + 1})")
                if has_res:
                    L.append(f"{i3}h{2 * h}, h{2 * h + 1} = hf2(_r, _x, h{2 * h}, h{2 * h + 1})")
                continue
            for t in range(4):
                val = f"h2f(_m >> {16 * t})"
                if has_res:
                    val = f"({val} + h2f(_r >> {16 * t}))"
                L.append(f"{i3}a{4 * h + t} += _x * {val}")
        if wide:  # values 0-3 and value 4 of the centroid: one 16-byte load (and the residual's)
            L.append(f"{i3}_m, _o{u % 2} = lds128at(s64, sbc, _co)")
            if has_res:
                L.append(f"{i3}_r, _p{u % 2} = lds128at(s64, sbc, _cro)")
            if half:
                L.append(f"{i3}h0, h1 = hf2(_m, _x, h0, h1)")
                if has_res:
                    L.append(f"{i3}h0, h1 = hf2(_r, _x, h0, h1)")
            else:
                L += [f"{i3}a{t} += _x * h2f(_m >> {16 * t})" for t in range(4)]
                if has_res:
                    L += [f"{i3}a{t} += _x * h2f(_r >> {16 * t})" for t in range(4)]
        if odd:  # the last value: paired with the next code's, times (x'_u, x'_u+1), in half2
            if not wide:
                L.append(f"{i3}_o{u % 2} = s16[uint64({o16} + _cm * {r} + cp)]")
            if not half:
                L.append(f"{i3}a{v - 1} += _x * h2f(_o{u % 2})")
                if has_res:
                    L.append(f"{i3}a{v - 1} += _x * h2f(_p{u % 2})")
            elif u % 2:
                L.append(f"{i3}hx = hfma2(hpair(_o0, _o1, 0x5410), hpair(_xw, _xw >> 32, 0x5410), hx)")
                if has_res:
                    L.append(f"{i3}hx = hfma2(hpair(_p0, _p1, 0x5410), hpair(_xw, _xw >> 32, 0x5410), hx)")
        if half and (u + 1) % FLUSH == 0:
            L += flush(i3)
    for a, b in zip(bufs[:-1], bufs[1:], strict=True):
        L.append(f"{i3}{', '.join(f'{a}{i}' for i in range(nws))} = {', '.join(f'{b}{i}' for i in range(nws))}")
    L.append(f"{i3}c += {nl * cps}")
    if half and cps % FLUSH:
        L += flush(ind)
    # ---- partial sums of the column runs -> one sum per output of the tile
    for t in range(v):
        L.append(f"{ind}sf[{ored} + (ci * {rw} + rl) * {v} + {t}] = a{t}")
    L += [f"{ind}cuda.syncthreads()",
          f"{ind}for _e in range(tid, {rw * v}, {threads}):",
          f"{i2}orow = tile * {rw * v} + _e",
          f"{i2}if orow < m:",
          f"{i3}tot = float32(0.0)",
          f"{i3}for _s in range({cs}):",
          f"{i4}tot += sf[{ored} + _s * {rw * v} + _e]"]
    if has_norm:
        L.append(f"{i3}tot += sf[{owb}]")
    if "epi" in ablate:
        L.append(f"{i3}y[0, {yo}orow] = tot")
    else:
        L += store_sum_src("0", "orow", has_bias, i3, yo)
        L += split_epilogue_src(1, f"tile * {rw * v}", str(rw * v), has_bias, threads, ind, yo, ct)
    if persist:  # codebook and x' once; then this block's row tiles
        tail = tile_head + L + [f"{ind}cuda.syncthreads()"]
        walk = "tb, ntl, tst" if group else f"cuda.blockIdx.x, (nrows + {rw - 1}) // {rw}, cuda.gridDim.x"
        L = head + setup + [f"{ind}for tile in range({walk}):"]
        L += [ind + ln for ln in tail]
    else:
        L = head + tile_head + setup + L
    src = "\n".join(L) + "\n"
    hpair, _, hfma2 = nb.half2_ops()
    env = {**kernel_env(), "hf2": nb.half2_fma_pair(), "f2h2": nb.float_to_half2(), "warp_allsum": nb.warp_allsum(warp),
           "hpair": hpair, "hfma2": hfma2, "ld64": nb.load_64(), "sbase": nb.shared_128_at()[0],
           "lds128at": nb.shared_128_at()[1]}
    tag = (f"gemv-rows-v{v}-b{code_bits}-rw{rw}-cs{cs}-l{nl}-r{r}-kc{kc}-{'h' if half else 'f'}{ablate}-g{len(group)}"
           f"{'-p' if persist else ''}{'-w' if wide else ''}-a{ahead}{'-i' if ilv else ''}")
    fn = nb.compile_source(src, "gemv_rows", env, tag)
    c = nb.cuda()
    return c.jit(fn, max_registers=maxreg) if maxreg and not nb.simulator_enabled() else c.jit(fn)


def load_words(buf: str, base: str, nws: int, ind: str, nl: int = 1, gap: int = 0) -> list[str]:
    """Kernel lines: a lane's nws 64-bit words of codes of a step, from flat index `base` of idx64,
    into buf0..: 16-byte loads (pieces nl pieces apart: the row's nl lanes interleave) when nws is
    even (8- and 16-bit steps), 8-byte loads of one contiguous piece otherwise (10-bit: 5 words).
    gap > 0 (interleave_codes' order, gap = lanes of a warp): the lane's loads are a warp's loads apart."""
    if nws % 2 == 0:
        return [f"{ind}{buf}{i}, {buf}{i + 1} = ld128(idx64, {base} + {i * (gap or nl)})" for i in range(0, nws, 2)]
    return [f"{ind}{buf}{i} = ld64(idx64, {base} + {i * (gap or 1)})" for i in range(nws)]


def interleave_codes(idx64: torch.Tensor, cfg: dict, code_bits: int) -> torch.Tensor:
    """idx64 (1, rows, words) in the order kernel_rows(ilv=True) reads: blocks of rpw rows (a warp's
    rows), in each the steps of the lanes in turn, in each step the lanes' loads in turn, in each
    load the warp's lanes side by side (lane t = row-in-block * lpr + sub). Rows padded with zero
    codes to whole blocks (their outputs are past out_features: never written)."""
    nl, gsz = cfg["lpr"], cfg["gsz"]
    rpw = gsz // nl
    nws = cfg["cps"] * code_bits // 64
    rows, words = idx64.shape[1], idx64.shape[2]
    nrb = -(-rows // rpw)
    groups = words // (nl * nws)  # steps of all nl lanes of a row
    src = torch.zeros(nrb * rpw, words, dtype=torch.int64, device=idx64.device)
    src[:rows] = idx64[0]
    if nws % 2:  # word w of a step group: lane w // nws, load w % nws
        out = src.view(nrb, rpw, groups, nl, nws).permute(0, 2, 4, 1, 3)
    else:  # 16-byte piece P = w // 2: lane P % nl, load P // nl
        out = src.view(nrb, rpw, groups, nws // 2, nl, 2).permute(0, 2, 3, 1, 4, 5)
    return out.contiguous().view(1, nrb * rpw, words)


def code_src(u: int, bits: int, shift: int = 0) -> str:
    """Expression of code u of a step held in words w0.. (LSB-first stream, codes of `bits` bits);
    shift: of the code times 2**shift, the two shifts folded into one where the code lies in one word."""
    return field_src(u * bits, bits, shift)


def field_src(o: int, bits: int, shift: int = 0) -> str:
    """Expression of the `bits`-bit field at bit o of a step held in words w0.. (LSB first), times
    2**shift (code_src; a residual code's main and residual parts are two fields)."""
    i, sh = o >> 6, o & 63
    mask = ((1 << bits) - 1) << shift
    if sh + bits <= 64:
        d = sh - shift
        if d > 0:
            return f"((w{i} >> {d}) & {mask})"
        return f"((w{i} << {-d}) & {mask})" if d else f"(w{i} & {mask})"
    lo = 64 - sh  # bits from word i (the top ones), the rest from word i + 1
    code = f"(((w{i} >> {sh}) & {(1 << lo) - 1}) | ((w{i + 1} & {(1 << (bits - lo)) - 1}) << {lo}))"
    return f"({code} << {shift})" if shift else code


def rows_launch(p: PackedLayer, cfg: dict, xdtype, maxreg: int, ablate: str = "", group: tuple = ()):
    """(compiled kernel, scalar arguments) of a row-kernel launch of layout p with rows_config cfg;
    one layer, or a group of layers of p's layout (kernels/gemv_group.py). The kernel takes x, each
    layer's tensors (GemvPlan.rows_static), the workspace and counters, y, then these scalars."""
    kern = kernel_rows(p.vector_len, p.code_bits, p.num_res_centroids > 0, cfg["xperm"],
                       p.weight_scale is not None, p.bias is not None, cfg["rw"], cfg["cs"], cfg["replicas"],
                       cfg["kc"], p.num_centroids, p.num_res_centroids, str(xdtype), maxreg, ablate, group,
                       cfg["lpr"], cfg["persist"], cfg["wide"], cfg["ahead"], cfg["ilv"])
    return kern, [cfg["nsplit"]]
