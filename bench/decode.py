"""Decode speed: tokens/s and memory of a quantized model vs its FP original, same prompt, same run.

    python bench/decode.py --cpu  [--out DIR]    SmolLM2-135M (GGUF, FP32) on CPU
    python bench/decode.py --gpu  [--out DIR] [--formats v6k4096,v8k65536]
                                                 Llama-2-7B shape, random fp16 weights, on CUDA

Batch 1, greedy, exactly --new (128) new tokens (min_new_tokens = max_new_tokens, EOS ignored).
The quantized model replaces every linear of every decoder block by a `vptq.VQuantLinear` with
random codes and codebooks of the stated format (speed and memory do not depend on the values:
the kernels read every code whatever it is; quality is measured elsewhere). The FP model is
measured first, then its block linears are swapped in place, so both share embeddings, norms and
lm_head, and the FP weights are freed before the quantized run.

Modes: `generate` = transformers' `generate()` (eager, what a user runs); on CUDA also `graph` =
a hand-written greedy loop over a StaticCache whose one-token step is captured once in a CUDA
graph and replayed (host launch cost removed for both sides: the numba kernels launch on torch's
current stream without syncs, so they are captured like torch's own kernels).
On CUDA every format of --formats is measured in turn on the same model (the block linears are
swapped again for each); the first one is the headline `vptq` entry.
Results: bench/results/decode_cpu.json / decode_<gpu>.json (decode_h100.json, decode_h200.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernel_table import LAYOUT, NORM, PERM, gpu_tag  # noqa: E402
from vptq.compiled import compile_step  # noqa: E402
from vptq.layers import VQuantLinear, share_inputs  # noqa: E402

# VPTQ_BENCH_COMPILE=1: also the graph step through torch.compile, both sides (run_graph's `compiled`)
COMPILE = os.environ.get("VPTQ_BENCH_COMPILE", "0") == "1"
PROMPT = "The history of the transistor begins with"


def random_vq(lin: nn.Linear, v: int, k: int, *, device, gen: torch.Generator, kr: int = 0) -> VQuantLinear:
    """A VQuantLinear of lin's shape: v, k (2-bit at v8-k65536, v6-k4096), one group, perm + norm, random
    codes (on CUDA random packed words: with one group and no residual every bit pattern is a valid code).
    VPTQ_BENCH_PERM=0 (bench/kernel_table.py): no permutation, the layout the quantizer stores for every preset.
    kr: a residual codebook of kr centroids (the 3- and 4-bit presets: v5-k1024-32, v4-k1024-64)."""
    n, m = lin.in_features, lin.out_features
    with torch.device(device):
        q = VQuantLinear(n, m, [-1, v], [-1, k], [-1, kr if kr else -1], 1, n, 0, enable_norm=NORM, enable_perm=PERM,
                         bias=lin.bias is not None, dtype=torch.float16)
    with torch.no_grad():
        q.indices.copy_(torch.randint(-(2**31), 2**31 - 1, q.indices.shape, generator=gen, dtype=torch.int32,
                                      device=device)
                        if torch.device(device).type == "cuda" or (k == 65536 and v == 8) else _codes(q, gen, device))
        q.centroids.weight.copy_(0.02 * torch.randn(q.centroids.weight.shape, generator=gen, device=device))
        if kr:
            q.res_centroids.weight.copy_(0.005 * torch.randn(q.res_centroids.weight.shape, generator=gen, device=device))
        perm = torch.randperm(n, generator=gen, device=device)
        if PERM:
            q.perm.copy_(torch.where(perm >= 2**15, perm - 2**16, perm).to(torch.int16))
        if NORM:
            q.weight_scale.copy_(torch.rand(n, generator=gen, device=device) + 0.5)
            q.weight_bias.copy_(0.01 * torch.randn(n, generator=gen, device=device))
        if lin.bias is not None:
            q.bias.copy_(lin.bias)
    return q


def _codes(q: VQuantLinear, gen, device) -> torch.Tensor:
    """Packed random codes below k for any code width (the bit stream of vptq/packing.py)."""
    from vptq.packing import pack_indices

    g, r, _ = q.indices.shape
    codes = torch.randint(0, 2 ** q.code_bits, (g, r, q.group_size), generator=gen, device=device)
    return pack_indices(codes, q.code_bits).to(device)


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"model.layers.{i}.{n}", m) for i, layer in enumerate(model.model.layers)
            for n, m in layer.named_modules() if isinstance(m, (nn.Linear, VQuantLinear))]


def parse_format(f: str) -> tuple[int, int, int]:
    """'v6k4096' -> (6, 4096, 0); 'v5k1024r32' -> (5, 1024, 32) (a residual codebook of 32)."""
    import re

    mt = re.fullmatch(r"v(\d+)k(\d+)(?:r(\d+))?", f)
    if not mt:
        raise ValueError(f"format: {f!r} is not v<vector length>k<centroids>[r<residual centroids>], e.g. v6k4096 "
                         "or v5k1024r32")
    return int(mt.group(1)), int(mt.group(2)), int(mt.group(3) or 0)


def quantize_blocks(model: nn.Module, v: int, k: int, device, kr: int = 0) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    for name, lin in block_linears(model):
        model.set_submodule(name, random_vq(lin, v, k, device=device, gen=gen, kr=kr))
        del lin


def nbytes(mods) -> int:
    return sum(t.numel() * t.element_size() for m in mods for t in (*m.parameters(), *m.buffers()))


def weight_bytes(model: nn.Module) -> dict:
    blocks = [m for m in model.model.layers.modules() if isinstance(m, (nn.Linear, VQuantLinear))]
    return {"block_linears_bytes": nbytes(blocks), "model_bytes": nbytes([model])}


def run_generate(model, ids, new: int) -> tuple[float, list[int]]:
    attn = torch.ones_like(ids)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, attention_mask=attn)
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up / compile
        if ids.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        if ids.is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    toks = out[0, ids.shape[1]:].tolist()
    assert len(toks) == new, len(toks)
    return dt, toks


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run_graph(model, ids, new: int, *, compiled: bool = False) -> tuple[float, float, list[int]]:
    """Greedy loop over a StaticCache, decode step captured in one CUDA graph.

    compiled: the step goes through vptq.compiled.compile_step (inductor) before the capture, so the ops
    between the linears run as fused kernels. The prefill stays eager. Returns (seconds for prefill + `new` tokens,
    seconds per decode step, tokens).
    """
    from transformers import StaticCache

    dev = ids.device
    length = ids.shape[1]
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=length + new + 8)
        static_ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        static_pos = torch.zeros(1, dtype=torch.long, device=dev)

        def step():
            return model(input_ids=static_ids, cache_position=static_pos, position_ids=static_pos[None],
                         past_key_values=cache, use_cache=True).logits

        if compiled:
            torch._dynamo.reset()  # another model (or other linears) than the last compile
            step = compile_step(step)

        def prefill():
            pos = torch.arange(length, device=dev)
            out = model(input_ids=ids, cache_position=pos, position_ids=pos[None], past_key_values=cache,
                        use_cache=True).logits
            return out[:, -1].argmax(-1)

        # warm-up (lazy cache allocation, kernel compilation, plans) on a side stream, then capture
        nxt = prefill()
        static_ids.copy_(nxt[:, None])
        static_pos.fill_(length)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3 if compiled else 2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            logits = step()
        torch.cuda.synchronize()

        cache.reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        nxt = prefill()
        toks = [nxt]
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        first = None
        for i in range(new - 1):
            static_ids.copy_(nxt[:, None])
            static_pos.fill_(length + i)
            g.replay()
            if first is None:  # the first step's logits: eager and compiled steps start from the same prefill
                first = logits[0, -1].float().clone()
            nxt = logits[:, -1].argmax(-1)
            toks.append(nxt)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    run_graph.first_logits = first.cpu()
    return t2 - t0, (t2 - t1) / (new - 1), [int(t) for t in torch.cat(toks).tolist()]


def versions() -> dict:
    import numpy
    import transformers

    d = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
         "transformers": transformers.__version__}
    try:
        import numba

        d["numba"] = numba.__version__
        from importlib.metadata import version

        d["numba-cuda"] = version("numba-cuda")
    except Exception:
        pass
    return d


def bench_cpu(new: int) -> dict:
    from vptq.config import preset
    from vptq.source import load_model, resolve

    torch.manual_seed(0)
    model, tok = load_model(resolve("smollm2"), torch.float32)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    cfg = preset(2)
    res = {"device": "cpu", "threads": torch.get_num_threads(), "model": "SmolLM2-135M (GGUF -> FP32)",
           "prompt_tokens": ids.shape[1], "new_tokens": new,
           "format": f"v{cfg.vector_len}-k{cfg.num_centroids} (the repo's 2-bit preset), G=1, "
                     f"{LAYOUT}, random codes"}
    fp = weight_bytes(model)
    dt, toks_fp = run_generate(model, ids, new)
    res["fp"] = {**fp, "seconds": dt, "tokens_per_s": new / dt, "ms_per_token": 1e3 * dt / new,
                 "maxrss_MB_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    quantize_blocks(model, cfg.vector_len, cfg.num_centroids, "cpu")
    q = weight_bytes(model)
    dt, _ = run_generate(model, ids, new)
    cached = sum(m._cache[1].numel() * m._cache[1].element_size() for m in model.modules()
                 if isinstance(m, VQuantLinear) and m._cache is not None)
    res["vptq"] = {**q, "seconds": dt, "tokens_per_s": new / dt, "ms_per_token": 1e3 * dt / new,
                   "dequantized_cache_bytes": cached,
                   "maxrss_MB_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    res["time_per_token_ratio_vptq_over_fp"] = res["vptq"]["ms_per_token"] / res["fp"]["ms_per_token"]
    res["fp_tokens_head"] = toks_fp[:8]
    return res


def bench_gpu(new: int, layers: int, formats: list[str]) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda")
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.float16)
    model.eval()
    ids = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(0)).to(dev)
    def describe(f):
        v, k, kr = parse_format(f)
        bits = (math.log2(k) + (math.log2(kr) if kr else 0)) / v
        res = f"-{kr}" if kr else ""
        return (f"{bits:g} bit v{v}-k{k}{res} ({(k + kr) * v * 2 // 1024} KiB fp16 codebooks per linear), G=1, "
                f"{LAYOUT}, random codes")

    res = {"device": torch.cuda.get_device_name(), "model": f"Llama-2-7B shape ({layers} blocks), random fp16",
           "prompt_tokens": ids.shape[1], "new_tokens": new, "format": describe(formats[0])}

    def measure(tag):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        r = {**weight_bytes(model), "allocated_before_bytes": base}
        dt, toks = run_generate(model, ids, new)
        r.update(generate_seconds=dt, generate_tokens_per_s=new / dt, generate_ms_per_token=1e3 * dt / new)
        gtoks = first = None
        try:
            gt, step, gtoks = run_graph(model, ids, new)
            first = run_graph.first_logits
            r.update(graph_seconds=gt, graph_tokens_per_s=new / gt, graph_step_ms=1e3 * step,
                     graph_decode_tokens_per_s=1 / step, graph_matches_generate=gtoks == toks)
        except Exception as e:  # report, do not hide
            r["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if COMPILE and (tag == "fp16" or tag.endswith("shared")):  # the headline pair (compiles take minutes)
            try:
                t0 = time.perf_counter()
                gt, step, ctoks = run_graph(model, ids, new, compiled=True)
                r.update(compiled_graph_seconds=gt, compiled_graph_step_ms=1e3 * step,
                         compiled_graph_decode_tokens_per_s=1 / step, compiled_matches_graph=ctoks == gtoks,
                         compiled_tokens_equal_before_divergence=common_prefix(ctoks, gtoks or []),
                         compiled_first_logits_max_abs_diff=float((run_graph.first_logits - first).abs().max()),
                         first_logits_max_abs=float(first.abs().max()),
                         compile_and_run_seconds=time.perf_counter() - t0)
            except Exception as e:  # report, do not hide
                r["compiled_graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        r["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        r["tokens_head"] = toks[:8]
        res[tag] = r
        print(tag, json.dumps(r), flush=True)

    def ratio(tag, key="graph_step_ms"):
        return res["fp16"].get(key, float("nan")) / res[tag].get(key, float("nan"))

    measure("fp16")
    for i, fmt in enumerate(formats):
        v, k, kr = parse_format(fmt)
        quantize_blocks(model, v, k, dev, kr=kr)
        measure("vptq" if i == 0 else f"vptq_{fmt}")
        # then with q/k/v and gate/up each in one launch (vptq.layers.share_inputs; what
        # vptq.from_pretrained sets up), where the format takes the row kernel
        if share_inputs(model):
            tag = "vptq_shared" if i == 0 else f"vptq_{fmt}_shared"
            measure(tag)
            res[tag]["speedup_graph_decode"] = ratio(tag)
            if COMPILE:
                res[tag]["speedup_compiled_graph_decode"] = ratio(tag, "compiled_graph_step_ms")
        if i:
            res[f"vptq_{fmt}"]["format"] = describe(fmt)
            res[f"vptq_{fmt}"]["speedup_graph_decode"] = ratio(f"vptq_{fmt}")
    f, q = res["fp16"], res["vptq"]
    res["weight_ratio_block_linears"] = q["block_linears_bytes"] / f["block_linears_bytes"]
    res["weight_ratio_model"] = q["model_bytes"] / f["model_bytes"]
    res["speedup_generate"] = q["generate_tokens_per_s"] / f["generate_tokens_per_s"]
    if "graph_step_ms" in q and "graph_step_ms" in f:
        res["speedup_graph_decode"] = f["graph_step_ms"] / q["graph_step_ms"]
        res["speedup_graph_total"] = q["graph_tokens_per_s"] / f["graph_tokens_per_s"]
    if COMPILE:
        res["speedup_compiled_graph_decode"] = ratio("vptq_shared" if "vptq_shared" in res else "vptq",
                                                     "compiled_graph_step_ms")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32, help="decoder blocks of the GPU model (7B: 32)")
    ap.add_argument("--formats", default="v6k4096,v8k65536", help="GPU: quantized formats to measure, in order")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:  # before any model is built: a bad name must not cost a GPU run
        try:
            parse_format(f)
        except ValueError as e:
            ap.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": ("" if PERM else "VPTQ_BENCH_PERM=0 ") + ("" if NORM else "VPTQ_BENCH_NORM=0 ")
                       + ("VPTQ_BENCH_COMPILE=1 " if COMPILE else "") + "python bench/decode.py " + " ".join(sys.argv[1:]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.node(),
            "cpu_count": os.cpu_count(), "versions": versions()}
    if args.cpu:
        r = {**meta, **bench_cpu(args.new)}
        (out / "decode_cpu.json").write_text(json.dumps(r, indent=1))
        print(json.dumps(r, indent=1))
    if args.gpu:
        r = {**meta, **bench_gpu(args.new, args.layers, formats)}
        (out / f"decode_{gpu_tag(r['device'])}.json").write_text(json.dumps(r, indent=1))
        print(json.dumps(r, indent=1))
    if not (args.cpu or args.gpu):
        ap.error("give --cpu and/or --gpu")


if __name__ == "__main__":
    main()
