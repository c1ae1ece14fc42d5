"""The `compress` flow: fetch -> calibrate -> quantize block by block -> assemble -> evaluate -> publish.

Lineage rows are written at each step and the job row moves queued -> running -> succeeded |
failed | crashed | cancelled (with the error text). Ctrl-C marks the job cancelled; so does
`vptq jobs cancel`, which the flow notices before each block. With `max_ppl_ratio` the version is
published `rejected` (kept, never the latest) when perplexity after > ratio x before. Finished blocks
live in the run's workspace folder, keyed by hash(model sha, calibration hash, config, code version),
each with a descriptor the flow validates (sizes, sha256) before reusing it: running the same job
again recomputes none of them and reports them in `blocks_reused`. No Prefect result is persisted or
read back (`persist_result=False`, JSON if it ever were): nothing in the workspace is unpickled.

One process runs a job at a time (flows/heartbeat.py): the row names its runner and a heartbeat; the
same command run again meanwhile waits for the first and reports its result, and a job is taken over
only when its runner is gone (heartbeat older than VPTQ_HEARTBEAT_TIMEOUT, or its process dead).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run
from vptq_service.flows.heartbeat import (
    Heartbeat,
    JobLost,
    heartbeat_seconds,
    heartbeat_timeout,
    new_runner_id,
    runner_gone,
    stale_before,
)
from vptq_service.flows.spec import JobSpec
from vptq_service.tasks import (
    assemble_model,
    check_blocks,
    evaluate_model,
    fetch_model,
    inspect_model,
    publish_artifact,
    quantize_block,
    sample_calibration,
)
from vptq_service.tasks.blocks import (
    block_summary,
    finish_block,
    group_hessians,
    linear_names,
    needs_inputs,
    quantize_linear,
    read_block,
    run_key,
)
from vptq_service.tasks.hessians import collect_hessian_set
from vptq_service.tasks.runner import make_task_runner, submit_options
from vptq_service.tasks.workspace import code_version, run_dir

DEPLOYMENT = "compress"

# In-process callers (the CLI's progress bar) may set this to callback(done, total, info); a
# module attribute rather than a flow parameter, because flow parameters must serialize.
progress_hook = None


def _progress(done: int, total: int, info: str) -> None:
    if progress_hook is not None:
        progress_hook(done, total, info)


class JobCancelled(Exception):
    """The job row was set to cancelled (by `vptq jobs cancel`) while the flow ran."""


def peak_host_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class JobFailed(Exception):
    """The job this command waited for failed in the process that ran it."""


def claim_or_wait(repo, job_id: int, runner: str) -> dict[str, Any] | None:
    """Make this process (`runner`) the job's runner: None once it is. While another live process
    runs the job, wait for it (attach) and return the job's summary when it succeeds; JobFailed or
    JobCancelled when it ends otherwise. A job whose runner is gone (heartbeat older than the
    timeout, or its process on this host dead) is taken over."""
    from datetime import UTC, datetime

    log = get_run_logger()
    waited = False
    while True:
        job, how = repo.claim_job(job_id, runner, stale_before(datetime.now(UTC)), gone=runner_gone,
                                  restart_failed=not waited)
        if how == "taken_over":
            log.warning("job %d: its runner is gone (no heartbeat for %.0f s, or its process died): taking it over",
                        job_id, heartbeat_timeout())
        if how is not None:
            return None
        if job.status == "running":
            if not waited:
                log.info("job %d is running in %s: waiting for it to finish", job_id, job.runner)
                _progress(0, 0, f"waiting for job {job_id}, running in {job.runner}")
            waited = True
            time.sleep(min(heartbeat_seconds(), 2.0))
        elif job.status == "succeeded":
            return job_summary(repo, job_id)
        elif job.status == "cancelled":
            raise JobCancelled(f"job {job_id} was cancelled" + (f": {job.error}" if job.error else ""))
        else:
            raise JobFailed(f"job {job_id} {job.status} in the process that ran it: {job.error or 'no error recorded'}")


def end_job(repo, job_id: int, status: str, error: str, runner: str) -> None:
    """Record how the job ended, unless another process took it over meanwhile (then it is theirs)."""
    from vptq_service.store.repository import JobTakenOver

    try:
        repo.set_job_status(job_id, status, error=error, runner=runner)
    except JobTakenOver:
        pass


def job_summary(repo, job_id: int, blocks_total: int | None = None, blocks_reused: int | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON a job reports: id, status, blocks, artifact name:version, error."""
    job = repo.get_job(job_id)
    arts = [a for a in repo.list_artifacts() if a.job_id == job_id]
    blocks = {r.layer_name.split(".")[2] for r in repo.layer_results(job_id) if r.layer_name.startswith("model.layers.")}
    total = blocks_total if blocks_total is not None else job.config.get("blocks_total", len(blocks))
    return {"job_id": job.id, "status": job.status, "source": job.source_uri, "blocks_done": len(blocks),
            "blocks_total": total, "blocks_reused": total if blocks_reused is None else blocks_reused,
            "artifact": arts[0].ref if arts else None, "artifact_uri": arts[0].uri if arts else None,
            "error": job.error, "prefect_run_id": job.prefect_run_id} | (job.config.get("result") or {}) | (extra or {})


