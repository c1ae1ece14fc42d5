"""Compressed weights on CPU: y = x W^T + bias straight from the packed codes (numba, no numba-cuda).

VPTQ vectors run along the output dimension: code (g, r, c) covers the v output rows r*v .. r*v+v-1
of stored column O + g*group_size + c (O = outlier columns). So one pass over a row of packed codes
yields v outputs. The kernels are parallel over rows of vectors (`numba.prange`) and read the codes
as a bit stream (vptq-method.md 2.3). At batch 1 with the presets' small codebooks ("hist"), each
code adds its input value into a histogram over the codebook (one add per code), and the row's v
outputs are v vectorised dot products of the codebook's coordinates with it; with large codebooks
("direct") and for ROWS_APART+1..MAX_ROWS token rows ("batched", padded to a multiple of BATCH_ALIGN rows)
each code's centroid is multiplied into v accumulators (per token row, vectorised over the rows);
2..rows_apart() rows take one histogram per row in one call. The numba source is generated per vector
length, residual codebook, mode, code width and (histograms) token rows (kernels/cpu_source.py).

Algebra (as kernels/gemv.py): stored column p holds original column perm[p] and
W[:, j] = Q[:, p] * scale[j] + wbias[j], so y[b] = Q xs[b] + (x[b] . wbias) + bias with
xs[b, p] = x[b, perm[p]] * scale[perm[p]]; the prologue builds xs once per call.

Resident memory is the packed layer: the plan keeps numpy views of the module's int32 codes and
int16 outlier codes (no copy) and float32 copies of the codebooks (numba has no float16 on CPU),
the permutation and the scale/bias vectors: a few KiB per layer beside the codes. No dense weight.

Above MAX_ROWS token rows (prefill) the layer is dequantized for that call only (a numba kernel of
the same code walk) and multiplied by torch (the dense weight is freed after the call).

Layers that read the same x (q/k/v, gate/up, marked by vptq.layers.share_inputs) take one call
for the group where their layouts allow (CpuGroup). `gemm_ref` is the torch oracle.
"""

from __future__ import annotations

import functools
import os

import torch

from .cpu_source import MAX_V, dequant_kernel, kernel
from .dequant import dequantize_ref
from .layout import PackedLayer, check_layer, perm64

MAX_ROWS = 32  # token rows up to which the kernels run; above, dequantize for the call + matmul
# Up to this many token rows the histogram kernel serves them (one histogram per row, each code decoded once, one
# call); more take the batched mode, padded with zero rows to a multiple of BATCH_ALIGN: its loop over token rows
# vectorises 8 rows wide and ran the remainder scalar, so 2-7 rows cost 1.3-2.3x what 8 rows cost. SmolLM2 block
# 0's four calls, two threads, µs (bench/results/cpu_kernel_rows_probe_20261207.txt; 3 / 4 / 8 rows, histograms
# against batched at 8): 2-bit 980 / 1,297 against 1,453; 3-bit 1,776 / 1,876 against 1,782; 4-bit 1,796 / 2,409
# against 2,081; 4 rows of the 2-bit layout 1,477 against 1,647 (a run of the _padded_ probe), so layouts without
# a residual codebook (one histogram a row, not two) keep histograms one row further
ROWS_APART = 3
BATCH_ALIGN = 8


def rows_apart(residual: bool) -> int:
    """Token rows up to which the histogram kernel serves them (ROWS_APART, one more without a residual)."""
    return ROWS_APART if residual else ROWS_APART + 1


def gemm_ref(x: torch.Tensor, p: PackedLayer) -> torch.Tensor:
    """Torch oracle: x (B, N) float32 -> y (B, M) float32."""
    w = dequantize_ref(p, torch.float32)
    return torch.nn.functional.linear(x.float(), w, None if p.bias is None else p.bias.float())


