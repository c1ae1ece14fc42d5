"""Orchestration overhead (issue 7): the same job through the `compress` Prefect flow and through a
direct `vptq.pipeline.compress` call, one run each, same config and seed.

    python bench/overhead.py                      # SmolLM2, cheap config, both runs, record
    python bench/overhead.py --source DIR --nsamples 4 --seqlen 128 --set kmeans_iters=2

Each path runs in a fresh Python process with its own VPTQ_HOME and PREFECT_HOME (so neither
profits from the other's caches or workspace):
- flow: what `vptq compress SOURCE --name N` does in-process: flows.request.build_spec -> open_job ->
  cli.jobs.run_flow (a temporary local Prefect API is started, as for `vptq compress` without
  PREFECT_API_URL; every block a task with persisted results and workspace files; the
  checkpoint assembled, published to the local registry with sha256s); evaluation off.
- direct: vptq.pipeline.compress(source, cfg, out, calib, nsamples, seqlen): load, calibrate,
  quantize, save.
Reported: in-process seconds (timer around the calls, imports excluded) and process wall seconds
(imports and interpreter start included) of both; overhead = flow - direct, in seconds and percent
of direct; the target is overhead <= 5% of direct + 10 s. Per stage: the flow's Prefect task runs
(name, seconds) read from its API, and the direct run's sum of per-layer quantization seconds.
Whether both wrote the same tensors is checked too. The record is appended to
bench/results/overhead.json (a list of runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CHEAP = ["e2e_steps=0", "refine_iters=0", "kmeans_iters=4"]


def _overrides(items: list[str]) -> dict:
    from vptq_service.cli.options import overrides_from

    return overrides_from(None, items)


def run_flow_child(a) -> dict:
    """The flow path, in this process; VPTQ_HOME/PREFECT_HOME set by the parent."""
    t_import = time.perf_counter()
    from vptq_service.cli.jobs import run_flow
    from vptq_service.flows.request import build_spec, open_job

    t0 = time.perf_counter()
    spec = build_spec(a.source, "overhead", a.bits, calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen,
                      seed=a.seed, overrides=_overrides(a.set), eval_windows=0)
    job = open_job(spec)
    t_flow = time.perf_counter()
    s = run_flow(job.id)
    t1 = time.perf_counter()
    stages = _task_runs(s["prefect_run_id"])
    return {"path": "flow", "seconds": round(t1 - t0, 2), "flow_seconds": round(t1 - t_flow, 2),
            "import_seconds": round(t0 - t_import, 2), "status": s["status"], "artifact": s["artifact"],
            "bpw": s["bpw"], "checkpoint": str(Path(s["workspace"]) / "checkpoint"), "stages": stages,
            "config": spec.quant_config().to_dict()}


def _task_runs(flow_run_id: str) -> dict:
    """Seconds per task of the flow run (Prefect's own start/end times), and the flow run's."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
    rows = sorted(((t.start_time, t.name, (t.end_time - t.start_time).total_seconds())
                   for t in tasks if t.start_time and t.end_time), key=lambda r: r[0])
    flow_s = (run.end_time - run.start_time).total_seconds() if run.start_time and run.end_time else None
    return {"flow_run": round(flow_s, 2) if flow_s else None,
            "tasks": [{"task": name, "seconds": round(sec, 2)} for _, name, sec in rows]}


def run_direct_child(a) -> dict:
    """The direct path, in this process."""
    t_import = time.perf_counter()
    from vptq.config import resolve
    from vptq.pipeline import compress

    cfg, _ = resolve(a.bits, _overrides(a.set), seed=a.seed)  # the rule build_spec applies
    out = Path(os.environ["VPTQ_HOME"]) / "direct-out"
    t0 = time.perf_counter()
    result, _, _ = compress(a.source, cfg, out, calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen)
    t1 = time.perf_counter()
    return {"path": "direct", "seconds": round(t1 - t0, 2), "import_seconds": round(t0 - t_import, 2),
            "bpw": round(result.report.bpw, 4), "checkpoint": str(out), "config": cfg.to_dict(),
            "stages": {"quantize_layers_sum": round(sum(r.seconds for r in result.report.layers), 2),
                       "layers": len(result.report.layers)}}


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out |= load_file(f)
        return out

    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def child(path: str, a, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VPTQ_"))}
    env |= {"VPTQ_HOME": str(work / path / "home"), "PREFECT_HOME": str(work / path / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, __file__, "--child", path, "--source", a.source, "--bits", str(a.bits),
           "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--seed", str(a.seed),
           *(["--calib", a.calib] if a.calib else []), *[x for s in a.set for x in ("--set", s)]]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"{path} run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    rec["wall_seconds"] = round(wall, 2)
    print(f"{path}: {rec['seconds']} s in process, {rec['wall_seconds']} s wall", file=sys.stderr)
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="smollm2")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--calib", default=None)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=None, help="QuantConfig FIELD=VALUE (default: a cheap config)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "overhead.json"))
    p.add_argument("--child", choices=["flow", "direct"], help=argparse.SUPPRESS)
    a = p.parse_args()
    a.set = CHEAP if a.set is None else a.set
    if a.child:
        import torch

        torch.set_num_threads(int(os.environ.get("OVERHEAD_THREADS", os.cpu_count() or 1)))
        rec = (run_flow_child if a.child == "flow" else run_direct_child)(a)
        sys.stdout.write("\n" + json.dumps(rec) + "\n")
        return

    with tempfile.TemporaryDirectory(prefix="vptq-overhead-") as tmp:
        work = Path(tmp)
        direct = child("direct", a, work)
        flow = child("flow", a, work)
        identical = same_tensors(Path(flow["checkpoint"]), Path(direct["checkpoint"]))

    import prefect
    import torch
    import transformers

    over = flow["seconds"] - direct["seconds"]
    over_wall = flow["wall_seconds"] - direct["wall_seconds"]
    budget = 0.05 * direct["seconds"] + 10
    split = {"spec_checks_and_job_row": round(flow["seconds"] - flow["flow_seconds"], 2),
             "prefect_api_start_and_flow_setup": round(flow["flow_seconds"] - (flow["stages"]["flow_run"] or 0), 2),
             "flow_run": flow["stages"]["flow_run"],
             "flow_tasks_sum": round(sum(t["seconds"] for t in flow["stages"]["tasks"]), 2)}
    rec = {
        "date": date.today().isoformat(), "command": "python bench/overhead.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "prefect": prefect.__version__,
                     "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                              text=True).stdout.strip()},
        "job": {"source": a.source, "bits": a.bits, "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": a.seed,
                "set": a.set, "calib": a.calib or "default (wikitext-2 valid)"},
        "direct": {k: v for k, v in direct.items() if k not in ("checkpoint", "config")},
        "flow": {k: v for k, v in flow.items() if k not in ("checkpoint", "config")},
        "flow_split": split,
        "same_config": flow["config"] == direct["config"], "identical_tensors": identical,
        "overhead_seconds": round(over, 2), "overhead_percent": round(100 * over / direct["seconds"], 2),
        "overhead_wall_seconds": round(over_wall, 2),
        "overhead_wall_percent": round(100 * over_wall / direct["wall_seconds"], 2),
        "budget_seconds": round(budget, 2), "within_budget": over <= budget,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(runs + [rec], indent=2) + "\n")
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
