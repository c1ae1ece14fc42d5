"""Probe (issue 27 part 4, a one-shot lever): SmolLM2 with its residual stream rotated by a Haar-random orthogonal R
(QuaRot/SpinQuant's R1, fused into the weights so the result is an ordinary Llama checkpoint with the same function):
RMSNorm gains folded into the linears that read the stream, embeddings E R, readers (q, k, v, gate, up) W diag(g) R,
writers (o, down) R^T W, the head untied, W diag(g_final) R. Then quantize it as any model:

    python bench/rotate_probe.py OUT_DIR [SEED]
    python bench/quality.py --split --ood --seed 0 --only preset2-oneshot --model OUT_DIR --tag smollm2-135m-rot0

Prints the largest logit difference against the original model on a short text (the function is kept)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def rotate(model, seed: int) -> None:
    m = model.model
    d = model.config.hidden_size
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    rot = q * torch.sign(torch.diag(r))  # Haar-random orthogonal
    with torch.no_grad():
        head = model.lm_head.weight.detach().clone()
        model.lm_head.weight = torch.nn.Parameter(head * m.norm.weight[None, :] @ rot)  # untied from the embeddings
        m.norm.weight.fill_(1.0)
        m.embed_tokens.weight.copy_(m.embed_tokens.weight @ rot)
        for blk in m.layers:
            a, f = blk.self_attn, blk.mlp
            for lin, ln in ((a.q_proj, blk.input_layernorm), (a.k_proj, blk.input_layernorm),
                            (a.v_proj, blk.input_layernorm), (f.gate_proj, blk.post_attention_layernorm),
                            (f.up_proj, blk.post_attention_layernorm)):
                lin.weight.copy_(lin.weight * ln.weight[None, :] @ rot)
            blk.input_layernorm.weight.fill_(1.0)
            blk.post_attention_layernorm.weight.fill_(1.0)
            for lin in (a.o_proj, f.down_proj):
                assert lin.bias is None
                lin.weight.copy_(rot.T @ lin.weight)
    model.config.tie_word_embeddings = False


def main() -> None:
    from vptq.source import load_model, resolve

    out, seed = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0
    ref, tok = load_model(resolve("smollm2"))
    model = copy.deepcopy(ref).double()  # the GGUF parsed once
    rotate(model, seed)
    model = model.float()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    print(f"max |logit difference| {float((a - b).abs().max()):.3g} of {float(a.abs().max()):.3g}")


if __name__ == "__main__":
    main()
