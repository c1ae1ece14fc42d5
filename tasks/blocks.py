"""quantize_block(i): one vptq.driver.BlockStep between workspace files; assemble_model: the checkpoint.

Block i reads `inputs_{i}.safetensors` (block 0: the embedded calibration windows), runs the
driver's step on a copy of the original block, exactly as vptq.sequential.quantize_model does,
and writes `block_{i}.safetensors` (its state), `inputs_{i+1}.safetensors` and, last (the commit
point), `block_{i}.json`: the block's descriptor (its VPTQ layer configs, metrics, and the size and
sha256 of each file it wrote). The run folder is keyed by hash(model sha, calibration hash, config,
code version), so a rerun reuses every block whose descriptor validates (`read_block`) and
recomputes the others.

No Prefect result is persisted or read back: a Prefect result record names its own serializer
(cloudpickle by default) and the workspace may be shared (one VPTQ_HOME on NFS for several
workers), so a planted record would run code. Only safetensors and JSON are read from here.
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
from pydantic import BaseModel, ConfigDict, ValidationError
from vptq_service.tasks.workspace import (
    code_version,
    digest,
    file_matches,
    file_record,
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


def run_key(model_sha: str, calib_hash: str, config: dict[str, Any]) -> str:
    """Workspace key of one run: what every block's result depends on, bar its index."""
    return digest("run", model_sha, calib_hash, config, code_version())[:24]


def block_files(run: str, index: int) -> dict[str, Path]:
    d = run_dir(run)
    return {"state": d / f"block_{index:03d}.safetensors", "meta": d / f"block_{index:03d}.json",
            "next": d / f"inputs_{index + 1:03d}.safetensors"}


def needs_inputs(config: dict[str, Any], hessians: str | None) -> bool:
    """vptq.driver.needs_inputs for a config dict and a shared Hessian set folder (or None)."""
    from vptq import driver
    from vptq.config import QuantConfig

    return driver.needs_inputs(QuantConfig.from_dict(config), hessians is not None)


BLOCK_FORMAT = "vptq-block/1"


class FileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    size: int
    sha256: str


class LayerRow(BaseModel):
    """One quantized linear's report (tasks.blocks._report), as the flow records it."""

    model_config = ConfigDict(extra="forbid")
    name: str
    proxy_loss: float
    bpw: float
    bits: int
    weights: int
    seconds: float
    warnings: list[str]


class BlockDescriptor(BaseModel):
    """`block_{i}.json`: what a finished block is, validated before a rerun reuses it."""

    model_config = ConfigDict(extra="forbid")
    format: str
    key: str
    index: int
    config_for_layers: dict[str, dict[str, Any]]
    layers: list[LayerRow]
    seconds: float
    bits: int
    weights: int
    files: dict[str, FileRecord]


def block_key(run: str, index: int) -> str:
    """What a block's files depend on: its run (model, calibration, config, code) and its index."""
    return digest("block", run, index)


def block_summary(desc: dict[str, Any]) -> dict[str, Any]:
    """The metadata a block task returns (and the flow records) from its descriptor."""
    return {k: desc[k] for k in ("index", "layers", "seconds", "bits", "weights")}


def read_block(run: str, index: int, with_next: bool = True, verify: bool = True) -> dict[str, Any] | None:
    """Block `index`'s descriptor when the block is finished: the JSON validates, is this block's
    (format, key, index), and every file it names is there with its size and (verify) sha256;
    with_next: the next block's inputs among them. Anything else -> None: the block is recomputed."""
    files = block_files(run, index)
    try:
        raw = files["meta"].read_bytes()
        desc = BlockDescriptor.model_validate_json(raw)
    except (OSError, ValueError, ValidationError):
        return None
    if (desc.format, desc.key, desc.index) != (BLOCK_FORMAT, block_key(run, index), index):
        return None
    want = {"state": files["state"].name} | ({"next": files["next"].name} if with_next else {})
    if any(k not in desc.files or desc.files[k].name != name for k, name in want.items()):
        return None
    folder = files["meta"].parent
    if not all(file_matches(folder, r.model_dump(), verify) for r in desc.files.values()):
        return None
    return desc.model_dump()


