"""Save/load quantized models in the published VPTQ checkpoint format (vptq-method.md 3).

config.json = the model config + `quantization_config` (quant_method "vptq",
config_for_layers with exactly the key set both VPTQ loaders accept); weights in
model.safetensors; our own run report in vptq_report.json. Writing goes to a temporary
folder that is renamed into place at the end, so a crash leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError
from .layers import VQuantLinear

WEIGHTS = "model.safetensors"
REPORT = "vptq_report.json"


def quantization_config(model: nn.Module) -> dict:
    layers = {n: m.layer_config() for n, m in model.named_modules() if isinstance(m, VQuantLinear)}
    return {
        "quant_method": "vptq",
        "config_for_layers": layers,
        "shared_layer_config": {},
        "modules_to_not_convert": None,
    }


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied to embed_tokens: stored once
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def _is_checkpoint(folder: Path) -> bool:
    """An earlier output of ours (config.json with a VPTQ quantization_config), or an empty folder."""
    if not any(folder.iterdir()):
        return True
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return qc.get("quant_method") == "vptq"


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an --out that cannot be written or would clobber something; cheap, run it first.

    --overwrite replaces only an earlier VPTQ checkpoint (or an empty folder): never a file,
    nor a folder of something else (say `--out .`).
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"--out {out} already exists: choose another --out or pass --overwrite")
        if out.is_symlink() or not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder: choose another --out")
        if not _is_checkpoint(out):
            raise ConfigError(f"--out {out} is not a VPTQ checkpoint folder, so --overwrite will not "
                                  f"replace it: choose another --out")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is not a folder: choose another --out")
    try:  # a real probe: os.access says yes to root even on read-only mounts
        shutil.rmtree(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError:
        raise ConfigError(f"--out {out}: cannot create a folder in {parent}: choose another --out") from None
    return out


def _plain_modes(folder: Path) -> None:
    """mkdtemp makes a 0700 folder: give it (and its files) the modes of an ordinary mkdir/open."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def save_quantized(model: nn.Module, out: str | Path, tokenizer=None, report: dict | None = None,
                   overwrite: bool = False) -> Path:
    """Write the checkpoint to a temporary sibling folder, then rename it to `out`.

    A crash or Ctrl-C leaves nothing at `out` (the temporary folder is removed; only a hard kill
    can leave a hidden `.NAME.tmp-*` sibling behind). With `overwrite`, an existing `out` is
    swapped out only once the new checkpoint is complete, and deleted after the swap.
    """
    out = check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old: Path | None = None
    try:
        cfg = model.config.to_dict()
        cfg["quantization_config"] = quantization_config(model)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        save_file(_state_dict(model), tmp / WEIGHTS, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT).write_text(json.dumps(report, indent=2, default=str))
        _plain_modes(tmp)
        if out.exists():  # the new checkpoint is complete: now swap the old one out
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        try:
            if old is not None:
                os.replace(out, old)  # a rename onto the fresh empty folder
            os.replace(tmp, out)
        except BaseException:
            if old is not None and not out.exists() and any(old.iterdir()):
                os.replace(old, out)  # put the previous checkpoint back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def replace_linears(model: nn.Module, config_for_layers: dict[str, dict], dtype=torch.float16) -> None:
    """Swap each named nn.Linear for an (empty) VQuantLinear built from its config entry."""
    for name, entry in config_for_layers.items():
        kw = {k: entry[k] for k in (
            "in_features", "out_features", "vector_lens", "num_centroids", "num_res_centroids",
            "group_num", "group_size", "outlier_size")}
        kw.update(enable_norm=entry.get("enable_norm", False),
                  enable_perm=entry.get("enable_perm", False), bias=entry.get("bias", False))
        model.set_submodule(name, VQuantLinear(**kw, dtype=dtype))


def load_quantized(folder: str | Path, device: str = "cpu") -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    qc = raw.pop("quantization_config")
    if qc.get("quant_method") != "vptq":
        raise ValueError(f"{folder}: quantization_config.quant_method is not 'vptq'")
    config = AutoConfig.for_model(**raw)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    sd = load_file(folder / WEIGHTS, device=device)
    cb_dtype = next((v.dtype for k, v in sd.items() if k.endswith("centroids.weight")), torch.float16)
    replace_linears(model, qc["config_for_layers"], dtype=cb_dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model
