"""Load test of `vptq serve`: N concurrent clients (the official openai client, streaming), tokens/s,
latency and time-to-first-token percentiles, errors.

    python bench/serve_load.py [--source DIR | --format v5k1024] [--clients 1,4,8] [--requests 4]
                               [--max-tokens 32] [--max-batch 8] [--out bench/results/serve_load.json]

The server is a real `vptq serve` process on 127.0.0.1 (a free port). Without --source it serves
SmolLM2-135M with every decoder-block linear a VQuantLinear of random codes in --format (as
bench/cpu_decode.py builds it; written once with vptq.io.save_quantized), on CPU: the linears run on
the CPU kernels. Each client sends --requests completions one after the other (greedy, --max-tokens,
EOS honoured: usage counts the tokens actually generated); all clients of a level start together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["The history of the transistor begins with", "Once upon a time", "The capital of France is",
           "In 1905, Albert Einstein", "A recipe for bread:", "The weather today", "def fibonacci(n):",
           "My favourite book is"]


def random_model(fmt: str, out: Path, config: str | None = None) -> Path:
    """A model folder in fmt (fp16/bf16/fp32 dense or vNkK[rR] random codes) of SmolLM2's weights, or with
    --config random weights of that config folder's shape (throughput does not depend on the values, and
    the GPU machine has no copy of the GGUF): bench/cpu_decode.py's models, written to out."""
    from bench.cpu_decode import apply_format, base_model
    from vptq.io import save_quantized

    model, tok = base_model(config)
    model = apply_format(model, fmt)
    if fmt in ("fp16", "bf16", "fp32"):
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return out
    return Path(save_quantized(model, out, tok))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else float("nan")


async def level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    lat, ttft, toks, errors = [], [], [], []

    async def one(i: int) -> None:
        for j in range(requests):
            t0 = time.perf_counter()
            first = None
            try:
                stream = await client.completions.create(
                    model=model, prompt=PROMPTS[(i + j) % len(PROMPTS)], max_tokens=max_tokens, temperature=0,
                    stream=True, stream_options={"include_usage": True})
                n = 0
                async for ch in stream:
                    if ch.choices and ch.choices[0].text and first is None:
                        first = time.perf_counter() - t0
                    if ch.usage:
                        n = ch.usage.completion_tokens
                lat.append(time.perf_counter() - t0)
                ttft.append(first if first is not None else lat[-1])
                toks.append(n)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}"[:200])

    t0 = time.perf_counter()
    await asyncio.gather(*[one(i) for i in range(clients)])
    wall = time.perf_counter() - t0
    await client.close()
    return {"clients": clients, "requests": clients * requests, "errors": len(errors), "error_samples": errors[:3],
            "completion_tokens": sum(toks), "seconds": round(wall, 2),
            "tokens_per_s": round(sum(toks) / wall, 2) if wall else None,
            "latency_p50_s": round(pct(lat, 0.5), 3), "latency_p95_s": round(pct(lat, 0.95), 3),
            "ttft_p50_s": round(pct(ttft, 0.5), 3), "ttft_p95_s": round(pct(ttft, 0.95), 3)}


def batch_sizes(url: str) -> dict:
    import httpx

    text = httpx.get(url + "/metrics").text
    vals = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("vptq_decode_batch_size_") and not line.startswith("#")}
    n, s = vals.get("vptq_decode_batch_size_count", 0), vals.get("vptq_decode_batch_size_sum", 0)
    return {"decode_passes": int(n), "mean_decode_batch": round(s / n, 2) if n else None}


def main() -> None:

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", help="a model folder to serve (default: random-code SmolLM2 in --format)")
    ap.add_argument("--format", default="v5k1024", help="vNkK[rR] random codes, or fp16/bf16/fp32 dense")
    ap.add_argument("--config", help="random weights of this config+tokenizer folder's shape (not SmolLM2's)")
    ap.add_argument("--device", default="cpu", help="the server's --device")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_load.json")
    a = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="vptq-serve-load-")
    src = Path(a.source) if a.source else random_model(a.format, Path(tmp.name) / "model", a.config)
    from vptq_service.serve.launch import launch

    try:
        proc, url = launch(src, "--served-name", "m", "--max-batch", str(a.max_batch), "--max-queue", "256",
                           "--device", a.device,
                           log=Path(tmp.name) / "server.log", timeout=300)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    try:
        asyncio.run(level(url, "m", 1, 1, 4))  # warm-up: kernels loaded, plans built
        rows = []
        for c in (int(x) for x in a.clients.split(",")):
            before = batch_sizes(url)
            row = asyncio.run(level(url, "m", c, a.requests, a.max_tokens))
            after = batch_sizes(url)
            n = after["decode_passes"] - before["decode_passes"]
            if n:
                mean_after = (after["mean_decode_batch"] or 0) * after["decode_passes"]
                mean_before = (before["mean_decode_batch"] or 0) * before["decode_passes"]
                row["mean_decode_batch"] = round((mean_after - mean_before) / n, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    from bench.cpu_decode import versions

    result = {"command": "python " + " ".join(sys.argv), "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "cpu_count": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
              "versions": versions(), "device": a.device, "model": str(a.source) if a.source else
              f"{a.config or 'SmolLM2-135M'}, {a.format} (block linears: random codes when vNkK)",
              "max_tokens": a.max_tokens, "max_batch": a.max_batch,
              "env": {k: os.environ[k] for k in ("VPTQ_SERVE_GRAPHS", "VPTQ_CHUNKED_ROWS") if k in os.environ},
              "levels": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
