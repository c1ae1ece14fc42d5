"""The block driver: a decoder-only model quantized one decoder block at a time.

One block step (`BlockStep`) takes block i and its inputs (`BlockInputs`: block 0's are the
embedded calibration windows, block i+1's are what step i hands on), collects the Hessians
H = E[x x^T] of its target linears on those inputs unless a shared set (hessians="original")
gives them, quantizes each linear in place, fine-tunes the block towards the original block's
outputs when cfg.finetune_steps asks, and hands on the next block's inputs (`next_inputs`: one
rule for which activations feed the next block). `vptq.sequential.quantize_model` runs the steps
in memory; the Prefect tasks (vptq_service.tasks.blocks) run the same steps between workspace files.

Nothing here names an architecture: `decoder_layers` finds the blocks (model.layers, or the
ModuleList of config.num_hidden_layers blocks), and `embed` / `block_kwargs` capture what the
model's own forward hands block 0 (its hidden states) and every block (masks incl. sliding-window
ones, rotary tables per layer type, position ids) by running that forward once with the blocks
replaced by recorders (`_capture`). `run_block(block, x, kw)` calls a block with those kwargs; `pe`
in the signatures below is one block's kwargs dict. Which linears are quantized: vptq.targets.
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .as_linear import as_linears
from .callorder import call_groups, trace_calls
from .config import QuantConfig
from .experts import collect_expert_hessians, expert_key, with_pooled_fallback
from .finetune import finetune_block
from .forward_source import forward_tree
from .hessian import Hessians, collect_hessians
from .layers import VQuantLinear
from .quantizer import LayerReport
from .rescue import quantize_with_rescue
from .targets import block_prefix, decoder_layers, layers_path, target_linears  # noqa: F401 - the driver's API

QuantizeFn = Callable[[str, nn.Linear, torch.Tensor, QuantConfig], tuple[nn.Module, LayerReport]]
BATCH = 4  # calibration windows per block forward pass


# -- the architecture: where the blocks are and what the model's own forward gives each ----------

class _Stop(Exception):
    """Raised by a capturing block to end the model's forward early (nothing after it is needed)."""


def _backbone(model: nn.Module, path: str) -> nn.Module:
    """The module whose forward takes token ids and calls the blocks at `path`: the nearest ancestor of the
    blocks that accepts `input_ids` (the blocks' parent for Llama-like models; BERT-like models keep their
    blocks in an encoder whose forward starts from hidden states), without the LM head where it can."""
    parts = path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        mod = model.get_submodule(".".join(parts[:depth])) if depth else model
        if "input_ids" in inspect.signature(mod.forward).parameters:
            return mod
    return model


@functools.cache
def _tuple_returned(cls: type) -> int:
    """n where every `return` of the block class's forward is a tuple display of n values (Bamba's
    `return hidden_states, self_attn_weights`), else 0 (a bare tensor, or a shape its source does not show)."""
    tree = forward_tree(cls)
    if tree is None:
        return 0
    sizes = {len(r.value.elts) if isinstance(r.value, ast.Tuple) else 0
             for r in ast.walk(tree) if isinstance(r, ast.Return) and r.value is not None}
    return sizes.pop() if len(sizes) == 1 else 0


