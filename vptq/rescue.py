"""A layer far worse than the rest, quantized again with outlier columns (QuantConfig.rescue_loss).

One layer can break a whole model: Qwen2.5-0.5B's block-3 down_proj lost 0.24 of its output energy at 2 bits
(the median layer 0.02) and the model's test perplexity went from 23.7 to 2864. A few of its input channels carry
massive activations; k-means fitted the codebook on a uniform sample of the vectors, which left out most of those
channels' vectors, and their errors are then multiplied by the largest H[j,j] of the layer (without the sample:
0.023; with 1 % of the channels on their own codebook: 0.0014; bench/results/layer_probe_qwen05b_b3down_*.json).
The sample now keeps the heavy vectors (vptq.kmeans.weighted_subsample: 0.020 there); this stays for a layer whose
codebook still cannot serve its massive channels and the rest at once (too few codes for both).

The second quantization runs only where it can help: the proxy loss is above rescue_loss *and* the channels that
would become outlier columns hold most of the error (on H's diagonal), which a uniformly bad layer (a small
codebook, random weights) does not.
"""

from __future__ import annotations

import torch

from .config import LayerLayout, QuantConfig
from .quantizer import LayerReport, VQWeights, dequantize, quantize_linear

# the share of the (diagonal) error the would-be outlier columns must hold for a second quantization: 25x the
# fair share of 1 % of the channels; Qwen2.5-0.5B's block-3 down_proj: 0.497 of its error on the top 1 % (48)
CONCENTRATED = 0.25


def top_channel_share(weight: torch.Tensor, q: VQWeights, h: torch.Tensor, columns: int) -> float:
    """Share of sum_j H[j,j] ||dW[:, j]||^2 held by the `columns` input channels of highest H[j,j]."""
    diag = torch.diag(h).float()
    dw = dequantize(q).float() - weight.detach().float()
    err = diag * (dw * dw).sum(0)
    total = float(err.sum())
    return float(err[torch.topk(diag, columns).indices].sum()) / total if total > 0 else 0.0


def quantize_with_rescue(weight: torch.Tensor, h: torch.Tensor, cfg: QuantConfig,
                         name: str = "") -> tuple[VQWeights, LayerReport]:
    q, rep = quantize_linear(weight, h, cfg, name)
    if not cfg.rescue_loss or cfg.outlier_percent or rep.proxy_loss <= cfg.rescue_loss:
        return q, rep
    again = cfg.with_(outlier_percent=cfg.rescue_outlier_percent)
    columns = LayerLayout.for_shape(again, *weight.shape).outlier_size
    share = top_channel_share(weight, q, h.to(weight.device), columns)
    if share < CONCENTRATED:
        return q, rep
    q2, rep2 = quantize_linear(weight, h, again, name)
    kept = rep2.proxy_loss < rep.proxy_loss
    note = (f"proxy loss {rep.proxy_loss:.3g} > rescue_loss {cfg.rescue_loss:g}, {share:.0%} of it on the "
            f"{columns} input channels of highest H[j,j]: quantized again with {cfg.rescue_outlier_percent:g} % "
            f"outlier columns, {rep2.proxy_loss:.3g} at {rep2.bpw:.3f} bpw ({'kept' if kept else 'not kept'})")
    rep2.seconds += rep.seconds
    q, rep = (q2, rep2) if kept else (q, rep)
    rep.warnings.append(note)
    return q, rep
