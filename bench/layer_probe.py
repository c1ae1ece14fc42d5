"""One linear of a real model under several VPTQ layouts, everything else in floating point: the layer's proxy
loss and the model's perplexity on validation text (the selection part of wikitext-2 valid by default), so a
layer that breaks a whole run (Qwen2.5-0.5B's block-3 down_proj at 2 bits: bench/RESULTS.md) can be studied in
minutes instead of an hour-long run. Also prints its Hessian diagonal's concentration (the largest H[j,j] over
the median), the statistic vptq.config's outlier rule reads.

  python bench/layer_probe.py MODEL --layer 3.mlp.down_proj --bits 2 \
      --variant base: --variant out1:outlier_percent=1 [--windows 2] [--json OUT]

A variant is NAME:FIELD=VALUE[,FIELD=VALUE] over the preset's config as a one-shot job resolves it
(vptq.config.resolve: e2e_steps=0, its one-shot defaults); `fp` is the float model. Calibration: --nsamples
windows of --seqlen tokens from the calibration part of valid (seed 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import field_overrides  # noqa: E402

from vptq.config import LayerLayout  # noqa: E402
from vptq.config import resolve as job_config  # noqa: E402
from vptq.evaluate import calibration_windows, perplexity, tokenize_text  # noqa: E402
from vptq.hessian import HessianAccumulator  # noqa: E402
from vptq.quantizer import dequantize, quantize_linear  # noqa: E402
from vptq.rescue import top_channel_share  # noqa: E402
from vptq.source import load_model, resolve  # noqa: E402
from vptq.splits import split_valid  # noqa: E402

VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


class _Enough(Exception):
    """Raised from the hook once the layer's input is seen: nothing after it needs to run."""


def layer_hessian(model, lin, windows: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(lin.in_features)

    def hook(_mod, args):
        acc.add(args[0])
        raise _Enough

    handle = lin.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for w in windows:
                try:
                    model(w[None])
                except _Enough:
                    pass
    finally:
        handle.remove()
    return acc.value()


def diag_stats(model, windows: torch.Tensor) -> list[dict]:
    """max/median of H[j,j] (the mean of x_j^2 over the calibration tokens) for every linear in the blocks."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(_mod, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for w in windows:
                model(w[None])
    finally:
        for h in handles:
            h.remove()
    return [dict(layer=n, max_over_median=float(d.max() / d.median().clamp_min(1e-30))) for n, d in sums.items()]


def variant(spec: str, bits: int):
    name, _, kv = spec.partition(":")
    cfg = job_config(bits, {"e2e_steps": 0}, hessians="original")[0]  # as a one-shot job resolves it
    over = field_overrides(cfg, kv)
    return name, (cfg.with_(**over) if over else cfg), over


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--layer", required=True, help="BLOCK.PATH, e.g. 3.mlp.down_proj")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2, help="validation windows of 2048 tokens")
    ap.add_argument("--json", default="")
    ap.add_argument("--diag-stats", action="store_true",
                    help="only print max/median H[j,j] of every linear in the blocks (--nsamples windows)")
    args = ap.parse_args()
    torch.manual_seed(0)
    block, _, path = args.layer.partition(".")
    model, tok = load_model(resolve(args.model))
    calib_text, select_text = split_valid(VALID.read_text(encoding="utf-8"))
    windows = calibration_windows(tokenize_text(tok, calib_text), args.nsamples, args.seqlen, seed=0)
    if args.diag_stats:
        rows = diag_stats(model, windows)
        for r in rows:
            print(f"{r['layer']}: {r['max_over_median']:.3g}")
        if args.json:
            Path(args.json).write_text(json.dumps(dict(command=" ".join(sys.argv), model=args.model,
                                                       nsamples=args.nsamples, rows=rows), indent=1) + "\n")
        return
    lin = model.get_submodule(f"model.layers.{block}.{path}")
    t0 = time.perf_counter()
    h = layer_hessian(model, lin, windows)
    diag = torch.diag(h)
    conc = float(diag.max() / diag.median().clamp_min(1e-30))
    top = torch.topk(diag, 8).indices.tolist()
    print(f"{args.layer} {tuple(lin.weight.shape)}: H in {time.perf_counter() - t0:.0f}s, max/median H[j,j] "
          f"{conc:.3g}, top channels {top}", flush=True)
    select_ids = tokenize_text(tok, select_text)
    w0 = lin.weight.detach().clone()
    rows = []
    for spec in args.variant or ["base:"]:
        t0 = time.perf_counter()
        if spec.split(":")[0] == "fp":
            name, over, loss, bpw = "fp", {}, 0.0, 32.0
        else:
            name, cfg, over = variant(spec, args.bits)
            q, rep = quantize_linear(w0, h, cfg, args.layer)
            with torch.no_grad():
                lin.weight.copy_(dequantize(q).to(w0.dtype))
            loss, bpw = rep.proxy_loss, rep.bpw
            # the channels the rescue would give their own codebook (vptq.rescue's rule, one place)
            cols = LayerLayout.for_shape(cfg.with_(outlier_percent=cfg.rescue_outlier_percent), *w0.shape).outlier_size
            share = top_channel_share(w0, q, h, cols)
            print(f"{spec}: top {cols} input channels (by H[j,j]) hold {share:.3f} of the diagonal error",
                  flush=True)
        ppl = perplexity(model, select_ids, args.windows, 2048).perplexity
        with torch.no_grad():
            lin.weight.copy_(w0)
        row = dict(variant=name, overrides=over, bpw=bpw, proxy_loss=loss, select_ppl=ppl,
                   seconds=time.perf_counter() - t0)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        rec = dict(command=" ".join(sys.argv), date=datetime.now(UTC).isoformat(timespec="seconds"),
                   model=args.model, layer=args.layer, bits=args.bits, shape=list(lin.weight.shape),
                   hessian_max_over_median=conc, top_channels=top, nsamples=args.nsamples, seqlen=args.seqlen,
                   windows=args.windows, text="wikitext-2 valid, selection part (vptq/splits.py)", rows=rows)
        Path(args.json).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
