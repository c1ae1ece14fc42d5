"""The block driver: a decoder-only model quantized one decoder block at a time.

One block step (`BlockStep`) takes block i and its inputs (`BlockInputs`: block 0's are the
embedded calibration windows, block i+1's are what step i hands on), collects the Hessians
H = E[x x^T] of its target linears on those inputs unless a shared set (hessians="original")
gives them, quantizes each linear in place, fine-tunes the block towards the original block's
outputs when cfg.finetune_steps asks, and hands on the next block's inputs (`next_inputs`: one
rule for which activations feed the next block). `vptq.sequential.quantize_model` runs the steps
in memory; the Prefect tasks (vptq_service.tasks.blocks) run the same steps between workspace files.

A new architecture plugs in here and only here: `decoder_layers` (where the blocks are), `embed`
and `position_embeddings` (a block's first inputs and what it needs besides them) and `run_block`
(how one block is called).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import QuantConfig
from .finetune import finetune_block
from .hessian import collect_hessians
from .layers import VQuantLinear
from .quantizer import LayerReport, quantize_linear

QuantizeFn = Callable[[str, nn.Linear, torch.Tensor, QuantConfig], tuple[nn.Module, LayerReport]]
BATCH = 4  # calibration windows per block forward pass


# -- the architecture: where the blocks are and how one is run ---------------------------------

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, in order."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: expected a decoder-only model with model.layers")
    return layers


def block_prefix(index: int) -> str:
    """The module-name prefix of block `index`'s submodules in the whole model."""
    return f"model.layers.{index}."


