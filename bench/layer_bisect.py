"""Which layers hold a one-shot run's perplexity: every target linear of a model quantized once, exactly as a
one-shot run with hessians="original" quantizes it (each layer from the FP model's Hessian, so layers are
independent of one another), then the selection perplexity with chosen *subsets* of them swapped in.

    python bench/layer_bisect.py MODEL --bits 4 --seed 1 --out runs/bisect-q4s1 [--set FIELD=V,...]
        [--group attn=*.self_attn.* --group mlp=*.mlp.* ...] [--blocks] [--windows 2] [--gptq-group 64]

--gptq-group G quantizes every layer with GPTQ at --bits and groups of G instead, on the same Hessians, so a VPTQ
record and a GPTQ one compare layer by layer (their proxy losses) and as a whole.

Step 1 (resumable: the dequantized weights and proxy losses land in --out as they are made) quantizes every
layer; step 2 scores FP, all layers, every --group (fnmatch globs over `BLOCK.PATH`, e.g. `3.mlp.down_proj`),
and with --blocks each block alone. --requantize LAYER --under GLOB quantizes LAYER again from the Hessian of its
inputs with the --under layers quantized (what hessians="sequential" would see) and scores the --under layers
with LAYER's first and its second quantization. Calibration: --nsamples windows of --seqlen tokens from wikitext-2 valid's
calibration part, drawn with --seed as bench/quality.py --split does (vptq.pipeline.compress); perplexity on
valid's selection part (--windows x 2048 tokens). The JSON record (--out/bisect.json) keeps every row.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import field_overrides  # noqa: E402

from vptq.baselines import gptq_linear  # noqa: E402
from vptq.config import resolve as job_config  # noqa: E402
from vptq.driver import original_hessians  # noqa: E402
from vptq.evaluate import calibration_windows, perplexity, tokenize_text  # noqa: E402
from vptq.quantizer import dequantize  # noqa: E402
from vptq.rescue import quantize_with_rescue  # noqa: E402
from vptq.source import load_model, resolve  # noqa: E402
from vptq.splits import split_valid  # noqa: E402
from vptq.targets import decoder_layers, target_linears  # noqa: E402

VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def quantize_all(model, windows, cfg, out: Path, gptq: tuple[int, int] | None = None) -> dict[str, dict]:
    """Every target linear's dequantized weight (out/BLOCK.safetensors) and report (out/losses.json); with
    gptq = (bits, group) the layers are GPTQ's instead of VPTQ's, on the same Hessians,
    so their proxy losses compare layer by layer."""
    losses_file = out / "losses.json"
    losses = json.loads(losses_file.read_text()) if losses_file.exists() else {}
    done_blocks = {int(p.stem) for p in out.glob("*.safetensors")}
    layers = decoder_layers(model)
    n_blocks = len(layers)
    if done_blocks >= set(range(n_blocks)):
        return losses
    t0 = time.perf_counter()
    for i, hs in original_hessians(model, windows):
        if i in done_blocks:
            continue
        weights = {}
        for name, lin in target_linears(layers[i], cfg).items():
            if gptq:
                new, rep = gptq_linear(*gptq)(f"{i}.{name}", lin, hs[name], cfg)
                weights[name] = new.weight.detach().contiguous()
            else:
                q, rep = quantize_with_rescue(lin.weight.detach(), hs[name], cfg.for_layer(name, i), f"{i}.{name}")
                weights[name] = dequantize(q).to(lin.weight.dtype).contiguous()
            losses[f"{i}.{name}"] = dict(proxy_loss=rep.proxy_loss, bpw=rep.bpw, warnings=rep.warnings)
        save_file(weights, str(out / f"{i}.safetensors"))
        losses_file.write_text(json.dumps(losses, indent=1) + "\n")
        worst = max((k for k in losses if k.startswith(f"{i}.")), key=lambda k: losses[k]["proxy_loss"])
        print(f"block {i} quantized ({time.perf_counter() - t0:.0f}s), worst {worst} "
              f"{losses[worst]['proxy_loss']:.4f}", flush=True)
    return losses


def matching(keys: list[str], globs: str) -> list[str]:
    """The keys (BLOCK.PATH) that one of the |-separated fnmatch globs matches."""
    return [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in globs.split("|"))]


class Swapper:
    """Swaps chosen layers' quantized weights into the model and back."""

    def __init__(self, model, out: Path):
        self.layers = decoder_layers(model)
        self.model = model
        self.q = {}
        for p in sorted(out.glob("*.safetensors"), key=lambda p: int(p.stem)):
            for name, w in load_file(str(p)).items():
                self.q[f"{p.stem}.{name}"] = w
        self.fp = {k: self.lin(k).weight.detach().clone() for k in self.q}

    def lin(self, key: str):
        block, _, path = key.partition(".")
        return self.layers[int(block)].get_submodule(path)

    @contextlib.contextmanager
    def swapped(self, weights: dict[str, torch.Tensor]):
        """The model with these layers' weights in place of the FP ones, restored on the way out."""
        with torch.no_grad():
            for k, w in weights.items():
                self.lin(k).weight.copy_(w)
            try:
                yield self.model
            finally:
                for k in weights:
                    self.lin(k).weight.copy_(self.fp[k])

    def hessian(self, key: str, under: list[str], windows) -> torch.Tensor:
        """LAYER's H on the calibration windows with the `under` layers quantized."""
        from layer_probe import layer_hessian

        with self.swapped({k: self.q[k] for k in under}) as model:
            return layer_hessian(model, self.lin(key), windows)

    def score(self, weights: dict[str, torch.Tensor], ids, windows: int) -> float:
        with self.swapped(weights) as model:
            return perplexity(model, ids, windows, 2048).perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", default="", help="FIELD=VALUE[,FIELD=VALUE] over the preset's one-shot config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2, help="selection windows of 2048 tokens")
    ap.add_argument("--group", action="append", default=[], help="NAME=GLOB[|GLOB...] over BLOCK.PATH")
    ap.add_argument("--blocks", action="store_true", help="also score each block alone")
    ap.add_argument("--gptq-group", type=int, default=0,
                    help="quantize with GPTQ at --bits and this group size instead (the same Hessians)")
    ap.add_argument("--quantize-only", action="store_true")
    ap.add_argument("--requantize", default="", help="BLOCK.PATH of a layer to quantize again under --under")
    ap.add_argument("--under", default="", help="GLOB[|GLOB...]: the layers quantized when --requantize's H is taken")
    args = ap.parse_args()
    cfg = job_config(args.bits, {"e2e_steps": 0}, hessians="original")[0]  # as a one-shot job resolves it
    cfg = cfg.with_(**field_overrides(cfg, args.set), **({"seed": args.seed} if args.seed else {}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(resolve(args.model))
    model.eval()
    calib_text, select_text = split_valid(VALID.read_text(encoding="utf-8"))
    windows = calibration_windows(tokenize_text(tok, calib_text), args.nsamples, args.seqlen, cfg.seed)
    losses = quantize_all(model, windows, cfg, out, (args.bits, args.gptq_group) if args.gptq_group else None)
    if args.quantize_only:
        return
    swap = Swapper(model, out)
    ids = tokenize_text(tok, select_text)
    keys = list(swap.q)

    def quantized(ks: list[str]) -> dict[str, tuple[torch.Tensor, float]]:
        return {k: (swap.q[k], losses[k]["proxy_loss"]) for k in ks}

    # (name, {layer: (its quantized weight, its proxy loss)}, fields added to the row)
    groups = [("fp", {}, {}), ("all", quantized(keys), {})]
    for g in args.group:
        name, _, globs = g.partition("=")
        groups.append((name, quantized(matching(keys, globs)), {}))
    if args.blocks:
        groups += [(f"block{i}", quantized([k for k in keys if k.split(".")[0] == str(i)]), {})
                   for i in sorted({int(k.split(".")[0]) for k in keys})]
    if args.requantize:
        layer = args.requantize
        under = [k for k in matching(keys, args.under) if k != layer]
        h = swap.hessian(layer, under, windows)
        block, _, path = layer.partition(".")
        q, rep = quantize_with_rescue(swap.fp[layer], h, cfg.for_layer(path, int(block)), layer)
        requant = dict(layer=layer, under=under, proxy_loss=losses[layer]["proxy_loss"],
                       proxy_loss_again=rep.proxy_loss)
        print(json.dumps(requant), flush=True)
        again = dequantize(q).to(swap.fp[layer].dtype).contiguous()
        groups.append((f"{args.under}+{layer}", quantized(under + [layer]), {}))
        # the same layers with the second quantization of the layer
        groups.append((f"{args.under}+{layer}(again)", quantized(under) | {layer: (again, rep.proxy_loss)},
                       dict(requantized=requant)))
    rec_file = out / "bisect.json"
    rec = json.loads(rec_file.read_text()) if rec_file.exists() else dict(rows=[])
    seen = {r["group"] for r in rec["rows"]}
    rec.setdefault("commands", []).append(" ".join(sys.argv))
    method = f"gptq g{args.gptq_group}" if args.gptq_group else "vptq"
    rec.update(model=args.model, bits=args.bits, method=method, seed=args.seed, config=cfg.to_dict(),
               nsamples=args.nsamples, seqlen=args.seqlen, windows=args.windows,
               text="wikitext-2 valid, selection part (vptq/splits.py)", losses=losses)
    for name, group, extra in groups:
        if name in seen:
            continue
        t0 = time.perf_counter()
        ppl = swap.score({k: w for k, (w, _) in group.items()}, ids, args.windows)
        mean_loss = sum(loss for _, loss in group.values()) / len(group) if group else 0.0
        row = dict(group=name, layers=len(group), select_ppl=ppl, mean_proxy_loss=mean_loss,
                   date=datetime.now(UTC).isoformat(timespec="seconds"), seconds=time.perf_counter() - t0,
                   **extra)
        rec["rows"].append(row)
        rec_file.write_text(json.dumps(rec, indent=1) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
