"""quantize_block(i): one decoder block from workspace inputs; assemble_model: the checkpoint.

Block i reads `inputs_{i}.safetensors` (block 0: the embedded calibration windows), quantizes a
copy of the original block exactly as vptq.sequential.quantize_model would, and writes
`block_{i}.safetensors` (its state), `block_{i}.json` (its VPTQ layer configs and metrics) and
`inputs_{i+1}.safetensors`. The task result is cached (persisted) under
hash(model sha, calibration hash, config, code version, i), so a rerun skips finished blocks.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.workspace import (
    code_version,
    digest,
    load_fp_model,
    load_tensors,
    run_dir,
    save_tensors,
    sha256_path,
    write_json,
)

BATCH = 4  # calibration windows per forward pass (as quantize_model's default)


def run_key(model_sha: str, calib_hash: str, config: dict[str, Any]) -> str:
    """Workspace key of one run: what every block's result depends on, bar its index."""
    return digest("run", model_sha, calib_hash, config, code_version())[:24]


def block_files(run: str, index: int) -> dict[str, Path]:
    d = run_dir(run)
    return {"state": d / f"block_{index:03d}.safetensors", "meta": d / f"block_{index:03d}.json",
            "next": d / f"inputs_{index + 1:03d}.safetensors"}


def block_done(run: str, index: int) -> bool:
    """Every file block `index` writes is in the workspace."""
    return all(p.is_file() for p in block_files(run, index).values())


def block_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """hash(model sha, calibration hash, config, code version, block index)."""
    p = parameters
    return "block-" + digest(p["model_sha"], p["calib_hash"], p["config"], code_version(), p["index"])


def _inputs(model, run: str, calib_path: str, index: int, finetune: bool):
    """(x, fp_x) of block `index`: embedded windows for block 0, else the previous block's outputs."""
    if index == 0:
        ids = load_tensors(Path(calib_path))["input_ids"]
        with torch.no_grad():
            x = model.model.embed_tokens(ids).float()
        return x, (x.clone() if finetune else None)
    src = run_dir(run) / f"inputs_{index:03d}.safetensors"
    if not src.is_file():
        raise FileNotFoundError(f"{src} is missing: block {index - 1} must run first")
    t = load_tensors(src)
    return t["x"], t.get("fp_x")


@task(cache_key_fn=block_cache_key, persist_result=True, task_run_name="quantize-block-{index}")
def quantize_block(run: str, model_path: str, model_sha: str, calib_path: str, calib_hash: str,
                   config: dict[str, Any], index: int, device: str = "cpu") -> dict[str, Any]:
    """Quantize decoder block `index`; write its state and the next block's inputs to the workspace."""
    from vptq.config import QuantConfig
    from vptq.finetune import finetune_block
    from vptq.layers import VQuantLinear
    from vptq.sequential import _forward_all, _rotary, decoder_layers
    from vptq.sequential import quantize_block as quantize_linears

    t0 = time.perf_counter()
    cfg, dev = QuantConfig.from_dict(config), torch.device(device)
    model, _ = load_fp_model(model_path)
    x, fp_x = _inputs(model, run, calib_path, index, bool(cfg.finetune_steps))
    block = copy.deepcopy(decoder_layers(model)[index]).to(dev)
    pe = _rotary(model, x[:1].to(dev))
    target = _forward_all(block, fp_x, pe, dev, BATCH) if fp_x is not None else None
    prefix = f"model.layers.{index}."
    reps, fp_out = quantize_linears(block, x, pe, cfg, dev, prefix=prefix, batch=BATCH)
    if cfg.finetune_steps and target is not None:
        finetune_block(block, x, target, pe, cfg, dev, BATCH)
    nxt = _forward_all(block, x, pe, dev, BATCH) if cfg.hessians == "sequential" or cfg.finetune_steps else fp_out
    files = block_files(run, index)
    save_tensors({"x": nxt} | ({"fp_x": target} if target is not None else {}), files["next"])
    save_tensors({prefix + k: v for k, v in block.state_dict().items()}, files["state"])
    layers = [{"name": r.name, "proxy_loss": r.proxy_loss, "bpw": r.bpw, "bits": r.bits,
               "weights": r.shape[0] * r.shape[1], "seconds": r.seconds, "warnings": r.warnings} for r in reps]
    qcfg = {prefix + n: m.layer_config() for n, m in block.named_modules() if isinstance(m, VQuantLinear)}
    write_json({"index": index, "config_for_layers": qcfg, "layers": layers}, files["meta"])
    return {"index": index, "layers": layers, "seconds": time.perf_counter() - t0,
            "bits": sum(r["bits"] for r in layers), "weights": sum(r["weights"] for r in layers)}


