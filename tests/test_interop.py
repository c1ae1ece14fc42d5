"""Interop with transformers' VPTQ integration (issue 9, docs/transformers-vptq.md).

The model built the way `replace_with_vptq_linear` means to (our VQuantLinear, constructed with
exactly the keywords transformers passes, for every layer of config_for_layers; strict keys)
gives vptq.from_pretrained's logits; the upstream function fails on nested names; with
vptq.patch_transformers(), `AutoModelForCausalLM.from_pretrained(folder)` loads our folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import vptq

from .test_format import quantized_tiny_llama


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from vptq.io import save_quantized

    return save_quantized(quantized_tiny_llama(seed=3), tmp_path_factory.mktemp("interop") / "q")


def _ids():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))


def test_model_built_like_replace_with_vptq_linear_matches_from_pretrained(folder):
    from transformers import AutoConfig, AutoModelForCausalLM

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config)
    for name, p in qc["config_for_layers"].items():
        lin = model.get_submodule(name)
        with torch.device("meta"):  # as transformers does, then materialized by the load
            new = vptq.VQuantLinear(
                lin.in_features, lin.out_features, vector_lens=p["vector_lens"], num_centroids=p["num_centroids"],
                num_res_centroids=p["num_res_centroids"], group_num=p["group_num"], group_size=p["group_size"],
                outlier_size=p["outlier_size"], indices_as_float=p["indices_as_float"],
                enable_norm=p["enable_norm"], enable_perm=p["enable_perm"], is_indice_packed=True,
                enable_proxy_error=False, bias=lin.bias is not None)
        model.set_submodule(name, new)
    sd = load_file(folder / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    model.eval()
    assert sum(isinstance(m, vptq.VQuantLinear) for m in model.modules()) == len(qc["config_for_layers"]) == 14
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, vptq.from_pretrained(folder)(_ids()).logits)


def test_upstream_replace_with_vptq_linear_fails_on_nested_names(folder):
    import transformers.integrations.vptq as upstream
    from transformers import AutoConfig, AutoModelForCausalLM, VptqConfig

    from vptq.hf_compat import ORIGINAL
    upstream_fn = ORIGINAL.get("replace_with_vptq_linear", upstream.replace_with_vptq_linear)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    with pytest.raises(KeyError, match="model.layers.0.self_attn.q_proj"):
        upstream_fn(model, ["lm_head"], VptqConfig(config_for_layers=qc["config_for_layers"]))


def test_patched_transformers_from_pretrained_loads_our_folder_on_cpu(folder):
    from transformers import AutoModelForCausalLM

    vptq.patch_transformers(allow_cpu=True)
    vptq.patch_transformers(allow_cpu=True)  # idempotent
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert sum(isinstance(m, vptq.VQuantLinear) for m in model.modules()) == 14
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, vptq.from_pretrained(folder)(_ids()).logits)


REF_PY = __import__("pathlib").Path(__file__).resolve().parents[1] / ".venv-ref" / "bin" / "python"


@pytest.mark.skipif(not REF_PY.exists(), reason="no .venv-ref: run `make interop-ref` once to build it")
def test_reference_vqlinear_reads_our_artifacts(tmp_path):
    """The authors' vptq 0.0.5.post1 (its own venv) gives our logits exactly (bench/interop_ref.py)."""
    import subprocess
    import sys

    root = REF_PY.parents[2]
    subprocess.run([sys.executable, "bench/interop_ref.py", "export", "--out", str(tmp_path)], cwd=root,
                   check=True, capture_output=True, timeout=300)
    r = subprocess.run([str(REF_PY), "bench/interop_ref.py", "check", "--dir", str(tmp_path), "--tol", "0"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3 and all(row["max_abs_diff"] == 0.0 for row in rows)


def test_no_installed_distribution_shadows_our_top_level_packages():
    """Any other distribution providing one of our import names (`vptq`, `vptq_service`) would clash
    with ours, so the environment must not hold one. (Hugging Face's `kernels`, which transformers
    imports when installed, no longer clashes: our kernels are `vptq.kernels`.)"""
    import importlib.metadata as md

    ours = ("vptq", "vptq_service")
    mapping = md.packages_distributions()
    clashes = {name: sorted(set(mapping.get(name, [])) - {"vptq-service", "vptq_service"}) for name in ours}
    assert not any(clashes.values()), f"distributions providing our import names: {clashes}"
