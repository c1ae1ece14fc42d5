"""Random VQuantLinear layers in the stored format, for the kernel tests (GPU, simulator and CPU), and
a tiny model folder with every linear quantized on random Hessians.

Imports torch and vptq only: tests/test_kernels.py runs on the GPU machine with --noconftest.
"""

from __future__ import annotations

import torch

from vptq.config import LayerLayout
from vptq.layers import VQuantLinear
from vptq.quantizer import VQWeights


def random_layer(m=67, n=77, v=5, k=1024, kr=0, o=5, v0=2, k0=8, g=2, perm=True, norm=True, bias=True, seed=0):
    """A random VQuantLinear in the stored format (M not a multiple of v; N = o + g * group_size)."""
    gen = torch.Generator().manual_seed(seed)
    gs = (n - o) // g
    assert o + g * gs == n
    r = -(-m // v)
    q = VQWeights(layout=LayerLayout(m, n, o, g, gs), vector_len=v,
                  centroids=torch.randn(g, k, v, generator=gen).half(),
                  indices=torch.randint(0, k, (g, r, gs), generator=gen))
    if kr:
        q.res_centroids = (0.1 * torch.randn(g, kr, v, generator=gen)).half()
        q.res_indices = torch.randint(0, kr, (g, r, gs), generator=gen)
    if o:
        q.outlier_vector_len = v0
        q.outlier_centroids = torch.randn(1, k0, v0, generator=gen).half()
        q.outlier_indices = torch.randint(0, k0, (1, -(-m // v0), o), generator=gen)
    if perm:
        q.perm = torch.randperm(n, generator=gen)
    if norm:
        q.weight_scale = (torch.rand(n, generator=gen) + 0.5).half()
        q.weight_bias = (0.1 * torch.randn(n, generator=gen)).half()
    return VQuantLinear.from_weights(q, torch.randn(m, generator=gen).half() if bias else None)


def quantized_folder(model_dir, cfg, tokenizer, out):
    """model_dir's linears (not the head) quantized with cfg on random Hessians (seed 0), saved to out."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    from vptq.io import save_quantized
    from vptq.quantizer import quantize_linear

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        x = torch.randn(256, lin.in_features)
        q, _ = quantize_linear(lin.weight.data, x.t() @ x / 256, cfg)
        model.set_submodule(name, VQuantLinear.from_weights(q))
    return save_quantized(model, out, tokenizer)