@torch.no_grad()
def embed(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Block 0's inputs: token ids (n, seqlen) embedded, float32, on the CPU."""
    emb = model.model.embed_tokens
    return emb(ids.to(emb.weight.device)).float().cpu()


def position_embeddings(model: nn.Module, x: torch.Tensor, device: str | torch.device):
    """What every block takes besides its hidden states (rotary cos/sin for x's length), on `device`."""
    xs = x[:1].to(device)
    pos = torch.arange(xs.shape[1], device=xs.device)[None]
    return model.model.rotary_emb(xs, pos)


def run_block(block: nn.Module, x: torch.Tensor, pe) -> torch.Tensor:
    """One decoder block on hidden states x (batch, seqlen, d) -> its output hidden states."""
    out = block(x, position_embeddings=pe, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def forward_all(block: nn.Module, xs: torch.Tensor, pe, device, batch: int = BATCH) -> torch.Tensor:
    """Run a block over all windows, `batch` at a time on `device`; results back where xs lives."""
    out = torch.empty_like(xs)
    dtype = next(block.parameters()).dtype
    for s in range(0, xs.shape[0], batch):
        y = run_block(block, xs[s : s + batch].to(device, dtype), pe)
        out[s : s + batch] = y.to(out.device, out.dtype)
    return out


def target_linears(block: nn.Module, cfg: QuantConfig) -> dict[str, nn.Linear]:
    """The block's linears the config quantizes, in the order they are quantized."""
    return {
        n: m for n, m in block.named_modules()
        if isinstance(m, nn.Linear) and n.split(".")[-1] in cfg.targets
    }


def all_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every linear of a block: what a shared Hessian set covers, whatever a config targets."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


# -- Hessians ------------------------------------------------------------------------------------

def block_hessians(block: nn.Module, x: torch.Tensor, pe, device, batch: int = BATCH,
                   lins: dict[str, nn.Linear] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """H = E[x x^T] of the block's linears (all of them by default) on inputs x, and the block's outputs."""
    with collect_hessians(all_linears(block) if lins is None else lins) as hs:
        out = forward_all(block, x, pe, device, batch)
    return hs, out


def original_hessians(model: nn.Module, calib: torch.Tensor, device: str | torch.device = "cpu",
                      batch: int = BATCH, blocks: int | None = None,
                      block: Callable[[int], nn.Module] | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """One pass of the unquantized model over the calibration windows: (block index, {linear: H}).

    The Hessians of hessians="original" depend only on the model and the windows, never on a
    quantization config: one pass serves every later bit width or codebook shape. The model is
    left as it was (a block is copied to a non-CPU device, never moved). `block(i)`, when given,
    supplies block i instead of the model's own (a streamed model reads it from disk)."""
    device = torch.device(device)
    layers = decoder_layers(model)
    x = embed(model, calib)
    pe = position_embeddings(model, x, device)
    for i in range(len(layers) if blocks is None else min(blocks, len(layers))):
        if block is not None:
            b = block(i).to(device)
        else:
            b = layers[i] if device.type == "cpu" else copy.deepcopy(layers[i]).to(device)
        hs, x = block_hessians(b, x, pe, device, batch)
        yield i, hs


# -- quantizing one block --------------------------------------------------------------------------

def vptq_linear(name: str, lin: nn.Linear, h: torch.Tensor, cfg: QuantConfig):
    """Default per-linear quantizer: VPTQ -> VQuantLinear (on the linear's device)."""
    q, rep = quantize_linear(lin.weight, h, cfg, name)
    mod = VQuantLinear.from_weights(q, lin.bias.detach() if lin.bias is not None else None)
    return mod.to(lin.weight.device), rep


def quantize_linears(
    block: nn.Module, x: torch.Tensor | None, pe, cfg: QuantConfig, device: torch.device,
    quantize_fn: QuantizeFn = vptq_linear, prefix: str = "", batch: int = BATCH,
    progress: Callable[[str], None] | None = None, hessians: dict[str, torch.Tensor] | None = None,
) -> tuple[list[LayerReport], torch.Tensor | None]:
    """Collect Hessians of the block's target linears on inputs x (unless given), quantize them in place.

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


def needs_inputs(cfg: QuantConfig, shared_hessians: bool) -> bool:
    """Whether a block step needs its inputs (and so hands on the next block's): not when its
    Hessians come from a shared set and no block fine-tuning runs; such blocks are independent."""
    return not shared_hessians or bool(cfg.finetune_steps)


def quantized_chain(cfg: QuantConfig) -> bool:
    """Whether the next block's inputs are the *quantized* block's outputs (sequential Hessians,
    or a fine-tuned block) rather than the original block's (hessians="original")."""
    return cfg.hessians == "sequential" or bool(cfg.finetune_steps)


@dataclass
class BlockInputs:
    """A block's inputs: x along the model being quantized; fp_x along the original model (the
    teacher chain of per-block fine-tuning, None without it)."""

    x: torch.Tensor
    fp_x: torch.Tensor | None = None

    @classmethod
    def first(cls, model: nn.Module, ids: torch.Tensor, cfg: QuantConfig) -> BlockInputs:
        """Block 0's inputs: the embedded calibration windows (both chains start there)."""
        x = embed(model, ids)
        return cls(x, x.clone() if cfg.finetune_steps else None)


class BlockStep:
    """Block `index` of a run on `device`, quantized in place: quantize (or swap in linears
    quantized elsewhere), finetune, next_inputs, in that order.

    `inputs` may be None when the step needs none (see needs_inputs); then nothing runs the
    block and next_inputs is None. The fine-tuning target (the original block's outputs on
    fp_x) is computed here, before anything in the block changes."""

    def __init__(self, block: nn.Module, index: int, cfg: QuantConfig, device: str | torch.device,
                 inputs: BlockInputs | None = None, pe=None, batch: int = BATCH):
        self.block, self.index, self.cfg, self.batch = block, index, cfg, batch
        self.device = torch.device(device)
        self.prefix = block_prefix(index)
        self.x = inputs.x if inputs is not None else None
        fp_x = inputs.fp_x if inputs is not None else None
        self.pe = pe
        self.target = forward_all(block, fp_x, pe, self.device, batch) if fp_x is not None else None
        self.fp_out: torch.Tensor | None = None  # the original block's outputs on x, when known

    def quantize(self, quantize_fn: QuantizeFn = vptq_linear, hessians: dict[str, torch.Tensor] | None = None,
                 progress: Callable[[str], None] | None = None) -> list[LayerReport]:
        """Quantize the block's target linears (Hessians collected on x unless given)."""
        reports, self.fp_out = quantize_linears(self.block, self.x, self.pe, self.cfg, self.device, quantize_fn,
                                                prefix=self.prefix, batch=self.batch, progress=progress,
                                                hessians=hessians)
        return reports

    def hessians(self) -> dict[str, torch.Tensor]:
        """The Hessians of the block's target linears on x, as quantize collects them (for linears
        quantized elsewhere); the block is left as it is."""
        lins = target_linears(self.block, self.cfg)
        hs, _ = block_hessians(self.block, self.x, self.pe, self.device, self.batch, lins)
        return hs

    def keep_original_outputs(self) -> None:
        """Before linears quantized elsewhere are swapped in: the original block's outputs on x,
        when the next block's inputs are those (as quantize computes them on the way)."""
        if self.x is not None and not quantized_chain(self.cfg):
            self.fp_out = forward_all(self.block, self.x, self.pe, self.device, self.batch)

    def finetune(self) -> dict | None:
        """Per-block fine-tuning towards the target, when configured: its losses, else None."""
        if not self.cfg.finetune_steps or self.target is None:
            return None
        return finetune_block(self.block, self.x, self.target, lambda x: run_block(self.block, x, self.pe),
                              self.cfg, self.device, self.batch)

    def next_inputs(self) -> BlockInputs | None:
        """The next block's inputs: the quantized (and fine-tuned) block's outputs on x, or the
        original block's outputs when hessians="original" (the one rule, see quantized_chain)."""
        if self.x is None:
            return None
        if quantized_chain(self.cfg) or self.fp_out is None:
            x = forward_all(self.block, self.x, self.pe, self.device, self.batch)
        else:
            x = self.fp_out
        return BlockInputs(x, self.target)
