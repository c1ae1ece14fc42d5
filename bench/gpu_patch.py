"""transformers' own loader vs ours on CUDA (issue 9): a tiny random Llama, quantized and saved by
this package, loaded twice on the GPU and compared.

    python bench/gpu_patch.py [--out DIR]

For each quantized layout (one that takes the shared-memory-codebook gemv, one with outliers +
residual that takes the L2 gemv):
1. a random 2-block Llama (transformers LlamaConfig), every block linear quantized with
   vptq.quantizer.quantize_linear on a random proxy Hessian, saved with vptq.io.save_quantized;
2. `vptq.patch_transformers(); AutoModelForCausalLM.from_pretrained(folder, device_map="cuda")`
   against `vptq.from_pretrained(folder, device="cuda")`: logits of the same token ids (max |diff|),
   which gemv kernel each layer ran, greedy generate() with both (tokens, equal or not);
3. both against the CPU torch path (vptq.from_pretrained on CPU, fp32): max |diff| of the logits.

transformers only loads a VPTQ checkpoint when a distribution named `vptq` is installed; on a
machine where this repo is used from its source tree (the GPU box), the script registers the
repo's `vptq` package under that name (a dist-info folder in a temporary directory on sys.path)
before transformers is imported. Record: $OUT/gpu_patch.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def register_vptq_distribution() -> str:
    """Make importlib.metadata (hence transformers' is_vptq_available) see our package as `vptq`."""
    try:
        return f"installed {importlib.metadata.version('vptq')}"
    except importlib.metadata.PackageNotFoundError:
        pass
    d = Path(tempfile.mkdtemp(prefix="vptq-dist-"))
    info = d / "vptq-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vptq\nVersion: 0.1.0\n")
    (info / "top_level.txt").write_text("vptq\n")
    sys.path.append(str(d))
    importlib.invalidate_caches()
    return f"registered from source tree ({importlib.metadata.version('vptq')})"


REGISTERED = register_vptq_distribution()

import torch  # noqa: E402
from torch import nn  # noqa: E402

LAYOUTS = {
    "v6-k256 (shared-memory gemv)": dict(vector_len=6, num_centroids=256),
    "v4-k16 + res k4, 10% outliers v2-k16 (L2 gemv)": dict(vector_len=4, num_centroids=16, num_res_centroids=4,
                                                            outlier_percent=10.0, outlier_vector_len=2,
                                                            outlier_centroids=16),
}


def tiny_quantized_llama(layout: dict, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from vptq.config import QuantConfig
    from vptq.layers import VQuantLinear
    from vptq.quantizer import quantize_linear

    torch.manual_seed(seed)
    c = LlamaConfig(vocab_size=1000, hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=False)
    model = LlamaForCausalLM(c).eval()
    cfg = QuantConfig(kmeans_iters=5, refine_iters=0, **layout)
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        x = torch.randn(512, lin.in_features)
        q, _ = quantize_linear(lin.weight.data, x.t() @ x / 512, cfg)
        model.set_submodule(name, VQuantLinear.from_weights(q))
    model = model.half()
    model.config.dtype = torch.float16
    return model


def kernel_paths(model: nn.Module) -> dict:
    from vptq.layers import VQuantLinear

    paths: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, VQuantLinear):
            st = getattr(m, "_kernel_state", None)
            key = "torch (no kernel state)" if st is None else (st[2].path if st[2] is not None else "dequant only")
            paths[key] = paths.get(key, 0) + 1
    return paths


def compare(folder: Path, ids: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM

    import vptq

    vptq.patch_transformers()
    res: dict = {}
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map="cuda").eval()
        ours = vptq.from_pretrained(folder, device="cuda")
        ref = vptq.from_pretrained(folder, device="cpu").float()
        res["hf_class_of_q_proj"] = type(hf.model.layers[0].self_attn.q_proj).__name__
        res["dtypes"] = {"hf": str(next(hf.parameters()).dtype), "ours": str(next(ours.parameters()).dtype)}
        idc = ids.cuda()
        lh = hf(idc).logits.float()
        lo = ours(idc).logits.float()
        lr = ref(ids).logits.float()
        res["logits_shape"] = list(lh.shape)
        res["max_abs_diff_hf_vs_ours_cuda"] = float((lh - lo).abs().max())
        res["max_abs_diff_ours_cuda_vs_cpu_fp32"] = float((lo.cpu() - lr).abs().max())
        res["max_abs_diff_hf_cuda_vs_cpu_fp32"] = float((lh.cpu() - lr).abs().max())
        res["max_abs_logit"] = float(lr.abs().max())
        res["argmax_equal_hf_vs_ours"] = bool(torch.equal(lh.argmax(-1), lo.argmax(-1)))
        res["kernel_paths_hf"] = kernel_paths(hf)
        res["kernel_paths_ours"] = kernel_paths(ours)
        kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
        gen = {}
        for tag, mdl in (("hf", hf), ("ours", ours)):
            try:
                out = mdl.generate(idc[:1], attention_mask=torch.ones_like(idc[:1]), **kw)
                gen[tag] = out[0, idc.shape[1]:].tolist()
            except Exception as e:  # report, do not hide
                gen[tag] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        res["generate"] = gen
        res["generate_works"] = all(isinstance(g, list) and len(g) == 16 for g in gen.values())
        res["generate_equal"] = gen.get("hf") == gen.get("ours")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_patch.py needs CUDA")
    import transformers

    from vptq.io import save_quantized

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "transformers": transformers.__version__, "vptq_distribution": REGISTERED, "layouts": {}}
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, layout) in enumerate(LAYOUTS.items()):
            folder = save_quantized(tiny_quantized_llama(layout, seed=i), Path(tmp) / f"q{i}")
            try:
                r = compare(folder, ids)
            except Exception as e:  # report, do not hide
                import traceback

                r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            rec["layouts"][name] = r
            print(name, json.dumps(r), flush=True)
    (out / "gpu_patch.json").write_text(json.dumps(rec, indent=1))
    for name, r in rec["layouts"].items():
        if "error" in r:
            print(f"{name}: ERROR {r['error']}")
        else:
            print(f"{name}: max|logits hf - ours| = {r['max_abs_diff_hf_vs_ours_cuda']:.3g} (cuda), "
                  f"vs CPU fp32 {r['max_abs_diff_ours_cuda_vs_cpu_fp32']:.3g} (|logit| <= {r['max_abs_logit']:.3g}); "
                  f"generate works: {r['generate_works']}, same tokens: {r['generate_equal']}; "
                  f"kernels {r['kernel_paths_hf']}")


if __name__ == "__main__":
    main()