def _open_step(run: str, model_path: str, calib_path: str, cfg, index: int, device: str, hessians: str | None):
    """Block `index` of a run as a vptq.driver.BlockStep: a copy of the original block on the device
    and, when the step needs them, its inputs (block 0: the embedded windows; else the file the
    previous block wrote)."""
    from vptq import driver

    model, _ = load_fp_model(model_path)
    inputs = pe = None
    if driver.needs_inputs(cfg, hessians is not None):
        if index == 0:
            inputs = driver.BlockInputs.first(model, load_tensors(Path(calib_path))["input_ids"], cfg)
        else:
            src = block_files(run, index - 1)["next"]
            if not src.is_file():
                raise FileNotFoundError(f"{src} is missing: block {index - 1} must run first")
            t = load_tensors(src)
            inputs = driver.BlockInputs(t["x"], t.get("fp_x"))
        pe = driver.block_kwargs(model, inputs.x.shape[1], device)[index]
    # the block is copied after the capture: a model's forward may set its blocks' state per call (BigBird
    # switches them to full attention for windows too short for its sparse attention), and the copy must
    # run as the model's own block runs on these windows
    block = fp_block(model_path, index).to(device)
    return driver.BlockStep(block, index, cfg, device, inputs, pe, path=driver.layers_path(model))


