"""Fused dequantize-matvec for decoding: y = x W^T + bias for 1..8 token rows, W never formed.

Algebra (vptq-method.md 2.2): with stored column p holding original column j = perm[p],
W[:, j] = Q[:, p] * scale[j] + wbias[j], so

    y[b, m] = sum_p (x[b, perm[p]] * scale[perm[p]]) * Q[m, p]  +  x[b] . wbias  +  bias[m].

Three kernels compute it, one per module: gemv_l2.py (every layout: centroids gathered through
L1/L2), gemv_smem.py (one group, no outliers, codebooks <= 96 KiB: v6-k4096, v4-k4096, ...: the
codebook in shared memory) and, at batch 1, gemv_rows.py (byte and 10-bit codes with small
codebooks: a lane per row of vectors, replicated codebook). This module holds the choice.

`GemvPlan` is the per-layer prepared state: the kernel it takes (`GemvPlan.path` at batch 1,
`GemvPlan.base` above), folded perm/scale/bias tensors, launch configuration and the kernel
arguments of every constant tensor, marshalled once. A call then marshals only x and y and goes
straight to the driver (`host_us` in bench/results/kernels.md; `_numba.prepare_fast`).
`gemv_ref` is the torch oracle (dequantize_ref then F.linear), same signature.
"""

from __future__ import annotations

import torch

from . import _numba as nb
from .code_columns import permute_code_columns
from .codegen import CB_SMEM_MAX, WARP, ceil16, smem_codebook_bytes
from .dequant import dequantize_ref
from .gemv_l2 import L2_THREADS, L2_U, kernel_l2, l2_tiling
from .gemv_rows import (
    PERSIST_BITS,
    interleave_codes,
    rows_config,
    rows_launch,
    rows_path_ok,
    threads_maxreg,
)
from .gemv_smem import SMEM_MAXREG, SMEM_THREADS, SMEM_U, X_CHUNK, kernel_smem, pick_rg, smem_path_ok
from .layout import PackedLayer, check_layer, flat_words, perm64, word_view

MAX_BATCH = 8
SMS = 132  # H100 SXM; only steers the split-K heuristic


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
        self.threads = threads or (SMEM_THREADS if self.path == "smem" else L2_THREADS)
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
            pw = self.warp * L2_U
            kc0, rw0 = l2_tiling(p.rows, n, pw, self.threads, self.warp)
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
            src = perm64(p.perm)
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
            codes = permute_code_columns(codes, p.code_bits, torch.argsort(perm64(p.perm)))
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
        rg = pick_rg(self.rt, nsl, self.threads // self.warp)
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
            kern = kernel_smem(p.vector_len, bsz, p.code_bits, p.main_bits, p.num_res_centroids > 0,
                               p.perm is not None, p.weight_scale is not None, p.bias is not None,
                               c["u"], self.threads, c["wload"], str(dtype), c["maxreg"])
            static = [self.xsrc, self.xscale, self.xwb, p.indices, self.idx64, self.cbg, self.rcbg, self.bias,
                      self.workspace(bsz, split), self.cnt]
            scalars = [p.num_centroids, p.num_res_centroids, c["kc"], self.rt, c["rg"], c["nsplit"]]
            return kern, (self.tiles, c["nsplit"]), c["shmem"], static, scalars, self.threads
        kern = kernel_l2(p.vector_len, bsz, p.num_res_centroids > 0, p.outlier_size > 0, p.perm is not None,
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
            nb.launch_fast(fast, x, y)
            return y
        kern, grid, shmem, static, scalars, threads = self._launch_args(bsz, x.dtype)
        nb.launch(kern, grid, threads, nb.stream_for(x), x, *static, y, *scalars, shmem=shmem)
        if not self.sim:
            self._fast[(bsz, x.dtype)] = nb.prepare_fast(kern, grid, threads, shmem, static, scalars)
        return y


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
