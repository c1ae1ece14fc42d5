"""The order in which a block's forward calls its linears, in groups that read the same input.

hessians="true-sequential" (GPTQ's "true sequential") quantizes a block's linears one group at a time
in this order (Llama-like blocks: q/k/v, then o_proj, then gate/up, then down_proj), and takes each
group's Hessians with the groups before it already quantized: down_proj is fitted to the inputs that
the *quantized* gate/up give it, not to the FP block's. Block-level "sequential" Hessians take every
Hessian of a block before any of its linears changes, so that compounding inside a block goes unseen
(bench/RESULTS.md, "What breaks the 4-bit preset one-shot on Qwen2.5-0.5B").

The groups come from one traced forward, so nothing here names an architecture. A mixture-of-experts
block's experts form one group where the first of them runs: each expert reads its own routed tokens
(no shared input to group by), and one group per expert would cost a block forward each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .experts import expert_key


@torch.no_grad()
def trace_calls(run: Callable[[], object], lins: dict[str, nn.Linear]) -> list[tuple[str, torch.Tensor]]:
    """(name, input tensor) of every call of `lins` while `run()` (one forward of their block) runs, in
    order. The inputs are held, so no tensor id is reused while the trace is read."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: calls.append((n, args[0]))) for n, m in lins.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return calls


def call_groups(calls: list[tuple[str, torch.Tensor]], lins: dict[str, nn.Linear]) -> list[list[str]]:
    """The names of `lins` in groups, in the order of the traced `calls` (trace_calls).

    Consecutive calls on the same tensor object share a group (q/k/v, gate/up); every expert linear
    is in the group of the first one called; linears the forward never called go in the last group."""
    groups: list[list[str]] = []
    placed: set[str] = set()
    experts = [n for n in lins if expert_key(n) is not None]
    last: torch.Tensor | None = None
    for name, x in calls:
        if name in placed:
            last = x
            continue
        if expert_key(name) is not None:
            groups.append(list(experts))  # every expert at once, whichever ran here
            placed.update(experts)
            last = None
            continue
        if last is not x or not groups:
            groups.append([])
        groups[-1].append(name)
        placed.add(name)
        last = x
    rest = [n for n in lins if n not in placed]
    if rest:
        if not groups:
            groups.append([])
        groups[-1].extend(rest)
    return groups
