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
Conv1D. Convolutions in the blocks (hybrid blocks' short depthwise ones) stay floating point while they are a small
part of the block weights (MAX_CONV_WEIGHTS); beyond that, or with any other matrix weight outside a linear
(state-space parameters, expert tensors of an unknown layout), a model is refused before any work (`check_model`,
ConfigError: one line naming the architecture and the tensor): quantizing the rest would leave a half-quantized
model that reports a bpw over a fraction of its weights.
"""

from __future__ import annotations

import copy
import fnmatch
import re

from torch import nn

from .as_linear import as_linears, needs_rewrite
from .config import ConfigError, LayerLayout, QuantConfig, layer_rule_matches

# Convolutions in the blocks (the short depthwise convolutions of hybrid linear-attention or state-space blocks:
# Qwen3-Next, Falcon-H1, Nemotron-H, LFM2) stay floating point, listed in float_tensors, while their weights are at
# most this fraction of the blocks' linear weights (~1 % in real checkpoints, 1-2 % in the tests' 64-wide ones);
# beyond it, or with any other matrix weight outside a linear (Mamba's A_log, JetMoE's 3-D experts), the model is
# refused: a bpw over a part of its weights would hide that the rest was not quantized.
MAX_CONV_WEIGHTS = 0.10
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


def target_linears(block: nn.Module, cfg: QuantConfig) -> dict[str, nn.Linear]:
    """The block's linears the config quantizes, in the order they are quantized (module order)."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and selected(n, cfg.targets, m)}


def unsupported_weights(block: nn.Module) -> list[str]:
    """Matrix weights (2-D and up) of a block that are not an nn.Linear's, a router's or a norm's:
    what this quantizer cannot handle (state-space parameters, convolutions, expert tensors of a layout
    vptq.experts does not know); names inside the block (after vptq.as_linear's rewrite)."""
    out = []
    for mname, mod in block.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) or is_router(mname or "block", mod):
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
    bad = [(i, n) for i, b in enumerate(layers) for n in unsupported_weights(b)]
    convs = [(i, n) for i, n in bad
             if isinstance(layers[i].get_submodule(n.rpartition(".")[0]), (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    other = [(i, n) for i, n in bad if (i, n) not in convs]
    conv = sum(layers[i].get_parameter(n).numel() for i, n in convs)
    linear = sum(m.weight.numel() for b in layers for m in b.modules() if isinstance(m, nn.Linear))
    if other or conv > MAX_CONV_WEIGHTS * linear:
        i, n = (other or convs)[0]
        more = f" (+{len(other or convs) - 1} more)" if len(other or convs) > 1 else ""
        why = ("" if other else f", and convolutions are {conv / max(linear, 1):.0%} of its blocks' linear weights "
                                f"(at most {MAX_CONV_WEIGHTS:.0%} stay floating point)")
        raise ConfigError(f"{arch} is not supported: {path}.{i}.{n}{more} is a {tuple(layers[i].get_parameter(n).shape)} "
                          f"weight outside nn.Linear{why}; nothing was quantized")
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
