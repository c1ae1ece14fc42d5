"""Our own RTN and GPTQ (asymmetric, row-wise groups along the input dimension), with the same
per-linear interface as VPTQ, so the benchmark compares methods on one code path.

Bits are all-in: `bits` per weight plus an fp16 scale and an fp16 zero per group
(llm-compressor's accounting: 2-bit g64 = 2.5 bpw).
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from .config import QuantConfig
from .quantizer import LayerReport, inverse_hessian_factor, proxy_error


def _grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row asymmetric min/max grid for w (M, g): (scale, zero) of shape (M, 1), fp16-rounded."""
    lo = w.min(1, keepdim=True).values.clamp(max=0)
    hi = w.max(1, keepdim=True).values.clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    # stored as fp16: at least its smallest normal, or a (near) all-zero group's scale rounds to 0 and its
    # weights to 0/0 = NaN (such groups exist in real checkpoints: Qwen2.5-0.5B's RTN 4-bit scored NaN)
    return scale.half().float().clamp_min(torch.finfo(torch.float16).tiny), zero


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


def rtn_weight(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    w = w.float()
    out = torch.empty_like(w)
    for s in range(0, w.shape[1], group):
        blk = w[:, s : s + group]
        out[:, s : s + group] = _round(blk, *_grid(blk, bits), bits)
    return out


def gptq_weight(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, damp: float = 0.01,
                block: int = 128, report: LayerReport | None = None) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022) with lazy batch updates; grids are fixed at each group start."""
    report = report or LayerReport()
    w = w.float().clone()
    h = h.float().clone()
    m, n = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u = inverse_hessian_factor(h, damp, report)
    q = torch.zeros_like(w)
    scale = zero = None
    for s in range(0, n, block):
        e = min(s + block, n)
        err = torch.zeros(m, e - s, device=w.device)
        for j in range(s, e):
            if j % group == 0:
                scale, zero = _grid(w[:, j : j + group], bits)
            col = w[:, j : j + 1]
            qc = _round(col, scale, zero, bits)
            q[:, j : j + 1] = qc
            d = (col - qc)[:, 0] / u[j, j]
            w[:, j + 1 : e] -= d[:, None] * u[j, j + 1 : e][None, :]
            err[:, j - s] = d
        w[:, e:] -= err @ u[s:e, e:]
    return q


def _scalar_linear(name: str, lin: nn.Linear, h: torch.Tensor, cfg: QuantConfig, *, method: str,
                   bits: int, group: int):
    t0 = time.perf_counter()
    w0 = lin.weight.detach().float()
    m, n = w0.shape
    rep = LayerReport(name=name, shape=(m, n))
    wq = rtn_weight(w0, bits, group) if method == "rtn" else gptq_weight(w0, h, bits, group, cfg.damp, report=rep)
    hn = h / torch.diag(h).mean().clamp_min(1e-12)
    rep.proxy_loss = proxy_error(wq - w0, hn) / max(proxy_error(w0, hn), 1e-30)
    groups = m * -(-n // group)
    rep.bits = m * n * bits + groups * 32
    rep.bpw = rep.bits / (m * n)
    rep.seconds = time.perf_counter() - t0
    new = nn.Linear(n, m, bias=lin.bias is not None, device=w0.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(wq)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new, rep


def rtn_linear(bits: int, group: int = 128):
    """A quantize_fn for vptq.sequential.quantize_model: round-to-nearest."""
    return functools.partial(_scalar_linear, method="rtn", bits=bits, group=group)


def gptq_linear(bits: int, group: int = 128):
    """A quantize_fn for vptq.sequential.quantize_model: GPTQ."""
    return functools.partial(_scalar_linear, method="gptq", bits=bits, group=group)