@functools.cache
def available() -> bool:
    """numba (CPU) importable: the kernels can run here.

    Also starts numba's thread pool, on its OpenMP layer where that loads (else tbb, else its own
    "workqueue" pool) unless NUMBA_THREADING_LAYER says otherwise. The workqueue pool wakes its threads
    for every parallel call: ~200 us a layer call where the kernel takes ~65 (SmolLM2's o_proj), and
    SmolLM2's decode step took 55-63 ms against 43-44 on the OpenMP layer (two threads; one thread:
    87 against 53; bench/results/cpu_decode_smollm2_{workqueue,omp}_20261207.json: 0.57x -> 1.01x fp32). Its OpenMP layer shares torch's
    libgomp (one soname), and starting the pool resets the OpenMP thread count to numba's: torch's
    own count is put back after. (An older reading, 257 against 49 ms on one thread on the OpenMP
    layer, was not reproduced on 2026-12-07 in any thread combination.) GNU OpenMP is not fork-safe:
    numba's OpenMP pool ends a child forked after the pool started at its first parallel call
    ("Terminating: fork() called from a process already using GNU OpenMP"), so a process that forks
    workers should start them before it uses the kernels (fork + exec, as subprocess does, is safe;
    nothing in this project forks after using them)."""
    try:
        import numba
    except ImportError:
        return False
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "default"  # the first layer of the priority list that loads
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    threads = torch.get_num_threads()
    numba.get_num_threads()  # starts the pool now, not inside a request
    torch.set_num_threads(threads)
    return True


def batch1_mode(v: int, k: int, kr: int, columns: int) -> str:
    """"hist" where the histogram's dot products (k*v/8 vector FMAs, k/16 stores to clear it) cost
    less than the v - 1 multiply-adds per code it saves, else "direct" (e.g. v8-k65536)."""
    return "hist" if (k + kr) * (v / 8 + 1 / 16) < (v - 1) * columns else "direct"


# ------------------------------------------------------------------ per-layer plan
def _coords(cb: torch.Tensor, v: int):
    """(G, k*v) codebook -> float32 (G*v, k): row g*v + t holds coordinate t of group g's entries."""
    import numpy as np

    t = cb.detach().to(torch.float32).reshape(cb.shape[0], -1, v).transpose(1, 2)
    return np.ascontiguousarray(t.reshape(-1, t.shape[-1]).numpy())


def _f32(t: torch.Tensor | None):
    import numpy as np

    if t is None:
        return np.zeros(0, np.float32)
    return np.ascontiguousarray(t.detach().to(torch.float32).reshape(-1).numpy())


