"""The Hessian modes on a model's first blocks: blocks 0..N-1 quantized one-shot with each --modes value of
QuantConfig.hessians (the rest of the model left FP), scored on wikitext-2 valid's selection part. A CPU-sized
look at where the modes differ when the whole model is too slow to quantize three times (Qwen2.5-0.5B's 4-bit
one-shot collapse sits in blocks 2-3: bench/RESULTS.md, "What breaks the 4-bit preset one-shot").

    python bench/prefix_modes.py MODEL --bits 4 --seed 1 --blocks 4 --out runs/prefix.json \
        [--modes original,sequential,true-sequential] [--windows 2]

Calibration: --nsamples windows of --seqlen tokens from valid's calibration part, drawn with --seed as
bench/quality.py --split does; every mode quantizes a fresh copy of the model from the same windows. The
record (--out, JSON) keeps the command, the config and one row per mode (resumable: a mode already there is
skipped).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import field_overrides, machine, versions  # noqa: E402

from vptq.config import resolve as job_config  # noqa: E402
from vptq.evaluate import calibration_windows, perplexity, tokenize_text  # noqa: E402
from vptq.sequential import quantize_model  # noqa: E402
from vptq.source import load_model, resolve  # noqa: E402
from vptq.splits import split_valid  # noqa: E402

VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", type=int, required=True, help="quantize blocks 0..N-1")
    ap.add_argument("--modes", default="original,sequential,true-sequential")
    ap.add_argument("--set", default="", help="FIELD=VALUE[,FIELD=VALUE] over the preset's one-shot config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2, help="selection windows of 2048 tokens")
    args = ap.parse_args()
    base = job_config(args.bits, {"e2e_steps": 0})[0]  # as a one-shot job resolves it
    base = base.with_(**field_overrides(base, args.set), **({"seed": args.seed} if args.seed else {}))
    model, tok = load_model(resolve(args.model))
    model.eval()
    calib_text, select_text = split_valid(VALID.read_text(encoding="utf-8"))
    windows = calibration_windows(tokenize_text(tok, calib_text), args.nsamples, args.seqlen, base.seed)
    ids = tokenize_text(tok, select_text)
    out = Path(args.out)
    rec = json.loads(out.read_text()) if out.exists() else dict(rows=[])
    rec.setdefault("commands", []).append(" ".join(sys.argv))
    rec.update(model=args.model, bits=args.bits, seed=args.seed, blocks=args.blocks, nsamples=args.nsamples,
               seqlen=args.seqlen, windows=args.windows, text="wikitext-2 valid, selection part (vptq/splits.py)",
               machine=machine("cpu"), **versions())
    rows = {r["mode"]: r for r in rec["rows"]}
    if "fp" not in rows:
        rows["fp"] = dict(mode="fp", select_ppl=perplexity(model, ids, args.windows, 2048).perplexity)
    for mode in args.modes.split(","):
        if mode in rows:
            continue
        cfg = base.with_(hessians=mode)
        q = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = quantize_model(q, windows, cfg, blocks=args.blocks,
                                progress=lambda i, n, what, mode=mode: print(f"{mode}: {what} {i}/{n}", flush=True))
        secs = time.perf_counter() - t0
        ppl = perplexity(q, ids, args.windows, 2048).perplexity
        losses = {r.name: r.proxy_loss for r in report.layers}
        rows[mode] = dict(mode=mode, select_ppl=ppl, quant_seconds=secs, config=cfg.to_dict(), proxy_losses=losses,
                          date=datetime.now(UTC).isoformat(timespec="seconds"))
        print(json.dumps({k: v for k, v in rows[mode].items() if k not in ("config", "proxy_losses")}), flush=True)
        rec["rows"] = list(rows.values())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rec, indent=1) + "\n")
    rec["rows"] = list(rows.values())
    out.write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
