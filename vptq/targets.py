"""Which weights of a decoder-only model are quantized: found, not listed.

Every `nn.Linear` inside the decoder blocks is a candidate (attention and MLP projections of any
name, fused ones such as Phi-3's `qkv_proj` / `gate_up_proj` included), except MoE routers and
gates, which stay in floating point: a router's few rows pick the experts, and a small error there
sends tokens to the wrong ones. `QuantConfig.targets` holds globs that narrow or widen the choice:

* a pattern matches a linear's path inside its block (`self_attn.q_proj`, `mlp.experts.3.w1`)
  or its last component (`q_proj`): `("*",)` (the default) is every candidate, `("self_attn.*",)`
  attention only, `("*proj",)` every linear whose name ends in proj;
* a router/gate is taken only when a pattern names it without wildcards (`mlp.shared_expert_gate`).

Linears in other forms are rewritten as `nn.Linear` first (vptq/as_linear.py): MoE experts that
transformers 5 stores as 3-D parameters, one linear per expert (`mlp.experts.gate_up_proj.3`), and GPT-2's
Conv1D. Other matrix weights in the blocks (hybrid blocks' short depthwise convolutions, Mamba's state-space
`A_log`, RWKV's time-mix vectors) stay floating point, listed by `float_tensors`, while together they are a small
part of the blocks' weights (MAX_FLOAT_WEIGHTS); beyond that (expert tensors of a layout vptq/experts.py does not
know, large `nn.Linear` subclasses that compute no linear map: `plain_linear`), a model is refused before any work (`check_model`, ConfigError: one line naming the architecture and the largest
such tensor): quantizing the rest would leave a half-quantized model that reports a bpw over a fraction of its
weights.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import functools
import re

import torch
from torch import nn

from .as_linear import as_linears, needs_rewrite
from .config import ConfigError, LayerLayout, QuantConfig, layer_rule_matches
from .forward_source import forward_tree, self_attr

# Matrix weights of the blocks outside any linear (the short depthwise convolutions of hybrid linear-attention or
# state-space blocks: Qwen3-Next, Falcon-H1, Nemotron-H, LFM2; Mamba's A_log (d_inner, d_state); RWKV's (1, 1, C)
# time-mix vectors) stay floating point, listed in float_tensors, while together they are at most this fraction of
# the blocks' matrix weights (~1 % in real checkpoints: Mamba-130m 0.8 %; 2-8 % in the tests' 64-wide ones); beyond it
# (3-D experts of a layout vptq/experts.py does not know, which are most of a MoE's weights) the model is refused: a
# bpw over a part of its weights would hide that the rest was not quantized.
MAX_FLOAT_WEIGHTS = 0.10
# last path components of MoE routers and gates (they stay floating point): Mixtral's `gate` when it is
# an nn.Linear (transformers 4.x), Qwen2-MoE's `shared_expert_gate`, a `router`
ROUTER_NAMES = ("gate", "router", "shared_expert_gate", "*_router", "*_gate")


def layers_path(model: nn.Module) -> str:
    """The module path of the model's decoder blocks: `model.layers` where it is (every Llama-like
    model of transformers), else the ModuleList with config.num_hidden_layers entries nearest the root."""
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return "model.layers"
    config = getattr(model, "config", None)
    # composite (vision-language) models keep the decoder's depth in their text config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    found = [name for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and n is not None and len(m) == n and name]
    if not found:
        raise ValueError(f"{type(model).__name__}: no decoder blocks (no model.layers, no ModuleList of "
                         f"config.num_hidden_layers={n} blocks): not a decoder-only causal LM")
    depth = min(name.count(".") for name in found)
    top = [name for name in found if name.count(".") == depth]
    if len(top) > 1:  # XLM: attentions, ffns and norms in lists of their own, each a part of a block
        raise ValueError(f"{type(model).__name__}: its blocks are split across {', '.join(top)} (one list per part, "
                         "not one module per block): not supported")
    return top[0]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, in order."""
    return model.get_submodule(layers_path(model))


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder block and the head: the last norm module (by class name) among the
    children of the module holding the blocks (Llama's `model.norm`, GPT-2's `transformer.ln_f`); an
    identity where there is none there (BERT-style decoders keep it in the head)."""
    path = layers_path(model)
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    norms = [m for name, m in parent.named_children() if "norm" in type(m).__name__.lower()]
    return norms[-1] if norms else nn.Identity()


def block_prefix(index: int, path: str = "model.layers") -> str:
    """The module-name prefix of block `index`'s submodules in the whole model."""
    return f"{path}.{index}."


def unfused(block: nn.Module) -> nn.Module:
    """The block with its linears in other forms rewritten as nn.Linear (vptq.as_linear): itself when it has
    none, else a copy (the model is left as it is)."""
    if not needs_rewrite(block):
        return block
    block = copy.deepcopy(block)
    as_linears(block)
    return block


