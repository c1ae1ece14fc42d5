"""Quality benchmark on the baselines.md protocol: FP, RTN, our GPTQ and VPTQ at 2/3/4 bits,
both Hessian modes, and the 2-bit ablation (each VPTQ part off in turn).

    python bench/quality.py                      # every run, on the CPU (hours on 2 cores)
    python bench/quality.py --device cuda --only vptq2,vptq2-no-norm
    python bench/quality.py --report             # results JSONL -> bench/RESULTS.md + docs/quality.png
    python bench/quality.py --model PATH.gguf --tag qwen2.5-0.5b --results bench/results/real_models.jsonl \
        --only fp,rtn4,gptq3,preset2-oneshot --plan   # another model (bench/real_models.sh drives this)

Each finished run is appended to bench/results/quality.jsonl at once (a crash loses nothing);
--report rebuilds the table from every recorded run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from vptq.config import REQUEST_FIELDS, QuantConfig, calib_windows, preset  # noqa: E402
from vptq.config import resolve as resolve_request  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "quality.jsonl"
# runs on the quality issue's protocol (--split --ood: calibration and selection from wikitext-2 valid's two
# parts, test and out-of-domain text reported), several seeds a run: report_selection's table
SELECTION = ROOT / "bench" / "results" / "selection.jsonl"
REAL_MODELS = ROOT / "bench" / "results" / "real_models.jsonl"  # the real-model table's records
SHARED = ROOT.parent / "shared" / "data" / "wikitext-2"
OOD = sorted((ROOT / "bench" / "data" / "ood").glob("*.txt"))  # docs/ood-corpora.md
# the selection parts of the calibration mix's code and technical-prose domains (docs/calibration-mix.md),
# scored beside valid's selection part by every --split run; MIX = the mix's calibration file (--mix)
SELECT_DOMAINS = sorted((ROOT / "bench" / "data" / "select").glob("*.txt"))
MIX = ROOT / "vptq" / "data" / "calib-mix.txt"

# The presets as they were when the runs below up to the "second generation" were recorded
# (first generation: per-channel norm, sequential Hessians, 200 end-to-end steps at lr 1e-4,
# 64 calibration windows). Recorded runs name this base so they still reproduce their record
# after the presets in vptq/config.py moved on; each record also carries its full config.
_V1_FT = dict(e2e_steps=200, e2e_lr=1e-4, e2e_batch=1)
V1: dict[int, QuantConfig] = {
    2: QuantConfig(vector_len=5, num_centroids=1024, **_V1_FT),
    3: QuantConfig(vector_len=5, num_centroids=1024, num_res_centroids=32, **_V1_FT),
    4: QuantConfig(vector_len=4, num_centroids=256, num_res_centroids=256, **_V1_FT),
}
# second generation = today's presets (vptq/config.py): no norm, Hessians of the original model,
# 400 end-to-end steps, 256 calibration windows; 4 bit grows to v4-k1024 + residual k64
_V2 = dict(enable_norm=False, hessians="original", e2e_steps=400)
_PRESET = dict(_V2, rescue_loss=0.1)  # the presets' runs below
# the run that measured each current preset (the plot and the target table use these)
PRESET_RUNS = {2: "q2-orig-nonorm-s400-n256", 3: "q3-orig-nonorm-s400-n256", 4: "q4-k1024r64-orig-nonorm-s400-n256"}
# name -> (method, bits, QuantConfig overrides of the V1 base or baseline options; nsamples:
# calibration windows when not --nsamples' 64)
RUNS: dict[str, dict] = {
    "fp": dict(method="fp"),
    "rtn4": dict(method="rtn", bits=4, group=128),
    "rtn3": dict(method="rtn", bits=3, group=128),
    "rtn2": dict(method="rtn", bits=2, group=128),
    "gptq4": dict(method="gptq", bits=4, group=64),  # llm-compressor's group in baselines.md
    "gptq3": dict(method="gptq", bits=3, group=64),  # llm-compressor's group in baselines.md
    "gptq2": dict(method="gptq", bits=2, group=64),  # llm-compressor's group in baselines.md
    # the 3/4-bit rows recorded before the lr sweep ran the old presets (e2e_lr 1e-4; their
    # records carry the config); the presets now use 5e-4 = vptq3-lr5e-4 / vptq4-lr5e-4 below
    "vptq4": dict(method="vptq", bits=4),
    "vptq3": dict(method="vptq", bits=3),
    "vptq2": dict(method="vptq", bits=2),
    # today's presets (vptq/config.py) without the fine-tuning stage: what a CPU user gets in one shot,
    # with a one-shot job's default calibration (calib_windows(0) windows)
    "preset2-oneshot": dict(method="vptq", bits=2, base="current", nsamples="job", cfg=dict(e2e_steps=0)),
    "preset3-oneshot": dict(method="vptq", bits=3, base="current", nsamples="job", cfg=dict(e2e_steps=0)),
    "preset4-oneshot": dict(method="vptq", bits=4, base="current", nsamples="job", cfg=dict(e2e_steps=0)),
    # one-shot levers at 2 bits (the quality issue, part 4), each against preset2-oneshot, chosen on the
    # selection part of valid (--split): calibration tokens, closed-form refinement rounds, Hessian damping,
    # outlier columns with their own codebook (all-in bpw changes with the outliers: recorded per run)
    "os2-n256": dict(method="vptq", bits=2, base="current", nsamples=256, cfg=dict(e2e_steps=0)),
    "os2-refine4": dict(method="vptq", bits=2, base="current", nsamples="job", cfg=dict(e2e_steps=0, refine_iters=4)),
    "os2-damp0.1": dict(method="vptq", bits=2, base="current", nsamples="job", cfg=dict(e2e_steps=0, damp=0.1)),
    "os2-outliers1": dict(method="vptq", bits=2, base="current", nsamples="job",
                          cfg=dict(e2e_steps=0, outlier_percent=1.0)),
    # bits where they matter: k_proj and v_proj (6 % of a block's weights, the ones GQA shares across heads)
    # get the 3-bit preset's residual codebook (k32), the rest stays at 2 bits: ~2.24 bpw all-in
    "os2-kv3": dict(method="vptq", bits=2, base="current", nsamples="job", cfg=dict(
        e2e_steps=0, layers={"k_proj": {"num_res_centroids": 32}, "v_proj": {"num_res_centroids": 32}})),
    # and the first block whole (where the residual stream's outlier features start) at the 3-bit preset's
    # residual k32: 2.269 bpw all-in on SmolLM2 (first and last blocks would be 2.301, over the target's 2.3)
    "os2-kv3-first3": dict(method="vptq", bits=2, base="current", nsamples="job", cfg=dict(
        e2e_steps=0, layers={"k_proj": {"num_res_centroids": 32}, "v_proj": {"num_res_centroids": 32},
                             "0.*": {"num_res_centroids": 32}})),
    # bits by sensitivity (bench/layer_bisect.py on SmolLM2, 2 bits, seed 0, each layer type alone on the selection
    # text: log-perplexity cost per share of the block's weights k 2.00, v 1.65, q 1.55, up 0.92, down 0.76, gate 0.56,
    # o 0.53): more bits where a bit buys most (q, k, v at v4, 2.5 bpw; up at k2048, 2.2), fewer where it buys least
    # (o, gate at k512, 1.8); 2.218 bpw all-in on SmolLM2 against 2.173 (bench/RESULTS.md, "Bits by sensitivity")
    "os2-alloc": dict(method="vptq", bits=2, base="current", nsamples="job", cfg=dict(
        e2e_steps=0, layers={"q_proj": {"vector_len": 4}, "k_proj": {"vector_len": 4}, "v_proj": {"vector_len": 4},
                             "up_proj": {"num_centroids": 2048}, "o_proj": {"num_centroids": 512},
                             "gate_proj": {"num_centroids": 512}})),
    "vptq2-original-hessians": dict(method="vptq", bits=2, cfg=dict(hessians="original")),
    # one-shot ablation at 2 bits (no end-to-end stage, which would hide the parts' effects):
    # the full one-shot method, then each part off in turn
    "vptq2-oneshot": dict(method="vptq", bits=2, cfg=dict(e2e_steps=0)),
    "vptq3-oneshot": dict(method="vptq", bits=3, cfg=dict(e2e_steps=0)),  # with/without fine-tuning rows
    "vptq4-oneshot": dict(method="vptq", bits=4, cfg=dict(e2e_steps=0)),
    "vptq2-oneshot-no-refine": dict(method="vptq", bits=2, cfg=dict(e2e_steps=0, refine_iters=0)),
    "vptq2-oneshot-no-error-feedback": dict(method="vptq", bits=2, cfg=dict(e2e_steps=0, error_feedback=False)),
    "vptq2-oneshot-no-weighted-kmeans": dict(method="vptq", bits=2, cfg=dict(e2e_steps=0, weighted_kmeans=False)),
    "vptq2-oneshot-no-perm": dict(method="vptq", bits=2, cfg=dict(e2e_steps=0, enable_perm=False)),
    "vptq2-oneshot-no-norm": dict(method="vptq", bits=2, cfg=dict(e2e_steps=0, enable_norm=False)),
    # plain (unweighted) k-means VQ at the same bpw: no Hessian anywhere, no fine-tuning
    "kmeans-vq2": dict(method="vptq", bits=2, cfg=dict(weighted_kmeans=False, error_feedback=False,
                                                       enable_perm=False, refine_iters=0, e2e_steps=0)),
    # other 2-bit shapes at the same recipe
    "vptq2-v4k256": dict(method="vptq", bits=2, cfg=dict(vector_len=4, num_centroids=256)),
    # 3/4-bit preset sweep (issue 4 targets): stronger end-to-end stage (lr, windows per step,
    # steps) on the preset shapes, and other shapes within the bpw limits (3.3 / 4.3 all-in)
    "vptq3-lr3e-4": dict(method="vptq", bits=3, cfg=dict(e2e_lr=3e-4)),
    "vptq3-lr5e-4": dict(method="vptq", bits=3, cfg=dict(e2e_lr=5e-4)),
    "vptq3-lr1e-3": dict(method="vptq", bits=3, cfg=dict(e2e_lr=1e-3)),
    "vptq4-lr3e-4": dict(method="vptq", bits=4, cfg=dict(e2e_lr=3e-4)),
    "vptq4-lr5e-4": dict(method="vptq", bits=4, cfg=dict(e2e_lr=5e-4)),
    "vptq3-lr5e-4-b4": dict(method="vptq", bits=3, cfg=dict(e2e_lr=5e-4, e2e_batch=4)),
    "vptq3-lr1e-3-b4": dict(method="vptq", bits=3, cfg=dict(e2e_lr=1e-3, e2e_batch=4)),
    "vptq3-v6k512r512-lr5e-4-b4": dict(method="vptq", bits=3, cfg=dict(
        vector_len=6, num_centroids=512, num_res_centroids=512, e2e_lr=5e-4, e2e_batch=4)),
    "vptq3-v4k1024r4-lr5e-4-b4": dict(method="vptq", bits=3, cfg=dict(
        vector_len=4, num_centroids=1024, num_res_centroids=4, e2e_lr=5e-4, e2e_batch=4)),
    "vptq4-lr5e-4-b4": dict(method="vptq", bits=4, cfg=dict(e2e_lr=5e-4, e2e_batch=4)),
    "vptq4-lr1e-3-b4": dict(method="vptq", bits=4, cfg=dict(e2e_lr=1e-3, e2e_batch=4)),
    "vptq4-v4k1024r64-lr5e-4-b4": dict(method="vptq", bits=4, cfg=dict(
        vector_len=4, num_centroids=1024, num_res_centroids=64, e2e_lr=5e-4, e2e_batch=4)),
    # block-wise fine-tuning (each block's output against the original's) before the end-to-end stage
    "vptq3-bw50-lr5e-4-b4": dict(method="vptq", bits=3, cfg=dict(finetune_steps=50, e2e_lr=5e-4, e2e_batch=4)),
    "vptq4-bw50-lr5e-4-b4": dict(method="vptq", bits=4, cfg=dict(finetune_steps=50, e2e_lr=5e-4, e2e_batch=4)),
    # second-generation sweep (GPU, 2026-11-25 11:15-11:49 UTC): Hessians of the original model,
    # 400 end-to-end steps, 64 or 256 calibration windows, with and without the norm
    "q4-orig-s400": dict(method="vptq", bits=4, cfg=dict(hessians="original", e2e_steps=400, e2e_lr=5e-4)),
    "q4-orig-s400-n256": dict(method="vptq", bits=4, nsamples=256,
                              cfg=dict(hessians="original", e2e_steps=400, e2e_lr=5e-4)),
    "q3-orig-s400-n256": dict(method="vptq", bits=3, nsamples=256,
                              cfg=dict(hessians="original", e2e_steps=400, e2e_lr=5e-4)),
    "q4-orig-nonorm-s400-n256": dict(method="vptq", bits=4, nsamples=256, cfg=dict(_V2, e2e_lr=5e-4)),
    # the current presets (PRESET_RUNS; equal to preset(bits) with 256 windows, checked in main)
    # the presets; rescue_loss=0.1 since 2026-12-06 (vptq/rescue.py). No SmolLM2 layer comes near it (2-bit
    # one-shot: max proxy loss 0.060, bench/results/smollm2_preset2_oneshot_layer_losses_20261206.json), so the
    # SmolLM2 records made before it stand for these runs; records of other models carry their config
    "q2-orig-nonorm-s400-n256": dict(method="vptq", bits=2, nsamples=256, cfg=dict(_PRESET)),
    "q3-orig-nonorm-s400-n256": dict(method="vptq", bits=3, nsamples=256, cfg=dict(_PRESET, e2e_lr=5e-4)),
    "q4-k1024r64-orig-nonorm-s400-n256": dict(method="vptq", bits=4, nsamples=256, cfg=dict(
        _PRESET, e2e_lr=5e-4, num_centroids=1024, num_res_centroids=64)),
}


def field_overrides(cfg: QuantConfig, kv: str) -> dict:
    """FIELD=VALUE[,FIELD=VALUE] as {field: value}, each value typed like cfg's field (the exploration runs'
    syntax: --custom here, --variant in bench/layer_probe.py)."""
    over = {}
    for item in filter(None, kv.split(",")):
        k, v = item.split("=")
        cur = getattr(cfg, k)
        over[k] = (v.lower() in ("1", "true")) if isinstance(cur, bool) else type(cur)(v)
    return over


def run_config(spec: dict, seed: int = 0) -> QuantConfig:
    if spec.get("base") == "current":  # what a job of these bits and overrides runs (vptq.config.resolve)
        over = dict(spec.get("cfg", {}))
        own = {k: over.pop(k) for k in REQUEST_FIELDS if k in over} | ({"seed": seed} if seed else {})
        return resolve_request(spec["bits"], over, **own)[0]
    return V1[spec["bits"]].with_(**spec.get("cfg", {}), **({"seed": seed} if seed else {}))


def check_preset_runs() -> None:
    """The runs that stand for the presets must still be the presets (config and windows)."""
    for bits, name in PRESET_RUNS.items():
        spec = RUNS[name]
        if run_config(spec) != preset(bits) or spec.get("nsamples", 64) != calib_windows(preset(bits).e2e_steps):
            sys.exit(f"{name} no longer matches preset({bits}) in vptq/config.py: update PRESET_RUNS")


def versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (+{torch.get_num_threads()} CPU threads)"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def peak_host_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(name: str, spec: dict, args) -> dict:
    from vptq.baselines import gptq_linear, rtn_linear
    from vptq.driver import vptq_linear
    from vptq.pipeline import compress, evaluate_texts
    from vptq.source import load_model, resolve

    method = spec["method"]
    cfg = run_config(spec, args.seed) if method != "fp" else None
    nsamples = spec.get("nsamples", args.nsamples)
    if nsamples == "job":
        nsamples = calib_windows(cfg.e2e_steps)
    t0 = time.perf_counter()
    calib_text = ("calibration mix (docs/calibration-mix.md)" if args.mix else
                  "wikitext-2 valid, calibration part (vptq/splits.py)" if args.split else args.calib)
    rec = {"name": name, "model": args.tag, "seed": args.seed, "calib_text": calib_text, "source": args.model,
           "method": method, "bits": spec.get("bits"), "device": args.device,
           "machine": machine(args.device), "date": datetime.now(UTC).isoformat(timespec="seconds"),
           **versions(), "nsamples": nsamples, "seqlen": args.seqlen}
    if args.plan and method == "vptq":  # vptq plan's prediction, made before the run, recorded beside it
        from vptq.plan import plan
        p = plan(args.model, cfg, nsamples, args.seqlen, args.device, calib=args.calib)
        rec["plan"] = {k: p[k] for k in ("bpw", "bits_per_param", "peak_host_bytes", "peak_device_bytes",
                                         "seconds_total", "notes")}
        t0 = time.perf_counter()
    if method == "fp":
        model, tok = load_model(resolve(args.model))
        rec.update(bpw=32.0, quant_seconds=0.0)
    else:
        if method != "vptq":  # scalar baselines: one-shot, as llm-compressor's GPTQ in baselines.md
            cfg = cfg.with_(e2e_steps=0)
        fn = {"vptq": vptq_linear, "rtn": lambda: rtn_linear(spec["bits"], spec["group"]),
              "gptq": lambda: gptq_linear(spec["bits"], spec["group"])}[method]
        fn = fn if method == "vptq" else fn()
        def progress(done, total, msg, t0=t0):  # milestones on stderr (a killed run shows how far it got)
            if "done" in msg or (msg.startswith("fine-tune") and (done % 50 == 0 or done == total)):
                print(f"{name}: {time.perf_counter() - t0:.0f}s {msg}", file=sys.stderr, flush=True)

        out = Path(args.save) / f"{args.tag}-{name}" if args.save and method == "vptq" else None
        res, model, tok = compress(args.model, cfg, out, args.calib, nsamples, args.seqlen, args.device,
                                   overwrite=True, progress=progress, quantize_fn=fn)
        rec.update(bpw=res.report.bpw, quant_seconds=res.report.seconds, config=cfg.to_dict(),
                   mean_proxy_loss=sum(r.proxy_loss for r in res.report.layers) / len(res.report.layers),
                   warnings=len(res.report.warnings), warning_notes=res.report.warnings,  # which layers, and why
                   group=spec.get("group"), e2e=res.report.e2e,
                   bits_per_param=res.report.bits_per_param, float_params=res.report.float_params)
    rec["quant_peak_host_bytes"] = peak_host_bytes()  # load + calibration + quantization (before the eval)
    # test text, then the selection part of valid (no calibration window came from it) and the out-of-domain
    # reporting columns (docs/ood-corpora.md: never calibration, never selection), each 10 x 2048
    ood = OOD if args.ood else []
    domains = SELECT_DOMAINS if args.split else []
    texts = [args.test, *([args.select] if args.split else []), *domains, *ood]
    ppl, *rest = evaluate_texts(args.model, texts, 10, 2048, args.device, model=model, tokenizer=tok)
    if args.split:
        rec["select_perplexity"] = rest.pop(0).perplexity
        rec["select_domains"] = {f.stem: rest.pop(0).perplexity for f in domains}
    if ood:
        rec["ood_perplexity"] = {f.stem: r.perplexity for f, r in zip(ood, rest, strict=True)}
    rec.update(perplexity=ppl.perplexity, windows=ppl.windows, eval_seqlen=ppl.seqlen,
               total_seconds=time.perf_counter() - t0, peak_host_bytes=peak_host_bytes())
    return rec


def refresh_table(marker: str, table: str, doc: Path = ROOT / "bench" / "RESULTS.md") -> None:
    """The table between doc's `<!-- MARKER:begin/end -->` comments (the prose stays by hand)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = doc.read_text() if doc.exists() else ""
    if begin in text:
        head, rest = text.split(begin, 1)
        doc.write_text(head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1])
    print(table)


