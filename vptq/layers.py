"""VQuantLinear: a linear layer stored as VPTQ codebooks + packed indices.

Constructor arguments and parameter names are those of the published VPTQ checkpoints
(vptq-method.md section 3), so a `config_for_layers` entry can be passed as **kwargs.
Forward = dequantize (cached while gradients are off) then F.linear.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import LayerLayout
from .packing import from_int16, pack_indices, split_codes, to_int16, unpack_indices
from .quantizer import VQWeights, dequantize


class VQuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        vector_lens: list[int],
        num_centroids: list[int],
        num_res_centroids: list[int],
        group_num: int,
        group_size: int,
        outlier_size: int,
        indices_as_float: bool = False,
        enable_norm: bool = False,
        enable_perm: bool = False,
        is_indice_packed: bool = True,
        bias: bool = False,
        vector_quant_dim: str = "out",
        device=None,
        dtype: torch.dtype | None = None,
        enable_proxy_error: bool = False,
    ):
        """The published signature (authors' `vptq.VQuantLinear`), as transformers calls it.

        `dtype=None` means fp16 (the codebook dtype of our artifacts). What the published class
        accepts but this one cannot compute is refused here, with the reason: unpacked indices,
        `vector_quant_dim="in"` (not implemented upstream either) and `enable_proxy_error=True`
        (a training-time forward that returns a proxy-error matrix instead of `y`).
        """
        super().__init__()
        if not is_indice_packed:
            raise ValueError("VQuantLinear: only packed indices (is_indice_packed=True) are supported")
        if vector_quant_dim != "out":
            raise ValueError(f"VQuantLinear: vector_quant_dim={vector_quant_dim!r} is not supported: use 'out'")
        if enable_proxy_error:
            raise ValueError("VQuantLinear: enable_proxy_error=True is a training-time mode; loaders pass False")
        for name, val in (("vector_lens", vector_lens), ("num_centroids", num_centroids),
                          ("num_res_centroids", num_res_centroids)):
            if not isinstance(val, (list, tuple)) or len(val) != 2:
                raise ValueError(f"VQuantLinear: {name} must be a two-element [outlier, main] list, got {val!r}")
        v, k = vector_lens[1], num_centroids[1]
        if v < 1 or k < 2 or k & (k - 1):
            raise ValueError(f"VQuantLinear: vector_lens[1]={v} must be >= 1 and num_centroids[1]={k} a power of two")
        kr = num_res_centroids[1]
        if kr > 0 and kr & (kr - 1):
            raise ValueError(f"VQuantLinear: num_res_centroids[1]={kr} must be a power of two (or <= 0: none)")
        if group_num < 1 or group_size < 1 or outlier_size < 0:
            raise ValueError(f"VQuantLinear: group_num={group_num}, group_size={group_size}, "
                             f"outlier_size={outlier_size} must be positive")
        dtype = torch.float16 if dtype is None else dtype
        if outlier_size + group_num * group_size != in_features:
            raise ValueError(
                f"outlier_size + group_num*group_size = {outlier_size + group_num * group_size}"
                f" != in_features {in_features}"
            )
        self.indices_as_float = bool(indices_as_float)
        self.vector_quant_dim = vector_quant_dim
        self.in_features, self.out_features = in_features, out_features
        self.vector_lens, self.num_centroids = list(vector_lens), list(num_centroids)
        self.num_res_centroids = list(num_res_centroids)
        self.group_num, self.group_size, self.outlier_size = group_num, group_size, outlier_size
        self.enable_norm, self.enable_perm = enable_norm, enable_perm
        self.has_res = kr > 0
        self.has_outliers = vector_lens[0] > 1 and num_centroids[0] > 0 and outlier_size > 0
        self.main_bits = int(math.log2(k))
        self.code_bits = self.main_bits + (int(math.log2(kr)) if self.has_res else 0)
        rows = math.ceil(out_features / v)
        words = math.ceil(group_size * self.code_bits / 32)
        self.centroids = nn.Embedding(group_num, k * v, dtype=dtype)
        self.res_centroids = nn.Embedding(group_num, kr * v, dtype=dtype) if self.has_res else None
        self.register_buffer("indices", torch.zeros(group_num, rows, words, dtype=torch.int32))
        if self.has_outliers:
            v0, k0 = vector_lens[0], num_centroids[0]
            self.outlier_centroids = nn.Embedding(1, k0 * v0, dtype=dtype)
            self.register_buffer(
                "outlier_indices",
                torch.zeros(1, math.ceil(out_features / v0), outlier_size,
                            dtype=torch.float16 if self.indices_as_float else torch.int16),
            )
        else:
            self.outlier_centroids = None
        if enable_perm:
            self.register_buffer("perm", torch.zeros(in_features, dtype=torch.int16))
        if enable_norm:
            self.weight_scale = nn.Parameter(torch.ones(in_features, dtype=dtype))
            self.weight_bias = nn.Parameter(torch.zeros(in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self._cache: tuple | None = None
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------ conversion
    def layer_config(self) -> dict:
        """The `config_for_layers` entry, exactly the key set both VPTQ loaders accept."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "vector_lens": self.vector_lens,
            "num_centroids": self.num_centroids,
            "num_res_centroids": self.num_res_centroids,
            "group_num": self.group_num,
            "group_size": self.group_size,
            "outlier_size": self.outlier_size,
            "enable_norm": self.enable_norm,
            "enable_perm": self.enable_perm,
            "is_indice_packed": True,
            "indices_as_float": self.indices_as_float,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_weights(cls, q: VQWeights, bias: torch.Tensor | None = None) -> VQuantLinear:
        lay: LayerLayout = q.layout
        g, k, v = q.centroids.shape
        kr = q.res_centroids.shape[1] if q.res_centroids is not None else -1
        v0 = q.outlier_vector_len if lay.outlier_size else -1
        k0 = q.outlier_centroids.shape[1] if lay.outlier_size else -1
        mod = cls(
            lay.in_features, lay.out_features, [v0, v], [k0, k], [-1, kr], g, lay.group_size,
            lay.outlier_size, enable_norm=q.weight_scale is not None,
            enable_perm=q.perm is not None, bias=bias is not None,
        )
        with torch.no_grad():
            mod.centroids.weight.copy_(q.centroids.reshape(g, k * v))
            codes = q.indices
            if q.res_centroids is not None:
                mod.res_centroids.weight.copy_(q.res_centroids.reshape(g, kr * v))
                codes = codes | (q.res_indices << mod.main_bits)
            mod.indices.copy_(pack_indices(codes, mod.code_bits))
            if mod.has_outliers:
                mod.outlier_centroids.weight.copy_(q.outlier_centroids.reshape(1, k0 * v0))
                mod.outlier_indices.copy_(to_int16(q.outlier_indices))  # int16: from_weights never sets indices_as_float
            if q.perm is not None:
                mod.perm.copy_(to_int16(q.perm))
            if q.weight_scale is not None:
                mod.weight_scale.copy_(q.weight_scale)
                mod.weight_bias.copy_(q.weight_bias)
            if bias is not None:
                mod.bias.copy_(bias)
        return mod

    def _codes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unpacked (main, residual) indices, cached: they never change after quantization."""
        key = (self.indices.data_ptr(), self.indices._version)
        if getattr(self, "_codes_key", None) != key:
            codes = unpack_indices(self.indices, self.code_bits, self.group_size)
            main, res = split_codes(codes, self.main_bits)
            self._codes_val = (main, res if self.has_res else None)
            self._codes_key = key
        return self._codes_val

    def to_weights(self) -> VQWeights:
        main, res = self._codes()
        v, k = self.vector_lens[1], self.num_centroids[1]
        lay = LayerLayout(self.out_features, self.in_features, self.outlier_size, self.group_num,
                          self.group_size)
        q = VQWeights(layout=lay, vector_len=v,
                      centroids=self.centroids.weight.reshape(self.group_num, k, v), indices=main)
        if self.has_res:
            q.res_centroids = self.res_centroids.weight.reshape(self.group_num, -1, v)
            q.res_indices = res
        if self.has_outliers:
            v0 = self.vector_lens[0]
            q.outlier_vector_len = v0
            q.outlier_centroids = self.outlier_centroids.weight.reshape(1, -1, v0)
            oidx = self.outlier_indices
            q.outlier_indices = from_int16(oidx.view(torch.int16) if oidx.dtype == torch.float16 else oidx)
        if self.enable_perm:
            q.perm = from_int16(self.perm)
        if self.enable_norm:
            q.weight_scale, q.weight_bias = self.weight_scale, self.weight_bias
        return q

    # ------------------------------------------------------------------ compute
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.to_weights(), dtype)

    # torch.compile traces around the layer, not into it: the numba launches, the dequantize cache and the
    # shared-input hand-off (keyed on tensor identity) stay eager, one graph break a call (a CUDA graph
    # captured over the compiled step removes its host cost); outside a compile it costs ~0.5 us a call.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not self.indices_as_float:  # the kernels read int16 outlier indices
            # numba.cuda kernels: fused gemv for <= 8 token rows, dequantize + F.linear above.
            # Imported lazily so numba stays optional; None = use the torch path below.
            from vptq.kernels.dispatch import vq_linear_forward

            y = vq_linear_forward(self, x)
            if y is not None:
                return y
        elif getattr(self, "_cpu_kernel", False):  # opted in by vptq.kernels.dispatch.use_cpu_kernels
            from vptq.kernels.dispatch import vq_linear_forward_cpu

            y = vq_linear_forward_cpu(self, x)
            if y is not None:
                return y
        if torch.is_grad_enabled():
            w = self.dequantized_weight(x.dtype)
        else:
            # parameters only change under autograd or load_state_dict: key on their versions
            key = (x.dtype, x.device, *((p.data_ptr(), p._version) for p in (*self.parameters(), *self.buffers())))
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self.dequantized_weight(x.dtype))
            w = self._cache[1]
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, v={self.vector_lens}, "
                f"k={self.num_centroids}, res={self.num_res_centroids}, G={self.group_num}")


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Llama-family names


def share_inputs(model: nn.Module) -> int:
    """Mark the VQuantLinear siblings that a decoder block always calls on the same activation
    (q/k/v of attention, gate/up of the MLP), so that at batch 1 on CUDA one kernel launch computes
    them all (kernels/gemv_group.py; same numbers as separate calls). Returns the sets marked.
    Harmless elsewhere: CPU, larger batches and layouts the row kernel does not take ignore it."""
    n = 0
    for parent in model.modules():
        kids = dict(parent.named_children())
        for names in SHARED_INPUTS:
            mods = [kids.get(k) for k in names]
            if all(isinstance(m, VQuantLinear) for m in mods) and len({m.in_features for m in mods}) == 1:
                from vptq.kernels.dispatch import share_input

                share_input(mods)
                n += 1
    return n
