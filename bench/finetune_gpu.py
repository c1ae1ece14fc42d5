"""Recovery fine-tuning on a GPU at Llama-2-7B shape: seconds per end-to-end step and memory.

    python bench/finetune_gpu.py [--steps 12] [--windows 64] [--seqlen 512] [--batch B] [--format v8-k65536]

Teacher: a Llama-2-7B-shaped LlamaForCausalLM (hidden 4096, intermediate 11008, 32 blocks, 32
heads, vocab 32000) with random fp16 weights. Student: the same model with every linear of every
block replaced by a 2-bit `vptq.VQuantLinear` (random codes and codebooks of the stated format,
perm + norm; the cost of a step does not depend on the values). Windows: random token ids.
`vptq.finetune.finetune_model` then runs the end-to-end stage exactly as a job would (the 2-bit
preset's lr and batch unless given; Adam over centroids, weight_scale/bias and norms; gradients
through the dequantizing gather; teacher log-probs cached when the windows are revisited).
Reported: seconds per step (median of the steps after the first; the first also holds the teacher
log-prob cache and the probe loss), peak GPU memory (torch.cuda.max_memory_allocated), trainable
parameters (centroids, scales/biases, norms). JSON on stdout and in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import quantize_blocks  # noqa: E402  (random VQuantLinear of a given format)

from vptq.config import preset  # noqa: E402
from vptq.finetune import finetune_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=None, help="windows per step (default: the 2-bit preset's)")
    ap.add_argument("--format", default="v8-k65536", help="vN-kK of the random 2-bit codes")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda")
    v, k = (int(x[1:]) for x in a.format.split("-"))
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=a.layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(dev):
        teacher = LlamaForCausalLM(cfg).half().eval()
        student = LlamaForCausalLM(cfg).half()
    student.load_state_dict(teacher.state_dict())
    quantize_blocks(student, v, k, dev)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t
    qc = preset(2).with_(e2e_steps=a.steps, **({"e2e_batch": a.batch} if a.batch else {}))
    windows = torch.randint(0, cfg.vocab_size, (a.windows, a.seqlen), generator=torch.Generator().manual_seed(0))
    times: list[float] = []
    last = [time.perf_counter()]

    def progress(step: int, steps: int, info: str) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    trainable = sum(p.numel() for n, p in student.named_parameters()
                    if n.endswith(("centroids.weight", "weight_scale", "weight_bias", "norm.weight")))
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    r = finetune_model(student, teacher, windows, qc, dev, progress=progress)
    total = time.perf_counter() - start
    out = {
        "bench": "finetune_gpu", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "shape": f"Llama-2-7B ({a.layers} blocks)", "format": a.format, "windows": a.windows, "seqlen": a.seqlen,
        "batch": qc.e2e_batch, "lr": qc.e2e_lr, "steps": a.steps, "build_seconds": round(build_s, 1),
        "seconds_total": round(total, 2), "step_seconds": [round(x, 3) for x in times],
        "seconds_per_step_median": round(statistics.median(times[1:] or times), 3),
        "first_step_seconds": round(times[0], 2) if times else None,  # + teacher cache + probe loss
        "finetune_seconds_per_step": r["seconds_per_step"], "kl_before": r["kl_before"], "kl_after": r["kl_after"],
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "trainable_params": trainable,
    }
    print(json.dumps(out, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