def report(results: Path) -> None:
    """Rebuild bench/results/quality_table.md and docs/quality.png from the JSONL."""
    recs: dict[str, dict] = {}
    for line in results.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[r["name"]] = r  # the latest run of a name wins
    rows = ["| run | method | bits | bpw all-in | quantize s (of which fine-tune) | machine | date | wikitext-2 ppl |",
            "|---|---|---|---|---|---|---|---|"]
    for name in [*RUNS, *(n for n in recs if n not in RUNS)]:
        r = recs.get(name)
        if r:
            e2e = (r.get("e2e") or {}).get("seconds")
            rows.append(f"| {name} | {r['method']} | {r.get('bits') or '-'} | {r['bpw']:.3f} | "
                        f"{r['quant_seconds']:.0f}{f' (fine-tune {e2e:.0f})' if e2e else ''} | "
                        f"{r['machine']} | {r['date'][:10]} | {r['perplexity']:.2f} |")
        else:
            rows.append(f"| {name} | not run | | | | | | |")
    table = "\n".join(rows)
    (ROOT / "bench" / "results" / "quality_table.md").write_text(table + "\n")
    refresh_table("quality-table", table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, marker in (("rtn", "s"), ("gptq", "^"), ("vptq", "o")):
        pts = sorted((r["bpw"], r["perplexity"]) for n, r in recs.items()
                     if r["method"] == method and (method != "vptq" or n in PRESET_RUNS.values()))
        if pts:
            ax.plot(*zip(*pts, strict=False), marker=marker, label=f"{method} (ours)")
    if "fp" in recs:
        ax.axhline(recs["fp"]["perplexity"], color="gray", ls="--", label="FP")
    ax.axhline(34.2, color="red", ls=":", label="GPTQ 3-bit, llm-compressor (34.2)")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight, all-in")
    ax.set_ylabel("wikitext-2 test perplexity")
    ax.set_title("SmolLM2-135M: perplexity vs bits (baselines.md protocol)")
    ax.legend()
    ax.grid(alpha=0.3)
    (ROOT / "docs").mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "quality.png", dpi=120)


