"""Mixture-of-experts layers as one linear per expert, so that each expert's matrices are quantized.

transformers 5 stores a block's experts as two 3-D parameters (`MixtralExperts`, `Qwen2MoeExperts`,
`Qwen3MoeExperts`, ...): `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I), called as
`experts(hidden_states, top_k_index, top_k_weights)`. `LinearExperts` computes exactly that with
`gate_up_proj[e]` / `down_proj[e]` as `nn.Linear` modules (`mlp.experts.gate_up_proj.3`), which the
generic target search, the Hessian hooks, VQuantLinear and the checkpoint's `config_for_layers` then
treat like any other linear: this is our extension of the VPTQ format (the authors' loader has no
per-expert layout); vptq/io.py and vptq/hf_compat.py unfuse the experts before they build
VQuantLinears, so both loaders read it.

Each expert's Hessian comes from the calibration tokens routed to it (the hooks see only those).
An expert that sees fewer than MIN_EXPERT_TOKENS tokens gets the Hessian pooled (token-weighted)
over the block's experts of the same projection, and its layer report says so in a warning; a block
where no expert of a projection saw any token fails with one line (a MoE without calibration tokens).
"""

from __future__ import annotations

import re
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn

MIN_EXPERT_TOKENS = 16  # fewer routed tokens than this: the expert's Hessian is the block's pooled one
# an expert's linear: ours (`experts.gate_up_proj.3`) or a ModuleList of expert MLPs (`experts.3.w1`)
_OURS = re.compile(r"^(.*\bexperts\.(?:gate_up_proj|down_proj))\.\d+$")
_LISTED = re.compile(r"^(.*\bexperts)\.\d+\.(.+)$")


def is_fused_experts(mod: nn.Module) -> bool:
    """transformers 5's fused experts: 3-D gate_up_proj (E, 2I, H) and down_proj (E, H, I), no biases."""
    gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3):
        return False
    e, two_i, h = gu.shape
    own = {n for n, _ in mod.named_parameters(recurse=False)}
    return dn.shape == (e, h, two_i // 2) and own == {"gate_up_proj", "down_proj"} and hasattr(mod, "act_fn")


class LinearExperts(nn.Module):
    """The fused experts' forward with one linear per expert and projection (see the module doc)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module,
                 device=None, dtype=None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, intermediate
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.gate_up_proj = nn.ModuleList(nn.Linear(hidden, 2 * intermediate, **kw) for _ in range(num_experts))
        self.down_proj = nn.ModuleList(nn.Linear(intermediate, hidden, **kw) for _ in range(num_experts))
        self.act_fn = act_fn

    @classmethod
    def from_fused(cls, mod: nn.Module) -> LinearExperts:
        e, two_i, h = mod.gate_up_proj.shape
        new = cls(e, h, two_i // 2, mod.act_fn, device=mod.gate_up_proj.device, dtype=mod.gate_up_proj.dtype)
        if not mod.gate_up_proj.is_meta:
            with torch.no_grad():
                for i in range(e):
                    new.gate_up_proj[i].weight.copy_(mod.gate_up_proj[i])
                    new.down_proj[i].weight.copy_(mod.down_proj[i])
        return new

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = int(e[0])
            if e == self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            gate, up = self.gate_up_proj[e](hidden_states[tok]).chunk(2, dim=-1)
            y = self.down_proj[e](self.act_fn(gate) * up) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module under `model` by a LinearExperts (same values); their names."""
    names = [n for n, m in model.named_modules() if is_fused_experts(m)]
    for n in names:
        model.set_submodule(n, LinearExperts.from_fused(model.get_submodule(n)))
    return names


def expert_key(name: str) -> str | None:
    """The projection an expert's linear belongs to, its expert index as `*` (`mlp.experts.gate_up_proj.*`
    for `mlp.experts.gate_up_proj.3`, `mlp.experts.*.w1` for `mlp.experts.3.w1`); None for other linears."""
    m = _OURS.match(name)
    if m:
        return f"{m[1]}.*"
    m = _LISTED.match(name)
    return f"{m[1]}.*.{m[2]}" if m else None


def with_pooled_fallback(hs: dict[str, torch.Tensor], counts: dict[str, int],
                         names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Hessians of experts that saw too few tokens replaced by the pooled one of their projection.

    hs/counts: what the hooks collected (an expert that saw no token is absent). Returns the Hessians of
    every name and {name: warning} for the ones that fell back. ValueError when no expert of a
    projection saw a token."""
    groups: dict[str, list[str]] = defaultdict(list)
    for n in names:
        key = expert_key(n)
        if key is not None:
            groups[key].append(n)
    out, warn = dict(hs), {}
    for key, members in groups.items():
        seen = [n for n in members if counts.get(n, 0) > 0]
        if not seen:
            raise ValueError(f"{key}: no expert received any calibration token (a router that sends nothing "
                             "there, or too few calibration windows)")
        total = sum(counts[n] for n in seen)
        pooled = sum(hs[n].double() * counts[n] for n in seen) / total
        for n in members:
            c = counts.get(n, 0)
            if c < MIN_EXPERT_TOKENS:
                out[n] = pooled.float()
                warn[n] = (f"expert saw {c} calibration token(s) (< {MIN_EXPERT_TOKENS}): Hessian pooled over "
                           f"the block's {len(seen)} experts that saw tokens")
    return out, warn


@contextmanager
def collect_expert_hessians(modules: dict[str, nn.Linear]):
    """Forward hooks accumulating each expert linear's H over the tokens routed to it, with the token
    counts; yields (hessians, counts), filled when the context exits (an expert that saw no token is
    absent from hessians)."""
    from .hessian import HessianAccumulator

    accs: dict[str, HessianAccumulator] = {}

    def make_hook(name: str):
        def hook(_mod, args, _out):
            x = args[0]
            accs.setdefault(name, HessianAccumulator(x.shape[-1], x.device)).add(x)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    hs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    try:
        yield hs, counts
    finally:
        for hd in handles:
            hd.remove()
    for n, a in accs.items():
        if a.count:
            hs[n], counts[n] = a.value(), a.count
