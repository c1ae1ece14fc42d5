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


def save_quantized(model: nn.Module, out: str | Path, tokenizer=None, report: dict | None = None,
                   overwrite: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        cfg = model.config.to_dict()
        cfg["quantization_config"] = quantization_config(model)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        save_file(_state_dict(model), tmp / WEIGHTS, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT).write_text(json.dumps(report, indent=2, default=str))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
