"""Does one seed give the same bytes twice on this machine? SmolLM2's first N blocks at a preset one-shot (as a
job resolves it), calibrated on wikitext-2 valid's calibration part with `--seed`, in this process; prints the
sha256 of the quantized blocks' state and the mean proxy loss as one JSON line. Run it twice (e.g. in two
processes at once) and compare: a difference means the CPU path is not bit-reproducible here.

    OMP_NUM_THREADS=1 python bench/repro_probe.py --bits 2 --seed 1 --blocks 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=3)
    args = ap.parse_args()
    from vptq.config import resolve
    from vptq.evaluate import calibration_windows, tokenize_text
    from vptq.pipeline import PACKAGE_CALIB
    from vptq.sequential import quantize_model
    from vptq.source import load_model
    from vptq.source import resolve as resolve_source
    from vptq.splits import split_valid

    t0 = time.perf_counter()
    cfg, n = resolve(args.bits, {"e2e_steps": 0}, seed=args.seed)
    model, tok = load_model(resolve_source("smollm2"))
    calib, _ = split_valid(PACKAGE_CALIB.read_text(encoding="utf-8"))
    ids = calibration_windows(tokenize_text(tok, calib), n, 512, args.seed)
    rep = quantize_model(model, ids, cfg, blocks=args.blocks)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if k.startswith(tuple(f"model.layers.{i}." for i in range(args.blocks))):
            h.update(k.encode())
            h.update(v.detach().contiguous().cpu().numpy().tobytes())
    losses = [r.proxy_loss for r in rep.layers]
    print(json.dumps({"bits": args.bits, "seed": args.seed, "blocks": args.blocks, "hessians": cfg.hessians,
                      "sha256": h.hexdigest(), "mean_proxy_loss": sum(losses) / len(losses),
                      "threads": torch.get_num_threads(), "pid": os.getpid(), "machine": platform.processor(),
                      "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
