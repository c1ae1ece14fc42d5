"""Sliding-window caches kept whole on a real model (issue 28: serve/engine.py's cache_kind "plain").

    python bench/sliding_cache_check.py [--model gemma3-270m|PATH] [--prefill 600] [--steps 200]
                                        [--out bench/results/sliding_cache_check_<model>.json]

The server keeps a sliding-window model's caches as plain layers (every token kept, the window applied in
the attention mask) so that sequences merge into one batch. The tests check it on tiny random models; this
checks it on a real one past its window: wikitext-2 test text, a prefill of --prefill tokens, then --steps
teacher-forced one-token steps, once on the model's own cache (sliding layers) and once on a config-less
DynamicCache (plain layers): the largest |logit difference| and the argmax agreement per step. Then the
engine: two greedy requests, the second joining at step 3, decoded together against each alone (tokens equal?).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    import transformers
    from transformers import DynamicCache
    from vptq_service.serve.engine import Engine, Sampling, Sequence, cache_kind

    from vptq.source import load_model, resolve

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--prefill", type=int, default=600)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--new", type=int, default=48, help="greedy tokens per request in the engine check")
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/test.txt"))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    src = a.model
    if not Path(src).exists():
        import subprocess

        src = subprocess.run([sys.executable, str(Path(__file__).with_name("fetch_models.py")), src], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
    torch.manual_seed(0)
    model, tok = load_model(resolve(src))
    model = model.float().eval()
    cfg = model.config.get_text_config()
    text = Path(a.text).read_text()[:200_000]
    ids = tok(text, return_tensors="pt").input_ids[:, : a.prefill + a.steps]
    rec = {"model": a.model, "date": datetime.now(UTC).isoformat(timespec="seconds"), "sliding_window":
           getattr(cfg, "sliding_window", None), "layer_types": sorted(set(getattr(cfg, "layer_types", []) or [])),
           "cache_kind": cache_kind(model, torch.device("cpu")), "prefill": a.prefill, "steps": a.steps,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    t0 = time.perf_counter()
    with torch.no_grad():
        runs = {}
        for name, kw in (("sliding", {}), ("plain", {"cache": DynamicCache()})):
            out = model(input_ids=ids[:, : a.prefill], use_cache=True, **kw)
            cache, logits = out.cache, [out.logits[0, -1]]
            rec[f"{name}_layers"] = sorted({type(layer).__name__ for layer in cache.layers})
            for i in range(a.prefill, ids.shape[1] - 1):
                out = model(input_ids=ids[:, i : i + 1], cache=cache, use_cache=True)
                cache = out.cache
                logits.append(out.logits[0, -1])
            runs[name] = torch.stack(logits)
        diff = (runs["sliding"] - runs["plain"]).abs().amax(-1)
        rec["max_abs_logit_diff"] = float(diff.max())
        rec["max_abs_logit"] = float(runs["sliding"].abs().max())
        rec["argmax_agree"] = int((runs["sliding"].argmax(-1) == runs["plain"].argmax(-1)).sum())
        rec["positions"] = int(diff.numel())
        rec["teacher_forced_s"] = round(time.perf_counter() - t0, 1)
    # the engine: a long prompt past the window and a short one joining it
    long_ids = ids[0, : a.prefill].tolist()
    prompts = [(long_ids, a.new), (tok("The history of the transistor begins with").input_ids, a.new)]

    def engine(which: list[int]) -> tuple[list, list[int]]:
        eng = Engine(model, tok, max_batch=4, graphs=False)
        rows: list[int] = []
        eng.on_decode = rows.append
        seqs = [Sequence(list(prompts[i][0]), Sampling(max_tokens=prompts[i][1], temperature=0), emit=lambda e: None)
                for i in which]
        eng.submit(seqs[0])
        for step in range(10 * a.new):
            if step == 3:
                for s in seqs[1:]:
                    eng.submit(s)
            eng.step()
            if all(s.finish for s in seqs):
                break
        return [s.out_ids for s in seqs], rows

    t0 = time.perf_counter()
    alone = [engine([0])[0][0], engine([1])[0][0]]
    together, rows = engine([0, 1])
    rec["engine"] = {"tokens_equal_alone": together == alone, "max_decode_rows": max(rows),
                     "common_prefix": [next((k for k, (x, y) in enumerate(zip(t, al, strict=False)) if x != y), min(len(t), len(al)))
                                       for t, al in zip(together, alone, strict=True)],
                     "new_tokens": [len(t) for t in together], "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(rec, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