def rewrite_for_checkpoint(model: nn.Module, quantized) -> list[str]:
    """A freshly built model made to match a checkpoint the driver wrote: the blocks holding one of the
    `quantized` layer names get their linears in other forms rewritten as the driver did (vptq.as_linear).
    A model with nothing to rewrite is left alone, whatever its layout."""
    if not needs_rewrite(model):
        return []
    path, done = layers_path(model), []
    for i, block in enumerate(decoder_layers(model)):
        prefix = block_prefix(i, path)
        if any(n.startswith(prefix) for n in quantized):
            done += [prefix + n for n in as_linears(block)]
    return done


def is_router(name: str, module: nn.Module | None = None) -> bool:
    """A MoE router or gate: by its last name component or its parent's (HunYuan-MoE keeps its router's
    linear as `mlp.gate.wg`), or a module class named *Router*."""
    parts = name.split(".")
    if any(fnmatch.fnmatchcase(part, p) for part in parts[-2:] for p in ROUTER_NAMES):
        return True
    return module is not None and "router" in type(module).__name__.lower()


def _literal(pattern: str) -> bool:
    return not any(c in pattern for c in "*?[")


def selected(name: str, patterns: tuple[str, ...] | list[str], module: nn.Module | None = None) -> bool:
    """Whether the linear at `name` (its path inside a block) is quantized under `patterns`."""
    leaf = name.rsplit(".", 1)[-1]
    if is_router(name, module):  # only when named outright
        return any(_literal(p) and p in (name, leaf) for p in patterns)
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)


def _skipped_branch(test: ast.expr) -> bool:
    """An `if` whose body this quantizer's models never take at inference: training-only paths (`self.training`:
    Mamba's fused kernel reads every projection's weight) and transformers' hook for its own quantizers
    (`hasattr(self.config, "_is_quantized")`: Falcon-Mamba and Jamba call dt_proj there, never set for ours)."""
    return any(self_attr(n, "training") or isinstance(n, ast.Constant) and n.value == "_is_quantized"
               for n in ast.walk(test))


@functools.cache
def _weights_read(cls: type) -> frozenset[str]:
    """The attributes X whose weight the class's forward reads (`self.X.weight`) and which it never calls
    (`self.X(...)`) on the paths taken at inference, from its source (none where the source cannot be read)."""
    tree = forward_tree(cls)
    if tree is None:
        return frozenset()
    reads: set[str] = set()
    calls: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _skipped_branch(node.test):
            for n in node.orelse:
                visit(n)
            return
        if isinstance(node, ast.Attribute) and node.attr == "weight" and (x := self_attr(node.value)):
            reads.add(x)
        if isinstance(node, ast.Call) and (x := self_attr(node.func)):
            calls.add(x)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return frozenset(reads - calls)


def read_as_weights(block: nn.Module) -> set[str]:
    """Linears of `block` whose weight their parent's forward reads and which it never calls (Mamba's mixer
    computes `self.dt_proj.weight @ x` and adds dt_proj's bias in its scan; so do Falcon-Mamba and Jamba): they
    stay floating point, since a VQuantLinear has no weight to read (and such a linear never runs, so it has no
    Hessian either). A linear the forward also calls is quantized (BLOOM reads its MLP's weight only in an
    optional tensor-parallel path). Found in the parent class's source, so that a job, `vptq plan` and the loaders
    agree before anything runs."""
    out = set()
    for name, mod in block.named_modules():
        for child in _weights_read(type(mod)):
            if isinstance(getattr(mod, child, None), nn.Linear):
                out.add(f"{name}.{child}" if name else child)
    return out


def plain_linear(mod: nn.Module) -> bool:
    """An nn.Linear that computes x W^T + b: the class itself, or a subclass whose own forward does the same
    (Falcon's FalconLinear), checked on a probe input (shapes only on the meta device). A subclass computing
    something else from its weight (DeepSeek-V4's grouped output projection: one block of W per head group)
    is no linear to this quantizer: a VQuantLinear in its place would compute x W^T; it stays floating point."""
    if not isinstance(mod, nn.Linear):
        return False
    if type(mod).forward is nn.Linear.forward:
        return True
    w = mod.weight
    # what the class's forward computes, not its values: probed once per class, settings (shapes, DeepSeek-V4's
    # n_groups), bias, dtype and device kind (the driver, the checks and the reports ask for every layer of every
    # block several times)
    settings = tuple(sorted((k, v) for k, v in vars(mod).items()
                            if not k.startswith("_") and isinstance(v, (bool, int, float, str))))
    key = (type(mod), settings, mod.bias is None, w.dtype, w.device.type)
    if key not in _PROBED:
        _PROBED[key] = _computes_linear(mod)
    return _PROBED[key]


_PROBED: dict[tuple, bool] = {}


