"""Mixture-of-experts layers as one linear per expert, so that each expert's matrices are quantized.

transformers 5 stores a block's experts as two 3-D parameters (`MixtralExperts`, `Qwen2MoeExperts`,
`Qwen3MoeExperts`, ...): `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I), called as
`experts(hidden_states, top_k_index, top_k_weights)`; others store them transposed, (E, in, out) (Aria,
GPT-OSS with per-expert biases and its own gate, Llama 4, whose experts each run on every token with the
unrouted ones zeroed), or ungated (`up_proj`): `Layout` says which, read from transformers' experts-interface
flags on the module. `LinearExperts` computes exactly that with `gate_up_proj[e]` (or `up_proj[e]`) /
`down_proj[e]` as `nn.Linear` modules (`mlp.experts.gate_up_proj.3`). JetMoE keeps each projection of its MLP and
of its mixture-of-attention heads in a `ParallelExperts` (one (E, out, in) `weight`, called on the routed rows
sorted by expert with one split per expert): `ParallelLinears` holds one `nn.Linear` per expert
(`mlp.input_linear.experts.3`). The rewritten linears are what the
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

import inspect
import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

MIN_EXPERT_TOKENS = 16  # fewer routed tokens than this: the expert's Hessian is the block's pooled one
# an expert's linear: ours (`experts.gate_up_proj.3`) or a ModuleList of expert MLPs (`experts.3.w1`)
_OURS = re.compile(r"^(.*\bexperts\.(?:gate_up_proj|up_proj|down_proj))\.\d+$")
_LISTED = re.compile(r"^(.*\bexperts)\.\d+\.(.+)$")
# a rewritten ParallelExperts (JetMoE): one linear per expert in a list of its own (`mlp.input_linear.experts.3`)
_PARALLEL = re.compile(r"^(.*\bexperts)\.\d+$")


@dataclass(frozen=True)
class Layout:
    """How a fused experts module stores and runs its matrices (transformers' experts interface flags).

    transposed: (E, in, out) rather than (E, out, in); bias: per-expert biases beside each matrix; gate:
    `gate_up_proj` (a gated MLP) rather than `up_proj`; dense: Llama 4's `forward(hidden_states)` over every
    expert, each reading all tokens with the unrouted ones zeroed (the others are called as
    `experts(hidden_states, top_k_index, top_k_weights)`)."""

    transposed: bool = False
    bias: bool = False
    gate: bool = True
    dense: bool = False

    @property
    def up_name(self) -> str:
        return "gate_up_proj" if self.gate else "up_proj"


def experts_layout(mod: nn.Module) -> Layout | None:
    """The Layout of a fused experts module (3-D `gate_up_proj`/`up_proj` and `down_proj`, optional biases),
    None for any other module. transformers' experts interface says the layout in flags on the module;
    a module without them (Llama 4's) is told by its shapes and its forward's arguments."""
    own = dict(mod.named_parameters(recurse=False))
    gate = "gate_up_proj" in own
    up, dn = own.get("gate_up_proj" if gate else "up_proj"), own.get("down_proj")
    if up is None or dn is None or up.dim() != 3 or dn.dim() != 3 or not hasattr(mod, "act_fn") and not gate:
        return None
    if hasattr(mod, "is_transposed"):
        layout = Layout(bool(mod.is_transposed), bool(getattr(mod, "has_bias", False)), gate)
    else:
        n_args = len(inspect.signature(mod.forward).parameters)
        layout = Layout(transposed=n_args == 1, gate=gate, dense=n_args == 1)
    e = up.shape[0]
    hidden, inner = (up.shape[1], dn.shape[1]) if layout.transposed else (up.shape[2], dn.shape[2])
    width = 2 * inner if gate else inner
    want_up, want_dn = ((e, hidden, width), (e, inner, hidden)) if layout.transposed else \
        ((e, width, hidden), (e, hidden, inner))
    names = {layout.up_name, "down_proj"} | ({f"{layout.up_name}_bias", "down_proj_bias"} if layout.bias else set())
    if tuple(up.shape) != want_up or tuple(dn.shape) != want_dn or set(own) != names:
        return None
    if gate and not (hasattr(mod, "act_fn") or hasattr(type(mod), "_apply_gate")):
        return None
    return layout


def is_fused_experts(mod: nn.Module) -> bool:
    """A fused experts module this file rewrites as one linear per expert (see experts_layout)."""
    return experts_layout(mod) is not None


def _default_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return self.act_fn(gate) * up


class LinearExperts(nn.Module):
    """The fused experts' forward with one linear per expert and projection (see the module doc)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module | None,
                 layout: Layout = Layout(), device=None, dtype=None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, intermediate
        self.layout = layout
        kw = {"bias": layout.bias, "device": device, "dtype": dtype}
        width = 2 * intermediate if layout.gate else intermediate
        self.add_module(layout.up_name, nn.ModuleList(nn.Linear(hidden, width, **kw) for _ in range(num_experts)))
        self.down_proj = nn.ModuleList(nn.Linear(intermediate, hidden, **kw) for _ in range(num_experts))
        self.act_fn = act_fn
        self.gate_fn = _default_gate  # a fused module's own `_apply_gate` (GPT-OSS: interleaved, clamped)

    @classmethod
    def from_fused(cls, mod: nn.Module) -> LinearExperts:
        layout = experts_layout(mod)
        up_w, dn_w = getattr(mod, layout.up_name), mod.down_proj
        e = up_w.shape[0]
        hidden, inner = (up_w.shape[1], dn_w.shape[1]) if layout.transposed else (up_w.shape[2], dn_w.shape[2])
        new = cls(e, hidden, inner, getattr(mod, "act_fn", None), layout, device=up_w.device, dtype=up_w.dtype)
        # the scalars a custom gate reads (GPT-OSS's alpha and limit; Ling's limit, None where off), and its
        # post-expert norm if any
        scalars = (bool, int, float, type(None))
        new.__dict__.update({k: v for k, v in vars(mod).items()
                             if not k.startswith("_") and isinstance(v, scalars) and k not in vars(new)})
        if getattr(mod, "has_gate", True) and hasattr(type(mod), "_apply_gate"):
            new.gate_fn = type(mod)._apply_gate
        if getattr(mod, "has_post_expert_norm", False):
            new.post_expert_norm = mod.post_expert_norm
        if not up_w.is_meta:
            with torch.no_grad():
                for i in range(e):
                    for lins, w in ((getattr(new, layout.up_name), layout.up_name), (new.down_proj, "down_proj")):
                        t = getattr(mod, w)[i]
                        lins[i].weight.copy_(t.T if layout.transposed else t)
                        if layout.bias:
                            lins[i].bias.copy_(getattr(mod, f"{w}_bias")[i])
        return new

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = getattr(self, self.layout.up_name)[e](x)
        h = self.gate_fn(self, h) if self.layout.gate else self.act_fn(h)
        h = self.down_proj[e](h)
        return self.post_expert_norm(h) if hasattr(self, "post_expert_norm") else h

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.layout.dense:  # every expert over all tokens; an unrouted (zeroed) row gives zero, so skip it
            x = hidden_states.view(self.num_experts, -1, self.hidden_dim)
            out = torch.zeros_like(x)
            for e in range(self.num_experts):
                rows = x[e].ne(0).any(-1).nonzero().squeeze(-1)
                if rows.numel():
                    out[e, rows] = self._expert(e, x[e, rows]).to(out.dtype)
            return out.view(-1, self.hidden_dim)
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = int(e[0])
            if e == self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            y = self._expert(e, hidden_states[tok]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def is_parallel_experts(mod: nn.Module) -> bool:
    """JetMoE's ParallelExperts (its MLP's and its mixture-of-attention's projections): one (E, out, in) `weight`,
    called as `forward(inputs, expert_size)` on the routed rows sorted by expert, one split per expert."""
    own = dict(mod.named_parameters(recurse=False))
    if set(own) != {"weight"} or own["weight"].dim() != 3 or getattr(mod, "num_experts", None) != own["weight"].shape[0]:
        return False
    return list(inspect.signature(mod.forward).parameters) == ["inputs", "expert_size"]


class ParallelLinears(nn.Module):
    """A ParallelExperts' forward with one nn.Linear per expert (`experts.3`)."""

    def __init__(self, num_experts: int, input_size: int, output_size: int, device=None, dtype=None):
        super().__init__()
        self.num_experts, self.input_size, self.output_size = num_experts, input_size, output_size
        self.experts = nn.ModuleList(nn.Linear(input_size, output_size, bias=False, device=device, dtype=dtype)
                                     for _ in range(num_experts))

    @classmethod
    def from_parallel(cls, mod: nn.Module) -> ParallelLinears:
        w = mod.weight
        new = cls(w.shape[0], w.shape[2], w.shape[1], device=w.device, dtype=w.dtype)
        if not w.is_meta:
            with torch.no_grad():
                for i, lin in enumerate(new.experts):
                    lin.weight.copy_(w[i])
        return new

    def forward(self, inputs: torch.Tensor, expert_size) -> torch.Tensor:
        # an expert no row was routed to is not run (its hooks would see an empty input)
        parts = inputs.split(expert_size, dim=0)
        return torch.cat([lin(x) if x.shape[0] else x.new_zeros(0, lin.out_features)
                          for lin, x in zip(self.experts, parts, strict=True)], dim=0)


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module under `model` by a LinearExperts, every ParallelExperts by a
    ParallelLinears (same values); their names."""
    found = [(n, ParallelLinears.from_parallel if is_parallel_experts(m) else LinearExperts.from_fused)
             for n, m in model.named_modules() if is_fused_experts(m) or is_parallel_experts(m)]
    for n, rewrite in found:
        model.set_submodule(n, rewrite(model.get_submodule(n)))
    return [n for n, _ in found]


def expert_key(name: str) -> str | None:
    """The projection an expert's linear belongs to, its expert index as `*` (`mlp.experts.gate_up_proj.*`
    for `mlp.experts.gate_up_proj.3`, `mlp.experts.*.w1` for `mlp.experts.3.w1`); None for other linears."""
    m = _OURS.match(name)
    if m:
        return f"{m[1]}.*"
    m = _LISTED.match(name)
    if m:
        return f"{m[1]}.*.{m[2]}"
    m = _PARALLEL.match(name)
    return f"{m[1]}.*" if m else None


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
