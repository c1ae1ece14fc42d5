"""Entry points for vptq/: numba.cuda kernels for CUDA tensors, the torch references otherwise.

Importing this module never imports numba; the kernels' modules import it on first use.

    nearest(x, centroids, c_sq=None) -> idx            drop-in for vptq.kmeans.nearest
    assign(x, centroids, weights=None, c_sq=None) -> (idx, dist)
    dequantize(layer, dtype) -> W                       layer: PackedLayer or VQuantLinear
    gemv(x, layer) -> y                                 y = x W^T + bias, 1..8 rows
    vq_linear_forward(module, x) -> y or None           VQuantLinear's CUDA route
    vq_linear_forward_cpu(module, x) -> y or None       its CPU route (kernels/cpu.py), opt-in: use_cpu_kernels
"""

from __future__ import annotations

import functools
import os

import torch

from . import _numba as nb
from .assign import MAX_K, SUPPORTED_V, assign_ref
from .dequant import dequantize_ref
from .gemv import MAX_BATCH, gemv_ref
from .layout import PackedLayer, check_layer, column_map

FUSED_MAX_ROWS = MAX_BATCH  # token rows up to which VQuantLinear uses the fused gemv
# VPTQ_CHUNKED_ROWS: token rows up to which VQuantLinear runs the fused gemv on chunks of FUSED_MAX_ROWS
# rows (each chunk reads the packed codes again); above, the dequantize kernel writes the dense weight
# for F.linear
CHUNKED_ENV = "VPTQ_CHUNKED_ROWS"
CHUNKED_MAX_ROWS = 0


def _assign_on_kernel(x: torch.Tensor, centroids: torch.Tensor) -> bool:
    return (nb.use_kernels(x, centroids) and x.dim() == 2 and x.shape[1] in SUPPORTED_V
            and 0 < centroids.shape[0] <= MAX_K and x.dtype in (torch.float16, torch.float32)
            and centroids.dtype in (torch.float16, torch.float32))


def assign(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None,
           c_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) int64 nearest-centroid index and (N,) float32 (weighted) squared distance."""
    if _assign_on_kernel(x, centroids):
        from .assign import assign as assign_kernel

        return assign_kernel(x.contiguous(), centroids.contiguous(),
                             None if weights is None else weights.contiguous(),
                             None if c_sq is None else c_sq.contiguous())
    return assign_ref(x, centroids, weights, c_sq)


def nearest(x: torch.Tensor, centroids: torch.Tensor, c_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Index (int64) of the nearest centroid for each row of x: (n, v) x (k, v) -> (n,)."""
    return assign(x, centroids, None, c_sq)[0]


def _packed(layer) -> PackedLayer:
    return layer if isinstance(layer, PackedLayer) else PackedLayer.from_module(layer)


def _kernel_layer(p: PackedLayer, *tensors: torch.Tensor) -> bool:
    f16 = (p.centroids, p.res_centroids, p.outlier_centroids)
    ok_f = all(t is None or t.dtype == torch.float16 for t in f16)
    ok_n = all(t is None or t.dtype in (torch.float16, torch.float32)
               for t in (p.weight_scale, p.weight_bias, p.bias))
    return ok_f and ok_n and p.vector_len <= 16 and nb.use_kernels(p.indices, *tensors)