def _block_table(meta: dict[str, Any], cached: bool) -> list[dict[str, Any]]:
    return [{"layer": r["name"], "proxy_loss": round(r["proxy_loss"], 6), "bpw": round(r["bpw"], 4),
             "seconds": round(r["seconds"], 3), "reused": cached} for r in meta["layers"]]


def _submit_linears(task_runner, spec: JobSpec, run: str, model_path: str, cfg: dict[str, Any], index: int,
                    hdir: str, names: list[str]) -> list:
    """Linears `names` of block `index` as tasks on the runner's workers, from the Hessians in `hdir`."""
    with submit_options(spec.runner, spec.device):
        return [task_runner.submit(quantize_linear, {"run": run, "model_path": model_path, "hessians": hdir,
                                                     "config": cfg, "index": index, "name": name,
                                                     "device": spec.device})
                for name in names]


def _quantize_on_workers(task_runner, spec: JobSpec, run: str, model_path: str, calib_path: str,
                         cfg: dict[str, Any], index: int, hpath: str | None) -> list[dict[str, Any]]:
    """Block `index`'s linears on the runner's workers: every one at once from a shared Hessian set
    (`hpath`), else group after group (one group unless hessians="true-sequential"), each group's
    Hessians taken here with the groups before it quantized."""
    if hpath:
        futures = _submit_linears(task_runner, spec, run, model_path, cfg, index, hpath,
                                  linear_names(model_path, cfg, index))
        return [f.result() for f in futures]
    layers, group, groups = [], 0, 1
    while group < groups:
        h = group_hessians(run, model_path, calib_path, cfg, index, group, spec.device)
        futures = _submit_linears(task_runner, spec, run, model_path, cfg, index, h["path"], h["names"])
        layers += [f.result() for f in futures]
        group, groups = group + 1, h["groups"]
    return layers


