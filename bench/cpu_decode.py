"""CPU decode from compressed weights (vptq/kernels/cpu.py) against fp32 and bf16 dense, same run.

    python bench/cpu_decode.py [--formats v5k1024,v5k1024r32,v4k1024r64] [--new 64] [--batches 1,8]
                               [--out bench/results/cpu_decode.json]

SmolLM2-135M (the bundled GGUF, dequantized to fp32). Each configuration runs in its own process (so
that its resident memory is its own): `fp32` and `bf16` dense, and each VPTQ format with every
decoder-block linear replaced by a VQuantLinear of random codes in the layout the quantizer stores
for the presets (one group, no outliers, permutation or norm; speed and memory do not depend on the
values) on the CPU kernels (dispatch.use_cpu_kernels: nothing dense kept; q/k/v and gate/up one call
each, vptq.layers.share_inputs). Embeddings, norms and lm_head stay dense fp32 (bf16 in `bf16`).

Per configuration: the block linears' resident bytes (dense: their weights; VPTQ: packed tensors +
the kernels' fp32 codebooks, kernels.cpu.resident_bytes), process RSS, first-token latency
(prefill of the prompt + the first token, batch 1; the 7-token prompt and a --long-prompt one, which
VPTQ runs above kernels.cpu.MAX_ROWS by dequantizing per call), and greedy decode tokens/s at each batch
(a hand-written loop over transformers' DynamicCache, EOS ignored, --new steps timed after a
warm-up). Threads: torch's and numba's, both `--threads` (default: all cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

# bench/ itself off the path: bench/kernels.py would shadow Hugging Face's `kernels`, which transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "The history of the transistor begins with"


def random_layer(lin, v: int, k: int, kr: int, gen):
    """A VQuantLinear of lin's shape as the presets store it (one group, no outliers, permutation or
    norm) with random packed words (k and kr are powers of two: every bit pattern is a valid code)."""
    import torch

    from vptq.layers import VQuantLinear

    n, m = lin.in_features, lin.out_features
    q = VQuantLinear(n, m, [-1, v], [-1, k], [-1, kr if kr else -1], 1, n, 0, bias=lin.bias is not None)
    with torch.no_grad():
        q.indices.copy_(torch.randint(-(2**31), 2**31 - 1, q.indices.shape, generator=gen, dtype=torch.int32))
        q.centroids.weight.copy_(0.02 * torch.randn(q.centroids.weight.shape, generator=gen))
        if kr:
            q.res_centroids.weight.copy_(0.005 * torch.randn(q.res_centroids.weight.shape, generator=gen))
        if lin.bias is not None:
            q.bias.copy_(lin.bias)
    return q


# Shapes by name: random weights (speed and memory do not depend on the values), SmolLM2's tokenizer
# for the prompt. Qwen2.5-0.5B's config.json values (24 blocks, hidden 896, tied embeddings).
SHAPES = {"qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                               num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                               max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
                               rms_norm_eps=1e-6)}


def base_model(shape: str | None = None):
    """(fp32 model, tokenizer): SmolLM2-135M's real weights (None), a named shape of SHAPES, or a folder
    holding a config.json (+ tokenizer), both with random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from vptq.source import load_model, resolve

    if shape is None:
        model, tok = load_model(resolve("smollm2"))
        return model.eval(), tok
    torch.manual_seed(0)
    if shape in SHAPES:
        kw = dict(SHAPES[shape])
        cfg, tok = AutoConfig.for_model(kw.pop("model_type"), **kw), load_model(resolve("smollm2"))[1]
    else:
        cfg, tok = AutoConfig.from_pretrained(shape), AutoTokenizer.from_pretrained(shape)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), tok


def apply_format(model, config: str):
    """model in fp32/bf16/fp16, or with every decoder-block linear a random VQuantLinear of format
    config (v<len>k<centroids>[r<residual centroids>]) of the presets' stored layout."""
    import re

    import torch
    from torch import nn

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if config in dtypes:
        return model.to(dtypes[config])
    mt = re.fullmatch(r"v(\d+)k(\d+)(?:r(\d+))?", config)
    if not mt:
        raise SystemExit(f"format {config!r}: use fp32/bf16/fp16 or v<len>k<centroids>[r<residual>], e.g. v5k1024r32")
    v, k, kr = int(mt.group(1)), int(mt.group(2)), int(mt.group(3) or 0)
    gen = torch.Generator().manual_seed(0)
    blocks = model.model.layers
    for name, lin in [(n, m) for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]:
        blocks.set_submodule(name, random_layer(lin, v, k, kr, gen))
    return model


def build(config: str, shape: str | None = None):
    """base_model(shape) in format config; VPTQ formats on the CPU kernels (nothing dense kept), q/k/v and
    gate/up sharing one call (as vptq.io.load_quantized marks them)."""
    from vptq.kernels.dispatch import use_cpu_kernels
    from vptq.layers import share_inputs

    model, tok = base_model(shape)
    model = apply_format(model, config)
    if config not in ("fp32", "bf16", "fp16"):
        share_inputs(model)
        use_cpu_kernels(model)
    return model, tok


def linears_bytes(model) -> int:
    from torch import nn

    from vptq.kernels.cpu import resident_bytes
    from vptq.layers import VQuantLinear

    total = 0
    for m in model.model.layers.modules():
        if isinstance(m, VQuantLinear):
            total += resident_bytes(m)
        elif isinstance(m, nn.Linear):
            total += sum(t.nbytes for t in (*m.parameters(), *m.buffers()))
    return total


