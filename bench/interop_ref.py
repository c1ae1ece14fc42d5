"""Interop oracle: our artifacts through the authors' reference `VQuantLinear` (PyPI vptq==0.0.5.post1).

Two halves, two venvs (both packages are imported as `vptq`), driven by `make interop-ref`:

  .venv/bin/python bench/interop_ref.py export --out out/interop [--artifact NAME=DIR ...]
      (our venv) writes a tiny random Llama quantized with our code (outliers + residual + perm
      + norm, and a grouped variant), plus any given artifact (e.g. a quantized SmolLM2), and
      for each the logits of `vptq.from_pretrained` on fixed token ids (logits.safetensors).
  .venv-ref/bin/python bench/interop_ref.py check --dir out/interop
      (reference venv) builds each model from its config.json the way the authors' loader does
      (`VQuantLinear(**entry, enable_proxy_error=False, dtype=<linear's dtype>)` for every layer
      of config_for_layers), loads the safetensors with strict keys, runs the same ids on CPU and
      compares logits with ours: prints one JSON line per artifact; exit 1 if any differs by
      more than --tol (max abs diff).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ off the path: a module there must never shadow a package transformers probes for (bench/
# held a kernels.py once, which shadowed Hugging Face's `kernels`)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _tiny(out: Path, name: str, seed: int, **cfg_kw) -> Path:
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    from vptq.config import QuantConfig
    from vptq.io import save_quantized
    from vptq.layers import VQuantLinear
    from vptq.quantizer import quantize_linear

    torch.manual_seed(seed)
    c = LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    tie_word_embeddings=True)
    model = LlamaForCausalLM(c).eval()
    cfg = QuantConfig(kmeans_iters=5, refine_iters=1, **cfg_kw)
    for lname, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        x = torch.randn(512, lin.in_features) @ torch.randn(lin.in_features, lin.in_features)
        q, _ = quantize_linear(lin.weight.data, x.t() @ x / 512, cfg)
        model.set_submodule(lname, VQuantLinear.from_weights(q))
    return save_quantized(model, out / name, overwrite=True)


def export(args) -> None:
    import torch
    from safetensors.torch import save_file

    import vptq

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arts = {
        "tiny-res-outlier": _tiny(out, "tiny-res-outlier", 0, vector_len=6, num_centroids=64, num_res_centroids=16,
                                  outlier_percent=5.0, outlier_vector_len=2, outlier_centroids=32),
        "tiny-groups": _tiny(out, "tiny-groups", 1, vector_len=4, num_centroids=256, group_num=2),
        # one group, no outliers, act-order on: the permutation folded into the codes' column order
        # and not stored (vptq/quantizer.py), as in every preset
        "tiny-folded-perm": _tiny(out, "tiny-folded-perm", 2, vector_len=5, num_centroids=64, num_res_centroids=8),
    }
    for item in args.artifact:
        name, _, folder = item.partition("=")
        arts[name] = Path(folder)
    manifest = {}
    for name, folder in arts.items():
        model = vptq.from_pretrained(folder, device="cpu")
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(ids).logits.float()
        save_file({"ids": ids, "logits": logits.contiguous()}, out / f"{name}.logits.safetensors")
        manifest[name] = str(Path(folder).resolve())
        print(f"exported {name}: {folder} logits {tuple(logits.shape)}", file=sys.stderr)
    (out / "artifacts.json").write_text(json.dumps(manifest, indent=2))


def _stub_sentence_transformers() -> None:
    """vptq 0.0.5.post1's vptq/utils/pack.py imports SentenceTransformer and never uses it."""
    st = types.ModuleType("sentence_transformers")
    sub = types.ModuleType("sentence_transformers.SentenceTransformer")
    sub.SentenceTransformer = type("SentenceTransformer", (), {})
    st.SentenceTransformer = sub
    sys.modules.setdefault("sentence_transformers", st)
    sys.modules.setdefault("sentence_transformers.SentenceTransformer", sub)


def _reference_model(folder: Path):
    """The authors' make_quant_linear, verbatim in effect: every config_for_layers entry as **kwargs."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from vptq import VQuantLinear  # the reference class (this runs in .venv-ref)

    raw = json.loads((folder / "config.json").read_text())
    qc = raw["quantization_config"]
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, entry in qc["config_for_layers"].items():
        old = model.get_submodule(name)
        model.set_submodule(name, VQuantLinear(**entry, enable_proxy_error=False, dtype=old.weight.dtype))
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    if config.tie_word_embeddings and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True)  # raises on any missing or unexpected key
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def check(args) -> int:
    import importlib.metadata

    import torch
    from safetensors.torch import load_file

    _stub_sentence_transformers()
    import vptq

    version = importlib.metadata.version("vptq")
    where = Path(vptq.__file__).resolve()
    if "site-packages" not in where.parts:
        raise SystemExit(f"check must run with the reference vptq, not ours ({where}): use .venv-ref")
    out = Path(args.dir)
    manifest = json.loads((out / "artifacts.json").read_text())
    worst = 0.0
    for name, folder in manifest.items():
        ours = load_file(out / f"{name}.logits.safetensors")
        model = _reference_model(Path(folder))
        with torch.no_grad():
            ref = model(ours["ids"]).logits.float()
        diff = float((ref - ours["logits"]).abs().max())
        scale = float(ours["logits"].abs().max())
        worst = max(worst, diff)
        print(json.dumps({"artifact": name, "reference": f"vptq=={version}", "layers":
                          len(json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
                              ["config_for_layers"]),
                          "logits_shape": list(ref.shape), "max_abs_diff": diff, "max_abs_logit": scale,
                          "argmax_equal": bool(torch.equal(ref.argmax(-1), ours["logits"].argmax(-1))),
                          "date": datetime.date.today().isoformat()}))
    ok = worst <= args.tol
    print(f"interop-ref: {'OK' if ok else 'MISMATCH'}: max abs logit diff {worst:.3g} (tol {args.tol})",
          file=sys.stderr)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--out", required=True)
    e.add_argument("--artifact", action="append", default=[], help="NAME=DIR of another quantized folder")
    c = sub.add_parser("check")
    c.add_argument("--dir", required=True)
    c.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args()
    if args.cmd == "export":
        export(args)
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
