"""Perplexity on fixed windows, exactly the protocol of baselines.md.

Tokenize the whole text at once, take the first `windows` non-overlapping windows of `seqlen`
tokens, mean next-token NLL over the seqlen-1 predictions of each window, exp of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    windows: int
    seqlen: int
    tokens: int  # tokens scored: windows * (seqlen - 1)
    nll: list[float]


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Whole text -> (1, T) ids, in one call (no per-line splitting)."""
    return tokenizer(text, return_tensors="pt").input_ids


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    windows: int = 10,
    seqlen: int = 2048,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    ids = ids.reshape(-1)
    available = ids.numel() // seqlen
    if available < windows:
        raise ValueError(
            f"text has {ids.numel()} tokens: {windows} windows of {seqlen} need "
            f"{windows * seqlen}; use fewer --windows or a shorter --seqlen"
        )
    model.eval()
    nlls = []
    for i in range(windows):
        w = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(w).logits[0, :-1].float()
        nlls.append(float(nn.functional.cross_entropy(logits, w[0, 1:])))
        if progress:
            progress(i + 1, windows)
    ppl = math.exp(sum(nlls) / len(nlls))
    return PerplexityResult(ppl, windows, seqlen, windows * (seqlen - 1), nlls)


def calibration_windows(
    ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """nsamples random windows (seeded) of seqlen tokens from a (1, T) id tensor."""
    ids = ids.reshape(-1)
    if ids.numel() < seqlen + 1:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens; at least {seqlen + 1} are needed "
            f"for windows of {seqlen} (give a longer --calib text or a smaller seqlen)"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
