"""Config + tokenizer folders of SmolLM2-135M's width and depth in other attention layouts, for the serving benches
(bench/serve_load.py --config DIR, bench/serve_graph_check.py --config DIR, bench/gpu_session.sh SERVE_CONFIG=DIR):
random weights are made from them there. SmolLM2's tokenizer (from its GGUF) is saved beside each config.

    python bench/serve_shapes.py mistral_sw|gemma3_sw|llama4_chunked OUT_DIR

- mistral_sw: a Mistral with a 16-token sliding window on every layer;
- gemma3_sw: a Gemma 3 text model, 16-token window, 5 sliding layers to 1 full (Gemma 3's pattern);
- llama4_chunked: a Llama 4 text model, 16-token attention chunks (3 chunked layers to 1 full, Llama 4's
  interleave), 2 experts (top-1) every other block.
All: 30 blocks, hidden 576, 9 heads / 3 key-value heads of 64, vocabulary 49,152, tied embeddings.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
             head_dim=64, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=None,
             rms_norm_eps=1e-5, tie_word_embeddings=True)


def config(kind: str):
    import transformers

    n = SHAPE["num_hidden_layers"]
    if kind == "mistral_sw":
        return transformers.MistralConfig(intermediate_size=1536, sliding_window=16, **SHAPE)
    if kind == "gemma3_sw":
        return transformers.Gemma3TextConfig(
            intermediate_size=1536, sliding_window=16,
            layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)], **SHAPE)
    if kind == "llama4_chunked":
        return transformers.Llama4TextConfig(
            intermediate_size=768, intermediate_size_mlp=1536, num_local_experts=2, num_experts_per_tok=1,
            interleave_moe_layer_step=2, attention_chunk_size=16, **SHAPE)
    raise SystemExit(f"unknown shape {kind!r}: use mistral_sw, gemma3_sw or llama4_chunked")


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.split("\n\n")[1])
    from vptq.source import load_tokenizer, resolve

    out = Path(sys.argv[2])
    cfg = config(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    load_tokenizer(resolve("smollm2")).save_pretrained(out)
    print(f"{out}: {cfg.model_type}, layer types {sorted(set(getattr(cfg, 'layer_types', None) or ['full_attention']))}")


if __name__ == "__main__":
    main()