def decode(model, ids, new: int):
    """Seconds of `new` greedy one-token steps after the prefill of ids (B, T)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(new):
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t0


def static_decode(model, ids, new: int, compiled: bool) -> float:
    """Seconds of `new` greedy batch-1 steps on a StaticCache (fixed shapes: what torch.compile needs), the step
    through vptq.compiled.compile_step (inductor) where `compiled`, after two warm-up steps (the compile)."""
    import torch
    from transformers import StaticCache

    from vptq.compiled import compile_step

    t = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=t + new + 8)
    tok, pos = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)

    def step():
        return model(input_ids=tok, cache_position=pos, position_ids=pos[None], cache=cache).logits

    fn = compile_step(step) if compiled else step
    with torch.no_grad():
        for timed in (False, True):  # the warm-up pass compiles; the cache starts empty again for the timed one
            cache.reset()
            at = torch.arange(t)
            nxt = model(input_ids=ids, cache_position=at, position_ids=at[None], cache=cache).logits[:, -1].argmax(-1)
            t0 = time.perf_counter()
            for i in range(new if timed else 2):
                tok.copy_(nxt[:, None])
                pos.fill_(t + i)
                nxt = fn()[:, -1].argmax(-1)
        return time.perf_counter() - t0


def first_token(model, ids, reps: int = 5) -> float:
    import torch

    best = float("inf")
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True).logits[:, -1].argmax(-1)
            best = min(best, time.perf_counter() - t0)
    return best


def one(config: str, new: int, batches: list[int], threads: int, long_prompt: int, shape: str | None = None,
        compiled: bool = False) -> dict:
    import psutil
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok = build(config, shape)
    build_s = time.perf_counter() - t0
    if config not in ("fp32", "bf16"):
        import numba

        numba.set_num_threads(threads)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    res = {"config": config, "build_seconds": round(build_s, 1), "prompt_tokens": ids.shape[1]}
    t0 = time.perf_counter()
    decode(model, ids, 2)  # warm-up: kernels loaded (or compiled), plans built
    res["warmup_seconds"] = round(time.perf_counter() - t0, 2)
    res["first_token_ms"] = round(1000 * first_token(model, ids), 2)
    long = tok(" ".join([PROMPT] * 64), return_tensors="pt").input_ids[:, :long_prompt]
    first_token(model, long, 1)  # warm-up at this length
    res[f"first_token_ms_{long.shape[1]}tok"] = round(1000 * first_token(model, long, 3), 2)
    for b in batches:
        idsb = ids.expand(b, -1).contiguous()
        decode(model, idsb, 2)
        dt = decode(model, idsb, new)
        res[f"tokens_per_s_b{b}"] = round(b * new / dt, 2)
        res[f"ms_per_step_b{b}"] = round(1000 * dt / new, 2)
    if compiled:  # batch 1 on a static cache, eager and compiled (the serve engine's lone sequence)
        for mode in ("static", "compiled"):
            t0 = time.perf_counter()
            dt = static_decode(model, ids, new, mode == "compiled")
            res[f"{mode}_tokens_per_s_b1"] = round(new / dt, 2)
            res[f"{mode}_ms_per_step_b1"] = round(1000 * dt / new, 2)
            res[f"{mode}_total_seconds"] = round(time.perf_counter() - t0, 1)
    res["block_linears_bytes"] = linears_bytes(model)
    res["rss_MB"] = round(psutil.Process().memory_info().rss / 2**20, 1)
    return res


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "numpy", "numba", "transformers", "fastapi", "uvicorn")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="v5k1024,v5k1024r32,v4k1024r64")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--long-prompt", type=int, default=128, help="tokens of the second first-token prompt")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_decode.json")
    ap.add_argument("--shape", help=f"random weights of a named shape ({', '.join(SHAPES)}) or a config folder "
                    "instead of SmolLM2-135M's weights")
    ap.add_argument("--compiled", action="store_true", help="also batch 1 on a static cache, eager and through "
                    "torch.compile (vptq.compiled.compile_step; a C++ compiler needed, minutes a configuration)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration, print JSON
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    if a.one:
        print(json.dumps(one(a.one, a.new, batches, a.threads, a.long_prompt, a.shape, a.compiled)))
        return
    rows = []
    for config in ["fp32", "bf16", *a.formats.split(",")]:
        cmd = [sys.executable, __file__, "--one", config, "--new", str(a.new), "--batches", a.batches,
               "--threads", str(a.threads), "--long-prompt", str(a.long_prompt), *(["--shape", a.shape] if a.shape else []),
               *(["--compiled"] if a.compiled else [])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    fp32 = rows[0]
    for r in rows:
        r["linears_vs_fp32"] = round(r["block_linears_bytes"] / fp32["block_linears_bytes"], 4)
        for b in batches:
            r[f"speedup_vs_fp32_b{b}"] = round(r[f"tokens_per_s_b{b}"] / fp32[f"tokens_per_s_b{b}"], 3)
        for mode in ("static", "compiled") if a.compiled else ():
            r[f"{mode}_speedup_vs_fp32_{mode}_b1"] = round(r[f"{mode}_tokens_per_s_b1"] / fp32[f"{mode}_tokens_per_s_b1"], 3)
    load = os.getloadavg()
    result = {"command": "python " + " ".join(sys.argv), "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "cpu_count": os.cpu_count(), "threads": a.threads, "loadavg_at_end": [round(x, 2) for x in load],
              "versions": versions(), "model": (f"{a.shape}: random weights" if a.shape else "SmolLM2-135M (GGUF -> fp32)")
              + "; VPTQ rows: random codes, the presets' stored layout",
              "new_tokens": a.new, "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
