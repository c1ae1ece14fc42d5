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


NEVER_RAN = ("never ran during calibration (a branch the calibration windows do not take, e.g. cross-attention "
             "without an encoder): quantized without data (H = I)")


class Hessians(dict):
    """{linear name: H}, and `warnings` {name: why its H is not its own}: a linear the calibration never
    ran (NEVER_RAN), an MoE expert that saw too few tokens (vptq.experts)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.warnings: dict[str, str] = {}


@contextmanager
def collect_hessians(modules: dict[str, nn.Linear]):
    """Forward hooks accumulating H for every named linear while the model/block runs.

    Linears called one after another on the *same tensor object* (q/k/v, gate/up) share one
    accumulator: the Hessian is identical, so it is computed once. The last input is held by
    reference, so its memory cannot be reused by another tensor and fool the identity check.
    Yields a Hessians dict that is filled with name -> H (float32) when the context exits. A linear
    that never ran gets the identity, so it is quantized like the rest (never left half-done), with a
    warning: its inputs are unknown, and the identity weighs every column alike.
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
    result = Hessians()
    try:
        yield result
    finally:
        for hd in handles:
            hd.remove()
        last["x"] = None
    for name in modules:
        src = accs.get(name) or accs.get(owner.get(name, ""))
        if src is None:
            w = modules[name].weight
            result[name] = torch.eye(w.shape[1], dtype=torch.float32, device=w.device)
            result.warnings[name] = NEVER_RAN
            continue
        result[name] = src.value()