def dequantize(layer, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Dense (M, N) weight of a stored layer in dtype."""
    p = _packed(layer)
    if dtype in (torch.float16, torch.float32) and _kernel_layer(p):
        from .dequant import dequantize as dequantize_kernel

        return dequantize_kernel(p, dtype)
    return dequantize_ref(p, dtype)


def gemv(x: torch.Tensor, layer) -> torch.Tensor:
    """y = x W^T + bias for x (B, N), B <= 8, without forming W on CUDA."""
    p = _packed(layer)
    if x.dim() == 2 and 1 <= x.shape[0] <= MAX_BATCH and x.dtype in (torch.float16, torch.float32) \
            and _kernel_layer(p, x):
        from .gemv import gemv as gemv_kernel

        return gemv_kernel(x.contiguous(), p)
    return gemv_ref(x, p)


INTERLEAVE_ENV = "VPTQ_INTERLEAVE_CODES"


def interleave_codes_wanted() -> bool:
    """VPTQ_INTERLEAVE_CODES=1: batch-1 plans keep a copy of the codes in the row kernel's load order
    (bench/RESULTS.md: 3-19 % faster gemv on an H200, its columns in the original order so that x needs
    no gather, at the cost of the codes' GPU memory once more).
    Read when a layer's plan is built."""
    val = os.environ.get(INTERLEAVE_ENV, "0").strip()
    if val not in ("0", "1"):
        raise ValueError(f"{INTERLEAVE_ENV}: {val!r} is not 0 or 1")
    return val == "1"


def chunked_rows_wanted() -> int:
    """Token rows up to which a layer runs the gemv on chunks of 8 rows (VPTQ_CHUNKED_ROWS, default
    CHUNKED_MAX_ROWS). Read when a layer's plans are built."""
    val = os.environ.get(CHUNKED_ENV, "").strip()
    if not val:
        return CHUNKED_MAX_ROWS
    if not val.isdigit():
        raise ValueError(f"{CHUNKED_ENV}: {val!r} is not a whole number of token rows")
    return int(val)


def _layer_state(mod):
    """(PackedLayer, GemvPlan, DequantPlan, chunked_rows_wanted()) of a VQuantLinear, validated once
    and cached on the module.

    Keyed on the data_ptr and _version of every parameter and buffer, so load_state_dict, .to()
    or in-place training steps rebuild it; the plan holds the folded perm/scale/bias tensors,
    the launch configuration and the pre-marshalled kernel arguments (one launch per call).
    """
    key = tuple((t.data_ptr(), t._version) for t in (*mod.parameters(), *mod.buffers()))
    st = getattr(mod, "_kernel_state", None)
    if st is None or st[0] != key:
        from .dequant import DequantPlan
        from .gemv import GemvPlan

        p = PackedLayer.from_module(mod)
        check_layer(p, kernel=True, check_values=True)
        plan = GemvPlan(p, checked=True, ilv=interleave_codes_wanted()) if _kernel_layer_dtypes(p) else None
        st = (key, p, plan, DequantPlan(p, column_map(p)), chunked_rows_wanted())
        mod._kernel_state = st
    return st[1:]


def vq_linear_forward(mod, x: torch.Tensor, *, force: bool = False) -> torch.Tensor | None:
    """VQuantLinear.forward on the kernels, or None when the torch path must run instead.

    None when: autograd needs the graph, x is not CUDA, the dtype or codebook is not fp16/fp32,
    or numba is unavailable. <= 8 token rows: fused gemv (one launch, no host sync: capturable
    in a CUDA graph); up to chunked_rows_wanted(): the gemv on chunks of 8 rows; more: the layer's
    prepared dequantize (DequantPlan) + F.linear (the dense weight is not cached: that would
    cost the fp16 model's memory). `force` lets tests drive the kernels with CPU tensors
    under the simulator.
    """
    if torch.is_grad_enabled() and (x.requires_grad or any(q.requires_grad for q in mod.parameters())):
        return None
    if x.dtype not in (torch.float16, torch.float32):
        return None
    if not force and not x.is_cuda:
        return None
    if mod.centroids.weight.dtype != torch.float16:
        return None
    if not force and not (nb.available() and nb.use_kernels(x, mod.indices)):
        return None
    if force and not nb.available():
        return None
    p, plan, dq, chunked = _layer_state(mod)
    if plan is None:
        return None
    x2 = x.reshape(-1, mod.in_features)
    rows = x2.shape[0]
    shared = getattr(mod, "_vq_shared", None)
    if rows == 1 and shared is not None:
        y = shared.forward(mod, x, x2, plan)
        if y is not None:
            return y.reshape(*x.shape[:-1], mod.out_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if 0 < rows <= FUSED_MAX_ROWS:
        y = plan(x2)
    elif FUSED_MAX_ROWS < rows <= chunked:
        y = torch.cat([plan(x2[i:i + FUSED_MAX_ROWS]) for i in range(0, rows, FUSED_MAX_ROWS)])
    else:
        y = torch.nn.functional.linear(x2, dq(x.dtype), None if p.bias is None else p.bias.to(x.dtype))
    return y.reshape(*x.shape[:-1], mod.out_features)


def _kernel_layer_dtypes(p: PackedLayer) -> bool:
    return all(t is None or t.dtype in (torch.float16, torch.float32)
               for t in (p.weight_scale, p.weight_bias, p.bias)) and p.vector_len <= 16


class SharedInput:
    """Layers called one after another on the same activation (q/k/v, gate/up): at batch 1 the
    first call computes every member's output in one launch (kernels/gemv_group.py) and keeps the
    others' outputs for their own calls.

    A kept output is handed out only to a member called with the *same tensor object*, unchanged
    (its `_version`), before any other call of the group; the group holds that tensor, so its
    memory cannot be reused meanwhile. Anything else (another x, a member called twice, weights
    changed: their plans are rebuilt) recomputes. Layouts the row kernel does not take (or a
    group that fails to build) leave every member on its own plan (`forward` returns None).
    """

    def __init__(self, mods: list):
        self.mods = list(mods)
        self._plan = None
        self._plan_key = None
        self._pending = None

    def group_plan(self):
        """The RowsGroupPlan of the members' current plans, or None where it does not apply."""
        plans = [_layer_state(m)[1] for m in self.mods]
        key = tuple(id(pl) for pl in plans)
        if key != self._plan_key:
            self._plan_key, self._plan = key, None
            if all(pl is not None and pl.path == "rows" for pl in plans):
                from .gemv_group import RowsGroupPlan

                try:
                    self._plan = RowsGroupPlan(plans)
                except ValueError:  # formats differ: each member keeps its own launch
                    self._plan = None
        return self._plan

    def forward(self, mod, x: torch.Tensor, x2: torch.Tensor, own_plan) -> torch.Tensor | None:
        """mod's output for x (x2 = x as rows), or None: mod takes its own launch. own_plan = mod's
        current GemvPlan; a kept output computed with another plan (weights changed) is not used."""
        pend = self._pending
        self._pending = None
        if pend is not None and pend[0] is x and pend[1] == x._version and mod in pend[2]:
            y, used = pend[2].pop(mod)
            if pend[2]:
                self._pending = pend
            if used is own_plan:
                return y
        group = self.group_plan()
        if group is None:
            return None
        ys = group.split(group(x2 if x2.is_contiguous() else x2.contiguous()))
        mine = None
        rest = {}
        for m, y, pl in zip(self.mods, ys, group.plans, strict=True):
            if m is mod:
                mine = y
            else:
                rest[m] = (y, pl)
        self._pending = (x, x._version, rest)
        return mine


def share_input(mods: list) -> SharedInput:
    """Mark VQuantLinear layers that are always called on the same x (in this order or any)."""
    group = SharedInput(mods)
    for m in mods:
        object.__setattr__(m, "_vq_shared", group)  # a plain attribute: not a submodule, not state
    return group


def use_cpu_kernels(model: torch.nn.Module, on: bool = True) -> int:
    """Opt the VQuantLinear layers of model into the CPU kernels (kernels/cpu.py: y from the packed
    codes, no dense weight resident; their dense caches are dropped). Opt-in, so that quantization,
    evaluation and fine-tuning keep the torch path's bit-exact numbers. Returns the layers marked."""
    if on:
        from .cpu import available

        available()  # numba's thread pool chosen before anyone starts it (kernels/cpu.py)
    n = 0
    for m in model.modules():
        if hasattr(m, "indices") and hasattr(m, "vector_lens"):  # duck-typed VQuantLinear
            object.__setattr__(m, "_cpu_kernel", bool(on))
            if on:
                m._cache = None
            n += 1
    return n


def vq_linear_forward_cpu(mod, x: torch.Tensor) -> torch.Tensor | None:
    """VQuantLinear.forward on the CPU kernels, or None for the torch path: a layer not opted in,
    autograd needing the graph, x not a floating CPU tensor, or numba missing. Runs for every layer of
    every token: the kernels' module is imported once, not per call."""
    if not getattr(mod, "_cpu_kernel", False) or x.is_cuda or not x.is_floating_point():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(q.requires_grad for q in mod.parameters())):
        return None
    cpu = _cpu_module()
    if cpu is None:
        return None
    shared = getattr(mod, "_vq_shared", None)  # siblings on the same x (share_input): one call for all
    if shared is not None and all(getattr(m, "_cpu_kernel", False) for m in shared.mods):
        return cpu.group_forward(shared, mod, x)
    return cpu.forward(mod, x)


@functools.cache
def _cpu_module():
    """vptq.kernels.cpu where its kernels can run (numba importable), else None; looked up once."""
    from . import cpu

    return cpu if cpu.available() else None