FINETUNE_CHECKPOINT_EVERY = 10  # end-to-end fine-tuning steps between two checkpoints


def finetune_dir(run: str) -> Path:
    """Where assemble_model keeps the fine-tuning checkpoint of a run (resumed by a rerun)."""
    return run_dir(run) / "finetune"


def _finetune_progress(run: str):
    """progress(step, steps, info) for finetune_model: the Prefect run logger (or this module's
    logger outside a run) and a progress artifact `finetune-<run>` with the loss and ETA."""
    import logging

    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.context import get_run_context

    try:
        get_run_context()
        log, art = get_run_logger(), {}
    except Exception:  # no run context (task called as a plain function): no artifact either
        log, art = logging.getLogger(__name__), {"id": None}
    last = [0.0]

    def progress(step: int, steps: int, info: str) -> None:
        now = time.monotonic()
        if step != steps and step % 10 and now - last[0] < 30:  # every 10 steps or 30 s
            return
        last[0] = now
        log.info("fine-tune step %d/%d %s", step, steps, info)
        pct, desc = 100.0 * step / max(steps, 1), f"end-to-end fine-tuning: step {step}/{steps}, {info}"
        try:
            if "id" not in art:
                art["id"] = create_progress_artifact(pct, key=f"finetune-{run.lower()}", description=desc)
            elif art["id"] is not None:
                update_progress_artifact(art["id"], pct, description=desc)
        except Exception as e:  # artifacts need a run context / API; logging still happened
            art.setdefault("id", None)
            log.debug("progress artifact not updated: %s", e)

    return progress


@task(cache_policy=NO_CACHE)
def assemble_model(run: str, model_path: str, calib_path: str, config: dict[str, Any], blocks: int,
                   report: dict[str, Any], device: str = "cpu",
                   checkpoint_every: int = FINETUNE_CHECKPOINT_EVERY) -> dict[str, Any]:
    """Swap every quantized block into the original model, fine-tune end to end if asked, save.

    The fine-tuning is checkpointed in the run's workspace (`finetune_dir(run)`) every
    `checkpoint_every` steps: a rerun of the job (blocks cached) resumes it where it stopped."""
    from vptq.config import QuantConfig
    from vptq.finetune import finetune_model
    from vptq.io import replace_linears, save_quantized

    cfg = QuantConfig.from_dict(config)
    fp, tok = load_fp_model(model_path)
    model = copy.deepcopy(fp)
    for i in range(blocks):
        files = block_files(run, i)
        sd = load_tensors(files["state"])
        dtype = next((v.dtype for k, v in sd.items() if k.endswith("centroids.weight")), torch.float16)
        replace_linears(model, json.loads(files["meta"].read_text())["config_for_layers"], dtype=dtype)
        _, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected:
            raise ValueError(f"block {i} state does not fit the model: unexpected {unexpected[:3]}")
    e2e: dict[str, Any] = {}
    if cfg.e2e_steps:
        ids = load_tensors(Path(calib_path))["input_ids"]
        e2e = finetune_model(model, copy.deepcopy(fp), ids, cfg, torch.device(device),
                             progress=_finetune_progress(run), checkpoint_dir=finetune_dir(run),
                             checkpoint_every=checkpoint_every)
        model.cpu()
    out = save_quantized(model, run_dir(run) / "checkpoint", tok, report | {"e2e": e2e}, overwrite=True)
    return {"path": str(out), "sha256": sha256_path(out), "e2e": e2e}
