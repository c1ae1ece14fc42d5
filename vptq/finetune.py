"""Layer-wise recovery (paper 1.10): after a block is quantized, train its continuous parts
(codebooks, per-channel scale/bias, RMSNorm weights) so that the quantized block, fed the
quantized model's own inputs, reproduces the original model's block output. Indices stay fixed.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import QuantConfig
from .layers import VQuantLinear


def _trainable(block: nn.Module) -> list[nn.Parameter]:
    params = []
    for mod in block.modules():
        if isinstance(mod, VQuantLinear):
            for p in (mod.centroids.weight, getattr(mod.res_centroids, "weight", None),
                      getattr(mod.outlier_centroids, "weight", None),
                      getattr(mod, "weight_scale", None), getattr(mod, "weight_bias", None)):
                if p is not None:
                    params.append(p)
        elif "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None:
            params.append(mod.weight)
    return params


def finetune_block(
    block: nn.Module, x: torch.Tensor, target: torch.Tensor, pe, cfg: QuantConfig,
    device: torch.device, batch: int,
) -> dict:
    """Adam on MSE(block(x), target) for cfg.finetune_steps minibatches; returns losses."""
    from .sequential import _run_block  # local: sequential imports this module

    quant = [m for m in block.modules() if isinstance(m, VQuantLinear)]
    stored = {m: m.centroids.weight.dtype for m in quant}
    for m in quant:  # train in fp32, store back in the checkpoint dtype at the end
        m.float()
    params = _trainable(block)
    keep = {id(p) for p in params}
    frozen = [p for p in block.parameters() if id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.finetune_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = x.shape[0]

    def loss_on(idx):
        out = _run_block(block, x[idx].to(device), pe)
        return nn.functional.mse_loss(out, target[idx].to(device))

    with torch.no_grad():
        probe = torch.arange(min(n, batch))
        before = float(loss_on(probe))
    block.train()
    for _ in range(cfg.finetune_steps):
        idx = torch.randperm(n, generator=gen)[:batch]
        opt.zero_grad(set_to_none=True)
        loss = loss_on(idx)
        loss.backward()
        opt.step()
    block.eval()
    for p in block.parameters():
        p.requires_grad_(False)
    for m in quant:
        m.to(stored[m])
    with torch.no_grad():
        after = float(loss_on(probe))
    return {"mse_before": before, "mse_after": after, "steps": cfg.finetune_steps}
