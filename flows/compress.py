"""The `compress` flow: fetch -> calibrate -> quantize block by block -> assemble -> evaluate -> publish.

Lineage rows are written at each step and the job row moves queued -> running -> succeeded |
failed | crashed (with the error text). Finished blocks are Prefect-cached under
hash(model sha, calibration hash, config, code version, index): running the same job again
recomputes none of them and reports them in `blocks_reused`.
"""

from __future__ import annotations

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

from flows.spec import JobSpec
from tasks import (
    assemble_model,
    evaluate_model,
    fetch_model,
    inspect_model,
    publish_artifact,
    quantize_block,
    sample_calibration,
)
from tasks.blocks import block_done, run_key
from tasks.workspace import code_version, run_dir

DEPLOYMENT = "compress"


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def start_job(repo, job_id: int):
    """Move the job to running from any state a job can be (re)started from."""
    job = repo.get_job(job_id)
    if job.status == "running":  # its worker died without a word (SIGKILL): resume it
        repo.set_job_status(job_id, "crashed", error="worker stopped while the job was running")
    elif job.status == "failed":
        repo.set_job_status(job_id, "queued")
    return repo.set_job_status(job_id, "running")


def job_summary(repo, job_id: int, blocks_total: int | None = None, blocks_reused: int | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON a job reports: id, status, blocks, artifact name:version, error."""
    job = repo.get_job(job_id)
    arts = [a for a in repo.list_artifacts() if a.job_id == job_id]
    blocks = {r.layer_name.split(".")[2] for r in repo.layer_results(job_id) if r.layer_name.startswith("model.layers.")}
    total = blocks_total if blocks_total is not None else len(blocks)
    return {"job_id": job.id, "status": job.status, "source": job.source_uri,
            "blocks_total": total, "blocks_reused": total if blocks_reused is None else blocks_reused,
            "artifact": arts[0].ref if arts else None, "error": job.error,
            "prefect_run_id": job.prefect_run_id} | (extra or {})


def _block_table(meta: dict[str, Any], cached: bool) -> list[dict[str, Any]]:
    return [{"layer": r["name"], "proxy_loss": round(r["proxy_loss"], 6), "bpw": round(r["bpw"], 4),
             "seconds": round(r["seconds"], 3), "reused": cached} for r in meta["layers"]]


def run_job(repo, job_id: int, spec: JobSpec) -> dict[str, Any]:
    """The job's steps, each a task; lineage rows written as results come in."""
    log = get_run_logger()
    t0 = time.perf_counter()
    cfg = spec.quant_config().to_dict()
    fetched = fetch_model(spec.source)
    calib = sample_calibration(fetched["path"], spec.calib, spec.nsamples, spec.seqlen, spec.seed)
    info = inspect_model(fetched["path"], cfg)
    model = repo.add_model(spec.source, fetched["sha256"], info["architecture"], info["parameter_count"])
    cset = repo.add_calibration_set(calib["source"], spec.nsamples, spec.seqlen, spec.seed, calib["hash"])
    repo.update_job(job_id, model_id=model.id, calibration_set_id=cset.id)

    run = run_key(fetched["sha256"], calib["hash"], cfg)
    storage = run_dir(run) / "results"
    storage.mkdir(parents=True, exist_ok=True)
    n = info["blocks"]
    # a block whose workspace files are gone is recomputed, and so is every block after it
    first_missing = next((i for i in range(n) if not block_done(run, i)), n)
    progress = create_progress_artifact(0.0, key=f"job-{job_id}-progress", description="blocks quantized (%)")
    reused, metas = 0, []
    for i in range(n):
        block_task = quantize_block.with_options(result_storage=storage, refresh_cache=i >= first_missing)
        state = block_task(run, fetched["path"], fetched["sha256"], calib["path"], calib["hash"], cfg, i,
                           spec.device, return_state=True)
        meta = state.result()
        cached = state.name == "Cached"
        reused += cached
        metas.append(meta)
        for r in meta["layers"]:
            repo.add_layer_result(job_id, r["name"], r["proxy_loss"], r["seconds"], r["bpw"])
        create_table_artifact(_block_table(meta, cached), key=f"job-{job_id}-block-{i}",
                              description=f"job {job_id}, block {i}{' (reused)' if cached else ''}")
        update_progress_artifact(progress, 100.0 * (i + 1) / n)
        log.info("block %d/%d %s", i + 1, n, "reused" if cached else f"quantized in {meta['seconds']:.1f} s")

    bits, weights = sum(m["bits"] for m in metas), sum(m["weights"] for m in metas)
    layers = [{k: v for k, v in r.items() if k != "seconds"} for m in metas for r in m["layers"]]
    report = {"source": spec.source, "model_sha256": fetched["sha256"], "calibration_hash": calib["hash"],
              "nsamples": spec.nsamples, "seqlen": spec.seqlen, "config": cfg, "code_version": code_version(),
              "bpw": round(bits / max(weights, 1), 4), "layers": len(layers), "layer_reports": layers}
    ckpt = assemble_model(run, fetched["path"], calib["path"], cfg, n, report, spec.device)

    ppl: dict[str, float] = {}
    if spec.eval_windows:
        text = spec.eval_text or calib["source"]
        before = evaluate_model(fetched["path"], text, spec.eval_windows, spec.eval_seqlen, spec.device)
        after = evaluate_model(ckpt["path"], text, spec.eval_windows, spec.eval_seqlen, spec.device)
        ppl = {"perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"]}
        repo.record_evaluation(text, spec.eval_windows, spec.eval_seqlen, before["perplexity"], model_id=model.id)

    lineage = {"job_id": job_id, "model_sha256": fetched["sha256"], "calibration_hash": calib["hash"],
               "code_version": code_version(), "config": cfg, "checkpoint_sha256": ckpt["sha256"]}
    art = publish_artifact(ckpt["path"], spec.name, spec.version, job_id, lineage)
    if ppl:
        repo.record_evaluation(text, spec.eval_windows, spec.eval_seqlen, ppl["perplexity_after"],
                               artifact_id=art["artifact_id"])
    extra = {"bpw": report["bpw"], "seconds": round(time.perf_counter() - t0, 2), "workspace": str(run_dir(run))} | ppl
    md = [f"# job {job_id}: {art['ref']}", "", f"- source: `{spec.source}`",
          f"- blocks: {n} ({reused} reused)", f"- bits per weight (all-in): {report['bpw']:.3f}"]
    if ppl:
        md.append(f"- perplexity before -> after: {ppl['perplexity_before']:.3f} -> {ppl['perplexity_after']:.3f}")
    md.append(f"- artifact: `{art['ref']}` at {art['uri']}")
    create_markdown_artifact("\n".join(md), key=f"job-{job_id}-summary", description=f"job {job_id} summary")
    return {"blocks_total": n, "blocks_reused": reused, "extra": extra}


@flow(name="compress", flow_run_name="compress-job-{job_id}", log_prints=False)
def compress(job_id: int) -> dict[str, Any]:
    """Run (or resume) compression job `job_id` as recorded in the lineage database."""
    from store.repository import Repository

    repo = Repository.open()
    try:
        job = repo.get_job(job_id)
        if job.status == "succeeded":
            return job_summary(repo, job_id)
        spec = JobSpec.model_validate(job.config["spec"])
        start_job(repo, job_id)
        if flow_run.id:
            repo.update_job(job_id, prefect_run_id=str(flow_run.id))
        try:
            out = run_job(repo, job_id, spec)
        except Exception as e:
            repo.set_job_status(job_id, "failed", error=one_line(e))
            raise
        except BaseException as e:  # interrupted or terminated: resumable
            repo.set_job_status(job_id, "crashed", error=one_line(e))
            raise
        repo.set_job_status(job_id, "succeeded")
        return job_summary(repo, job_id, out["blocks_total"], out["blocks_reused"], out["extra"])
    finally:
        repo.close()