def run_job(repo, job_id: int, spec: JobSpec, cfg: dict[str, Any], hb: Heartbeat | None = None) -> dict[str, Any]:
    """The job's steps, each a task, on the job's resolved QuantConfig `cfg` (as a dict, the form the
    tasks take); lineage rows written as results come in. `hb.check()` before each block, before
    assembling and before publishing: a runner that lost the job stops there (JobLost)."""
    check = hb.check if hb is not None else (lambda: None)
    log = get_run_logger()
    t0 = time.perf_counter()
    _progress(0, 0, "fetching the model")
    fetched = fetch_model(spec.source)
    _progress(0, 0, "sampling calibration windows")
    calib = sample_calibration(fetched["path"], spec.calib, spec.nsamples, spec.seqlen, spec.seed)
    info = inspect_model(fetched["path"], cfg)
    check_blocks(fetched["path"], calib["path"], spec.device)  # before any work: blocks that cannot run alone
    model = repo.add_model(spec.source, fetched["sha256"], info["architecture"], info["parameter_count"])
    cset = repo.add_calibration_set(calib["source"], spec.nsamples, spec.seqlen, spec.seed, calib["hash"])
    repo.update_job(job_id, model_id=model.id, calibration_set_id=cset.id,
                    config_updates={"blocks_total": info["blocks"]})

    hset = None
    if cfg["hessians"] == "original":  # the shared stage: computed once per (model, data), then reused
        _progress(0, 0, "collecting Hessians (shared stage)")
        hset = collect_hessian_set(fetched["path"], fetched["sha256"], calib["path"], calib["hash"],
                                   spec.nsamples, spec.seqlen, spec.device)
        repo.add_hessian_set(hset["key"], "original", spec.nsamples, spec.seqlen, hset["path"], hset["bytes"],
                             hset["blocks"], hset["seconds"], model_id=model.id, calibration_set_id=cset.id,
                             job_id=job_id)
        repo.update_job(job_id, config_updates={"hessian_set": hset["key"]})
        log.info("Hessian set %s %s (%d blocks, %.1f MB)", hset["key"],
                 "reused" if hset["reused"] else f"computed in {hset['seconds']:.1f} s", hset["blocks"],
                 hset["bytes"] / 1e6)
    hpath = hset["path"] if hset else None

    run = run_key(fetched["sha256"], calib["hash"], cfg)
    n = info["blocks"]
    chained = needs_inputs(cfg, hpath)
    # a block is reused only when its descriptor validates (every file there, sha256 as recorded);
    # one that does not is recomputed, and (when blocks feed each other) so is every block after it
    found = [read_block(run, i, chained) for i in range(n)]
    first_missing = next((i for i in range(n) if found[i] is None), n)
    todo = [(i >= first_missing) if chained else found[i] is None for i in range(n)]
    _progress(0, n, "blocks")
    progress = create_progress_artifact(0.0, key=f"job-{job_id}-progress", description="blocks quantized (%)")
    args = (run, fetched["path"], fetched["sha256"], calib["path"], calib["hash"], cfg)
    reused, metas = 0, []
    task_runner = make_task_runner(spec.runner, spec.workers, spec.device)
    with task_runner or contextlib.nullcontext():
        pending: dict[int, list] = {}
        if task_runner is not None and not chained:  # independent blocks: every linear queued at once
            for i in range(n):
                if todo[i]:
                    pending[i] = _submit_linears(task_runner, spec, run, fetched["path"], cfg, i, hpath,
                                                 linear_names(fetched["path"], cfg, i))
        for i in range(n):
            if repo.get_job(job_id).status == "cancelled":
                raise JobCancelled(f"job {job_id} was cancelled after {i} of {n} blocks")
            check()
            if not todo[i]:  # a finished block, verified above
                meta = block_summary(found[i])
            elif task_runner is None:  # in-process
                meta = quantize_block(*args, i, spec.device, hpath)
            else:
                if i in pending:  # independent blocks: queued above
                    layers = [f.result() for f in pending.pop(i)]
                else:
                    layers = _quantize_on_workers(task_runner, spec, run, fetched["path"], calib["path"], cfg, i,
                                                  hpath)
                meta = finish_block(*args, i, spec.device, hpath, layers)
            cached = not todo[i]
            reused += cached
            metas.append(meta)
            for r in meta["layers"]:
                repo.add_layer_result(job_id, r["name"], r["proxy_loss"], r["seconds"], r["bpw"])
            create_table_artifact(_block_table(meta, cached), key=f"job-{job_id}-block-{i}",
                                  description=f"job {job_id}, block {i}{' (reused)' if cached else ''}")
            update_progress_artifact(progress, 100.0 * (i + 1) / n)
            _progress(i + 1, n, "reused" if cached else f"block {i}: {meta['seconds']:.1f} s")
            log.info("block %d/%d %s", i + 1, n, "reused" if cached else f"quantized in {meta['seconds']:.1f} s")

    check()
    bits, weights = sum(m["bits"] for m in metas), sum(m["weights"] for m in metas)
    layers = [{k: v for k, v in r.items() if k != "seconds"} for m in metas for r in m["layers"]]
    report = {"source": spec.source, "model_sha256": fetched["sha256"], "calibration_hash": calib["hash"],
              "nsamples": spec.nsamples, "seqlen": spec.seqlen, "config": cfg, "code_version": code_version(),
              "bpw": round(bits / max(weights, 1), 4), "layers": len(layers), "layer_reports": layers}
    fl = info["float"]  # what stays floating point (vptq.targets.float_tensors): the whole-model figure
    report |= {"bits_per_param": round((bits + fl["bits"]) / max(weights + fl["params"], 1), 4),
               "float_params": fl["params"], "float_tensors": fl["groups"]}
    _progress(n, n, "assembling" + (f" + {cfg['e2e_steps']} fine-tuning steps" if cfg.get("e2e_steps") else ""))
    ckpt = assemble_model(run, fetched["path"], calib["path"], cfg, n, report, spec.device)

    ppl: dict[str, float] = {}
    if spec.eval_windows:
        text = spec.eval_text or calib["source"]
        _progress(n, n, "evaluating before/after")
        before = evaluate_model(fetched["path"], text, spec.eval_windows, spec.eval_seqlen, spec.device)
        after = evaluate_model(ckpt["path"], text, spec.eval_windows, spec.eval_seqlen, spec.device)
        ppl = {"perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"]}
        repo.record_evaluation(text, spec.eval_windows, spec.eval_seqlen, before["perplexity"], model_id=model.id)

    status = "published"
    if ppl and spec.max_ppl_ratio is not None:
        ratio = ppl["perplexity_after"] / ppl["perplexity_before"]
        ppl["perplexity_ratio"] = round(ratio, 4)
        if ratio > spec.max_ppl_ratio:
            status = "rejected"
            log.warning("perplexity ratio %.3f > --max-ppl-ratio %.3f: the version is published as rejected",
                        ratio, spec.max_ppl_ratio)
    lineage = {"job_id": job_id, "model_sha256": fetched["sha256"], "calibration_hash": calib["hash"],
               "code_version": code_version(), "config": cfg, "checkpoint_sha256": ckpt["sha256"]}
    if repo.get_job(job_id).status == "cancelled":
        raise JobCancelled(f"job {job_id} was cancelled before publishing")
    check()
    _progress(n, n, "publishing")
    art = publish_artifact(ckpt["path"], spec.name, spec.version, job_id, lineage, status)
    if ppl:
        repo.record_evaluation(text, spec.eval_windows, spec.eval_seqlen, ppl["perplexity_after"],
                               artifact_id=art["artifact_id"])
    extra = {"bpw": report["bpw"], "bits_per_param": report["bits_per_param"], "float_params": report["float_params"],
             "float_tensors": report["float_tensors"], "layers": report["layers"], "seconds": round(time.perf_counter() - t0, 2),
             "workspace": str(run_dir(run)), "artifact_status": art["status"], "runner": spec.runner,
             "hessians": cfg["hessians"], "peak_host_rss_mb": peak_host_rss_mb()} | ppl
    if hset:
        extra |= {"hessian_set": hset["key"], "hessians_reused": hset["reused"]}
    md = [f"# job {job_id}: {art['ref']}", "", f"- source: `{spec.source}`",
          f"- blocks: {n} ({reused} reused)", f"- bits per weight (all-in): {report['bpw']:.3f}"]
    if ppl:
        md.append(f"- perplexity before -> after: {ppl['perplexity_before']:.3f} -> {ppl['perplexity_after']:.3f}")
    md.append(f"- artifact: `{art['ref']}` ({art['status']}) at {art['uri']}")
    create_markdown_artifact("\n".join(md), key=f"job-{job_id}-summary", description=f"job {job_id} summary")
    return {"blocks_total": n, "blocks_reused": reused, "extra": extra}


