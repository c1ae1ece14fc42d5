"""Time VPTQ on one decoder block of Llama-2-7B shape (random weights, random activations).

    python bench/block7b.py --device cuda [--windows 128] [--seqlen 2048] [--json]

hidden 4096, intermediate 11008, 32 heads; 2 bits with a 65,536 x 8 codebook (v8-k65536, the
released-model setting); Hessians collected by running the real block on the activations.
Imports only vptq/ and transformers (the GPU image has no prefect/sqlalchemy/boto3).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vptq.config import QuantConfig, layer_bpw  # noqa: E402
from vptq.driver import quantize_linears  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kmeans-iters", type=int, default=10)
    ap.add_argument("--kmeans-samples", type=int, default=1 << 20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    dev = torch.device(a.device)
    torch.manual_seed(0)
    conf = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_attention_heads=a.heads,
                       num_key_value_heads=a.heads, max_position_embeddings=max(4096, a.seqlen))
    conf._attn_implementation = "sdpa"
    block = LlamaDecoderLayer(conf, 0).to(dev, torch.float16).eval()
    with torch.no_grad():
        for _n, p in block.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    # random activations: the calibration windows live on the CPU, moved batch by batch
    x = torch.randn(a.windows, a.seqlen, a.hidden, dtype=torch.float16)
    # the block's keyword arguments as the driver passes them (vptq.driver.run_block): the rotary tables;
    # no mask (sdpa's causal path, as the model hands a Llama block without padding)
    pe = {"position_embeddings": LlamaRotaryEmbedding(conf).to(dev)(x[:1].to(dev),
                                                                    torch.arange(a.seqlen, device=dev)[None])}
    cfg = QuantConfig(vector_len=8, num_centroids=65536, kmeans_iters=a.kmeans_iters,
                      kmeans_max_samples=a.kmeans_samples)
    times: dict[str, float] = {}

    def tick(name):
        sync(dev)
        times[name] = time.perf_counter()

    sync(dev)
    t0 = time.perf_counter()
    reps, _ = quantize_linears(block, x, pe, cfg, dev, batch=a.batch, progress=tick)
    sync(dev)
    total = time.perf_counter() - t0
    first = min(times.values())
    res = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "windows": a.windows, "seqlen": a.seqlen, "config": "v8-k65536 (2 bits), norm+perm",
        "kmeans_iters": a.kmeans_iters, "kmeans_samples": a.kmeans_samples,
        "block_seconds": round(total, 2),
        "hessian_seconds": round(first - t0, 2),
        "extrapolated_32_blocks_min": round(32 * total / 60, 1),
        "layers": [{"name": r.name, "shape": r.shape, "seconds": round(r.seconds, 2),
                    "proxy_loss": round(r.proxy_loss, 4), "proxy_loss_kmeans": round(r.proxy_loss_kmeans, 4),
                    "bpw": round(layer_bpw(cfg, *r.shape), 3), "warnings": r.warnings} for r in reps],
    }
    print(json.dumps(res, indent=None if a.json else 2))


if __name__ == "__main__":
    main()
