"""Nearest centroid per vector: X (N, v) against a codebook C (K, v) -> (index, distance).

`assign_ref` is the torch oracle and the spec; `assign` is the numba.cuda kernel with the same
signature. The kernel keeps ROWS_PER_THREAD vectors of X in registers, streams the codebook
through shared memory in tiles of TILE_K centroids and keeps a running argmin of
0.5*||c||^2 - x.c (the same argmin as ||x - c||^2, half the arithmetic). Ties go to the lowest
index, as in torch.argmin. Distances returned are ||x - c||^2 (times the vector's weight).
"""

from __future__ import annotations

import functools

import torch

from . import _numba as nb

TILE_K = 256  # centroids per shared-memory tile
THREADS = 128  # threads per block
ROWS_PER_THREAD = 4  # vectors of X held in registers by one thread
CHUNK_ROWS = 1 << 24  # vectors per launch (bounds the grid; outputs are written in place)
SUPPORTED_V = (2, 4, 6, 8, 12, 16)
MAX_K = 65536
_REF_TILE = 1 << 26  # floats per distance tile in the torch reference (256 MiB)

cuda = float32 = int32 = None  # bound lazily by _kernel(): numba is optional


def check_assign_inputs(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None,
                        c_sq: torch.Tensor | None = None, *, kernel: bool = True) -> None:
    """ValueError naming the tensor when shapes/dtypes do not fit, before anything is launched."""
    if x.dim() != 2:
        raise ValueError(f"x: expected (N, v), got shape {tuple(x.shape)}")
    if centroids.dim() != 2:
        raise ValueError(f"centroids: expected (K, v), got shape {tuple(centroids.shape)}")
    n, v = x.shape
    k = centroids.shape[0]
    if centroids.shape[1] != v:
        raise ValueError(f"centroids: vector length {centroids.shape[1]} != x's {v}")
    if k < 1:
        raise ValueError("centroids: empty codebook")
    floats = (torch.float16, torch.float32) if kernel else (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for name, t in (("x", x), ("centroids", centroids)):
        if t.dtype not in floats:
            raise ValueError(f"{name}: dtype {t.dtype} not supported (use one of {floats})")
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, x is on {x.device}")
    if weights is not None:
        if weights.shape != (n,):
            raise ValueError(f"weights: expected shape ({n},), got {tuple(weights.shape)}")
        if not weights.is_floating_point() or weights.device != x.device:
            raise ValueError(f"weights: must be a float tensor on {x.device}")
    if c_sq is not None:
        if c_sq.shape != (k,):
            raise ValueError(f"c_sq: expected shape ({k},), got {tuple(c_sq.shape)}")
        if not c_sq.is_floating_point() or c_sq.device != x.device:
            raise ValueError(f"c_sq: must be a float tensor on {x.device}")
    if kernel:
        if v not in SUPPORTED_V:
            raise ValueError(f"x: vector length {v} not supported by the kernel (one of {SUPPORTED_V})")
        if k > MAX_K:
            raise ValueError(f"centroids: {k} centroids > {MAX_K}")
        for name, t in (("x", x), ("centroids", centroids), ("weights", weights), ("c_sq", c_sq)):
            if t is not None and not t.is_contiguous():
                raise ValueError(f"{name}: must be contiguous (call .contiguous())")


def assign_ref(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None,
               c_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch oracle: (N,) int64 index of the nearest centroid and (N,) float32 weighted distance."""
    check_assign_inputs(x, centroids, weights, c_sq, kernel=False)
    c = centroids.float()
    if c_sq is None:
        c_sq = (c * c).sum(1)
    c_sq = c_sq.float()
    n = x.shape[0]
    idx = torch.empty(n, dtype=torch.long, device=x.device)
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    step = max(1024, _REF_TILE // c.shape[0])
    for s in range(0, n, step):
        xs = x[s : s + step].float()
        d = torch.addmm(c_sq.unsqueeze(0), xs, c.t(), beta=1.0, alpha=-2.0)  # ||c||^2 - 2 x.c
        best, i = d.min(1)
        idx[s : s + step] = i
        dist[s : s + step] = (best + (xs * xs).sum(1)).clamp_min(0)
    if weights is not None:
        dist = dist * weights.float()
    return idx, dist


@functools.cache
def _kernel(v: int, rows: int, tile: int, threads: int):
    """Kernel specialised for vector length v (loops over v and rows unroll into registers)."""
    global cuda, float32, int32
    cuda = nb.cuda()  # a module global: the simulator swaps it for its fake module inside kernels
    from numba import float32, int32

    inf = float32(3.0e38)

    @cuda.jit
    def assign_kernel(x, c, hsq, w, use_w, out_idx, out_dist):
        """Each thread: `rows` vectors of x against every centroid, tile by tile."""
        n = x.shape[0]
        k = c.shape[0]
        sc = cuda.shared.array((tile, v), float32)  # codebook tile
        sh = cuda.shared.array(tile, float32)  # 0.5 * ||c||^2 of the tile
        tid = cuda.threadIdx.x
        base = cuda.blockIdx.x * threads * rows
        xr = cuda.local.array((rows, v), float32)
        best = cuda.local.array(rows, float32)
        bidx = cuda.local.array(rows, int32)
        cj = cuda.local.array(v, float32)
        for r in range(rows):
            row = base + r * threads + tid
            best[r] = inf
            bidx[r] = 0
            for t in range(v):
                xr[r, t] = float32(x[row, t]) if row < n else float32(0.0)
        for k0 in range(0, k, tile):
            kt = min(tile, k - k0)
            for e in range(tid, kt * v, threads):
                sc[e // v, e % v] = c[k0 + e // v, e % v]
            for j in range(tid, kt, threads):
                sh[j] = hsq[k0 + j]
            cuda.syncthreads()  # tile fully loaded before anyone reads it
            for j in range(kt):
                for t in range(v):
                    cj[t] = sc[j, t]
                h = sh[j]
                for r in range(rows):
                    dot = float32(0.0)
                    for t in range(v):
                        dot += xr[r, t] * cj[t]
                    s = h - dot
                    if s < best[r]:
                        best[r] = s
                        bidx[r] = k0 + j
            cuda.syncthreads()  # everyone done with this tile before it is overwritten
        for r in range(rows):
            row = base + r * threads + tid
            if row < n:
                xx = float32(0.0)
                for t in range(v):
                    xx += xr[r, t] * xr[r, t]
                d = xx + float32(2.0) * best[r]
                if d < float32(0.0):
                    d = float32(0.0)
                if use_w:
                    d *= float32(w[row])
                out_idx[row] = bidx[r]
                out_dist[row] = d

    return assign_kernel


def assign(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None,
           c_sq: torch.Tensor | None = None, *, rows_per_thread: int = ROWS_PER_THREAD,
           tile_k: int = TILE_K, threads: int = THREADS) -> tuple[torch.Tensor, torch.Tensor]:
    """numba.cuda nearest centroid; same contract as `assign_ref` (tile sizes overridable for tests)."""
    check_assign_inputs(x, centroids, weights, c_sq, kernel=True)
    n, v = x.shape
    dev = x.device
    c = centroids.float().contiguous()
    hsq = 0.5 * ((c * c).sum(1) if c_sq is None else c_sq.float())
    hsq = hsq.contiguous()
    w = weights.float().contiguous() if weights is not None else nb.dummy(dev)
    idx = torch.empty(n, dtype=torch.int32, device=dev)
    dist = torch.empty(n, dtype=torch.float32, device=dev)
    kern = _kernel(v, rows_per_thread, tile_k, threads)
    stream = nb.stream_for(x)
    per_block = threads * rows_per_thread
    for s in range(0, n, CHUNK_ROWS):
        e = min(n, s + CHUNK_ROWS)
        nb.launch(kern, nb.grid_1d(e - s, per_block), threads, stream, x[s:e], c, hsq,
                  w[s:e] if weights is not None else w, weights is not None, idx[s:e], dist[s:e])
    return idx.long(), dist