@torch.no_grad()
def _capture(model: nn.Module, ids: torch.Tensor, upto: int) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states in, keyword arguments) of blocks 0..upto as the model's own forward calls them.

    Every block's forward is replaced, for this call only, by one that records its inputs and hands
    them on unchanged: no block computes (a streamed model's blocks may be on the meta device), and
    what the model computes around its blocks (scaled embeddings, rotary tables per layer type, causal
    and sliding-window masks, position ids) is exactly what its forward gives each block."""
    path = layers_path(model)
    layers = model.get_submodule(path)
    base = _backbone(model, path)
    seen: list[tuple[torch.Tensor, dict]] = []

    # a block's parameters by name (self dropped): positional arguments (BERT-like encoders pass the mask so)
    # are recorded as the keyword arguments they bind to, so that run_block can hand every one back by name
    params = list(inspect.signature(type(layers[0]).forward).parameters.values())[1:]
    named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    by_name = bool(named) and not any(p.kind == p.POSITIONAL_ONLY for p in params)
    # handed back in the shape the model's loop unpacks (Bamba: `hidden_states, attn_weights = layer(...)`), the
    # other values None, as a block run without caches or attention outputs gives them
    arity = _tuple_returned(type(layers[0]))

    def record(*args, **kwargs):
        if not by_name or len(args) > len(named):
            raise ValueError(f"{type(model).__name__}: its blocks take positional arguments that cannot be passed "
                             "by name; this architecture is not supported")
        kwargs = {**dict(zip(named, args, strict=False)), **kwargs}  # len(args) <= len(named)
        x = kwargs.pop(named[0])
        seen.append((x, kwargs))
        if len(seen) > upto:
            raise _Stop
        return (x,) + (None,) * (arity - 1) if arity else x

    training = model.training
    model.eval()  # no embedding dropout in what the blocks are given
    for layer in layers:
        layer.forward = record  # an instance attribute wins over the class's forward
    try:
        emb = model.get_input_embeddings().weight
        base(input_ids=ids.to(emb.device if not emb.is_meta else "cpu"), use_cache=False)
    except _Stop:
        pass
    finally:
        for layer in layers:
            del layer.forward
        model.train(training)
    if len(seen) != upto + 1:
        raise ValueError(f"{type(model).__name__}: its forward called {len(seen)} of {len(layers)} decoder blocks")
    return seen


@dataclass(frozen=True, eq=False)
class PerWindow:
    """A block argument holding one slice per window, window-major along its first dimension (BLOOM's
    ALiBi biases, the masks of models that check them against the batch): captured for one window, repeated
    for a batch of windows by run_block. Every window has the same length and no padding, so the slices
    are equal."""

    value: torch.Tensor


def _mark_per_window(one, two):
    """one window's kwargs, with each tensor that the two-window capture holds twice along dim 0 a PerWindow."""
    if isinstance(one, torch.Tensor) and isinstance(two, torch.Tensor):
        if one.dim() and two.shape[0] == 2 * one.shape[0] and two.shape[1:] == one.shape[1:]:
            return PerWindow(one)
        return one
    if isinstance(one, (tuple, list)) and isinstance(two, (tuple, list)) and len(one) == len(two):
        return type(one)(_mark_per_window(a, b) for a, b in zip(one, two, strict=True))
    if isinstance(one, dict) and isinstance(two, dict):
        return {k: _mark_per_window(v, two.get(k)) for k, v in one.items()}
    return one


def _for_batch(o, n: int):
    """Block kwargs with every PerWindow repeated for n windows (the plain value otherwise)."""
    if isinstance(o, PerWindow):
        v = o.value
        if n == 1:
            return v
        # one slice per window (masks): a broadcast view, no copy; several (BLOOM's heads): repeated
        return v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v.repeat(n, *[1] * (v.dim() - 1))
    if isinstance(o, tuple):
        return tuple(_for_batch(v, n) for v in o)
    if isinstance(o, list):
        return [_for_batch(v, n) for v in o]
    if isinstance(o, dict):
        return {k: _for_batch(v, n) for k, v in o.items()}
    return o


def to_device(obj, device: str | torch.device):
    """A block's keyword arguments (tensors in tuples, lists, dicts) on `device`; tensors shared
    between blocks (one mask or rotary table for many) stay shared."""
    memo: dict[int, torch.Tensor] = {}

    def move(o):
        if isinstance(o, PerWindow):
            return PerWindow(move(o.value))
        if isinstance(o, torch.Tensor):
            if id(o) not in memo:
                memo[id(o)] = o.to(device)
            return memo[id(o)]
        if isinstance(o, tuple):
            return tuple(move(v) for v in o)
        if isinstance(o, list):
            return [move(v) for v in o]
        if isinstance(o, dict):
            return {k: move(v) for k, v in o.items()}
        return o

    return move(obj)


@torch.no_grad()
def embed(model: nn.Module, ids: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    """Block 0's inputs: token ids (n, seqlen) through what the model does before its first block
    (embedding, scaling as Gemma's sqrt(hidden)), float32, on the CPU."""
    parts = [_capture(model, ids[s : s + batch], 0)[0][0].float().cpu() for s in range(0, ids.shape[0], batch)]
    return torch.cat(parts)


def block_kwargs(model: nn.Module, seqlen: int, device: str | torch.device = "cpu") -> list[dict]:
    """What the model's forward gives each block besides its hidden states, for windows of `seqlen`
    tokens (one dict per block, captured on a batch of one: masks and tables broadcast over a batch;
    what a batch holds once per window is marked PerWindow, found by capturing two windows as well),
    on `device`. The values depend on the window length only, never on its tokens (no padding)."""
    last = len(decoder_layers(model)) - 1
    one = _capture(model, torch.zeros(1, seqlen, dtype=torch.long), last)
    two = _capture(model, torch.zeros(2, seqlen, dtype=torch.long), last)
    return to_device([_mark_per_window(a, b) for (_, a), (_, b) in zip(one, two, strict=True)], device)


def run_block(block: nn.Module, x: torch.Tensor, kw: dict | None) -> torch.Tensor:
    """One decoder block on hidden states x (batch, seqlen, d) -> its output hidden states.
    kw: the block's keyword arguments from block_kwargs."""
    out = block(x, **_for_batch(kw or {}, x.shape[0]))
    return out[0] if isinstance(out, (tuple, list)) else out  # older blocks return (h, attentions...)


def block_dtype(block: nn.Module) -> torch.dtype:
    """The dtype a block computes in: its floating-point weights' outside VQuantLinears (whose fp16
    codebooks are not the block's dtype: a quantized block keeps computing in the original one); a block
    with none (NanoChat's weightless norms around its linears) computes in float32."""
    skip = {id(p) for m in block.modules() if isinstance(m, VQuantLinear) for p in m.parameters()}
    return next((p.dtype for p in block.parameters() if id(p) not in skip and p.is_floating_point()),
                torch.float32)


@torch.no_grad()
def forward_all(block: nn.Module, xs: torch.Tensor, pe, device, batch: int = BATCH) -> torch.Tensor:
    """Run a block over all windows, `batch` at a time on `device`; results back where xs lives."""
    out = torch.empty_like(xs)
    dtype = block_dtype(block)
    for s in range(0, xs.shape[0], batch):
        y = run_block(block, xs[s : s + batch].to(device, dtype), pe)
        out[s : s + batch] = y.to(out.device, out.dtype)
    return out


def all_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every linear of a block: what a shared Hessian set covers, whatever a config targets."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


# -- Hessians ------------------------------------------------------------------------------------

def block_hessians(block: nn.Module, x: torch.Tensor, pe, device, batch: int = BATCH,
                   lins: dict[str, nn.Linear] | None = None) -> tuple[Hessians, torch.Tensor]:
    """H = E[x x^T] of the block's linears (all of them by default) on inputs x, and the block's outputs.
    An MoE expert's H is over the tokens routed to it (see vptq.experts for the few-token fallback)."""
    lins = all_linears(block) if lins is None else lins
    experts = {n: m for n, m in lins.items() if expert_key(n) is not None}
    plain = {n: m for n, m in lins.items() if n not in experts}
    with collect_hessians(plain) as hs, collect_expert_hessians(experts) as (ehs, counts):
        out = forward_all(block, x, pe, device, batch)
    if experts:
        pooled, few = with_pooled_fallback(ehs, counts, list(experts))
        hs.update(pooled)
        hs.warnings.update(few)
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
    kws = block_kwargs(model, x.shape[1], device)
    for i in range(len(layers) if blocks is None else min(blocks, len(layers))):
        if block is not None:
            b = block(i).to(device)
        else:
            b = layers[i] if device.type == "cpu" else copy.deepcopy(layers[i]).to(device)
        as_linears(b)  # the same values as nn.Linear (experts one each: their Hessians over routed tokens)
        hs, x = block_hessians(b, x, kws[i], device, batch)
        yield i, hs


# -- quantizing one block --------------------------------------------------------------------------

def vptq_linear(name: str, lin: nn.Linear, h: torch.Tensor, cfg: QuantConfig):
    """Default per-linear quantizer: VPTQ -> VQuantLinear (on the linear's device)."""
    q, rep = quantize_with_rescue(lin.weight, h, cfg, name)
    mod = VQuantLinear.from_weights(q, lin.bias.detach() if lin.bias is not None else None)
    return mod.to(lin.weight.device), rep


def quantize_linears(
    block: nn.Module, x: torch.Tensor | None, pe, cfg: QuantConfig, device: torch.device,
    quantize_fn: QuantizeFn = vptq_linear, prefix: str = "", batch: int = BATCH,
    progress: Callable[[str], None] | None = None, hessians: dict[str, torch.Tensor] | None = None,
    index: int | None = None,
) -> tuple[list[LayerReport], torch.Tensor | None]:
    """Collect Hessians of the block's target linears on inputs x (unless given), quantize them in place.

    hessians="true-sequential" quantizes them group by group instead, each group's Hessians collected
    with the groups before it quantized (vptq.callorder). Returns the layer reports and the block's
    outputs on x *before* quantization (the
    original-model activations that hessians="original" propagates); None when the Hessians were
    given (a shared Hessian set: nothing ran). Each linear gets its own config (cfg.for_layer: the
    per-layer rules, matched with the block's `index`).
    """
    lins = target_linears(block, cfg)
    if hessians is None and cfg.hessians == "true-sequential":
        return _quantize_in_call_order(block, x, pe, cfg, device, quantize_fn, prefix, batch, progress, index, lins)
    fp_out = None
    if hessians is None:
        hessians, fp_out = block_hessians(block, x, pe, device, batch, lins)
    return _quantize_with(block, lins, hessians, cfg, device, quantize_fn, prefix, progress, index), fp_out


def linear_groups(block: nn.Module, x: torch.Tensor | None, pe, cfg: QuantConfig, device,
                  lins: dict[str, nn.Linear]) -> list[list[str]]:
    """The block's target linears `lins` in the groups they are quantized in, in order: with
    hessians="true-sequential" the order its forward calls them (vptq.callorder: traced on x's first
    window), else one group."""
    if cfg.hessians != "true-sequential":
        return [list(lins)]
    first = x[:1].to(device, block_dtype(block))
    return call_groups(trace_calls(lambda: run_block(block, first, pe), lins), lins)


def _quantize_in_call_order(block, x, pe, cfg, device, quantize_fn, prefix, batch, progress, index, lins):
    """hessians="true-sequential": the block's linears group by group in the order its forward calls
    them (vptq.callorder), each group's Hessians taken with the groups before it quantized."""
    reports, fp_out = [], None
    for names in linear_groups(block, x, pe, cfg, device, lins):
        group = {n: lins[n] for n in names}
        hs, out = block_hessians(block, x, pe, device, batch, group)
        fp_out = out if fp_out is None else fp_out  # the first pass runs the block before any change
        reports += _quantize_with(block, group, hs, cfg, device, quantize_fn, prefix, progress, index)
    return reports, fp_out


def _quantize_with(block, lins, hessians, cfg, device, quantize_fn, prefix, progress, index) -> list[LayerReport]:
    """Quantize `lins` of the block in place from the given Hessians (one per linear)."""
    missing = sorted(set(lins) - set(hessians))
    if missing:
        raise ValueError(f"{prefix or 'block'}: no Hessian given for {missing}")
    reports = []
    for name, lin in lins.items():
        if progress:
            progress(name)
        new, rep = quantize_fn(prefix + name, lin, hessians[name].to(device), cfg.for_layer(name, index))
        if name in getattr(hessians, "warnings", {}):
            rep.warnings.append(hessians.warnings[name])
        reports.append(rep)
        block.set_submodule(name, new)
    return reports


def needs_inputs(cfg: QuantConfig, shared_hessians: bool) -> bool:
    """Whether a block step needs its inputs (and so hands on the next block's): not when its
    Hessians come from a shared set and no block fine-tuning runs; such blocks are independent."""
    return not shared_hessians or bool(cfg.finetune_steps)


def quantized_chain(cfg: QuantConfig) -> bool:
    """Whether the next block's inputs are the *quantized* block's outputs (sequential Hessians,
    or a fine-tuned block) rather than the original block's (hessians="original")."""
    return cfg.hessians != "original" or bool(cfg.finetune_steps)


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
                 inputs: BlockInputs | None = None, pe: dict | None = None, batch: int = BATCH,
                 path: str = "model.layers"):
        as_linears(block)  # experts one linear each, Conv1D as nn.Linear (same values): vptq.as_linear
        self.block, self.index, self.cfg, self.batch = block, index, cfg, batch
        self.device = torch.device(device)
        self.prefix = block_prefix(index, path)
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
                                                hessians=hessians, index=self.index)
        return reports

    def linear_groups(self) -> list[list[str]]:
        """The target linears in the groups quantize takes them, in order (see linear_groups)."""
        return linear_groups(self.block, self.x, self.pe, self.cfg, self.device, target_linears(self.block, self.cfg))

    def hessians(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The Hessians of the block's target linears (those of `names` when given) on x, as quantize
        collects them (for linears quantized elsewhere); the block is left as it is."""
        lins = target_linears(self.block, self.cfg)
        if names is not None:
            lins = {n: lins[n] for n in names}
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
