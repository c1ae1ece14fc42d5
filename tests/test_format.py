"""Checkpoint format: packing, bit accounting against bytes on disk, save/load round trip."""

import json
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from vptq.config import QuantConfig, layer_bits
from vptq.layers import VQuantLinear
from vptq.packing import from_int16, pack_indices, to_int16, unpack_indices
from vptq.quantizer import dequantize, quantize_linear

from .conftest import correlated_problem


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 32), lead=st.integers(1, 3), count=st.integers(1, 70), data=st.data())
def test_pack_unpack_identity(width, lead, count, data):
    vals = data.draw(st.lists(st.integers(0, 2**width - 1), min_size=lead * count, max_size=lead * count))
    codes = torch.tensor(vals, dtype=torch.int64).reshape(lead, count)
    packed = pack_indices(codes, width)
    assert packed.dtype == torch.int32 and packed.shape == (lead, -(-count * width // 32))
    assert torch.equal(unpack_indices(packed, width, count), codes)


def test_packing_bit_order_matches_the_spec():
    # codes 1, 2, 3 at 12 bits: stream bit i of code c at position 12c + i, LSB first
    packed = pack_indices(torch.tensor([[1, 2, 3]]), 12)
    word0 = 1 | (2 << 12) | ((3 & 0xFF) << 24)
    assert int(packed[0, 0]) & 0xFFFFFFFF == word0
    assert int(packed[0, 1]) == 3 >> 8


def test_int16_reinterpretation():
    x = torch.tensor([0, 1, 32767, 32768, 65535])
    assert torch.equal(from_int16(to_int16(x)), x)


@settings(max_examples=8, deadline=None)
@given(kw=st.sampled_from([
    dict(), dict(num_res_centroids=16), dict(group_num=3), dict(enable_perm=False, enable_norm=False),
    dict(outlier_percent=10.0, outlier_vector_len=2, outlier_centroids=16), dict(vector_len=5),
]))
def test_bit_accounting_equals_bytes_saved(kw, tmp_path_factory):
    w, h = correlated_problem(m=45, n=36, seed=4)
    cfg = QuantConfig(vector_len=4, num_centroids=32, kmeans_iters=5).with_(**kw)
    q, rep = quantize_linear(w, h, cfg)
    mod = VQuantLinear.from_weights(q)
    path = tmp_path_factory.mktemp("bits") / "l.safetensors"
    save_file({k: v.contiguous() for k, v in mod.state_dict().items()}, path)
    stored = sum(t.numel() * t.element_size() * 8 for t in load_file(path).values())
    assert stored == sum(layer_bits(cfg, 45, 36).values()) == rep.bits
    # and the module reproduces the quantizer's own dequantization exactly
    assert torch.equal(mod.dequantized_weight(), dequantize(q))


def test_layer_config_has_exactly_the_loader_keys():
    w, h = correlated_problem(m=16, n=16)
    q, _ = quantize_linear(w, h, QuantConfig(vector_len=4, num_centroids=16, kmeans_iters=3))
    entry = VQuantLinear.from_weights(q).layer_config()
    assert set(entry) == {"in_features", "out_features", "vector_lens", "num_centroids", "num_res_centroids",
                          "group_num", "group_size", "outlier_size", "enable_norm", "enable_perm",
                          "is_indice_packed", "indices_as_float", "bias"}
    assert entry["outlier_size"] + entry["group_num"] * entry["group_size"] == entry["in_features"]
    json.dumps(entry)
    # a config entry builds an identical empty module (what both VPTQ loaders do)
    mod = VQuantLinear(**entry)
    mod.load_state_dict(VQuantLinear.from_weights(q).state_dict())


# ------------------------------------------------------------------ checkpoint folders and the loader
import pytest  # noqa: E402
from torch import nn  # noqa: E402

import vptq  # noqa: E402
from vptq.io import CheckpointError, load_quantized, save_quantized  # noqa: E402

FOLDER_CFG = QuantConfig(vector_len=4, num_centroids=16, num_res_centroids=4, outlier_percent=10.0,
                         outlier_vector_len=2, outlier_centroids=16, kmeans_iters=3, refine_iters=0)


def quantized_tiny_llama(cfg: QuantConfig = FOLDER_CFG, seed: int = 0):
    """A 2-block random Llama whose 14 linears are VQuantLinear (outliers, residual, perm, norm)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    c = LlamaConfig(vocab_size=256, hidden_size=40, intermediate_size=80, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    tie_word_embeddings=True)
    model = LlamaForCausalLM(c).eval()
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        x = torch.randn(256, lin.in_features)
        q, _ = quantize_linear(lin.weight.data, x.t() @ x / 256, cfg)
        model.set_submodule(name, VQuantLinear.from_weights(q))
    return model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model = quantized_tiny_llama()
    out = save_quantized(model, tmp_path_factory.mktemp("ckpt") / "q")
    return model, out


def _copy(src, tmp_path):
    import shutil

    return Path(shutil.copytree(src, tmp_path / "copy"))


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder, fn):
    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, folder / "model.safetensors")


Q = "model.layers.1.mlp.down_proj"


def test_saved_folder_loads_with_equal_logits(tiny_checkpoint):
    model, out = tiny_checkpoint
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= files
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "vptq" and qc["shared_layer_config"] == {} and len(qc["config_for_layers"]) == 14
    loaded = vptq.from_pretrained(out, device="cpu")
    assert sum(isinstance(m, vptq.VQuantLinear) for m in loaded.modules()) == 14
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_sharded_checkpoint_loads(tmp_path):
    model = quantized_tiny_llama()
    out = save_quantized(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_quantized(out)(ids).logits)


def test_constructor_takes_the_published_keywords():
    kw = dict(vector_lens=[-1, 4], num_centroids=[-1, 16], num_res_centroids=[-1, -1], group_num=1,
              group_size=32, outlier_size=0, indices_as_float=False, enable_norm=True, enable_perm=True,
              is_indice_packed=True, enable_proxy_error=False, bias=False)
    mod = VQuantLinear(32, 8, **kw)  # exactly what transformers' replace_with_vptq_linear passes
    assert mod.indices.shape == (1, 2, 4) and mod.indices.dtype == torch.int32
    mod = VQuantLinear(32, 8, **kw | dict(vector_quant_dim="out", device="cpu", dtype=torch.bfloat16))
    assert mod.centroids.weight.dtype == torch.bfloat16
    with torch.device("meta"):
        assert VQuantLinear(32, 8, **kw).indices.is_meta
    for bad in (dict(enable_proxy_error=True), dict(is_indice_packed=False), dict(vector_quant_dim="in"),
                dict(num_centroids=[-1, 12])):
        with pytest.raises(ValueError):
            VQuantLinear(32, 8, **kw | bad)


def test_indices_as_float_reads_the_same_bits():
    w, h = correlated_problem(m=16, n=40)
    q, _ = quantize_linear(w, h, FOLDER_CFG)
    mod = VQuantLinear.from_weights(q)
    entry = mod.layer_config() | {"indices_as_float": True}
    sd = mod.state_dict()
    sd["outlier_indices"] = sd["outlier_indices"].view(torch.float16)  # bit-cast, as published
    flt = VQuantLinear(**entry)
    assert flt.outlier_indices.dtype == torch.float16
    flt.load_state_dict(sd)
    assert torch.equal(flt.dequantized_weight(), mod.dequantized_weight())


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("quantization_config"), "no quantization_config"),
    (lambda c: c["quantization_config"].update(quant_method="gptq"), "'gptq', not 'vptq'"),
    (lambda c: c["quantization_config"].update(config_for_layers={}), "names no quantized layer"),
    (lambda c: c["quantization_config"]["config_for_layers"][Q].update(num_centroids=[16, 32]),
     f"layer {Q}: tensor {Q}\\..* has shape"),
    (lambda c: c["quantization_config"]["config_for_layers"][Q].pop("group_size"), f"layer {Q}: .*lacks group_size"),
    (lambda c: c["quantization_config"]["config_for_layers"][Q].update(in_features=99), f"layer {Q}: .*in_features=99"),
    (lambda c: c["quantization_config"]["config_for_layers"].update({"model.layers.0.nope": {}}),
     "layer model.layers.0.nope: named in config_for_layers"),
])
def test_bad_quantization_config_is_refused_naming_the_layer(tiny_checkpoint, tmp_path, edit, match, monkeypatch):
    folder = _copy(tiny_checkpoint[1], tmp_path)
    _edit_config(folder, edit)
    used = []
    monkeypatch.setattr("vptq.io.load_file", lambda *a, **k: used.append(a))
    with pytest.raises(CheckpointError, match=match):
        load_quantized(folder)
    assert not used  # refused before any weight was read


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.update({f"{Q}.indices": sd[f"{Q}.indices"][:, :-1]}), f"layer {Q}: tensor {Q}.indices has shape"),
    (lambda sd: sd.update({f"{Q}.indices": sd[f"{Q}.indices"].to(torch.int64)}), f"layer {Q}: tensor {Q}.indices is torch.int64"),
    (lambda sd: sd.pop(f"{Q}.res_centroids.weight"), f"layer {Q}: tensor {Q}.res_centroids.weight is missing"),
    (lambda sd: sd.update({f"{Q}.extra": torch.zeros(1)}), f"layer {Q}: unexpected tensor {Q}.extra"),
    (lambda sd: sd.update({f"{Q}.outlier_indices": torch.full_like(sd[f"{Q}.outlier_indices"], 16)}),
     f"layer {Q}: outlier_indices reach 16, beyond the outlier codebook of 16"),
    (lambda sd: sd.update({f"{Q}.perm": torch.zeros_like(sd[f"{Q}.perm"])}), f"layer {Q}: perm is not a permutation"),
])
def test_tensors_inconsistent_with_the_config_are_refused(tiny_checkpoint, tmp_path, edit, match):
    folder = _copy(tiny_checkpoint[1], tmp_path)
    _edit_tensors(folder, edit)
    with pytest.raises(CheckpointError, match=match):
        load_quantized(folder)


def test_checkpoint_error_is_a_value_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no quantization_config"):
        vptq.from_pretrained(tmp_path)
