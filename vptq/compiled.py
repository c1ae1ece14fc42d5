"""compile_step: torch.compile for a model's one-token decode step (bench/decode.py, `vptq serve`'s lone sequence).

Inductor fuses what runs between the linears (norms, rotary embedding, cache writes, residual adds, SiLU x up)
into a few kernels; a VQuantLinear stays a graph break (its forward is torch.compiler.disable'd: the numba
launches run as in eager, and a CUDA graph captured over the compiled step removes the breaks' host cost).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# A graph break inside a decoder block resumes in frames guarded on that block's own constants (its layer
# index), so each block compiles its own: 32 for a 7B model, over dynamo's default limit of 8 (past it, the
# remaining blocks would silently run eager).
RECOMPILES = 4096


def compile_step(fn: Callable, backend: str = "inductor") -> Callable:
    """fn (a zero-argument step over fixed input tensors and a static cache) compiled for fixed shapes. The
    compile happens on the first call (seconds to a minute); errors surface there."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILES)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, RECOMPILES)
    return torch.compile(fn, backend=backend, dynamic=False)
