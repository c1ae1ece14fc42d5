"""VPTQ_GGUF_CACHE: a GGUF source loaded once is cached as a Hugging Face folder that loads the same
weights, config and tokenizer (chat template included) without parsing the file; off by default; a
replaced file gets a new entry; a cache that cannot be written never fails a load."""

import os
from pathlib import Path

import pytest
import torch

from vptq import gguf_cache
from vptq.source import ModelSource, cached, load_model, load_skeleton, load_tokenizer, resolve


def test_a_cached_gguf_loads_the_same_model_and_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    src = resolve("smollm2")
    assert cached(src) is src  # nothing cached yet
    direct, tok = load_model(src)  # from the file; written to the cache as it goes
    hit = cached(src)
    assert hit.kind == "hf" and hit.gguf_file is None and hit.path.parent == tmp_path / "cache"
    import gguf

    def no_parse(*a, **k):
        raise AssertionError("the cached folder must load without reading the GGUF file")

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFReader, "__init__", no_parse)
        again, tok2 = load_model(src)
        assert load_tokenizer(src).chat_template == tok.chat_template
        assert type(load_skeleton(src)) is type(direct)
    a, b = direct.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[1, 2, 3, 40, 500]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, again(ids).logits)
    text = "The history of the transistor begins in 1947 at Bell Labs. def f(x): return x ** 2\n"
    assert tok(text)["input_ids"] == tok2(text)["input_ids"]
    assert tok.chat_template and tok2.chat_template == tok.chat_template
    assert (tok2.eos_token, tok2.bos_token, tok2.pad_token) == (tok.eos_token, tok.bos_token, tok.pad_token)
    # another dtype is cast from the cached fp32 values, as from the file's dequantized ones
    half, _ = load_model(src, dtype=torch.bfloat16)
    assert torch.equal(half.state_dict()["lm_head.weight"], a["lm_head.weight"].bfloat16())


def test_off_by_default_and_a_replaced_file_is_a_new_entry(tmp_path, monkeypatch):
    monkeypatch.delenv(gguf_cache.ENV, raising=False)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    assert gguf_cache.lookup(gguf) is None and gguf_cache.store(gguf, None, None) is None
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    first = gguf_cache._entry(gguf)
    os.utime(gguf, ns=(1, 1))
    assert gguf_cache._entry(gguf) != first


def test_an_unwritable_cache_warns_and_the_load_goes_on(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(gguf_cache.ENV, str(blocker / "cache"))

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    with pytest.warns(UserWarning, match="could not cache m.gguf"):
        assert gguf_cache.store(gguf, None, None) is None  # fails at its folder
    assert cached(ModelSource("gguf", tmp_path, "m.gguf")).gguf_file == "m.gguf"


def test_a_gguf_model_is_a_plain_float_model(tmp_path):
    """transformers marks a model loaded from a GGUF "quantized" (its gguf quantizer) although the weights are
    dequantized floats: `.half()` then refused (`vptq serve --device cuda` on a GGUF failed on an H200) and
    every folder saved from it carried a gguf quantization_config, reloaded "quantized" again."""
    for source in ("first load", "cache hit"):  # the session's VPTQ_GGUF_CACHE: the second load is a hit
        model, _ = load_model(resolve("smollm2"))
        assert not getattr(model, "is_quantized", False), source
        assert getattr(model.config, "quantization_config", None) is None, source
        assert model.half().dtype == torch.float16, source
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()


def test_an_unsupported_transformers_is_refused_in_one_line(monkeypatch):
    """transformers 5.17 (the GPU image's) built a different Gemma-3 tokenizer from its GGUF (perplexity 196
    against 46) and lacks the `cache` output the server uses: loading under it must stop with what to install,
    not score garbage or fail mid-request. The floor is pyproject's, kept in one place."""
    import tomllib

    import transformers

    from vptq import source
    from vptq.errors import DependencyError

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("transformers"))
    assert pin == f"transformers>={'.'.join(map(str, source.TRANSFORMERS_MIN))},<6"
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    for load in (source.load_model, source.load_tokenizer, source.load_skeleton):
        with pytest.raises(DependencyError, match=r"transformers 5\.17\.0 .*needs transformers>=5\.24,<6"):
            load(resolve("smollm2"))
    monkeypatch.setattr(transformers, "__version__", "5.24.0.dev0")
    source.check_transformers()  # a newer pre-release is fine


def test_loading_a_model_never_fetches_hub_kernels(monkeypatch, tmp_path):
    """Defect found on the GPU (2026-12-06, bench/results/gpu_20261206b_h100/gemma_failed_hub_kernels): with the
    `kernels` package installed (transformers pulls it in), transformers 5.25 on CUDA fetched Gemma-3's rotary
    kernel from the hub and, offline, every run died at its trust check. A run must not download code; a user
    who wants hub kernels says so with USE_HUB_KERNELS=YES, which is kept."""
    from transformers.integrations import hub_kernels

    from vptq import source
    from vptq.io import CheckpointError, load_quantized

    for load in (source.load_tokenizer, source.load_skeleton):
        monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
        load(resolve("smollm2"))
        assert not hub_kernels._kernels_enabled()
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    with pytest.raises(CheckpointError):  # vptq.from_pretrained's path sets it before reading anything
        load_quantized(tmp_path)
    assert not hub_kernels._kernels_enabled()
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    source.load_skeleton(resolve("smollm2"))
    assert hub_kernels._kernels_enabled()
