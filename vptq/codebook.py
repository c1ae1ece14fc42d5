"""Closed-form codebook update: with the codes fixed, the centroids that minimise the proxy loss
tr((Q - W) H (Q - W)^T) solve a small linear system (GPTVQ's "codebook update", done exactly).

k-means fits centroids to the *diagonal* of H only; after the column loop has chosen codes with
error feedback, the full H (cross-channel terms) can move the centroids further. Every entry of
Q is one centroid component (plus one residual component), so Q is linear in the centroids:

    Q[r*v + t, j] = theta[t, U[r, j]] (+ theta[t, U2[r, j]])

where U maps (vector row r, column j) to a row of the stacked codebooks. For each component t
the loss is quadratic in theta[t]: K theta[t] = b_t with K = sum_r P_r^T H P_r (P_r the one-hot
code matrix of vector row r, the same for every t) and b_t = sum_r P_r^T H w_{r*v+t}.
"""

from __future__ import annotations

import torch


def _gram(h: torch.Tensor, u: torch.Tensor, u2: torch.Tensor | None, t: int) -> torch.Tensor:
    """sum over rows r of u of P_r^T h P_r, (t, t). u, u2: (R, C) unknown ids of the C columns."""
    c = h.shape[0]
    k = torch.zeros(t, t, dtype=h.dtype, device=h.device)
    for r in range(u.shape[0]):
        a = torch.zeros(t, c, dtype=h.dtype, device=h.device).index_add_(0, u[r], h)  # P^T h
        if u2 is not None:
            a.index_add_(0, u2[r], h)
        k.index_add_(1, u[r], a)  # (P^T h) P
        if u2 is not None:
            k.index_add_(1, u2[r], a)
    return k


def refine_codebooks(
    w: torch.Tensor,
    h: torch.Tensor,
    theta: torch.Tensor,
    u: torch.Tensor,
    u2: torch.Tensor | None = None,
    ridge: float = 1e-4,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Proxy-optimal stacked codebooks for fixed codes.

    w: (M, C) target columns; h: (C, C) their Hessian block; theta: (T, v) current stacked
    codebooks; u, u2: (R, C) long ids into theta of the main and residual code of every
    vector (R = ceil(M / v)). shift (M, C), optional: E_f H_fc, the pull of the error E_f of
    columns kept fixed (outliers) through their cross terms with these columns. Returns new (T, v). A ridge pulls each centroid towards its
    current value in proportion to its own curvature, so unused codes stay put and the solve
    is well posed.
    """
    m, c = w.shape
    tt, v = theta.shape
    hd = h.double()
    full = m // v  # vector rows without padding; a last partial row exists if m % v
    k_full = _gram(hd, u[:full], None if u2 is None else u2[:full], tt)
    k_last = _gram(hd, u[full:], None if u2 is None else u2[full:], tt) if full < u.shape[0] else None
    y = w.double() @ hd  # (M, C): row m of W times H
    if shift is not None:
        y -= shift.double()
    out = theta.double().clone()
    for t in range(v):
        rows = torch.arange(t, m, v, device=w.device)  # the rows using component t
        nr = rows.numel()
        kt = k_full + k_last if (k_last is not None and nr > full) else k_full
        b = torch.zeros(tt, dtype=hd.dtype, device=w.device)
        b.index_add_(0, u[:nr].reshape(-1), y[rows].reshape(-1))
        if u2 is not None:
            b.index_add_(0, u2[:nr].reshape(-1), y[rows].reshape(-1))
        d = torch.diagonal(kt)
        reg = ridge * d + 1e-9 * float(d.mean().clamp_min(1e-30))
        a = kt + torch.diag(reg)
        out[:, t] = torch.linalg.solve(a, b + reg * out[:, t])
    return out.to(theta.dtype)
