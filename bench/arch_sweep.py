"""Every causal-LM family of the installed transformers through `vptq compress`, as a new user would (issue 24).

tests/test_architectures.py checks 14 families and 9 more beyond its matrix in CI; this sweep takes every model
type in transformers' causal-LM mapping, builds a tiny random model of it from its own config class (2 blocks, hidden 64, SmolLM2's
tokenizer), runs the command line (`vptq compress DIR --bits 2 --json`, tiny codebooks) in a fresh process and
classifies what a user would see:

  ok          exit 0; the folder loads with vptq.from_pretrained and with transformers after
              vptq.patch_transformers() (logits equal, finite) and generates
  refused     exit 2 with one line on stderr, no traceback, nothing at --out (an architecture we cannot support)
  crash       anything else: a traceback, another exit code, output left behind, a load that fails or differs
  not-built   the tiny config or model could not be built, or the floating-point model fails transformers' own
              generate (a family needing images/audio, or options this script does not set): nothing about vptq
              is learnt from it
  timeout     the family's work ran past --timeout seconds

    python bench/arch_sweep.py --out bench/results/arch_sweep_<date>.jsonl [--only llama,qwen2] [--timeout 240]

One JSON line per family (model type, status, seconds, message); a table on stdout at the end.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--nsamples", "2", "--seqlen", "32", "--finetune-steps", "0", "--eval-windows", "0",
             "--set", "vector_len=4", "--set", "num_centroids=16", "--set", "kmeans_iters=2",
             "--set", "refine_iters=0"]
# the fields that make a config tiny, where its class has them (by __init__ parameter or attribute_map alias)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "sliding_window": 16,
        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 4,
        "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
        "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8, "v_head_dim": 16, "n_group": 1, "topk_group": 1, "ffn_hidden_size": 128,
        "d_ff": 128, "ffn_dim": 128, "n_inner": 128, "rotary_dim": 8, "partial_rotary_factor": 0.5,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "decoder_sparse_step": 1,
        "attention_window_size": 16, "expert_interval": 1, "num_kv_heads": 2, "multi_query": False}


# per type, where TINY alone gives a model that does not run: Falcon's default (old) decoder takes no grouped key/value
# heads; hybrid stacks whose first attention layer lies past two blocks (Jamba, Bamba, Granite 4 hybrid, RecurrentGemma:
# Mamba or recurrent blocks alone fail in transformers' mask code) get one of each; Mamba-2's heads must fill its
# inner width; GPT-Neo's attention types list must cover its layers
_MAMBA2 = {"mamba_n_heads": 4, "mamba_d_head": 32, "mamba_n_groups": 1, "mamba_d_state": 8, "mamba_chunk_size": 16}
OVERRIDES = {"falcon": {"num_kv_heads": 4, "new_decoder_architecture": True},
             "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
                       "mamba_d_state": 8, "mamba_dt_rank": 4},
             "bamba": {"attn_layer_indices": [1], **_MAMBA2},
             "granitemoehybrid": {"layer_types": ["mamba", "attention"], **_MAMBA2},
             "recurrent_gemma": {"block_types": ["recurrent", "attention"], "attention_window_size": 16, "lru_width": 64},
             "mamba2": {"num_heads": 4, "head_dim": 32, "n_groups": 1, "state_size": 8, "chunk_size": 16, "expand": 2},
             "gpt_neo": {"num_layers": 2, "attention_types": [[["global", "local"], 1]], "window_size": 16},
             # multi-head latent attention keeps one key/value head per query head
             "glm4_moe_lite": {"num_key_value_heads": 4},
             "kimi_linear": {"layer_types": ["linear_attention", "full_attention"], "mlp_layer_types": ["dense", "sparse"],
                             "linear_num_heads": 4, "linear_head_dim": 16},
             "lfm2_moe": {"num_dense_layers": 1, "layer_types": ["conv", "full_attention"]},
             # Gemma 3n's text model: no layers sharing another's cache (it has two), an attention-only pattern
             "gemma3n_text": {"num_kv_shared_layers": 0, "layer_types": ["sliding_attention", "full_attention"],
                              "laurel_rank": 8, "hidden_size_per_layer_input": 16, "intermediate_size": [128, 128],
                              "activation_sparsity_pattern": [0.0, 0.0]},
             # Zamba 2's generation with a cache fails in transformers on its tiny config: the cache off
             "zamba2": {"layers_block_type": ["mamba", "hybrid"], "n_mamba_heads": 4, "mamba_d_state": 8,
                        "mamba_ngroups": 1, "num_mem_blocks": 1, "use_mamba_kernels": False, "use_cache": False}}


# the same for the other towers of composite configs (vision, audio): small enough to build, never quantized
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "depth": 1,
         "num_heads": 2, "embed_dim": 32, "num_key_value_heads": 2, "head_dim": 16, "out_hidden_size": 64,
         "vision_output_dim": 32, "projector_input_dim": 32, "projector_output_dim": 64,
         "num_global_layers": 1, "output_dim": 64}


def _known(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str, tokenizer):
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    known = _known(cls)
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    kw = {k: v for k, v in {**TINY, **ids}.items() if k in known} | OVERRIDES.get(model_type, {})
    if getattr(cls, "sub_configs", None):  # composite: a tiny text config, and tiny towers beside it
        default = cls()
        for name in cls.sub_configs:
            part = getattr(default, name, None)
            if part is None or name not in known:
                continue
            values = {**TINY, **ids} if name == "text_config" else TOWER
            part_kw = {k: v for k, v in values.items() if k in _known(type(part))}
            kw[name] = {"model_type": part.model_type, **_with_full_attention(type(part), part_kw)}
    return cls(**_with_full_attention(cls, kw))


def _with_full_attention(cls, kw: dict) -> dict:
    """Hybrid stacks (Qwen3-Next, Qwen3.5) cut to 2 layers may keep only linear-attention layers, which
    transformers' mask code refuses: the last layer made a full-attention one, as the real stacks end."""
    if "layer_types" not in _known(cls):
        return kw
    try:
        types = getattr(cls(**kw), "layer_types", None)
    except Exception:  # noqa: BLE001 - the config itself is judged when it is built
        return kw
    if not (isinstance(types, list) and types and "full_attention" not in types):
        return kw
    fixed = {**kw, "layer_types": [*types[:-1], "full_attention"]}
    try:  # a config whose layer_types is derived (Falcon-H1's property) takes no such argument
        cls(**fixed)
    except Exception:  # noqa: BLE001
        return kw
    return fixed


