"""The shared Hessian stage: one pass of the original model, its Hessians kept for every later job.

With hessians="original" every Hessian depends only on (model, calibration windows), never on the
bit width or codebook shape, and collecting them is a whole forward pass with float64 outer
products per linear. So it is a stage of its own whose output, a *Hessian set*, is stored once
under VPTQ_HOME/work/hessians/<key>/, key = hash(model sha, calibration hash, mode, nsamples,
seqlen), and reused by every later job on the same model and data:

    block_000.safetensors ... block_NNN.safetensors   (float32 H per distinct linear input;
                                                       q/k/v and gate/up share one tensor)
    manifest.json                                     (written last: the commit point; names the
                                                       key fields, files, sizes and sha256)

A set without its manifest (a killed pass) is recomputed. In hessians="sequential" mode block i's
Hessians depend on the quantized blocks before it, hence on the config: nothing to share there.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from vptq_service.tasks.workspace import (
    digest,
    fp_block,
    load_fp_model,
    load_tensors,
    save_tensors,
    work_root,
    write_json,
)

MANIFEST = "manifest.json"


def hessian_key(model_sha: str, calib_hash: str, mode: str, nsamples: int, seqlen: int) -> str:
    return digest("hessians", model_sha, calib_hash, mode, nsamples, seqlen)[:24]


def hessian_dir(key: str) -> Path:
    return work_root() / "hessians" / key


def read_manifest(key: str, verify: bool = True) -> dict[str, Any] | None:
    """The set's manifest when it is complete (every file there, sizes and, if verify, sha256 match)."""
    from vptq_service.store.registry import sha256_file

    d = hessian_dir(key)
    try:
        m = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    for f in m.get("files", []):
        p = d / f["path"]
        if not p.is_file() or p.stat().st_size != f["size"] or (verify and sha256_file(p) != f["sha256"]):
            return None
    return m


def _dedup(hs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(distinct tensors by the first name that has them, name -> stored name)."""
    kept: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    for name in sorted(hs):
        h = hs[name]
        same = next((k for k, t in kept.items() if t.shape == h.shape and torch.equal(t, h)), None)
        if same is None:
            kept[name] = h
        alias[name] = same or name
    return kept, alias


def save_block_hessians(hs: dict[str, torch.Tensor], path: str | Path, index: int) -> Path:
    """Block `index`'s {linear name: H} into a Hessian-set folder (shared tensors stored once)."""
    kept, alias = _dedup(hs)
    return save_tensors(kept, Path(path) / f"block_{index:03d}.safetensors", metadata={"aliases": json.dumps(alias)})


def load_block_hessians(path: str | Path, index: int) -> dict[str, torch.Tensor]:
    """{linear name within block `index`: H} from a Hessian set folder."""
    from safetensors import safe_open

    f = Path(path) / f"block_{index:03d}.safetensors"
    with safe_open(str(f), "pt") as sf:
        alias = json.loads(sf.metadata()["aliases"])
    tensors = load_tensors(f)
    return {name: tensors[src] for name, src in alias.items()}


@task(cache_policy=NO_CACHE, task_run_name="collect-hessians")
def collect_hessian_set(model_path: str, model_sha: str, calib_path: str, calib_hash: str, nsamples: int,
                        seqlen: int, device: str = "cpu", mode: str = "original") -> dict[str, Any]:
    """The Hessian set of (model, calibration windows): reused when complete, else computed and stored."""
    from vptq_service.store.registry import sha256_file

    from vptq.driver import original_hessians

    if mode != "original":
        raise ValueError(f"a shared Hessian set exists only for hessians='original', not {mode!r}")
    key = hessian_key(model_sha, calib_hash, mode, nsamples, seqlen)
    d = hessian_dir(key)
    m = read_manifest(key)
    if m is not None:
        return {"key": key, "path": str(d), "reused": True, "seconds": m["seconds"], "blocks": m["blocks"],
                "bytes": sum(f["size"] for f in m["files"])}
    t0 = time.perf_counter()
    if d.exists():  # a pass that died before its manifest: start clean
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model, _ = load_fp_model(model_path)
    ids = load_tensors(Path(calib_path))["input_ids"]
    files, blocks = [], 0
    for i, hs in original_hessians(model, ids, device, block=lambda i: fp_block(model_path, i)):
        p = save_block_hessians(hs, d, i)
        files.append({"path": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)})
        blocks = i + 1
    seconds = round(time.perf_counter() - t0, 3)
    write_json({"key": key, "model_sha256": model_sha, "calibration_hash": calib_hash, "mode": mode,
                "nsamples": nsamples, "seqlen": seqlen, "blocks": blocks, "seconds": seconds, "files": files},
               d / MANIFEST)
    return {"key": key, "path": str(d), "reused": False, "seconds": seconds, "blocks": blocks,
            "bytes": sum(f["size"] for f in files)}
