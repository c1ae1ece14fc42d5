"""Workspace glue for the tasks: folders under VPTQ_HOME/work, content hashes, atomic writes."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

VPTQ_DIR = Path(__file__).resolve().parents[1] / "vptq"


def work_root() -> Path:
    """VPTQ_HOME/work: models fetched from remote stores, calibration sets, per-run block state."""
    from store.db import vptq_home

    root = vptq_home() / "work"
    root.mkdir(parents=True, exist_ok=True)
    return root


def digest(*parts: Any) -> str:
    """sha256 of a JSON rendering of parts (sorted keys): stable across processes."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a folder's (relative path, file sha256) list; hidden files skipped."""
    from store.registry import sha256_file

    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    return digest([(p.relative_to(path).as_posix(), sha256_file(p)) for p in files])


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the method's source (vptq/*.py): a changed quantizer invalidates cached blocks."""
    return digest([(p.name, p.read_text()) for p in sorted(VPTQ_DIR.glob("*.py"))])[:16]


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def run_dir(run_key: str) -> Path:
    """Folder of one (model, calibration, config, code) run: block states, inputs, checkpoint."""
    d = work_root() / "runs" / run_key
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors written to a temporary sibling and renamed: a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(data: dict, path: Path) -> Path:
    """JSON written atomically (temporary sibling + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


@functools.lru_cache(maxsize=1)
def load_fp_model(path: str):
    """(model, tokenizer) of a resolved source, kept for the next task of the same process.

    Callers must not modify the model: they deep-copy the block they quantize.
    """
    from vptq.pipeline import _load
    from vptq.source import load_model, resolve

    return _load(load_model, resolve(path), "model")
