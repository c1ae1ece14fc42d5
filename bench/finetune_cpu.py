"""End-to-end fine-tuning on SmolLM2-135M on the CPU: seconds per step at the 2-bit preset's
settings, and whether the discrete re-assignment step (e2e_reassign_every) helps.

    python bench/finetune_cpu.py --what speed [--steps 10]
    python bench/finetune_cpu.py --what reassign [--steps 20 --every 5 --windows 8 --eval-windows 2]

The student is a one-shot 2-bit quantization (preset(2); `--cheap` uses 10 k-means iterations and
no refinement, and 16 calibration windows, to save time: step time does not depend on the codes).
It is saved under --work and reused. One JSON record per run is appended to
bench/results/finetune_cpu.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def student(work: Path, cheap: bool):
    from vptq.config import preset
    from vptq.io import load_quantized
    from vptq.pipeline import compress

    out = work / ("smol2-cheap" if cheap else "smol2")
    if not out.is_dir():
        # the fine-tuned preset's block quantization, its fine-tuning left out (not a one-shot job's
        # config: that is vptq.config.resolve's, with ONESHOT_DEFAULTS); the steps below fine-tune it
        cfg = preset(2).with_(e2e_steps=0)
        if cheap:
            cfg = cfg.with_(kmeans_iters=10, refine_iters=0)
        t0 = time.perf_counter()
        compress("smollm2", cfg, out, calib=DATA / "valid.txt", nsamples=16 if cheap else 64, seqlen=512)
        print(f"quantized in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    return load_quantized(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", choices=["speed", "reassign"], required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--cheap", action="store_true")
    ap.add_argument("--work", default="/tmp/vptq-ft-bench")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    from vptq.config import preset
    from vptq.evaluate import calibration_windows, perplexity, tokenize_text
    from vptq.finetune import finetune_model
    from vptq.source import load_model, load_tokenizer, resolve

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    src = resolve("smollm2")
    tok = load_tokenizer(src)
    teacher, _ = load_model(src)
    base = student(work, a.cheap)
    cfg = preset(2)
    calib = calibration_windows(tokenize_text(tok, (DATA / "valid.txt").read_text()), a.windows, 512, cfg.seed)
    rec = {"what": a.what, "steps": a.steps, "windows": a.windows, "seqlen": 512, "cheap_student": a.cheap,
           "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=REPO).stdout.strip(),
           "loadavg_start": os.getloadavg()[0]}
    if a.what == "speed":
        s = copy.deepcopy(base)
        times = []
        r = finetune_model(s, teacher, calib, cfg.with_(e2e_steps=a.steps), torch.device("cpu"),
                           progress=lambda d, t, info: (times.append(time.perf_counter()), print(d, t, info, flush=True)))
        steps_s = [b - c for b, c in zip(times[1:], times[:-1], strict=False)]
        rec |= {"seconds_total": r["seconds"], "seconds_per_step": r["seconds_per_step"],
                "seconds_per_step_median": sorted(steps_s)[len(steps_s) // 2] if steps_s else None,
                "setup_seconds": round(r["seconds"] - r["seconds_per_step"] * a.steps, 1),
                "kl_before": r["kl_before"], "kl_after": r["kl_after"]}
        rec["extrapolated_200_steps_min"] = round((rec["setup_seconds"] + 200 * r["seconds_per_step"]) / 60, 1)
    else:
        test = tokenize_text(tok, (DATA / "test.txt").read_text())

        def ppl(m):
            return round(perplexity(m, test, a.eval_windows, 2048).perplexity, 3)

        rec["ppl_oneshot"] = ppl(base)
        for k in (0, a.every):
            s = copy.deepcopy(base)
            t0 = time.perf_counter()
            r = finetune_model(s, teacher, calib, cfg.with_(e2e_steps=a.steps, e2e_reassign_every=k),
                               torch.device("cpu"), progress=lambda d, t, info, k=k: print(k, d, t, info, flush=True))
            rec[f"every{k}"] = {"kl_before": r["kl_before"], "kl_after": r["kl_after"], "ppl": ppl(s),
                                "seconds": round(time.perf_counter() - t0, 1), "reassign": r.get("reassign")}
            print(json.dumps(rec[f"every{k}"]), flush=True)
    rec["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(rec), flush=True)
    with open(REPO / "bench" / "results" / "finetune_cpu.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
