"""Checkpoint format: packing, bit accounting against bytes on disk, save/load round trip."""

import json

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
