"""Hessian-weighted k-means (Lloyd), deterministic for a given seed, device-agnostic.

The weight of a vector is H[j, j] of the input channel it lives in: minimising
sum_i w_i ||x_i - c(i)||^2 is the diagonal part of the proxy loss tr(dW H dW^T).
"""

from __future__ import annotations

import torch

from .config import KmeansSample

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


def weighted_subsample(w: torch.Tensor, m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """About m of the vectors with weights w (n,) to fit a codebook on: (indices, their new weights).

    A uniform sample loses the few vectors that carry most of the weighted error: Qwen2.5's massive-activation
    channels (H[j,j] ~300x the median) kept ~15 % of their vectors in a 131k sample of 871k, and the layer's
    codebook could not serve the rest (bench/RESULTS.md, "Why, and the fix"). So vector i is kept with
    probability p_i = min(1, c (w_i / mean(w) + 1)), c set so that sum p_i = m: half of the budget goes by
    weight (the heaviest are always kept), half uniformly (the bulk keeps ~m/2 samples). A kept vector carries
    w_i / p_i (Horvitz-Thompson), so the sample's weighted objective estimates the full one without bias.
    """
    mean = w.mean()
    s = (w / mean if mean > 0 else torch.zeros_like(w)).double() + 1.0
    desc = s.sort(descending=True).values
    # c with sum min(1, c s) = m: with the t largest capped at 1, c = (m - t) / (sum of the others); the
    # smallest t where the (t+1)-th largest is no longer capped is the fixed point (t = m - 1 always qualifies
    # when n > m: its c is 1 / (a sum that holds it and more))
    t = torch.arange(m, device=s.device, dtype=torch.float64)
    c_t = (m - t) / desc.flip(0).cumsum(0).flip(0)[:m]
    c = c_t[int((c_t * desc[:m] < 1).int().argmax())]
    p = (c * s).clamp(max=1.0)
    keep = (torch.rand(s.numel(), generator=gen, dtype=torch.float64).to(s.device) < p).nonzero().squeeze(1)
    return keep, (w[keep] / p[keep]).to(w.dtype)


def weighted_kmeans(
    x: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 40,
    seed: int = 0,
    max_samples: int | None = None,
    tol: float = 1e-5,
    sample: KmeansSample = "weighted",
) -> torch.Tensor:
    """Fit k centroids to x (n, v) with per-vector weights (n,). Returns (k, v) float32. Above max_samples
    vectors it fits on a sample: `sample` "weighted" (weighted_subsample; QuantConfig.kmeans_sample's default
    too) or "uniform"."""
    x = x.float()
    n, v = x.shape
    w = torch.ones(n, device=x.device) if weights is None else weights.float().clamp_min(0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if max_samples is not None and n > max_samples:
        if sample == "weighted":
            pick, w = weighted_subsample(w, max_samples, gen)
        else:
            pick = torch.randperm(n, generator=gen)[:max_samples].to(x.device)
            w = w[pick]
        x = x[pick]
        n = x.shape[0]
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