def _computes_linear(mod: nn.Linear) -> bool:
    w = mod.weight
    try:
        with torch.no_grad():
            if w.is_meta:
                x = torch.empty(1, 7, mod.in_features, device="meta", dtype=w.dtype)
                return tuple(mod(x).shape) == (1, 7, mod.out_features)
            x = torch.randn(1, 7, mod.in_features, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
            y, want = mod(x), nn.functional.linear(x, w, mod.bias)
            return y.shape == want.shape and torch.allclose(y.float(), want.float(), rtol=1e-2, atol=1e-3)
    except Exception:  # noqa: BLE001 - a forward that cannot take a plain (batch, seq, in) input is no plain linear
        return False


def target_linears(block: nn.Module, cfg: QuantConfig) -> dict[str, nn.Linear]:
    """The block's linears the config quantizes, in the order they are quantized (module order); never those
    read as weights (read_as_weights)."""
    direct = read_as_weights(block)
    return {n: m for n, m in block.named_modules()
            if plain_linear(m) and n not in direct and selected(n, cfg.targets, m)}


def unsupported_weights(block: nn.Module) -> list[str]:
    """Matrix weights (2-D and up) of a block that are not a plain linear's (plain_linear), a router's or a norm's:
    what stays floating point beside the quantized linears (state-space parameters, convolutions, linear subclasses
    computing something else, expert tensors of a layout vptq.experts does not know); names inside the block (after
    vptq.as_linear's rewrite)."""
    out = []
    for mname, mod in block.named_modules():
        if plain_linear(mod) or isinstance(mod, nn.Embedding) or is_router(mname or "block", mod):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() >= 2:
                out.append(f"{mname}.{pname}" if mname else pname)
    return out


def check_model(model: nn.Module, cfg: QuantConfig) -> list[dict[str, nn.Linear]]:
    """Every block's target linears, or ConfigError (one line) before any work: no decoder blocks,
    weights this quantizer cannot handle, a `targets` pattern that matches nothing."""
    arch = type(model).__name__
    try:
        path = layers_path(model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    layers = [unfused(b) for b in decoder_layers(model)]
    bad = [(i, n, layers[i].get_parameter(n)) for i, b in enumerate(layers) for n in unsupported_weights(b)]
    kept = sum(p.numel() for _, _, p in bad)
    linear = sum(m.weight.numel() for b in layers for m in b.modules() if plain_linear(m))
    if kept > MAX_FLOAT_WEIGHTS * (kept + linear):
        i, n, p = max(bad, key=lambda t: t[2].numel())
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConfigError(f"{arch} is not supported: {path}.{i}.{n}{more} is a {tuple(p.shape)} weight outside a plain "
                          f"nn.Linear; such weights are {kept / (kept + linear):.0%} of its blocks' matrix weights "
                          f"(at most {MAX_FLOAT_WEIGHTS:.0%} stay floating point); nothing was quantized")
    lins = [target_linears(b, cfg) for b in layers]
    unused = [p for p in cfg.targets if not any(selected(n, (p,), m) for blk in lins for n, m in blk.items())]
    if unused:
        raise ConfigError(f"{arch}: targets pattern {unused[0]!r} matches no linear of its decoder blocks"
                          + ("" if any(lins) else ": nothing to quantize"))
    return lins


def check_layouts(model: nn.Module, cfg: QuantConfig) -> list[dict[str, nn.Linear]]:
    """check_model, then the configuration's layout for every target linear's shape (ConfigError if
    one does not fit): the whole check a job makes before any work, on a real or a meta-device model."""
    linears = check_model(model, cfg)
    for i, lins in enumerate(linears):
        for name, lin in lins.items():
            LayerLayout.for_shape(cfg.for_layer(name, i), lin.out_features, lin.in_features)
    for glob, _ in cfg.layers:  # a rule that matches nothing is a typo, as a targets pattern is
        if not any(layer_rule_matches(glob, n, i) for i, lins in enumerate(linears) for n in lins):
            raise ConfigError(f"{type(model).__name__}: layer rule {glob!r} matches no quantized linear of its "
                              f"decoder blocks")
    return linears


def float_tensors(model: nn.Module, cfg: QuantConfig, blocks: int | None = None) -> dict:
    """What stays floating point: {"tensors": {name: elements}, "groups": the same with block indices
    as `*`, "params": elements, "bits": as stored (each tensor's dtype)}: embeddings, head, norms, biases, routers, linears `targets` leaves out.
    Tied tensors count once; blocks from index `blocks` on (a partial run) stay floating point whole."""
    path = layers_path(model)
    params = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(path + ".")]
    for i, b in enumerate(decoder_layers(model)):
        b = unfused(b)  # MoE experts as the linears they are quantized as
        quantized = {f"{n}.weight" for n in target_linears(b, cfg)} if blocks is None or i < blocks else set()
        params += [(block_prefix(i, path) + n, p) for n, p in b.named_parameters() if n not in quantized]
    seen: set[int] = set()
    tensors, bits = {}, 0
    for n, p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        tensors[n] = p.numel()
        bits += p.numel() * p.element_size() * 8
    groups: dict[str, int] = {}  # block tensors under one name: model.layers.*.input_layernorm.weight
    for n, k in tensors.items():
        g = re.sub(rf"^{re.escape(path)}\.\d+\.", f"{path}.*.", n)
        groups[g] = groups.get(g, 0) + k
    return {"tensors": tensors, "groups": groups, "params": sum(tensors.values()), "bits": bits}
