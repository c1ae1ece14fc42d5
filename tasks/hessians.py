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

Several jobs (processes, hosts sharing VPTQ_HOME) may need one set at once. A set is built under
an exclusive lock (`.<key>.lock`, fcntl.flock) in a private folder (`.<key>.<random>.tmp`) and
renamed into place once complete, so the folder a job reads is never written or removed by
another: the second job waits for the first's build and reuses it. An incomplete set in place
(a flipped byte) is renamed aside, under the lock, before the new one takes its name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from vptq_service.tasks.workspace import (
    digest,
    file_matches,
    fp_block,
    load_fp_model,
    load_tensors,
    save_tensors,
    sha256_file,
    work_root,
    write_json,
)

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def hessian_key(model_sha: str, calib_hash: str, mode: str, nsamples: int, seqlen: int) -> str:
    return digest("hessians", model_sha, calib_hash, mode, nsamples, seqlen)[:24]


def hessian_dir(key: str) -> Path:
    return work_root() / "hessians" / key


@contextlib.contextmanager
def building(key: str) -> Iterator[None]:
    """Hold the exclusive build lock of set `key` (blocks while another process builds it)."""
    root = hessian_dir(key).parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Hessian set %s: another process is building it, waiting for it", key)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_manifest(key: str, verify: bool = True) -> dict[str, Any] | None:
    """The set's manifest when it is complete (every file there, sizes and, if verify, sha256 match)."""
    d = hessian_dir(key)
    try:
        m = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("files"), list) or not {"blocks", "seconds"} <= m.keys():
        return None
    for f in m["files"]:  # bare names of plain files in the set's folder (file_matches), as recorded
        if not isinstance(f, dict) or not file_matches(d, {**f, "name": f.get("path")}, verify):
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
    """The Hessian set of (model, calibration windows): reused when complete, else computed and stored
    (one builder at a time; the others wait and reuse its set)."""
    from vptq.driver import original_hessians

    if mode != "original":
        raise ValueError(f"a shared Hessian set exists only for hessians='original', not {mode!r}")
    key = hessian_key(model_sha, calib_hash, mode, nsamples, seqlen)
    d = hessian_dir(key)

    def reused(m: dict[str, Any]) -> dict[str, Any]:
        return {"key": key, "path": str(d), "reused": True, "seconds": m["seconds"], "blocks": m["blocks"],
                "bytes": sum(f["size"] for f in m["files"])}

    m = read_manifest(key)
    if m is not None:
        return reused(m)
    with building(key):
        m = read_manifest(key)  # built by the process this one waited for
        if m is not None:
            return reused(m)
        for stale in d.parent.glob(f".{key}.*.tmp"):  # a killed build's leftovers (builders hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=d.parent))
        try:
            model, _ = load_fp_model(model_path)
            ids = load_tensors(Path(calib_path))["input_ids"]
            files, blocks = [], 0
            for i, hs in original_hessians(model, ids, device, block=lambda i: fp_block(model_path, i)):
                p = save_block_hessians(hs, tmp, i)
                files.append({"path": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)})
                blocks = i + 1
            seconds = round(time.perf_counter() - t0, 3)
            write_json({"key": key, "model_sha256": model_sha, "calibration_hash": calib_hash, "mode": mode,
                        "nsamples": nsamples, "seqlen": seqlen, "blocks": blocks, "seconds": seconds,
                        "files": files}, tmp / MANIFEST)
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide a shared set from the group
            old = None
            if d.exists():  # an incomplete set in place: aside first (a folder cannot replace a folder)
                old = d.parent / f".{key}.{os.getpid()}.old.tmp"
                os.replace(d, old)
            os.replace(tmp, d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return {"key": key, "path": str(d), "reused": False, "seconds": seconds, "blocks": blocks,
            "bytes": sum(f["size"] for f in files)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
