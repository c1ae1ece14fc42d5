"""VPTQ for one linear layer: W (M, N), proxy Hessian H (N, N) -> codebooks + indices.

Reads like GPTQ's `fasterquant`: the only new thing in the inner step is "nearest centroid
of a v-long vector of one input column" instead of scalar rounding (vptq-method.md 1.6).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .codebook import refine_codebooks
from .config import LayerLayout, QuantConfig, layer_bits
from .kmeans import nearest, weighted_kmeans

# the closed-form codebook update solves a (T x T) system, T = all centroids of a layer:
# beyond this (e.g. one 65,536-entry codebook) it is skipped
MAX_REFINE_CENTROIDS = 4096
# one group, no outlier columns: store the codes in the original column order and no permutation
# (quantize_linear); False keeps the stored permutation (the format allows both; tests compare them)
FOLD_PERM = True


@dataclass
class VQWeights:
    """Everything stored for one quantized linear (unpacked; see vptq.packing for the file)."""

    layout: LayerLayout
    vector_len: int
    centroids: torch.Tensor  # (G, k, v) fp16
    indices: torch.Tensor  # (G, R, group_size) int64, R = ceil(M / v)
    res_centroids: torch.Tensor | None = None  # (G, k_res, v) fp16
    res_indices: torch.Tensor | None = None  # (G, R, group_size) int64
    outlier_vector_len: int = -1
    outlier_centroids: torch.Tensor | None = None  # (1, k0, v0) fp16
    outlier_indices: torch.Tensor | None = None  # (1, R0, outlier_size) int64
    perm: torch.Tensor | None = None  # (N,) int64: stored column p is original column perm[p]
    weight_scale: torch.Tensor | None = None  # (N,) fp16, original column order
    weight_bias: torch.Tensor | None = None  # (N,) fp16


@dataclass
class LayerReport:
    name: str = ""
    shape: tuple[int, int] = (0, 0)
    proxy_loss: float = 0.0  # tr(dW H dW^T) / tr(W H W^T), unnormalized space
    proxy_loss_kmeans: float = 0.0  # same before the column loop (codebook assignment only)
    proxy_loss_loop: float = 0.0  # after the column loop, before the codebook refinement
    seconds: float = 0.0
    bits: int = 0
    bpw: float = 0.0
    damp_used: float = 0.0
    warnings: list[str] = field(default_factory=list)


def _gather_rows(cb: torch.Tensor, idx: torch.Tensor, m: int) -> torch.Tensor:
    """Codebook (k, v), indices (R, C) -> dense (m, C): vectors run along the rows."""
    r, c = idx.shape
    v = cb.shape[1]
    return cb[idx.t()].reshape(c, r * v).t()[:m]  # (C, R, v) -> (R*v, C) -> drop padding


def dequantize(q: VQWeights, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense (M, N) weight from stored parts, reference path of vptq-method.md 2.1."""
    lay, m = q.layout, q.layout.out_features
    parts = []
    if lay.outlier_size:
        parts.append(_gather_rows(q.outlier_centroids[0].to(dtype), q.outlier_indices[0], m))
    for g in range(lay.group_num):
        wg = _gather_rows(q.centroids[g].to(dtype), q.indices[g], m)
        if q.res_centroids is not None:
            wg = wg + _gather_rows(q.res_centroids[g].to(dtype), q.res_indices[g], m)
        parts.append(wg)
    w = torch.cat(parts, dim=1)  # (M, N), permuted column order
    if q.perm is not None:
        w = w[:, torch.argsort(q.perm)]
    if q.weight_scale is not None:
        w = w * q.weight_scale.to(dtype)[None, :] + q.weight_bias.to(dtype)[None, :]
    return w


def inverse_hessian_factor(h: torch.Tensor, damp: float, report: LayerReport) -> torch.Tensor:
    """U = chol_upper(inv(H + damp*mean(diag)*I)); on failure retry with 10x damping."""
    n = h.shape[0]
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(n, device=h.device, dtype=h.dtype)
    for attempt in range(6):
        d = damp * (10**attempt)
        try:
            lower = torch.linalg.cholesky(h + d * mean_diag * eye)
            u = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
            if not torch.isfinite(u).all():
                raise torch.linalg.LinAlgError("non-finite factor")
            report.damp_used = d
            if attempt:
                report.warnings.append(
                    f"Cholesky failed at damp={damp}; used damp={d} (more calibration data helps)"
                )
            return u
        except torch.linalg.LinAlgError:
            continue
    report.warnings.append("Cholesky failed at every damping; error feedback disabled (U = I)")
    report.damp_used = float("nan")
    return eye


