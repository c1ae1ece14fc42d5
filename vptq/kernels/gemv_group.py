"""One row-per-lane gemv launch for several layers that read the same x (q/k/v, gate/up), batch 1.

Why: at 7B decode shapes a gemv launch costs a fixed ~5 µs (launch, x' staging, codebook fill,
split-K epilogue) against ~4 µs of work, and a Llama block calls seven linears, three of them
(q, k, v) and two more (gate, up) on the same activation. One launch for each such set puts the
row tiles of every layer on one grid (kernels/gemv_rows.py `kernel_rows(group=...)`), so the
fixed cost is paid twice per block instead of five times. The layers keep their own tensors
(nothing is copied or stacked); y holds their outputs side by side.
"""

from __future__ import annotations

import torch

from . import _numba as nb
from .gemv import GemvPlan
from .gemv_rows import rows_config, rows_launch

_SAME = ("in_features", "vector_len", "code_bits", "num_centroids", "num_res_centroids", "device")


def layer_blocks(tiles: list[int], total: int) -> list[int]:
    """Blocks for each layer of a persistent group launch: its share of `total` by tiles (rounded
    down), at least one, at most its tiles."""
    s = sum(tiles)
    return [max(1, min(t, total * t // s)) for t in tiles]


class RowsGroupPlan:
    """Fused batch-1 gemv of two or more layers on the row kernel; build from their GemvPlans.
    Persistent when the first plan is (kernels/gemv_rows.py PERSIST_BITS); gx: the blocks of a
    column chunk in all (default: as many as fill the SMs)."""

    def __init__(self, plans: list[GemvPlan], gx: int | None = None):
        if len(plans) < 2:
            raise ValueError("group: needs two or more layers")
        if any(pl.path != "rows" for pl in plans):
            raise ValueError("group: every layer must take the row-per-lane kernel (8-bit codes, one group)")
        # interleaved codes are in the order of their plan's lanes per row and warp: the group's must be the same
        # (whether their columns are in the original order follows from ilv and the permutation, checked below)
        order = {(c["ilv"], c["lpr"], c["gsz"]) if c["ilv"] else (False,) for c in (pl.rows_cfg for pl in plans)}
        if len(order) > 1:
            raise ValueError("group: layers differ in the order of their codes (ilv, lanes per row)")
        p0 = plans[0].p
        for pl in plans[1:]:
            p = pl.p
            diff = [a for a in _SAME if getattr(p, a) != getattr(p0, a)]
            diff += [a for a in ("perm", "weight_scale", "bias") if (getattr(p, a) is None) != (getattr(p0, a) is None)]
            if diff:
                raise ValueError(f"group: layers differ in {', '.join(diff)}")
        self.plans = plans
        self.sim = plans[0].sim
        c0 = plans[0].rows_cfg
        self.threads = plans[0].rows_threads
        tiles = [nb.cdiv(pl.p.rows, c0["rw"]) for pl in plans]
        persist = c0["persist"]
        self.cfg = rows_config(p0, self.threads, plans[0].warp, tiles=sum(tiles), lpr=c0["lpr"], rw=c0["rw"],
                               persist=persist, gx=gx, ahead=c0["ahead"], ilv=c0["ilv"],
                               maxreg=plans[0].rows_maxreg if persist else None)
        if persist:  # the blocks of a column chunk shared by the layers as their tiles are: each walks one layer's
            blocks = layer_blocks(tiles, self.cfg["gx"])
            self.cfg["gx"] = sum(blocks)
            self.group = tuple((t, pl.p.out_features, b) for t, pl, b in zip(tiles, plans, blocks, strict=True))
        else:
            self.group = tuple((t, pl.p.out_features) for t, pl in zip(tiles, plans, strict=True))
        self.splits = [pl.p.out_features for pl in plans]
        self.out_features = sum(self.splits)
        dev = p0.device
        self.cnt = torch.zeros(sum(tiles), dtype=torch.int32, device=dev)
        n = self.out_features if self.cfg["nsplit"] > 1 else 1
        self.ws = torch.zeros(1, n, dtype=torch.float32, device=dev)
        self.static = [t for pl in plans for t in pl.rows_static()] + [self.ws, self.cnt]
        self.maxreg = plans[0].rows_maxreg
        self._fast: dict = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (1, in_features) contiguous, fp16/fp32 -> y (1, sum of out_features) in x.dtype."""
        if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != self.plans[0].p.in_features or not x.is_contiguous():
            raise ValueError(f"x: expected a contiguous (1, {self.plans[0].p.in_features}), got {tuple(x.shape)}")
        y = torch.empty(1, self.out_features, dtype=x.dtype, device=x.device)
        fast = self._fast.get(x.dtype)
        if fast is not None:
            nb.launch_fast(fast, x, y)
            return y
        c = self.cfg
        kern, scalars = rows_launch(self.plans[0].p, c, x.dtype, self.maxreg, group=self.group)
        grid = (c["gx"], c["nsplit"])
        nb.launch(kern, grid, self.threads, nb.stream_for(x), x, *self.static, y, *scalars, shmem=c["shmem"])
        if not self.sim:
            self._fast[x.dtype] = nb.prepare_fast(kern, grid, self.threads, c["shmem"], self.static, scalars)
        return y

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's output: views of y."""
        return list(torch.split(y, self.splits, dim=1))