def child(model_type: str, work: Path) -> dict:
    """Build, save, compress through the CLI, load both ways, generate: one family in this process."""
    import torch
    import transformers

    from vptq.source import load_tokenizer, resolve

    tok = load_tokenizer(resolve("smollm2"))
    src, out, home = work / "src", work / "q", work / "home"
    try:
        torch.manual_seed(0)
        cfg = tiny_config(model_type, tok)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # the tiny config must make a working model before vptq is asked anything: a forward,
            model(input_ids=torch.zeros(4, 16, dtype=torch.long))  # and (as checked after compress) generation
            model.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2, do_sample=False,
                           pad_token_id=tok.pad_token_id)
        model.save_pretrained(src)
        tok.save_pretrained(src)
        arch = type(model).__name__
    except Exception as e:  # noqa: BLE001 - the sweep's own tiny model could not be built
        return {"status": "not-built", "message": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    calib = work / "calib.txt"
    calib.write_text((REPO / "vptq" / "data" / "wikitext2-valid.txt").read_text()[:20_000])
    env = {**os.environ, "VPTQ_HOME": str(home), "PYTHONWARNINGS": "ignore"}
    cmd = [str(Path(sys.executable).parent / "vptq"), "compress", str(src), "--bits", "2", "--json",
           "--out", str(out), "--calib", str(calib), *TINY_ARGS]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    err = p.stderr.strip().splitlines()
    last = err[-1][:300] if err else ""
    base = {"arch": arch}
    if "Traceback" in p.stderr:
        return {**base, "status": "crash", "exit": p.returncode, "message": last}
    if p.returncode == 2:
        ok = out.exists() is False and len([line for line in err if line.strip()]) == 1
        return {**base, "status": "refused" if ok else "crash", "exit": 2, "message": last}
    if p.returncode != 0:
        return {**base, "status": "crash", "exit": p.returncode, "message": last}
    try:
        summary = json.loads(p.stdout)
        import vptq

        ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(1))
        ours = vptq.from_pretrained(out)
        with torch.no_grad():
            a = ours(ids).logits
        vptq.patch_transformers(allow_cpu=True)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            b = hf(ids).logits
        if not torch.isfinite(a).all():
            return {**base, "status": "crash", "exit": 0, "message": "non-finite logits after loading"}
        if not torch.equal(a, b):
            return {**base, "status": "crash", "exit": 0,
                    "message": f"transformers' load differs from ours: max |diff| {(a - b).abs().max():.3g}"}
        from vptq.generate import generate_text

        g = generate_text(ours, tok, "The quick brown fox", max_new_tokens=4)
        return {**base, "status": "ok", "exit": 0, "generated": g.tokens,
                "bpw": summary.get("bpw"), "float_params": summary.get("float_params"),
                "quantized_layers": summary.get("layers")}
    except Exception as e:  # noqa: BLE001 - a load or generate failure is the finding
        return {**base, "status": "crash", "exit": 0,
                "message": f"after compress: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", default="")
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.work)))
        return
    types = [t for t in a.only.split(",") if t] or causal_lm_types()
    rows = []
    for t in types:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"sweep-{t}-") as d:
            try:
                p = subprocess.run([sys.executable, __file__, "--child", t, "--work", d], capture_output=True,
                                   text=True, timeout=a.timeout, cwd=REPO,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
                lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
                row = json.loads(lines[-1]) if lines else {
                    "status": "crash", "message": f"sweep child died (exit {p.returncode}): "
                                                  f"{(p.stderr.strip().splitlines() or [''])[-1][:300]}"}
            except subprocess.TimeoutExpired:
                row = {"status": "timeout", "message": f"past {a.timeout} s"}
        row = {"model_type": t, **row, "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("\n" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
