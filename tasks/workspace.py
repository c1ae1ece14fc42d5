"""Workspace glue for the tasks: folders under VPTQ_HOME/work, content hashes, atomic writes."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from vptq_service.store.durable import replace_durably

import vptq

# the method's package (vptq/ with its kernels in vptq/kernels/): every source file a block's bytes depend on
VPTQ_DIR = Path(vptq.__file__).resolve().parent


def work_root() -> Path:
    """VPTQ_HOME/work: models fetched from remote stores, calibration sets, per-run block state."""
    from vptq_service.store.db import vptq_home

    root = vptq_home() / "work"
    root.mkdir(parents=True, exist_ok=True)
    return root


def digest(*parts: Any) -> str:
    """sha256 of a JSON rendering of parts (sorted keys): stable across processes."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a folder's (relative path, file sha256) list; hidden files skipped."""
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    return digest([(p.relative_to(path).as_posix(), sha256_file(p)) for p in files])


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the method's source (vptq/**/*.py, the kernels included): a changed quantizer or kernel
    invalidates cached blocks."""
    files = sorted(VPTQ_DIR.rglob("*.py"))
    return digest([(p.relative_to(VPTQ_DIR).as_posix(), p.read_text()) for p in files])[:16]


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
    """safetensors written durably (store/durable.py): a kill or a power cut never leaves half a file,
    and concurrent writers of one path never share a temporary file."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return replace_durably(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def write_json(data: dict, path: Path) -> Path:
    """JSON written durably (store/durable.py)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    return replace_durably(path, lambda tmp: Path(tmp).write_text(text))


def file_record(path: Path) -> dict[str, Any]:
    """What a descriptor records of a file it vouches for: its name, size and sha256."""
    return {"name": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def file_matches(folder: Path, record: dict[str, Any], verify: bool = True) -> bool:
    """The file a record names is in `folder`, a plain file (no symlink), of its size and (verify)
    sha256. The name must be a bare file name: a record never points outside its folder."""
    name = record.get("name")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        return False
    p = folder / name
    try:
        if p.is_symlink() or not p.is_file() or p.stat().st_size != record.get("size"):
            return False
    except OSError:
        return False
    return not verify or sha256_file(p) == record.get("sha256")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


@functools.lru_cache(maxsize=1)
def _opened(path: str):
    """(model, tokenizer, StreamedModel or None) of a resolved source, kept for the next task of
    the same process. A Hugging Face safetensors folder is streamed (vptq/stream.py): the model's
    blocks stay on disk (meta) until fp_block / fp_linear read one; VPTQ_STREAM=0 loads it whole."""
    from vptq.pipeline import checked_load
    from vptq.source import load_model, load_tokenizer, resolve
    from vptq.stream import open_streamed

    src = resolve(path)
    if src.kind == "hf" and os.environ.get("VPTQ_STREAM", "1") != "0":
        stream = checked_load(lambda s: open_streamed(s.path), src, "model")
        if stream is not None:
            return stream.model, checked_load(load_tokenizer, src, "tokenizer"), stream
    model, tok = checked_load(load_model, src, "model")
    return model, tok, None


def load_fp_model(path: str):
    """(model, tokenizer) of a resolved source. Callers must not modify the model, and must read
    its blocks through fp_block / fp_linear / fp_full (a streamed model's blocks are meta)."""
    model, tok, _ = _opened(path)
    return model, tok


load_fp_model.cache_clear = _opened.cache_clear  # tests reset the per-process model


def fp_block(path: str, index: int) -> torch.nn.Module:
    """A fresh CPU copy of the original decoder block `index` (free to modify)."""
    import copy

    from vptq.driver import decoder_layers

    model, _, stream = _opened(path)
    return stream.block(index) if stream else copy.deepcopy(decoder_layers(model)[index])


def fp_linear(path: str, index: int, name: str) -> torch.nn.Linear:
    """A fresh CPU copy of the original linear `name` of block `index` (only it is read from disk)."""
    import copy

    from vptq.driver import decoder_layers

    model, _, stream = _opened(path)
    return stream.linear(index, name) if stream else copy.deepcopy(decoder_layers(model)[index].get_submodule(name))


def fp_full(path: str) -> torch.nn.Module:
    """A fresh, complete in-memory copy of the original model (fine-tuning teacher)."""
    import copy

    model, _, stream = _opened(path)
    return stream.full() if stream else copy.deepcopy(model)


def is_streamed(path: str) -> bool:
    return _opened(path)[2] is not None