class CpuPlan:
    """Layers prepared for the CPU kernels: numpy views of the packed codes, float32 codebooks.

    One layer, or several of the same layout that read the same input (q/k/v, gate/up: `group`),
    computed by one call into one output (B, sum of M) that `split` cuts per layer."""

    def __init__(self, layers: list[PackedLayer], checked: bool = False):
        import numpy as np
        from numba.typed import List

        p = self.p = layers[0]
        self.layers = layers
        for q in layers:
            if not checked:
                check_layer(q)
            if q.device.type != "cpu":
                raise ValueError(f"indices: on {q.device}, the CPU kernels need CPU tensors")
        if not 1 <= p.vector_len <= MAX_V:
            raise ValueError(f"vector_len: {p.vector_len} not supported on CPU (1..{MAX_V})")
        v = p.vector_len
        self.bits, self.words = p.code_bits, p.indices.shape[-1]  # the code stream's width and words per row
        self.idxs = List([q.indices.contiguous().reshape(-1).numpy() for q in layers])  # views: no copy
        self.cbs = List([_coords(q.centroids, v) for q in layers])
        self.rcbs = List([_coords(q.res_centroids, v) if q.num_res_centroids
                          else np.zeros((q.group_num * v, 1), np.float32) for q in layers])
        self.starts = np.cumsum([0] + [q.rows for q in layers]).astype(np.int64)
        self.moffs = np.cumsum([0] + [q.out_features for q in layers]).astype(np.int64)
        oidx = p.outlier_indices  # only single layers have outliers (`group` refuses them)
        if p.outlier_size:
            oidx = (oidx.view(torch.int16) if oidx.dtype == torch.float16 else oidx)[0].contiguous().numpy()
        else:
            oidx = np.zeros((1, 0), np.int16)
        self.src = perm64(p.perm).numpy() if p.perm is not None else np.zeros(0, np.int64)
        self.scale, self.wbias = _f32(p.weight_scale), _f32(p.weight_bias)
        has_bias = any(q.bias is not None for q in layers)
        self.bias = np.concatenate([_f32(q.bias) if q.bias is not None else np.zeros(q.out_features, np.float32)
                                    for q in layers]) if has_bias else np.zeros(0, np.float32)
        self.out_features = int(self.moffs[-1])
        self.mode = batch1_mode(v, p.num_centroids, p.num_res_centroids, p.group_size)
        self._runs: dict[int, tuple] = {}  # token rows -> (generated kernel, rows padded?)
        self.args = (self.src, self.scale, self.wbias, self.bias, self.idxs, self.words, self.cbs,
                     p.num_centroids, self.rcbs, p.num_res_centroids or 1, p.group_size, self.bits, p.main_bits,
                     oidx, _f32(p.outlier_centroids), max(p.outlier_vector_len, 1))

    @classmethod
    def build(cls, p: PackedLayer, checked: bool = False) -> CpuPlan:
        return cls([p], checked)

    @classmethod
    def group(cls, layers: list[PackedLayer]) -> CpuPlan | None:
        """One plan for layers that read the same x, or None where their layouts differ (each then
        keeps its own): same shape of codes and codebooks, no outlier columns, permutation or norm."""
        p = layers[0]
        same = all((q.in_features, q.vector_len, q.num_centroids, q.num_res_centroids, q.group_num, q.group_size)
                   == (p.in_features, p.vector_len, p.num_centroids, p.num_res_centroids, p.group_num, p.group_size)
                   and not q.outlier_size and q.perm is None and q.weight_scale is None for q in layers)
        return cls(layers) if same else None

    @property
    def nbytes(self) -> int:
        """Bytes this plan holds beyond the layers' own tensors (the code views count nothing)."""
        arrays = [*self.cbs, *self.rcbs, self.src, self.scale, self.wbias, self.bias, self.args[-2]]
        return sum(a.nbytes for a in arrays)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N) -> y (B, sum of M) float32; B <= MAX_ROWS on the kernels, above: dequantize + matmul.

        Kept lean: it runs for every layer of every token (~210 calls a SmolLM2 step, each ~50-200 us of
        kernel), so nothing here is done twice (the kernel per row count looked up once per plan)."""
        if x.requires_grad:
            x = x.detach()
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        rows = x.shape[0]
        if rows > MAX_ROWS:
            return self.dense(x)
        run, batched = self._runs.get(rows) or self._runs.setdefault(rows, self._kernel_for(rows))
        pad = -rows % BATCH_ALIGN if batched else 0  # zero rows up to the vector width: no scalar remainder
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        y = torch.empty(rows + pad, self.out_features, dtype=torch.float32)
        run(x.numpy(), *self.args, y.numpy(), self.starts, self.moffs)
        return y[:rows] if pad else y

    def _kernel_for(self, rows: int) -> tuple:
        """(generated kernel, padded?) for `rows` token rows: a histogram per row up to rows_apart, the
        one-row mode at 1, else the batched mode, whose input is padded to BATCH_ALIGN rows."""
        res, bits, v = self.p.num_res_centroids > 0, self.bits, self.p.vector_len
        if rows <= rows_apart(res) and self.mode == "hist":  # a histogram per token row, one call for all
            return kernel(v, res, "hist", bits, rows), False
        if rows == 1:
            return kernel(v, res, self.mode, bits), False
        return kernel(v, res, "batched", bits), True

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Many token rows (prefill): the dense weight of the coded columns for this call only (numba,
        parallel), then torch's matmul; the algebra of the kernels (x permuted and scaled, x . wbias)."""
        p = self.p
        if p.outlier_size:
            return gemm_ref(x, p)  # outlier columns: rare (no preset has them), the torch oracle
        w = torch.empty(self.out_features, p.in_features, dtype=torch.float32)
        dequant_kernel(p.vector_len, p.num_res_centroids > 0)(
            self.idxs, self.words, self.cbs, p.num_centroids, self.rcbs, p.num_res_centroids or 1,
            p.group_size, self.bits, p.main_bits, w.numpy(), self.starts, self.moffs)
        xs = x
        if p.weight_scale is not None:
            xs = x * p.weight_scale.float()
        if p.perm is not None:
            xs = xs[:, perm64(p.perm)]
        y = xs @ w.t()
        if p.weight_bias is not None:
            y += x @ p.weight_bias.float()[:, None]
        if self.bias.size:
            y += torch.from_numpy(self.bias)
        return y

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(y.split([q.out_features for q in self.layers], dim=-1))


