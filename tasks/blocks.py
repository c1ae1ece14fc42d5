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
from vptq_service.tasks.workspace import (
    code_version,
    digest,
    fp_block,
    fp_full,
    fp_linear,
    is_streamed,
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


def needs_inputs(config: dict[str, Any], hessians: str | None) -> bool:
    """Whether a block needs its inputs (and so writes the next block's): not when its Hessians come
    from a shared set and no block fine-tuning runs; such blocks are independent of each other."""
    return hessians is None or bool(config.get("finetune_steps"))


def block_done(run: str, index: int, with_next: bool = True) -> bool:
    """Every file block `index` writes is in the workspace."""
    files = block_files(run, index)
    return all(files[k].is_file() for k in (("state", "meta", "next") if with_next else ("state", "meta")))


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


class _Block:
    """Block `index` of a run, ready to quantize: a copy of the original block on the device, its
    inputs (quantized chain), the fine-tuning target and rotary embeddings when they are needed."""

    def __init__(self, run: str, model_path: str, calib_path: str, cfg, index: int, device: str,
                 hessians: str | None):
        from vptq.sequential import _forward_all, _rotary

        self.run, self.cfg, self.index, self.dev = run, cfg, index, torch.device(device)
        self.prefix = f"model.layers.{index}."
        model, _ = load_fp_model(model_path)
        self.block = fp_block(model_path, index).to(self.dev)
        self.x = self.fp_x = self.pe = self.target = None
        if needs_inputs(cfg.to_dict(), hessians):
            self.x, self.fp_x = _inputs(model, run, calib_path, index, bool(cfg.finetune_steps))
            self.pe = _rotary(model, self.x[:1].to(self.dev))
            if self.fp_x is not None:
                self.target = _forward_all(self.block, self.fp_x, self.pe, self.dev, BATCH)

    def finish(self, layers: list[dict[str, Any]], fp_out: torch.Tensor | None, t0: float) -> dict[str, Any]:
        """Block fine-tuning if configured, the next block's inputs, the block's state and meta files."""
        from vptq.finetune import finetune_block
        from vptq.layers import VQuantLinear
        from vptq.sequential import _forward_all

        cfg, files = self.cfg, block_files(self.run, self.index)
        if cfg.finetune_steps and self.target is not None:
            finetune_block(self.block, self.x, self.target, self.pe, cfg, self.dev, BATCH)
        if self.x is not None:
            fwd = cfg.hessians == "sequential" or cfg.finetune_steps or fp_out is None
            nxt = _forward_all(self.block, self.x, self.pe, self.dev, BATCH) if fwd else fp_out
            save_tensors({"x": nxt} | ({"fp_x": self.target} if self.target is not None else {}), files["next"])
        save_tensors({self.prefix + k: v for k, v in self.block.state_dict().items()}, files["state"])
        qcfg = {self.prefix + n: m.layer_config() for n, m in self.block.named_modules()
                if isinstance(m, VQuantLinear)}
        write_json({"index": self.index, "config_for_layers": qcfg, "layers": layers}, files["meta"])
        return {"index": self.index, "layers": layers, "seconds": time.perf_counter() - t0,
                "bits": sum(r["bits"] for r in layers), "weights": sum(r["weights"] for r in layers)}


def state_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    """The float dtype VQuantLinears of a saved state were stored in (that of their centroids)."""
    return next((v.dtype for k, v in sd.items() if k.endswith("centroids.weight")), torch.float16)


def _report(r) -> dict[str, Any]:
    return {"name": r.name, "proxy_loss": r.proxy_loss, "bpw": r.bpw, "bits": r.bits,
            "weights": r.shape[0] * r.shape[1], "seconds": r.seconds, "warnings": r.warnings}


@task(cache_key_fn=block_cache_key, persist_result=True, task_run_name="quantize-block-{index}")
def quantize_block(run: str, model_path: str, model_sha: str, calib_path: str, calib_hash: str,
                   config: dict[str, Any], index: int, device: str = "cpu",
                   hessians: str | None = None) -> dict[str, Any]:
    """Quantize decoder block `index`; write its state and the next block's inputs to the workspace.

    hessians: a shared Hessian set folder (hessians="original"); without it the block's Hessians
    are collected here, on its inputs."""
    from vptq_service.tasks.hessians import load_block_hessians

    from vptq.config import QuantConfig
    from vptq.sequential import quantize_block as quantize_linears

    t0 = time.perf_counter()
    b = _Block(run, model_path, calib_path, QuantConfig.from_dict(config), index, device, hessians)
    hs = load_block_hessians(hessians, index) if hessians else None
    reps, fp_out = quantize_linears(b.block, b.x, b.pe, b.cfg, b.dev, prefix=b.prefix, batch=BATCH, hessians=hs)
    return b.finish([_report(r) for r in reps], fp_out, t0)


# -- the same block, spread over a task runner's workers (`--runner dask|ray`) ---------------------
# block_hessians (in the flow's process) -> quantize_linear per linear (workers, any order) ->
# finish_block (in the flow's process): the same calls as quantize_block, so the same bytes.


def linear_names(model_path: str, config: dict[str, Any], index: int) -> list[str]:
    """The target linears of block `index`, in the order quantize_block visits them."""
    from vptq.config import QuantConfig
    from vptq.sequential import decoder_layers, target_linears

    model, _ = load_fp_model(model_path)
    return list(target_linears(decoder_layers(model)[index], QuantConfig.from_dict(config)))


def linear_file(run: str, index: int, name: str) -> Path:
    return run_dir(run) / "linears" / f"block_{index:03d}.{name}.safetensors"


@task(cache_policy=NO_CACHE, task_run_name="block-hessians-{index}")
def block_hessians(run: str, model_path: str, calib_path: str, config: dict[str, Any], index: int,
                   device: str = "cpu") -> str:
    """Hessians of block `index`'s target linears on its inputs, to the workspace; returns the folder
    (laid out as a Hessian set) that quantize_linear reads."""
    from vptq_service.tasks.hessians import save_block_hessians

    from vptq.config import QuantConfig
    from vptq.sequential import block_hessians as collect
    from vptq.sequential import target_linears

    cfg = QuantConfig.from_dict(config)
    b = _Block(run, model_path, calib_path, cfg, index, device, None)
    hs, _ = collect(b.block, b.x, b.pe, b.dev, BATCH, target_linears(b.block, cfg))
    d = run_dir(run) / "hessians"
    save_block_hessians(hs, d, index)
    return str(d)


@task(cache_policy=NO_CACHE, task_run_name="quantize-{index}-{name}")
def quantize_linear(run: str, model_path: str, hessians: str, config: dict[str, Any], index: int, name: str,
                    device: str = "cpu") -> dict[str, Any]:
    """One linear of block `index` from its Hessian: the VQuantLinear's state + config to the workspace."""
    from vptq_service.tasks.hessians import load_block_hessians
    from vptq_service.tasks.runner import worker_device

    from vptq.config import QuantConfig
    from vptq.sequential import vptq_linear

    cfg, dev = QuantConfig.from_dict(config), worker_device(device)
    lin = fp_linear(model_path, index, name).to(dev)
    h = load_block_hessians(hessians, index)[name]
    mod, rep = vptq_linear(f"model.layers.{index}.{name}", lin, h.to(dev), cfg)
    save_tensors(mod.state_dict(), linear_file(run, index, name),
                 metadata={"layer_config": json.dumps(mod.layer_config())})
    return _report(rep)


@task(cache_key_fn=block_cache_key, persist_result=True, task_run_name="finish-block-{index}")
def finish_block(run: str, model_path: str, model_sha: str, calib_path: str, calib_hash: str,
                 config: dict[str, Any], index: int, device: str = "cpu", hessians: str | None = None,
                 layers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Block `index` from its quantized linears (quantize_linear's files): as quantize_block ends.
    Cached under the same key as quantize_block: either path's finished blocks serve the other."""
    from safetensors import safe_open

    from vptq.config import QuantConfig
    from vptq.io import replace_linears
    from vptq.sequential import _forward_all, target_linears

    t0 = time.perf_counter()
    cfg = QuantConfig.from_dict(config)
    b = _Block(run, model_path, calib_path, cfg, index, device, hessians)
    names = list(target_linears(b.block, cfg))
    fp_out = None
    if b.x is not None and cfg.hessians == "original" and not cfg.finetune_steps:
        fp_out = _forward_all(b.block, b.x, b.pe, b.dev, BATCH)  # the original activations, as quantize_block
    for name in names:
        f = linear_file(run, index, name)
        with safe_open(str(f), "pt") as sf:
            entry = json.loads(sf.metadata()["layer_config"])
        sd = load_tensors(f)
        dtype = state_dtype(sd)
        mod = replace_linears(b.block, {name: entry}, dtype=dtype)[name]
        mod.load_state_dict(sd)
        mod.to(b.dev)
    by_name = {r["name"]: r for r in layers or []}
    reports = [by_name[b.prefix + n] for n in names]
    return b.finish(reports, fp_out, t0)


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
    model = copy.deepcopy(fp)  # a streamed model's blocks are meta: each is filled from its state below
    streamed = is_streamed(model_path)
    for i in range(blocks):
        files = block_files(run, i)
        sd = load_tensors(files["state"])
        dtype = state_dtype(sd)
        replace_linears(model, json.loads(files["meta"].read_text())["config_for_layers"], dtype=dtype)
        if streamed:
            model.model.layers[i].to_empty(device="cpu")
        _, unexpected = model.load_state_dict(sd, strict=False, assign=streamed)
        if unexpected:
            raise ValueError(f"block {i} state does not fit the model: unexpected {unexpected[:3]}")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"the block states do not cover the model: {left[:3]} have no values")
    e2e: dict[str, Any] = {}
    if cfg.e2e_steps:
        ids = load_tensors(Path(calib_path))["input_ids"]
        e2e = finetune_model(model, fp_full(model_path), ids, cfg, torch.device(device),
                             progress=_finetune_progress(run), checkpoint_dir=finetune_dir(run),
                             checkpoint_every=checkpoint_every)
        model.cpu()
    out = save_quantized(model, run_dir(run) / "checkpoint", tok, report | {"e2e": e2e}, overwrite=True)
    return {"path": str(out), "sha256": sha256_path(out), "e2e": e2e}
