"""Block-by-block driver: capture block inputs, collect Hessians, quantize, propagate.

Only one decoder block and one batch of its activations sit on the compute device at a time;
the model and the calibration activations stay on the CPU, so a model larger than the
device's memory can be quantized.

hessians="sequential": block l is calibrated on the outputs of the already-quantized blocks
before it (GPTQ-style). hessians="original": every Hessian comes from the unquantized model
(the authors' setting), so every linear is independent of the others.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import QuantConfig
from .finetune import finetune_block, finetune_model
from .hessian import collect_hessians
from .layers import VQuantLinear
from .quantizer import LayerReport, quantize_linear

QuantizeFn = Callable[[str, nn.Linear, torch.Tensor, QuantConfig], tuple[nn.Module, LayerReport]]
Progress = Callable[[int, int, str], None]


@dataclass
class ModelReport:
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    finetune: list[dict] = field(default_factory=list)
    e2e: dict = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return sum(r.bits for r in self.layers)

    @property
    def weights(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def bpw(self) -> float:
        return self.bits / max(self.weights, 1)

    @property
    def warnings(self) -> list[str]:
        return [f"{r.name}: {w}" for r in self.layers for w in r.warnings]


def vptq_linear(name: str, lin: nn.Linear, h: torch.Tensor, cfg: QuantConfig):
    """Default per-linear quantizer: VPTQ -> VQuantLinear (on the linear's device)."""
    q, rep = quantize_linear(lin.weight, h, cfg, name)
    mod = VQuantLinear.from_weights(q, lin.bias.detach() if lin.bias is not None else None)
    return mod.to(lin.weight.device), rep


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: expected a decoder-only model with model.layers")
    return layers


def target_linears(block: nn.Module, cfg: QuantConfig) -> dict[str, nn.Linear]:
    return {
        n: m for n, m in block.named_modules()
        if isinstance(m, nn.Linear) and n.split(".")[-1] in cfg.targets
    }


def _run_block(block: nn.Module, x: torch.Tensor, pe) -> torch.Tensor:
    out = block(x, position_embeddings=pe, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


def _rotary(model: nn.Module, x: torch.Tensor):
    pos = torch.arange(x.shape[1], device=x.device)[None]
    return model.model.rotary_emb(x, pos)


@torch.no_grad()
def _forward_all(block, xs: torch.Tensor, pe, device, batch: int) -> torch.Tensor:
    """Run a block over all windows, `batch` at a time on `device`; results back where xs lives."""
    out = torch.empty_like(xs)
    dtype = next(block.parameters()).dtype
    for s in range(0, xs.shape[0], batch):
        y = _run_block(block, xs[s : s + batch].to(device, dtype), pe)
        out[s : s + batch] = y.to(out.device, out.dtype)
    return out


def all_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every linear of a block: what a shared Hessian set covers, whatever a config targets."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def block_hessians(block: nn.Module, x: torch.Tensor, pe, device, batch: int,
                   lins: dict[str, nn.Linear] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """H = E[x x^T] of the block's linears (all of them by default) on inputs x, and the block's outputs."""
    with collect_hessians(all_linears(block) if lins is None else lins) as hs:
        out = _forward_all(block, x, pe, device, batch)
    return hs, out


def original_hessians(model: nn.Module, calib: torch.Tensor, device: str | torch.device = "cpu",
                      batch: int = 4, blocks: int | None = None,
                      block: Callable[[int], nn.Module] | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """One pass of the unquantized model over the calibration windows: (block index, {linear: H}).

    The Hessians of hessians="original" depend only on the model and the windows, never on a
    quantization config: one pass serves every later bit width or codebook shape. The model is
    left as it was (a block is copied to a non-CPU device, never moved). `block(i)`, when given,
    supplies block i instead of model.model.layers[i] (a streamed model reads it from disk)."""
    device = torch.device(device)
    layers = decoder_layers(model)
    with torch.no_grad():
        x = model.model.embed_tokens(calib.to(model.model.embed_tokens.weight.device)).float().cpu()
    pe = _rotary(model, x[:1].to(device))
    for i in range(len(layers) if blocks is None else min(blocks, len(layers))):
        if block is not None:
            b = block(i).to(device)
        else:
            b = layers[i] if device.type == "cpu" else copy.deepcopy(layers[i]).to(device)
        hs, x = block_hessians(b, x, pe, device, batch)
        yield i, hs


def quantize_block(
    block: nn.Module, x: torch.Tensor, pe, cfg: QuantConfig, device: torch.device,
    quantize_fn: QuantizeFn = vptq_linear, prefix: str = "", batch: int = 4,
    progress: Callable[[str], None] | None = None, hessians: dict[str, torch.Tensor] | None = None,
) -> tuple[list[LayerReport], torch.Tensor | None]:
    """Collect Hessians of the block's linears on inputs x (unless given), quantize them in place.

    Returns the layer reports and the block's outputs on x *before* quantization (the
    original-model activations that hessians="original" propagates); None when the Hessians were
    given (a shared Hessian set: nothing ran).
    """
    lins = target_linears(block, cfg)
    fp_out = None
    if hessians is None:
        hessians, fp_out = block_hessians(block, x, pe, device, batch, lins)
    missing = sorted(set(lins) - set(hessians))
    if missing:
        raise ValueError(f"{prefix or 'block'}: no Hessian given for {missing}")
    reports = []
    for name, lin in lins.items():
        if progress:
            progress(name)
        new, rep = quantize_fn(prefix + name, lin, hessians[name].to(device), cfg)
        reports.append(rep)
        block.set_submodule(name, new)
    return reports, fp_out


def quantize_model(
    model: nn.Module,
    calib: torch.Tensor,
    cfg: QuantConfig,
    device: str | torch.device = "cpu",
    quantize_fn: QuantizeFn = vptq_linear,
    progress: Progress | None = None,
    batch: int = 4,
    blocks: int | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
) -> ModelReport:
    """Quantize the target linears of every decoder block in place. calib: (n, seqlen) ids.

    `blocks` limits the run to the first blocks (tests, quick looks); the rest stay FP.
    `checkpoint_dir`: the end-to-end fine-tuning stage is checkpointed there every
    `checkpoint_every` steps, and a rerun resumes it (see finetune_model).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    model.eval()
    layers = decoder_layers(model)
    n_blocks = len(layers) if blocks is None else min(blocks, len(layers))
    report = ModelReport()
    # the end-to-end stage needs the original as teacher: keep a copy (CPU) before quantizing
    teacher = copy.deepcopy(model).cpu() if cfg.e2e_steps else None
    with torch.no_grad():
        x = model.model.embed_tokens(calib.to(model.model.embed_tokens.weight.device)).float()
    x = x.cpu()
    fp_x = x.clone() if cfg.finetune_steps else None  # teacher chain of the original model
    pe = _rotary(model, x[:1].to(device))
    for i in range(n_blocks):
        block = layers[i].to(device)
        target = _forward_all(block, fp_x, pe, device, batch) if fp_x is not None else None
        reps, fp_out = quantize_block(
            block, x, pe, cfg, device, quantize_fn, f"model.layers.{i}.", batch,
            (lambda name, i=i: progress(i, n_blocks, f"block {i} {name}")) if progress else None)
        report.layers.extend(reps)
        if cfg.finetune_steps and target is not None:
            report.finetune.append(finetune_block(block, x, target, pe, cfg, device, batch))
        if cfg.hessians == "sequential" or cfg.finetune_steps:
            x = _forward_all(block, x, pe, device, batch)  # inputs as the quantized model sees them
        else:
            x = fp_out
        if target is not None:
            fp_x = target
        layers[i] = block.to("cpu") if device.type != "cpu" else block
        if progress:
            progress(i + 1, n_blocks, f"block {i} done")
    if teacher is not None:
        report.e2e = finetune_model(
            model, teacher, calib, cfg, device,
            (lambda d, t, info: progress(d, t, f"fine-tune {info}")) if progress else None,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every if checkpoint_dir else 0)
        model.cpu()
        del teacher
    report.seconds = time.perf_counter() - t0
    return report