def report_selection(results: Path) -> None:
    """Seeds -> mean [min, max] of the selection (valid) and test perplexities and of each out-of-domain
    corpus' ratio to FP's, per run, into bench/RESULTS.md; an OOD target (the quality issue: no worse than
    GPTQ 3-bit's ratio) counts as met only if the worst seed meets it."""
    runs: dict[str, dict[int, dict]] = {}
    for line in results.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            runs.setdefault(r["name"], {})[r.get("seed", 0)] = r  # the latest record of a (run, seed) wins
    unmeasured = [run for run in PRESET_RUNS.values() if not any("select_perplexity" in r for r in runs.get(run, {}).values())]
    if unmeasured:  # a preset is reported only from the selection protocol (valid's two parts), never test alone
        sys.exit(f"{results}: no selection-protocol record (--split) of preset run(s) {unmeasured}: run them with "
                 "--split before reporting them as the presets")
    fp = next(iter(runs.get("fp", {}).values()), None)
    corpora = sorted({c for seeds in runs.values() for r in seeds.values() for c in r.get("ood_perplexity", {})})
    domains = sorted({d for seeds in runs.values() for r in seeds.values() for d in r.get("select_domains", {})})

    def span(xs: list[float]) -> str:
        return f"{sum(xs) / len(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]" if len(xs) > 1 else f"{xs[0]:.2f}"

    def ood_ratios(r: dict) -> dict[str, float]:  # empty for a run scored without --ood
        ood = r.get("ood_perplexity") or {}
        return {c: ood[c] / fp["ood_perplexity"][c] for c in corpora if c in ood} if fp else {}

    def summary(name: str) -> tuple[list[dict], list[dict[str, float]], str]:
        """(the run's records, their OOD ratios, its selection | test | ratio cells)."""
        rs = list(runs[name].values())
        ratios = [ood_ratios(r) for r in rs]
        cells = [span([x[c] for x in ratios]) if all(c in x for x in ratios) else "-" for c in corpora]
        return rs, ratios, (f"{span([r['select_perplexity'] for r in rs])} | {span([r['perplexity'] for r in rs])} | "
                            + " | ".join(cells))

    def domain_cells(rs: list[dict]) -> str:  # the mix's other domains' selection parts (seeds that scored them)
        out = []
        for d in domains:
            xs = [r["select_domains"][d] for r in rs if d in r.get("select_domains", {})]
            out.append(f"{span(xs)} ({len(xs)})" if xs else "-")
        return "".join(f" | {c}" for c in out)

    def gptq3_of(name: str) -> list[dict[str, float]]:  # the reference with the same calibration (the rule)
        return [ood_ratios(r) for r in runs.get("gptq3+mix" if name.endswith("+mix") else "gptq3", {}).values()]

    rows = ["| run | bits | bpw all-in | seeds | selection ppl (valid) | test ppl | "
            + " | ".join(f"{c}: ratio to FP" for c in corpora) + " | OOD <= GPTQ 3-bit, same calibration (worst seed) | device"
            + "".join(f" | selection ppl, {d} (seeds)" for d in domains) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(corpora) + "---|---|" + "---|" * len(domains)]
    order = ["fp", "gptq3", *PRESET_RUNS.values()]
    for name in sorted(runs, key=lambda n: (order.index(n) if n in order else len(order), n)):
        rs, ratios, cells = summary(name)
        target = "-"
        gptq3 = gptq3_of(name)
        if gptq3 and name not in ("fp", "gptq3", "gptq3+mix") and all(len(x) == len(corpora) for x in ratios):
            target = "yes" if all(x[c] <= g[c] for x in ratios for g in gptq3 for c in corpora) else "no"
        rows.append(f"| {name} | {rs[0].get('bits') or '-'} | {rs[0]['bpw']:.3f} | {','.join(map(str, sorted(runs[name])))} "
                    f"| {cells} | {target} | {rs[0]['machine'].split(' (')[0]}{domain_cells(rs)} |")
    refresh_table("selection", "\n".join(rows))
    # README's quality table: the presets (and what they are compared with), from the same records
    labels = {"fp": "FP (GGUF dequantized)", "gptq3": "GPTQ 3-bit, group 64 (ours, one-shot)",
              "preset2-oneshot": "2-bit preset, one-shot (no fine-tuning: the CPU path)",
              **{run: f"{bits}-bit preset (fine-tuned)" for bits, run in PRESET_RUNS.items()},
              # what a job gets without --calib: the calibration mix (docs/calibration-mix.md)
              "gptq3+mix": "GPTQ 3-bit, calibrated on the default mix",
              **{f"{run}+mix": f"{bits}-bit preset (fine-tuned), calibrated on the default mix"
                 for bits, run in PRESET_RUNS.items()}}
    short = ["| model | bpw all-in | seeds | selection ppl (valid) | test ppl | "
             + " | ".join(f"{c} (x FP)" for c in corpora) + " |", "|---|---|---|---|---|" + "---|" * len(corpora)]
    for name in [n for n in labels if n in runs]:
        rs, _, cells = summary(name)
        if name == "fp":  # its ratios are 1: its own perplexities instead
            cells = cells.rsplit(" | ", len(corpora))[0] + "".join(
                f" | {rs[0]['ood_perplexity'][c]:.2f} (ppl)" for c in corpora)
        short.append(f"| {labels[name]} | {rs[0]['bpw']:.3f} | {len(rs)} | {cells} |")
    refresh_table("quality", "\n".join(short), ROOT / "README.md")


