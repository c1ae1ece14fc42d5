"""`vptq serve`'s lone-sequence CUDA graph (serve/graph.py) on a GPU: the engine's logits with the graph against
the eager engine's on one schedule (A alone, B joining, B done: the static cache moved in, out and in again),
and one sequence's decode rate through the engine with and without it, on the same model in the same process.
Models: bench/serve_load.py's (random codes or dense fp16, the shape of --config).

  [VPTQ_SERVE_COMPILE=1] python bench/serve_graph_check.py --config .gpu/smol --formats fp16,v5k1024 --out OUT.json
(with VPTQ_SERVE_COMPILE=1 the graphed engine's step is compiled before the capture, as `vptq serve` does then)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def schedule(eng, seen: list) -> list[torch.Tensor]:
    from vptq_service.serve.engine import Sampling, Sequence

    seen.clear()
    a = Sequence(eng.encode("The cat sat on the"), Sampling(max_tokens=40, temperature=0), emit=lambda e: None)
    b = Sequence(eng.encode("A long time ago in a galaxy far far away there lived a small robot who"),
                 Sampling(max_tokens=8, temperature=0), emit=lambda e: None)
    eng.submit(a)
    for i in range(60):
        if i == 5:
            eng.submit(b)
        eng.step()
        if a.finish and b.finish:
            break
    return list(seen)


def rate(eng, tokens: int) -> float:
    """Decode tokens/s of one greedy sequence through the engine (prefill excluded)."""
    from vptq_service.serve.engine import Sampling, Sequence

    s = Sequence(eng.encode("The history of the transistor begins with"), Sampling(max_tokens=tokens,
                 temperature=0), emit=lambda e: None)
    eng.submit(s)
    eng.step()  # prefill + first decode
    torch.cuda.synchronize()
    t0, n0 = time.perf_counter(), len(s.out_ids)
    while not s.finish:
        eng.step()
    torch.cuda.synchronize()
    return (len(s.out_ids) - n0) / (time.perf_counter() - t0)


def main() -> None:
    import vptq_service.serve.engine as engine_mod
    from serve_load import random_model
    from vptq_service.serve.engine import Engine
    from vptq_service.serve.run import load_engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None)
    ap.add_argument("--formats", default="fp16,v5k1024")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    seen: list[torch.Tensor] = []
    sample = engine_mod.sample
    engine_mod.sample = lambda logits, s, gen: seen.append(logits) or sample(logits, s, gen)
    rows = []
    compile_env = "VPTQ_SERVE_COMPILE=1 " if os.environ.get("VPTQ_SERVE_COMPILE") == "1" else ""
    tmp = tempfile.TemporaryDirectory(prefix="vptq-graph-")
    for fmt in a.formats.split(","):
        folder = random_model(fmt, Path(tmp.name) / fmt, a.config)
        graphed = load_engine(str(folder), "cuda")  # graphs on (the default on CUDA), captured here
        eager = Engine(graphed.model, graphed.tok, max_batch=8, graphs=False)
        with torch.no_grad():
            g, e = schedule(graphed, seen), schedule(eager, seen)
            diff = max(float((x - y).abs().max()) for x, y in zip(g, e, strict=True))
            scale = max(float(y.abs().max()) for y in e)
            same = sum(int(x.argmax()) == int(y.argmax()) for x, y in zip(g, e, strict=True))
            r_eager = [rate(eager, a.tokens) for _ in range(2)]
            r_graph = [rate(graphed, a.tokens) for _ in range(2)]
        row = dict(format=fmt, config=a.config, caches=graphed.caches, captured=graphed.graph is not None and graphed.graph.graph is not None,
                   compiled=graphed.graph is not None and graphed.graph.run != graphed.graph.eager_step,
                   logits_compared=len(e), max_abs_diff=diff, max_abs_logit=scale, argmax_equal=same,
                   eager_tokens_per_s=r_eager, graph_tokens_per_s=r_graph,
                   speedup=max(r_graph) / max(r_eager))
        rows.append(row)
        print(json.dumps(row), flush=True)
    from bench.cpu_decode import versions

    a.out.write_text(json.dumps(dict(command=compile_env + "python " + " ".join(sys.argv), device=torch.cuda.get_device_name(),
                                     date=datetime.now(UTC).isoformat(timespec="seconds"), versions=versions(),
                                     rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
