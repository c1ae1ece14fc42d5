"""Hessian-weighted k-means (Lloyd), deterministic for a given seed, device-agnostic.

The weight of a vector is H[j, j] of the input channel it lives in: minimising
sum_i w_i ||x_i - c(i)||^2 is the diagonal part of the proxy loss tr(dW H dW^T).
"""

from __future__ import annotations

import torch

_TILE = 1 << 27  # floats per distance tile (512 MiB): a full 2M x 65536 matrix would be 0.5 TB


# below this many vectors (one column of the column loop) a launch costs more than it saves
_KERNEL_MIN_VECTORS = 1 << 14


def tile_rows(k: int) -> int:
    """Rows of x per distance tile against k centroids (nearest()); vptq.plan sizes its memory by it."""
    return max(1024, _TILE // k)


def nearest(x: torch.Tensor, centroids: torch.Tensor, c_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest centroid (Euclidean) for each row of x: (n, v) x (k, v) -> (n,)."""
    if x.is_cuda and x.shape[0] >= _KERNEL_MIN_VECTORS:
        # the numba kernel (codebook tiles in shared memory); it falls back to the same
        # matmul form below when numba is missing or the shape is unsupported
        from vptq.kernels.dispatch import nearest as kernel_nearest

        return kernel_nearest(x, centroids, c_sq)
    if c_sq is None:
        c_sq = (centroids * centroids).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    step = tile_rows(centroids.shape[0])
    for s in range(0, x.shape[0], step):
        xs = x[s : s + step]
        # ||x||^2 is constant per row, so argmin of ||c||^2 - 2 x.c is the nearest centroid
        d = torch.addmm(c_sq.unsqueeze(0), xs, centroids.t(), beta=1.0, alpha=-2.0)
        out[s : s + step] = d.argmin(1)
    return out


def weighted_kmeans(
    x: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 40,
    seed: int = 0,
    max_samples: int | None = None,
    tol: float = 1e-5,
) -> torch.Tensor:
    """Fit k centroids to x (n, v) with per-vector weights (n,). Returns (k, v) float32."""
    x = x.float()
    n, v = x.shape
    w = torch.ones(n, device=x.device) if weights is None else weights.float().clamp_min(0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if max_samples is not None and n > max_samples:
        pick = torch.randperm(n, generator=gen)[:max_samples].to(x.device)
        x, w = x[pick], w[pick]
        n = max_samples
    if n <= k:  # fewer vectors than codes: every vector is a centroid, pad with copies
        reps = torch.arange(k) % max(n, 1)
        return x[reps.to(x.device)].clone() if n else torch.zeros(k, v, device=x.device)
    # seed centroids with distinct vectors drawn with probability ~ weight
    p = (w + 1e-12).cpu().double()
    init = torch.multinomial(p, k, replacement=False, generator=gen).to(x.device)
    c = x[init].clone()
    prev = float("inf")
    for _ in range(iters):
        c_sq = (c * c).sum(1)
        a = nearest(x, c, c_sq)
        sums = torch.zeros_like(c).index_add_(0, a, x * w[:, None])
        mass = torch.zeros(k, device=x.device).index_add_(0, a, w)
        live = mass > 0
        c[live] = sums[live] / mass[live, None]
        err = (w * ((x - c[a]) ** 2).sum(1))
        if (~live).any():
            # empty clusters waste codes: re-seed them at the worst-served vectors
            worst = err.topk(int((~live).sum())).indices
            c[~live] = x[worst]
        loss = float(err.sum())
        if prev - loss <= tol * max(prev, 1e-30) and live.all():
            break
        prev = loss
    return c