def report_models(results: Path) -> None:
    """The real-model table (one row per model and run, the latest record wins) into bench/RESULTS.md."""
    recs: dict[tuple[str, str], dict] = {}
    for line in results.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[(r["model"], r["name"])] = r
    gib = 1 << 30
    rows = ["| model | run | bpw all-in | bits/param (whole model) | quantize s | peak host GiB | "
            "plan: s / GiB | wikitext-2 test ppl | date | machine |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, name), r in sorted(recs.items(), key=lambda kv: (kv[0][0], list(RUNS).index(kv[0][1])
                                                                    if kv[0][1] in RUNS else 999)):
        pl = r.get("plan")
        plan_cell = f"{pl['seconds_total']:.0f} / {pl['peak_host_bytes'] / gib:.1f}" if pl else "-"
        bpp = r.get("bits_per_param")
        rows.append(f"| {model} | {name} | {r['bpw']:.3f} | {f'{bpp:.3f}' if bpp else '-'} | "
                    f"{r['quant_seconds']:.0f} | {r.get('quant_peak_host_bytes', r['peak_host_bytes']) / gib:.1f} | "
                    f"{plan_cell} | {r['perplexity']:.2f} | {r['date'][:10]} | {r['machine']} |")
    if results.resolve() == REAL_MODELS.resolve():
        refresh_table("real-models", "\n".join(rows))
    else:  # an exploration's own file: its table is printed, RESULTS.md's stays the real models'
        print("\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2", help="model source (default: the baselines.md SmolLM2)")
    ap.add_argument("--tag", default="smollm2-135m", help="the model's name in the records")
    ap.add_argument("--plan", action="store_true", help="record vptq plan's prediction beside each VPTQ run")
    ap.add_argument("--seed", type=int, default=0, help="the calibration sample's and k-means' seed")
    ap.add_argument("--split", action="store_true",
                    help="calibrate on valid's calibration part and record the selection part's perplexity "
                         "(vptq/splits.py; the quality issue's selection protocol)")
    ap.add_argument("--ood", action="store_true", help="also score the out-of-domain corpora (docs/ood-corpora.md)")
    ap.add_argument("--save", default="", help="keep each VPTQ run's quantized folder under DIR/TAG-RUN")
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    ap.add_argument("--skip-done", action="store_true", help="skip runs already in the JSONL")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib", default=str(SHARED / "valid.txt"))
    ap.add_argument("--test", default=str(SHARED / "test.txt"))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--custom", action="append", default=[],
                    help="extra VPTQ run NAME:BITS:field=value,field=value (exploration)")
    ap.add_argument("--mix", action="store_true",
                    help="calibrate on the calibration mix (docs/calibration-mix.md; implies --split for the "
                         "selection parts); the records' names get a +mix suffix")
    args = ap.parse_args()
    check_preset_runs()
    args.split = args.split or args.mix
    if args.split:  # the two parts of valid as files, for the commands' text arguments
        import tempfile

        from vptq.splits import write_parts

        args.calib, args.select = map(str, write_parts(args.calib, tempfile.mkdtemp(prefix="vptq-split-")))
        if args.mix:  # the mix holds valid's calibration part and the other domains' calibration parts
            args.calib = str(MIX)
    results = Path(args.results)
    if args.report:
        report_for(results)
        return
    for c in args.custom:
        name, bits, kv = (c.split(":", 2) + [""])[:3]
        over = field_overrides(preset(int(bits)), kv)
        RUNS[name] = dict(method="vptq", bits=int(bits), cfg=over, base="current")
    names = [n for n in args.only.split(",") if n] or [n for n in RUNS if ":" not in n]
    names += [c.split(":")[0] for c in args.custom if c.split(":")[0] not in names]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        sys.exit(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    done = set()
    if args.skip_done and results.exists():
        recs = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
        done = {r["name"] for r in recs if r.get("model", "smollm2-135m") == args.tag
                and r.get("seed", 0) == args.seed and ("select_perplexity" in r) == args.split}
    results.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name + ("+mix" if args.mix else "") in done:
            continue
        print(f"{name}: running", file=sys.stderr, flush=True)
        rec = run_one(name, RUNS[name], args)
        if args.mix:
            rec["name"] = name + "+mix"
        with results.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{name}: bpw {rec['bpw']:.3f} ppl {rec['perplexity']:.2f} quant {rec['quant_seconds']:.0f}s",
              flush=True)
    report_for(results)


def report_for(results: Path) -> None:
    """The table a results file feeds: quality.jsonl, selection.jsonl, real_models.jsonl; any other file's
    rows are printed as the real-model table is, and no document changes."""
    {RESULTS: report, SELECTION: report_selection}.get(results.resolve(), report_models)(results)


if __name__ == "__main__":
    main()