# persist_result=False: the flow's and its tasks' results stay in memory (nothing to read back, no
# serializer in play); result_serializer="json" should anyone turn persistence on (never pickle)
@flow(name="compress", flow_run_name="compress-job-{job_id}", log_prints=False, persist_result=False,
      result_serializer="json")
def compress(job_id: int) -> dict[str, Any]:
    """Run (or resume) compression job `job_id` as recorded in the lineage database."""
    from vptq_service.store.repository import Repository

    from vptq.config import QuantConfig

    repo = Repository.open()
    try:
        job = repo.get_job(job_id)
        if job.status == "succeeded":
            return job_summary(repo, job_id)
        spec = JobSpec.model_validate(job.config["spec"])
        # the QuantConfig resolved when the request was built (flows/request.py), as the row stores it
        cfg = QuantConfig.from_dict(job.config["quant"]).to_dict()
        me = new_runner_id()
        attached = claim_or_wait(repo, job_id, me)
        if attached is not None:  # another process ran it while this one waited: its result
            return attached
        with Heartbeat(repo, job_id, me) as hb:
            if flow_run.id:
                repo.update_job(job_id, prefect_run_id=str(flow_run.id))
            try:
                out = run_job(repo, job_id, spec, cfg, hb)
            except (JobCancelled, JobLost):
                raise  # the row already says cancelled / belongs to the process that took the job over
            except Exception as e:
                end_job(repo, job_id, "failed", one_line(e), me)
                raise
            except KeyboardInterrupt:  # Ctrl-C: the user stopped it (its blocks stay cached for a new job)
                end_job(repo, job_id, "cancelled", "cancelled (interrupted by the user)", me)
                raise
            except BaseException as e:  # terminated: resumable
                end_job(repo, job_id, "crashed", one_line(e), me)
                raise
            hb.check()
            repo.update_job(job_id, config_updates={"result": out["extra"]})
            repo.set_job_status(job_id, "succeeded", runner=me)
        return job_summary(repo, job_id, out["blocks_total"], out["blocks_reused"], out["extra"])
    finally:
        repo.close()