def _key(mod) -> tuple:
    """(data_ptr, _version) of the layer's tensors and its codebook embeddings' (what parameters() and
    buffers() yield, read without their recursion: this runs for every layer of every token)."""
    ts = [*mod._parameters.values(), *mod._buffers.values(),
          *(t for m in mod._modules.values() if m is not None for t in m._parameters.values())]
    return tuple((t.data_ptr(), t._version) for t in ts if t is not None)


def forward(mod, x: torch.Tensor) -> torch.Tensor:
    """VQuantLinear.forward on the CPU kernels (dispatch.vq_linear_forward_cpu decides when).

    The plan is cached on the module, keyed on the data_ptr and _version of every parameter and
    buffer (load_state_dict, .to() or in-place updates rebuild it)."""
    key = _key(mod)
    st = getattr(mod, "_cpu_plan", None)
    if st is None or st[0] != key:
        st = (key, CpuPlan.build(PackedLayer.from_module(mod)))
        object.__setattr__(mod, "_cpu_plan", st)  # a plain attribute: not state, not a submodule
    return _as_input(st[1](x.reshape(-1, mod.in_features)), x, mod.out_features)


def _as_input(y: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """y (rows, M) float32 in x's dtype and leading shape (no op where they already are)."""
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


class CpuGroup:
    """Layers always called one after another on the same x (dispatch.SharedInput's members): the
    first call computes every member's output in one kernel call and keeps the others' for their own
    calls, handed out only for the same x object, unchanged, to a member whose weights are those the
    output was computed with (a member's output depends on its own weights and x alone)."""

    def __init__(self, mods: list):
        self.mods = list(mods)
        self._key = None
        self._plan: CpuPlan | None = None
        self._pending = None

    def plan(self) -> CpuPlan | None:
        key = tuple(_key(m) for m in self.mods)
        if key != self._key:
            self._key, self._pending = key, None
            self._plan = CpuPlan.group([PackedLayer.from_module(m) for m in self.mods])
        return self._plan

    def forward(self, mod, x: torch.Tensor) -> torch.Tensor:
        pend, self._pending = self._pending, None
        if pend is not None and pend[0] is x and pend[1] == x._version:
            kept = pend[2].pop(mod, None)
            if pend[2]:
                self._pending = pend
            if kept is not None and kept[1] == _key(mod):  # one key, not the group's: this runs per member
                return kept[0]
        plan = self.plan()
        if plan is None:
            return forward(mod, x)
        ys = plan.split(plan(x.reshape(-1, mod.in_features)))
        mine, keep = None, {}
        for m, y, key in zip(self.mods, ys, self._key, strict=True):
            y = _as_input(y, x, m.out_features)
            if m is mod:
                mine = y
            else:
                keep[m] = (y, key)
        self._pending = (x, x._version, keep)
        return mine


def group_forward(shared, mod, x: torch.Tensor) -> torch.Tensor:
    """mod's output through the CpuGroup of its SharedInput (created on first use)."""
    grp = getattr(shared, "cpu_group", None)
    if grp is None:
        grp = shared.cpu_group = CpuGroup(shared.mods)
    return grp.forward(mod, x)


def resident_bytes(mod) -> int:
    """Bytes a layer holds on the CPU route: its parameters and buffers (the packed layer as stored)
    plus its plan's float32 codebooks and vectors (a group's plan counted with its first member, so
    that a sum over a model's layers is right); a dense weight, if one were cached, counts too."""
    n = sum(t.nbytes for t in (*mod.parameters(), *mod.buffers()))
    st = getattr(mod, "_cpu_plan", None)
    cache = getattr(mod, "_cache", None)
    grp = getattr(getattr(mod, "_vq_shared", None), "cpu_group", None)
    shared = grp._plan.nbytes if grp is not None and grp._plan is not None and grp.mods[0] is mod else 0
    return n + (st[1].nbytes if st else 0) + (cache[1].nbytes if cache else 0) + shared  # a group's plan: once
