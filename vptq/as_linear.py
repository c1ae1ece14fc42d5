"""Block weights that are linears in another form, rewritten as `nn.Linear` modules with the same values.

The target search, the Hessian hooks, VQuantLinear and both loaders know one kind of matrix weight, the
`nn.Linear`. Two other forms compute the same thing and are rewritten before any of them looks at a block:

* fused MoE experts, 3-D parameters in any of transformers' layouts, and JetMoE's ParallelExperts: one linear
  per expert and projection (vptq/experts.py);
* GPT-2's `Conv1D` (GPT-2, GPT-Neo's relatives, openai-gpt, gpt-sw3): `x @ weight + bias` with the weight
  stored (in, out): an `nn.Linear` holding its transpose.

The driver rewrites each block it quantizes; the loaders rewrite the blocks that hold quantized layers
(the blocks the driver went through: vptq.targets.rewrite_for_checkpoint), so the saved names and shapes are
those of the rewritten modules.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import is_fused_experts, is_parallel_experts, unfuse_experts


def is_conv1d(mod: nn.Module) -> bool:
    """transformers' Conv1D: a 2-D weight (in, out) and `nf` output features (by class, so that no
    transformers import is needed here)."""
    w = getattr(mod, "weight", None)
    return (type(mod).__name__ == "Conv1D" and isinstance(w, nn.Parameter) and w.dim() == 2
            and getattr(mod, "nf", None) == w.shape[1])


def linear_from_conv1d(mod: nn.Module) -> nn.Linear:
    """The nn.Linear computing what `mod` (a Conv1D) does: weight transposed, the same bias."""
    n_in, n_out = mod.weight.shape
    lin = nn.Linear(n_in, n_out, bias=mod.bias is not None, device=mod.weight.device, dtype=mod.weight.dtype)
    if not mod.weight.is_meta:
        with torch.no_grad():
            lin.weight.copy_(mod.weight.T)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
    lin.requires_grad_(mod.weight.requires_grad)
    return lin


def needs_rewrite(module: nn.Module) -> bool:
    """Whether `module` holds a linear in another form."""
    return any(is_fused_experts(m) or is_parallel_experts(m) or is_conv1d(m) for m in module.modules())


def as_linears(module: nn.Module) -> list[str]:
    """Rewrite every linear in another form under `module` in place; the rewritten modules' names."""
    names = unfuse_experts(module)
    convs = [n for n, m in module.named_modules() if is_conv1d(m)]
    for n in convs:
        module.set_submodule(n, linear_from_conv1d(module.get_submodule(n)))
    return names + convs

