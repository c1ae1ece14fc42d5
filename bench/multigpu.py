"""One decoder block of a Llama-2-70B-shaped model at 2 bits, its linears spread over 1, 2, 4, 8 GPUs.

    python bench/multigpu.py [--gpus 1,2,4] [--windows 16] [--seqlen 2048] [--out FILE]
    python bench/multigpu.py --device cpu --gpus 1,2 --hidden 64 --intermediate 160 --heads 4 --kv-heads 2 \\
        --windows 2 --seqlen 32 --set vector_len=4 --set num_centroids=16     (a CPU smoke run)

The block (hidden 8192, intermediate 28672, 64 heads, 8 KV heads; random fp16 weights) runs once on
synthetic calibration activations (random windows) to collect the Hessians of its 7 linears, as
the pipeline's block stage does (`vptq.driver.block_hessians`). The linears are then placed as
`--runner dask|ray` places them (tasks/runner.py: one worker process per GPU, each quantizing
whole linears with `vptq.driver.vptq_linear`, the function the pipeline's quantize_linear task
calls), here with plain torch.multiprocessing because the GPU image has no Prefect or Dask:
longest-first onto the least-loaded worker. Timed: from handing out the work to the last result
(workers already started, CUDA initialised, inputs in host memory). Reported per GPU count:
seconds per block (Hessians + quantization), speed-up and efficiency against 1 GPU, peak GPU memory
per worker, peak host RSS, whether every tensor equals the 1-GPU result, and the whole model
(80 blocks) extrapolated in hours. Imports only vptq/ and transformers.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _worker(rank: int, device: str, inbox, outbox) -> None:
    """Quantize the linears sent to this worker on its device; reply with the module state."""
    from vptq.config import QuantConfig
    from vptq.driver import vptq_linear

    dev = torch.device(f"cuda:{rank}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.zeros(1, device=dev)  # CUDA context before the clock starts
    torch.set_num_threads(1)
    outbox.put(("ready", rank, None))
    while True:
        job = inbox.get()
        if job is None:
            break
        name, weight, h, cfg = job
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=dev, dtype=weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
        mod, rep = vptq_linear(name, lin, h.to(dev), QuantConfig.from_dict(cfg))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        state = {k: v.cpu() for k, v in mod.state_dict().items()}
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
        outbox.put(("done", rank, (name, state, time.perf_counter() - t0, rep.proxy_loss, peak)))


def place(costs: dict[str, int], workers: int) -> list[list[str]]:
    """Longest first onto the least-loaded worker."""
    load, plan = [0] * workers, [[] for _ in range(workers)]
    for name in sorted(costs, key=lambda n: -costs[n]):
        w = load.index(min(load))
        plan[w].append(name)
        load[w] += costs[name]
    return plan


def run_spread(gpus: int, device: str, weights: dict, hs: dict, cfg: dict) -> dict:
    ctx = mp.get_context("spawn")
    inboxes = [ctx.Queue() for _ in range(gpus)]
    outbox = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, device, inboxes[r], outbox)) for r in range(gpus)]
    for p in procs:
        p.start()
    for _ in procs:
        assert outbox.get()[0] == "ready"
    plan = place({n: w.numel() for n, w in weights.items()}, gpus)
    t0 = time.perf_counter()
    for r, names in enumerate(plan):
        for n in names:
            inboxes[r].put((n, weights[n], hs[n], cfg))
    states, layers = {}, []
    for _ in weights:
        _, rank, (name, state, secs, loss, peak) = outbox.get()
        states[name] = state
        layers.append({"name": name, "gpu": rank, "seconds": round(secs, 2), "proxy_loss": round(loss, 5),
                       "peak_gpu_gib": round(peak / 2**30, 2)})
    wall = time.perf_counter() - t0
    for q in inboxes:
        q.put(None)
    for p in procs:
        p.join()
    return {"gpus": gpus, "quantize_seconds": round(wall, 2), "placement": plan, "layers": layers,
            "peak_gpu_gib": max(x["peak_gpu_gib"] for x in layers)}, states


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpus", default="1,2,4,8", help="worker counts to time (capped at the GPUs present)")
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--intermediate", type=int, default=28672)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=80, help="blocks of the whole model (extrapolation)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--set", action="append", default=[], help="QuantConfig FIELD=VALUE over v8-k65536")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from vptq.config import QuantConfig
    from vptq.driver import block_hessians, target_linears

    dev = torch.device(a.device)
    have = torch.cuda.device_count() if dev.type == "cuda" else 64
    counts = [g for g in (int(x) for x in a.gpus.split(",")) if g <= have]
    over = {}
    for item in a.set:
        k, v = item.split("=", 1)
        over[k] = int(v) if v.lstrip("-").isdigit() else (v.lower() == "true" if v.lower() in ("true", "false") else v)
    cfg = QuantConfig(vector_len=8, num_centroids=65536).with_(**over)
    torch.manual_seed(0)
    conf = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_attention_heads=a.heads,
                       num_key_value_heads=a.kv_heads, max_position_embeddings=max(4096, a.seqlen))
    conf._attn_implementation = "sdpa"
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    block = LlamaDecoderLayer(conf, 0).to(dev, dtype).eval()
    with torch.no_grad():
        for _n, p in block.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    x = torch.randn(a.windows, a.seqlen, a.hidden, dtype=dtype)
    pe = {"position_embeddings": LlamaRotaryEmbedding(conf).to(dev)(x[:1].to(dev), torch.arange(a.seqlen, device=dev)[None])}  # block kwargs
    lins = target_linears(block, cfg)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    hs, _ = block_hessians(block, x, pe, dev, 4, lins)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    hess_s = time.perf_counter() - t0
    weights = {n: m.weight.detach().cpu() for n, m in lins.items()}
    hs = {n: h.cpu() for n, h in hs.items()}
    del block, x
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    runs, ref = [], None
    for g in counts:
        r, states = run_spread(g, a.device, weights, hs, cfg.to_dict())
        if ref is None:
            ref = states
        r["identical_to_1"] = all(torch.equal(states[n][k], ref[n][k]) for n in ref for k in ref[n])
        r["block_seconds"] = round(hess_s + r["quantize_seconds"], 2)
        runs.append(r)
        print(f"{g} worker(s): {r['block_seconds']} s/block (Hessians {hess_s:.1f} s), identical {r['identical_to_1']}",
              file=sys.stderr, flush=True)
    base = runs[0]["block_seconds"] if runs else None
    for r in runs:
        r["speedup"] = round(base / r["block_seconds"], 2)
        r["efficiency"] = round(base / r["block_seconds"] / r["gpus"], 3)
        r["model_hours"] = round(a.blocks * r["block_seconds"] / 3600, 2)
    out = {"bench": "multigpu", "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor(),
           "gpus_present": have if dev.type == "cuda" else 0, "torch": torch.__version__,
           "shape": {"hidden": a.hidden, "intermediate": a.intermediate, "heads": a.heads, "kv_heads": a.kv_heads},
           "calibration": f"{a.windows} x {a.seqlen} random tokens' activations", "config": cfg.to_dict(),
           "hessian_seconds": round(hess_s, 2), "peak_host_rss_gib": round(
               max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20, 2),
           "runs": runs}
    print(json.dumps(out, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
