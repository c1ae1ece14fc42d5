"""Proxy Hessians H = E[x x^T] of linear inputs, accumulated as a running mean in float64."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class HessianAccumulator:
    """Running mean of x x^T over all tokens seen; float64 so long runs do not drift."""

    def __init__(self, n: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.h.device, torch.float64)
        t = x.shape[0]
        if t == 0:
            return
        self.h *= self.count / (self.count + t)
        self.h.addmm_(x.t(), x, alpha=1.0 / (self.count + t))
        self.count += t

    def value(self) -> torch.Tensor:
        return self.h.float()


@contextmanager
def collect_hessians(modules: dict[str, nn.Linear]):
    """Forward hooks accumulating H for every named linear while the model/block runs.

    Linears called one after another on the *same tensor object* (q/k/v, gate/up) share one
    accumulator: the Hessian is identical, so it is computed once. The last input is held by
    reference, so its memory cannot be reused by another tensor and fool the identity check.
    Yields a dict that is filled with name -> H (float32) when the context exits.
    """
    accs: dict[str, HessianAccumulator] = {}
    owner: dict[str, str] = {}  # name -> name of the accumulator it shares
    last: dict = {"x": None, "name": None}
    handles = []

    def make_hook(name: str):
        def hook(_mod, args, _out):
            x = args[0]
            if last["x"] is x:
                owner[name] = owner.get(last["name"], last["name"])
                return
            accs.setdefault(name, HessianAccumulator(x.shape[-1], x.device)).add(x)
            last["x"], last["name"] = x, name

        return hook

    for name, mod in modules.items():
        handles.append(mod.register_forward_hook(make_hook(name)))
    result: dict[str, torch.Tensor] = {}
    try:
        yield result
    finally:
        for hd in handles:
            hd.remove()
        last["x"] = None
    for name in modules:
        src = accs.get(name) or accs.get(owner.get(name, ""))
        if src is None:
            raise RuntimeError(f"linear {name} never ran during calibration")
        result[name] = src.value()