def proxy_error(dw: torch.Tensor, h: torch.Tensor) -> float:
    """tr(dW H dW^T): the output error a weight change dW causes on inputs with Hessian H."""
    return float(torch.einsum("ij,jk,ik->", dw, h, dw))


class _Codebooks:
    """Per-column codebook lookup: outliers, then G groups of the permuted columns."""

    def __init__(self, lay: LayerLayout, v: int, v0: int):
        self.lay, self.v, self.v0 = lay, v, v0
        self.main: list[torch.Tensor] = []
        self.res: list[torch.Tensor | None] = []
        self.outlier: torch.Tensor | None = None

    def which(self, col: int) -> tuple[int, int]:
        """(group, column-within-group); group -1 = outlier block."""
        if col < self.lay.outlier_size:
            return -1, col
        c = col - self.lay.outlier_size
        return c // self.lay.group_size, c % self.lay.group_size


def to_vectors(cols: torch.Tensor, v: int) -> torch.Tensor:
    """(M, C) columns -> (C * R, v) vectors along the output dimension, zero padded."""
    m, c = cols.shape
    pad = (-m) % v
    if pad:
        cols = torch.nn.functional.pad(cols, (0, 0, 0, pad))
    return cols.t().reshape(c * ((m + pad) // v), v)


def refines_codebooks(cfg: QuantConfig, lay: LayerLayout) -> bool:
    """Whether quantize_linear runs the closed-form codebook update on a layer of this layout (vptq.plan
    sizes its memory by the same rule)."""
    return bool(cfg.refine_iters) and lay.group_num * (cfg.num_centroids + cfg.num_res_centroids) \
        <= MAX_REFINE_CENTROIDS


def quantize_linear(
    weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig, name: str = ""
) -> tuple[VQWeights, LayerReport]:
    """Quantize one linear with VPTQ. weight (M, N) any float dtype; hessian (N, N) = E[x x^T]."""
    t0 = time.perf_counter()
    dev = weight.device
    w0 = weight.detach().float().clone()
    m, n = w0.shape
    lay = LayerLayout.for_shape(cfg, m, n)
    rep = LayerReport(name=name, shape=(m, n))
    h = hessian.detach().float().to(dev).clone()

    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w0[:, dead] = 0.0
    h_eval = h / torch.diag(h).mean()  # proxy-loss metric in the original space

    w = w0.clone()
    scale = bias = None
    if cfg.enable_norm:
        # per input channel min/max; rounded to fp16 now, since that is what is stored
        lo, hi = w.min(0).values, w.max(0).values
        scale = (hi - lo).clamp_min(1e-6).half()
        bias = lo.half()
        w = (w - bias.float()) / scale.float()
        # the error in normalized space is dW' * scale: the right Hessian there is S H S
        h = h * scale.float()[:, None] * scale.float()[None, :]
    h = h / torch.diag(h).mean()
    diag = torch.diag(h).clone()

    perm = torch.argsort(diag, descending=True) if cfg.enable_perm else None
    if perm is not None:
        w, h, diag = w[:, perm], h[perm][:, perm], diag[perm]

    v, v0 = cfg.vector_len, cfg.outlier_vector_len
    books = _Codebooks(lay, v, v0)
    gen_seed = cfg.seed

    def fit(cols: torch.Tensor, col_w: torch.Tensor, k: int, vl: int, seed: int) -> torch.Tensor:
        x = to_vectors(cols, vl)
        rows = x.shape[0] // cols.shape[1]
        wt = col_w.repeat_interleave(rows) if cfg.weighted_kmeans else None
        c = weighted_kmeans(x, k, wt, cfg.kmeans_iters, seed, cfg.kmeans_max_samples, sample=cfg.kmeans_sample)
        return c.half().float()  # stored as fp16: optimise against the stored values

    # --- codebook initialisation: Hessian-weighted k-means per codebook
    o = lay.outlier_size
    if o:
        books.outlier = fit(w[:, :o], diag[:o], cfg.outlier_centroids, v0, gen_seed + 7919)
    for g in range(lay.group_num):
        s = o + g * lay.group_size
        sl = slice(s, s + lay.group_size)
        books.main.append(fit(w[:, sl], diag[sl], cfg.num_centroids, v, gen_seed + g))
        books.res.append(None)

    u = inverse_hessian_factor(h, cfg.damp, rep)

    def segments():
        """(column slice, main codebook, residual codebook or None, vector length)."""
        if o:
            yield slice(0, o), books.outlier, None, v0
        for g in range(lay.group_num):
            s = o + g * lay.group_size
            yield slice(s, s + lay.group_size), books.main[g], books.res[g], v

    def assign_all(w_start: torch.Tensor, use_res: bool):
        """No error feedback: every vector independently to its nearest code (vectorized)."""
        q = torch.zeros_like(w_start)
        codes: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for sl, cb, rc, vl in segments():
            x = to_vectors(w_start[:, sl], vl)  # (C*R, vl), column-major blocks of R vectors
            idx = nearest(x, cb)
            qv = cb[idx]
            ridx = None
            if use_res and rc is not None:
                ridx = nearest(x - qv, rc)
                qv = qv + rc[ridx]
            cols = sl.stop - sl.start
            rows = x.shape[0] // cols
            q[:, sl] = qv.reshape(cols, rows * vl).t()[:m]
            for c in range(cols):
                codes[sl.start + c] = (idx[c * rows : (c + 1) * rows],
                                       None if ridx is None else ridx[c * rows : (c + 1) * rows])
        return q, w_start - q, codes

    def loop(w_start: torch.Tensor, use_res: bool, feedback: bool):
        """The column loop; returns codes and, per column, residual after error feedback."""
        if not feedback:
            return assign_all(w_start, use_res)
        wl = w_start.clone()
        q = torch.zeros_like(wl)
        resid = torch.zeros_like(wl)
        codes: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        sq = {id(c): (c * c).sum(1) for c in [*books.main, *[r for r in books.res if r is not None]]}
        if books.outlier is not None:
            sq[id(books.outlier)] = (books.outlier**2).sum(1)
        bs = cfg.block_size
        for s in range(0, n, bs):
            e_blk = min(s + bs, n)
            err = torch.zeros(m, e_blk - s, device=dev)
            for j in range(s, e_blk):
                col = wl[:, j : j + 1]
                g, _ = books.which(j)
                cb = books.outlier if g < 0 else books.main[g]
                vl = v0 if g < 0 else v
                x = to_vectors(col, vl)  # (R, vl)
                idx = nearest(x, cb, sq[id(cb)])
                qv = cb[idx]
                ridx = None
                if use_res and g >= 0 and books.res[g] is not None:
                    rc = books.res[g]
                    ridx = nearest(x - qv, rc, sq[id(rc)])
                    qv = qv + rc[ridx]
                qc = qv.reshape(-1)[:m]
                q[:, j] = qc
                resid[:, j] = col[:, 0] - qc
                codes[j] = (idx, ridx)
                if feedback:
                    e = (col[:, 0] - qc) / u[j, j]
                    wl[:, j + 1 : e_blk] -= e[:, None] * u[j, j + 1 : e_blk][None, :]
                    err[:, j - s] = e
            if feedback and e_blk < n:
                wl[:, e_blk:] -= err @ u[s:e_blk, e_blk:]  # lazy update of later columns
        return q, resid, codes

    def unperm_denorm(qp: torch.Tensor) -> torch.Tensor:
        out = qp[:, torch.argsort(perm)] if perm is not None else qp
        return out * scale.float()[None, :] + bias.float()[None, :] if scale is not None else out

    q_km, _, _ = loop(w, use_res=False, feedback=False)
    rep.proxy_loss_kmeans = proxy_error(unperm_denorm(q_km) - w0, h_eval) / proxy_error(w0, h_eval)

    q, resid, codes = loop(w, use_res=False, feedback=cfg.error_feedback)
    if cfg.num_res_centroids:
        # residual codebook from what the first pass left, then a joint re-run from W'
        for g in range(lay.group_num):
            s = o + g * lay.group_size
            sl = slice(s, s + lay.group_size)
            books.res[g] = fit(resid[:, sl], diag[sl], cfg.num_res_centroids, v, gen_seed + 104729 + g)
        q, resid, codes = loop(w, use_res=True, feedback=cfg.error_feedback)

    rep.proxy_loss_loop = proxy_error(unperm_denorm(q) - w0, h_eval) / proxy_error(w0, h_eval)
    rows = math.ceil(m / v)
    k, kr, gn = cfg.num_centroids, cfg.num_res_centroids, lay.group_num

    def code_ids(cd):
        """(R, C) ids of each vector's main / residual code in the stacked codebooks."""
        u = torch.empty(rows, n - o, dtype=torch.long, device=dev)
        u2 = torch.empty_like(u) if kr else None
        for j in range(o, n):
            g, _ = books.which(j)
            a, b = cd[j]
            u[:, j - o] = g * k + a
            if u2 is not None:
                u2[:, j - o] = gn * k + g * kr + b
        return u, u2

    def set_books(theta):
        for g in range(gn):
            books.main[g] = theta[g * k : (g + 1) * k]
            if kr:
                books.res[g] = theta[gn * k + g * kr : gn * k + (g + 1) * kr]

    def snapshot(qq, cd):
        return proxy_error(qq - w, h), qq, cd, list(books.main), list(books.res)

    if refines_codebooks(cfg, lay):
        best = snapshot(q, codes)
        for it in range(cfg.refine_iters):
            ids, ids2 = code_ids(codes)
            shift = (q[:, :o] - w[:, :o]) @ h[:o, o:] if o else None
            theta = torch.cat([*books.main, *(books.res if kr else [])])
            theta = refine_codebooks(w[:, o:], h[o:, o:], theta, ids, ids2, shift=shift)
            set_books(theta.half().float())  # stored as fp16
            vals = theta.half().float()[ids] + (theta.half().float()[ids2] if ids2 is not None else 0)
            q = q.clone()
            q[:, o:] = vals.permute(0, 2, 1).reshape(rows * v, n - o)[:m]  # (R, v, C) -> rows
            cand = snapshot(q, codes)
            if cand[0] < best[0]:
                best = cand
            if it + 1 < cfg.refine_iters:  # new codes for the new codebooks
                q, _, codes = loop(w, use_res=bool(kr), feedback=cfg.error_feedback)
                cand = snapshot(q, codes)
                if cand[0] < best[0]:
                    best = cand
        _, q, codes, books.main, books.res = best

    idx = torch.zeros(lay.group_num, rows, lay.group_size, dtype=torch.long, device=dev)
    ridx = torch.zeros_like(idx) if cfg.num_res_centroids else None
    oidx = torch.zeros(1, math.ceil(m / v0), o, dtype=torch.long, device=dev) if o else None
    for j, (a, b) in codes.items():
        g, c = books.which(j)
        if g < 0:
            oidx[0, :, c] = a
        else:
            idx[g, :, c] = a
            if ridx is not None:
                ridx[g, :, c] = b
    if FOLD_PERM and perm is not None and not o and lay.group_num == 1:
        # one group and no outlier columns: the act-order permutation only relabels the columns (each
        # has its own codes; scale and bias are per original column already), so the codes are stored
        # in the original column order and no permutation is. The kernels then read x in order: the
        # gather through the permutation cost the row gemv 4-12 % on an H200 (bench/RESULTS.md,
        # 2026-12-03 (6))
        inv = torch.argsort(perm)
        idx = idx[:, :, inv]
        ridx = ridx[:, :, inv] if ridx is not None else None
        perm = None
    result = VQWeights(
        layout=lay,
        vector_len=v,
        centroids=torch.stack(books.main).half(),
        indices=idx,
        res_centroids=torch.stack(books.res).half() if cfg.num_res_centroids else None,
        res_indices=ridx,
        outlier_vector_len=v0 if o else -1,
        outlier_centroids=books.outlier.half()[None] if o else None,
        outlier_indices=oidx,
        perm=perm,
        weight_scale=scale,
        weight_bias=bias,
    )
    w_hat = dequantize(result)
    rep.proxy_loss = proxy_error(w_hat - w0, h_eval) / proxy_error(w0, h_eval)
    rep.bits = sum(layer_bits(cfg, m, n).values())
    rep.bpw = rep.bits / (m * n)
    rep.seconds = time.perf_counter() - t0
    return result, rep