def _close_step(run: str, step, layers: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """The rest of a quantized step (block fine-tuning if configured, the next block's inputs),
    then its files: the next inputs, the block's state and, last, its descriptor."""
    from vptq.layers import VQuantLinear

    files = block_files(run, step.index)
    files["meta"].unlink(missing_ok=True)  # the block is not finished until its new descriptor is written
    step.finetune()
    nxt = step.next_inputs()
    written = {}
    if nxt is not None:
        save_tensors({"x": nxt.x} | ({"fp_x": nxt.fp_x} if nxt.fp_x is not None else {}), files["next"])
        written["next"] = file_record(files["next"])
    save_tensors({step.prefix + k: v for k, v in step.block.state_dict().items()}, files["state"])
    written["state"] = file_record(files["state"])
    qcfg = {step.prefix + n: m.layer_config() for n, m in step.block.named_modules() if isinstance(m, VQuantLinear)}
    desc = {"format": BLOCK_FORMAT, "key": block_key(run, step.index), "index": step.index,
            "config_for_layers": qcfg, "layers": layers, "seconds": time.perf_counter() - t0,
            "bits": sum(r["bits"] for r in layers), "weights": sum(r["weights"] for r in layers),
            "files": written}
    write_json(BlockDescriptor.model_validate(desc).model_dump(), files["meta"])
    return block_summary(desc)


def state_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    """The float dtype VQuantLinears of a saved state were stored in (that of their centroids)."""
    return next((v.dtype for k, v in sd.items() if k.endswith("centroids.weight")), torch.float16)


def _report(r) -> dict[str, Any]:
    return {"name": r.name, "proxy_loss": r.proxy_loss, "bpw": r.bpw, "bits": r.bits,
            "weights": r.shape[0] * r.shape[1], "seconds": r.seconds, "warnings": r.warnings}


@task(cache_policy=NO_CACHE, task_run_name="quantize-block-{index}")
def quantize_block(run: str, model_path: str, model_sha: str, calib_path: str, calib_hash: str,
                   config: dict[str, Any], index: int, device: str = "cpu",
                   hessians: str | None = None) -> dict[str, Any]:
    """Quantize decoder block `index`; write its state and the next block's inputs to the workspace.

    hessians: a shared Hessian set folder (hessians="original"); without it the block's Hessians
    are collected here, on its inputs."""
    from vptq_service.tasks.hessians import load_block_hessians

    from vptq.config import QuantConfig

    t0 = time.perf_counter()
    step = _open_step(run, model_path, calib_path, QuantConfig.from_dict(config), index, device, hessians)
    reps = step.quantize(hessians=load_block_hessians(hessians, index) if hessians else None)
    return _close_step(run, step, [_report(r) for r in reps], t0)


# -- the same block, spread over a task runner's workers (`--runner dask|ray`) ---------------------
# for each group of its linears (vptq.driver.linear_groups: one, or true-sequential's call groups):
# group_hessians (in the flow's process) -> quantize_linear per linear of the group (workers, any
# order); then finish_block (in the flow's process): the same driver calls as quantize_block, so the
# same bytes. A shared Hessian set (hessians="original") skips group_hessians: every linear at once.


def linear_names(model_path: str, config: dict[str, Any], index: int) -> list[str]:
    """The target linears of block `index`, in the order quantize_block visits them."""
    from vptq.config import QuantConfig
    from vptq.driver import decoder_layers, target_linears
    from vptq.targets import unfused

    model, _ = load_fp_model(model_path)  # MoE experts counted as the linears they are quantized as
    return list(target_linears(unfused(decoder_layers(model)[index]), QuantConfig.from_dict(config)))


def linear_file(run: str, index: int, name: str) -> Path:
    return run_dir(run) / "linears" / f"block_{index:03d}.{name}.safetensors"


@task(cache_policy=NO_CACHE, task_run_name="group-hessians-{index}-{group}")
def group_hessians(run: str, model_path: str, calib_path: str, config: dict[str, Any], index: int, group: int,
                   device: str = "cpu") -> dict[str, Any]:
    """The Hessians of group `group` of block `index`'s linears (vptq.driver.linear_groups: all of them
    in one group unless hessians="true-sequential") on its inputs, with the groups before it quantized
    (quantize_linear's files swapped in: the in-process path's block at that point), to the workspace.
    Returns {"path": the folder quantize_linear reads, "names": the group's linears, "groups": how many}."""
    from vptq_service.tasks.hessians import save_block_hessians

    from vptq.config import QuantConfig

    step = _open_step(run, model_path, calib_path, QuantConfig.from_dict(config), index, device, None)
    groups = step.linear_groups()
    _swap_in(run, step, [n for names in groups[:group] for n in names])
    d = run_dir(run) / "hessians" / f"group_{group}"
    save_block_hessians(step.hessians(groups[group]), d, index)
    return {"path": str(d), "names": groups[group], "groups": len(groups)}


@task(cache_policy=NO_CACHE, task_run_name="quantize-{index}-{name}")
def quantize_linear(run: str, model_path: str, hessians: str, config: dict[str, Any], index: int, name: str,
                    device: str = "cpu") -> dict[str, Any]:
    """One linear of block `index` from its Hessian: the VQuantLinear's state + config to the workspace."""
    from vptq_service.tasks.hessians import load_block_hessians
    from vptq_service.tasks.runner import worker_device

    from vptq.config import QuantConfig
    from vptq.driver import block_prefix, vptq_linear
    from vptq.experts import expert_key
    from vptq.targets import unfused

    cfg, dev = QuantConfig.from_dict(config), worker_device(device)
    if expert_key(name):  # an MoE expert's linear exists once its block's experts are unfused (vptq.experts)
        lin = unfused(fp_block(model_path, index)).get_submodule(name).to(dev)
    else:
        lin = fp_linear(model_path, index, name).to(dev)
    h = load_block_hessians(hessians, index)[name]
    mod, rep = vptq_linear(block_prefix(index) + name, lin, h.to(dev), cfg)
    save_tensors(mod.state_dict(), linear_file(run, index, name),
                 metadata={"layer_config": json.dumps(mod.layer_config())})
    return _report(rep)


@task(cache_policy=NO_CACHE, task_run_name="finish-block-{index}")
def finish_block(run: str, model_path: str, model_sha: str, calib_path: str, calib_hash: str,
                 config: dict[str, Any], index: int, device: str = "cpu", hessians: str | None = None,
                 layers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Block `index` from its quantized linears (quantize_linear's files): as quantize_block ends,
    with the same files: either path's finished blocks serve the other. `layers`: the linears' reports
    in the order the flow quantized them (group after group: the in-process path's order)."""
    from vptq.config import QuantConfig
    from vptq.driver import target_linears

    t0 = time.perf_counter()
    cfg = QuantConfig.from_dict(config)
    step = _open_step(run, model_path, calib_path, cfg, index, device, hessians)
    step.keep_original_outputs()  # before the quantized linears replace the original ones
    names = list(target_linears(step.block, cfg))
    layers = layers or []
    if sorted(r["name"] for r in layers) != sorted(step.prefix + n for n in names):
        raise ValueError(f"block {index}: the reports given do not match its target linears")
    _swap_in(run, step, names)
    return _close_step(run, step, layers, t0)


def _swap_in(run: str, step, names: list[str]) -> None:
    """Replace the step's linears `names` by the VQuantLinears quantize_linear wrote for them."""
    from safetensors import safe_open

    from vptq.io import replace_linears

    for name in names:
        f = linear_file(run, step.index, name)
        with safe_open(str(f), "pt") as sf:
            entry = json.loads(sf.metadata()["layer_config"])
        sd = load_tensors(f)
        mod = replace_linears(step.block, {name: entry}, dtype=state_dtype(sd))[name]
        mod.load_state_dict(sd)
        mod.to(step.device)


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
        desc = read_block(run, i, with_next=False, verify=False)  # the flow verified the sha256s
        if desc is None:
            raise ValueError(f"block {i} of run {run} is missing or changed since it was quantized: run the job again")
        sd = load_tensors(block_files(run, i)["state"])
        dtype = state_dtype(sd)
        replace_linears(model, desc["config_for_layers"], dtype=dtype)
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
