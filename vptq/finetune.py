"""Recovery fine-tuning (paper 1.10): train the continuous parts of a quantized model
(codebooks, per-channel scale/bias, RMSNorm weights) against the original; indices stay fixed.

Block-wise: after a block is quantized, its output on the quantized model's own inputs is pulled
towards the original model's block output (MSE). End-to-end: the whole student's next-token
distribution is pulled towards the teacher's (KL(teacher || student)) on calibration windows.
Gradients flow through the dequantization (a gather); no dense copy of a weight is kept.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .config import QuantConfig
from .layers import VQuantLinear

TEACHER_CACHE_BYTES = 4 << 30  # CPU memory allowed for the teacher's cached log-probs


def _trainable(block: nn.Module, norms: bool = True) -> list[nn.Parameter]:
    params = []
    for mod in block.modules():
        if isinstance(mod, VQuantLinear):
            for p in (mod.centroids.weight, getattr(mod.res_centroids, "weight", None),
                      getattr(mod.outlier_centroids, "weight", None),
                      getattr(mod, "weight_scale", None), getattr(mod, "weight_bias", None)):
                if p is not None:
                    params.append(p)
        elif norms and "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None:
            params.append(mod.weight)
    return params


def _train(
    model: nn.Module, loss_on, n: int, batch: int, steps: int, lr: float, seed: int,
    cosine: bool = False, progress=None,
) -> tuple[float, float]:
    """The loop both modes share: Adam on loss_on(window indices) over the continuous parts of
    `model` (trained in fp32, stored back in the checkpoint dtype at the end). Returns the loss
    on a fixed probe batch before and after."""
    quant = [m for m in model.modules() if isinstance(m, VQuantLinear)]
    stored = {m: m.centroids.weight.dtype for m in quant}
    for m in quant:
        m.float()
    params = _trainable(model)
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1)) if cosine else None
    gen = torch.Generator().manual_seed(seed)
    probe = torch.arange(min(n, batch))
    with torch.no_grad():
        before = float(loss_on(probe))
    model.train()
    for step in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch]
        opt.zero_grad(set_to_none=True)
        loss = loss_on(idx)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if progress:
            progress(step + 1, steps, f"loss {float(loss):.4f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for m in quant:
        m.to(stored[m])  # back to the checkpoint dtype (fp16 centroids)
    with torch.no_grad():
        after = float(loss_on(probe))
    return before, after


def finetune_block(
    block: nn.Module, x: torch.Tensor, target: torch.Tensor, pe, cfg: QuantConfig,
    device: torch.device, batch: int,
) -> dict:
    """Adam on MSE(block(x), target) for cfg.finetune_steps minibatches; returns losses."""
    from .sequential import _run_block  # local: sequential imports this module

    def loss_on(idx):
        out = _run_block(block, x[idx].to(device), pe)
        return nn.functional.mse_loss(out, target[idx].to(device))

    before, after = _train(block, loss_on, x.shape[0], batch, cfg.finetune_steps, cfg.finetune_lr, cfg.seed)
    return {"mse_before": before, "mse_after": after, "steps": cfg.finetune_steps}


def finetune_model(
    student: nn.Module, teacher: nn.Module, windows: torch.Tensor, cfg: QuantConfig,
    device: torch.device, progress=None,
) -> dict:
    """Adam on KL(teacher || student) over next-token distributions, cfg.e2e_steps steps of
    cfg.e2e_batch calibration windows each. Returns the loss on a fixed probe before and after."""
    t0 = time.perf_counter()
    student.to(device)
    teacher.to(device).eval()
    n = windows.shape[0]
    batch = max(1, min(cfg.e2e_batch, n))

    # Each window is drawn ~steps*batch/n times: when that is > 1 and the teacher's log-probs fit
    # the budget (64 x 512 tokens x 49k vocab in fp16 = 3.2 GB), compute them once and keep them
    # on the CPU. That removes the teacher forward from every step (a quarter of a step's work).
    @torch.no_grad()
    def teacher_logp(ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(teacher(ids.to(device)).logits.float(), -1)

    vocab = int(teacher.get_output_embeddings().weight.shape[0])
    cache = None
    if cfg.e2e_steps * batch > n and windows.numel() * vocab * 2 <= TEACHER_CACHE_BYTES:
        cache = torch.empty(*windows.shape, vocab, dtype=torch.float16)
        for i in range(n):
            # clamp: a log-prob below fp16's range would become -inf and the KL nan
            cache[i] = teacher_logp(windows[i : i + 1])[0].clamp_min(-1e4).half().cpu()

    def kl(idx: torch.Tensor) -> torch.Tensor:
        t = cache[idx].to(device).float() if cache is not None else teacher_logp(windows[idx])
        s = torch.log_softmax(student(windows[idx].to(device)).logits.float(), -1)
        # mean over tokens of sum_v p_t (log p_t - log p_s)
        return nn.functional.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean")

    before, after = _train(student, kl, n, batch, cfg.e2e_steps, cfg.e2e_lr, cfg.seed + 1, cosine=True,
                           progress=progress)
    return {"kl_before": before, "kl_after": after, "steps": cfg.e2e_steps,
            "seconds": round(time.perf_counter() - t0, 2)}
