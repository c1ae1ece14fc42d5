"""Layer streaming: a safetensors model whose decoder blocks stay on disk until one is asked for.

Quantization touches one block at a time, so the host only needs the "shell" (embeddings, final
norm, lm_head, rotary embeddings) plus the block at hand: `open_streamed(folder)` builds the model
on the meta device, reads the shell's tensors from the shards, and leaves every block as meta.
`StreamedModel.block(i)` then reads block i's tensors (shard by shard, only those tensors) into a
fresh CPU module, and `linear(i, name)` just one linear. Peak host memory is the shell + one
block, not the model: what lets a model larger than the host's memory be quantized.

Used for Hugging Face folders in safetensors (GGUF files and .bin checkpoints are loaded whole)
by the service's tasks and by `vptq plan` (vptq/plan.py: its probe reads block 0 only). Values
equal `from_pretrained(..., dtype=dtype)`'s: the same tensors cast to the same dtype.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

BLOCK_PREFIX = "model.layers."  # where transformers' decoder-only models keep their blocks


def weight_map(folder: Path) -> dict[str, str] | None:
    """tensor name -> shard file name, or None when the folder has no safetensors weights."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {k: single.name for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return None


class StreamedModel:
    """The shell model (`.model`) and block/linear readers for a safetensors folder."""

    def __init__(self, folder: Path, model: nn.Module, wmap: dict[str, str], dtype: torch.dtype):
        self.folder, self.model, self.wmap, self.dtype = folder, model, wmap, dtype

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = defaultdict(list)
        for n in names:
            by_shard[self.wmap[n]].append(n)
        out = {}
        for shard, keys in by_shard.items():
            with safe_open(str(self.folder / shard), "pt") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    out[k] = t.to(self.dtype) if t.is_floating_point() else t
        return out

    def block(self, index: int) -> nn.Module:
        """A fresh CPU copy of decoder block `index` with its weights read from the shards."""
        prefix = f"{BLOCK_PREFIX}{index}."
        names = [n for n in self.wmap if n.startswith(prefix)]
        if not names:
            raise KeyError(f"{self.folder}: no tensors for block {index} ({prefix}*)")
        block = copy.deepcopy(self.model.model.layers[index]).to_empty(device="cpu")
        missing, unexpected = block.load_state_dict({n[len(prefix):]: t for n, t in self._read(names).items()},
                                                    strict=False, assign=True)
        if missing or unexpected:
            raise KeyError(f"{self.folder}: block {index} does not fit its tensors (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
        init_block_buffers(self.model, block)
        return block.eval()

    def linear(self, index: int, name: str) -> nn.Linear:
        """Only the linear `name` of block `index` (weight and bias), read from the shards."""
        prefix = f"{BLOCK_PREFIX}{index}.{name}."
        lin = copy.deepcopy(self.model.model.layers[index].get_submodule(name)).to_empty(device="cpu")
        t = self._read([n for n in self.wmap if n.startswith(prefix)])
        lin.load_state_dict({n[len(prefix):]: v for n, v in t.items()}, strict=True, assign=True)
        return lin

    def full(self) -> nn.Module:
        """The whole model in memory (a teacher for end-to-end fine-tuning, evaluation)."""
        model = copy.deepcopy(self.model)
        for i in range(len(model.model.layers)):
            model.model.layers[i] = self.block(i)
        return model


def init_buffers(model: nn.Module) -> None:
    """Non-persistent buffers of the shell still on the meta device (computed at init, never stored:
    Gemma 3's embedding scale, per-layer-type rotary tables), computed as transformers' own
    `_init_weights` does, on a throwaway copy of their module (whose loaded weights stay untouched)."""
    if getattr(model, "_init_weights", None) is None:
        return
    for name, mod in model.named_modules():
        if name.startswith(BLOCK_PREFIX.rstrip(".")):
            continue
        meta = [n for n, b in mod.named_buffers(recurse=False) if b is not None and b.is_meta]
        if meta:
            _computed_buffers(_init_for(model, name), mod, meta)


def _init_for(model: nn.Module, name: str):
    """The `_init_weights` transformers applies to the module at `name`: that of the nearest module from it up to
    the root that has one (a PreTrainedModel inside another: Gemma 3n's text model computes its buffers from its own
    hidden size, which its causal-LM head does not have)."""
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        init = getattr(model.get_submodule(".".join(parts[:depth])) if depth else model, "_init_weights", None)
        if init is not None:
            return init
    return None


def init_block_buffers(model: nn.Module, block: nn.Module) -> bool:
    """A block's non-persistent buffers (Falcon-H1's `mamba.mup_vector`, rotary tables kept in a block), which
    the shards do not hold, computed as init_buffers computes the shell's. Whether every one was set."""
    stored = set(block.state_dict())
    init = _init_for(model, BLOCK_PREFIX.rstrip("."))  # the blocks' owner's, as for the shell's modules
    ok = True
    for name, mod in block.named_modules():
        own = [n for n, b in mod.named_buffers(recurse=False)
               if b is not None and (f"{name}.{n}" if name else n) not in stored]
        if own:
            ok = _computed_buffers(init, mod, own) and ok
    return ok


def _computed_buffers(init, mod: nn.Module, names: list[str]) -> bool:
    """Register `mod`'s non-persistent buffers `names` as `init` (its owner's `_init_weights`: _init_for) computes
    them (transformers' loader does the same), on a throwaway copy of `mod` whose loaded weights stay untouched; the
    copy's buffers start as NaN, so one that init leaves unset shows. Whether every one was set."""
    tmp = copy.deepcopy(mod).to_empty(device="cpu")
    for n in names:
        b = getattr(tmp, n)
        if b.is_floating_point():
            b.fill_(float("nan"))
    if init is not None:
        init(tmp)
    ok = True
    for n in names:
        b = getattr(tmp, n)
        ok = ok and not (b.is_floating_point() and bool(b.isnan().any()))
        mod.register_buffer(n, b, persistent=False)
    return ok


def open_streamed(folder: str | Path, dtype: torch.dtype = torch.float32) -> StreamedModel | None:
    """The streamed view of an HF safetensors folder, or None when it cannot be streamed (no
    safetensors, an architecture without model.layers, block tensors stored under other names than the
    module's (checkpoint conversion), shell tensors left unread)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    wmap = weight_map(folder)
    if wmap is None:
        return None
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return None
    stored: dict[str, set[str]] = defaultdict(set)
    for n in wmap:
        if n.startswith(BLOCK_PREFIX):
            index, _, rest = n[len(BLOCK_PREFIX):].partition(".")
            stored[index].add(rest)
    # every block, not only block 0: DeepSeek-V3 keeps its first blocks dense and stores its experts per expert
    if any(stored.get(str(i), set()) != set(layer.state_dict()) for i, layer in enumerate(layers)):
        # keys that transformers converts on load (Mixtral's experts.N.w1/w2/w3 -> fused 3-D experts):
        # only a whole-model load (from_pretrained, which converts them) reads this checkpoint
        return None
    s = StreamedModel(folder, model, wmap, dtype)
    shell = s._read([n for n in wmap if not n.startswith(BLOCK_PREFIX)])
    model.load_state_dict(shell, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    inner = model.model
    if hasattr(inner, "rotary_emb"):  # non-persistent buffers: computed, not stored
        try:  # from the backbone's own config (a sub-config in composite models)
            inner.rotary_emb = type(inner.rotary_emb)(config=getattr(inner, "config", config))
        except (TypeError, AttributeError, ValueError):
            pass  # built otherwise: init_buffers computes its tables, or the model is loaded whole
    init_buffers(model)
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta and not n.startswith(BLOCK_PREFIX):
            return None  # something the shards do not hold: load the model whole instead
    if not init_block_buffers(model, copy.deepcopy(layers[0]).to_empty(device="cpu")):
        return None  # a block buffer transformers' init does not compute: load the model whole instead
    model.eval()
    return s
