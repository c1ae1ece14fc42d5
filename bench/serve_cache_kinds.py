"""How `vptq serve` holds each causal-LM type's caches, and whether joined requests decode as they do alone (issue 28).

    python bench/serve_cache_kinds.py [--only mamba,qwen3_next] [--out bench/results/serve_cache_kinds.json]

Every type of transformers' causal-LM mapping as a tiny random model (bench/arch_sweep.py's tiny_config, SmolLM2's
tokenizer; BERT-style configs made decoders, is_decoder=True, as a checkpoint that generates is, and MLA configs given
as many key/value heads as heads, as MLA checkpoints have: the sweep's grouped heads fail batched prefill there, in
transformers' attention): serve/engine.py's
cache_kind ("merge", "plain", "states", "recurrent", "lanes"), and three greedy requests through the engine, the second and third
joining at step 3, against each alone: tokens equal, the largest |logit difference|, the most rows in one pass; the
first request alone against the model's own uncached forward at every step (the largest |logit difference|) and
against transformers' own `generate` (greedy; transformers 5.25 passes RoBERTa-style models positions from 0, not
their own). A type whose tiny model cannot be built is "not-built" (nothing learnt about serving), one the engine
refuses "refused".
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [("The cat sat on the mat and looked at the", 10),
           ("A long time ago in a galaxy far far away there lived a robot who", 6), ("Once", 8)]


class _Timeout(Exception):
    pass


def check(model_type: str, tok) -> dict:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM
    from vptq_service.serve.engine import cache_kind

    from tests.test_serve import decode_joining, own_logits
    from vptq.errors import SourceError

    spec = importlib.util.spec_from_file_location("arch_sweep", Path(__file__).with_name("arch_sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    torch.manual_seed(0)
    try:
        config = sweep.tiny_config(model_type, tok)
        if getattr(config, "is_decoder", None) is False:  # BERT-style: a checkpoint that generates is a decoder
            config.is_decoder = True
        if getattr(config, "kv_lora_rank", None):  # MLA (DeepSeek-V2/3, MiniCPM3): as many key/value heads as
            config.num_key_value_heads = config.num_attention_heads  # heads, as every MLA checkpoint has
        model = AutoModelForCausalLM.from_config(config).eval()
        kind = cache_kind(model, torch.device("cpu"))
    except Exception as e:  # noqa: BLE001 - a family this builder cannot make
        return {"kind": "not-built", "error": f"{type(e).__name__}: {str(e)[:160]}"}
    rec = {"kind": kind}
    alone_logits, together_logits = [], []
    try:
        alone = [decode_joining(model, tok, [p], logits=alone_logits)[0][0] for p in PROMPTS]
    except SourceError as e:  # the engine refuses the model (first_position): said, not served
        return {"kind": "refused", "error": str(e)[:200]}
    # against the model's own definition: an uncached forward over the prompt and the tokens so far, per step
    ids = tok(PROMPTS[0][0]).input_ids
    own = max(float((x - own_logits(model, ids + alone[0][1][:k])).abs().max()) for k, x in enumerate(alone_logits[0]))
    together, rows = decode_joining(model, tok, PROMPTS, logits=together_logits)
    diff = max((float((x - y).abs().max()) for a, b in zip(together_logits, alone_logits, strict=True)
                for x, y in zip(a, b, strict=False)), default=0.0)
    ids = tok(PROMPTS[0][0], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=PROMPTS[0][1],
                             min_new_tokens=PROMPTS[0][1], do_sample=False)
    ref = out[0, ids.shape[1]:].tolist()
    rec.update(tokens_equal_alone=together == alone, max_logit_diff=diff, max_rows=max(rows),
               alone_vs_own_forward=own, alone_equals_generate=alone[0][1] == ref[: len(alone[0][1])])
    return rec


def main() -> None:
    from vptq.source import load_model, resolve

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--timeout", type=int, default=60)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    import importlib.util

    spec = importlib.util.spec_from_file_location("arch_sweep", Path(__file__).with_name("arch_sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    tok = load_model(resolve("smollm2"))[1]
    types = [t for t in a.only.split(",") if t] or sweep.causal_lm_types()

    def alarm(*_):
        raise _Timeout

    signal.signal(signal.SIGALRM, alarm)
    out = {}
    for t in types:
        signal.alarm(a.timeout)
        try:
            out[t] = check(t, tok)
        except _Timeout:
            out[t] = {"kind": "timeout"}
        except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
            out[t] = {"kind": "error", "error": f"{type(e).__name__}: {str(e)[:160]}"}
        signal.alarm(0)
        if out[t]["kind"] != "not-built":
            print(t, json.dumps(out[t]), flush=True)
    summary = {k: sum(1 for r in out.values() if r["kind"] == k) for k in sorted({r["kind"] for r in out.values()})}
    print("summary", json.dumps(summary))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"summary": summary, "types": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
