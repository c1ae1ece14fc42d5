"""compress -> save -> load -> eval on a tiny random Llama, and on the real SmolLM2 (reduced)."""

import json
import time
from types import SimpleNamespace

import pytest
import torch

from vptq.config import QuantConfig
from vptq.evaluate import tokenize_text
from vptq.io import load_quantized
from vptq.layers import VQuantLinear
from vptq.pipeline import compress, evaluate

TINY = QuantConfig(vector_len=4, num_centroids=64, kmeans_iters=10)


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir, text_file, tmp_path_factory):
    """The plain TINY run (4 x 64 tokens) of the tiny Llama, saved: three tests compare with it, so it
    is computed once. Read only: no test changes its model or its folder."""
    t0 = time.perf_counter()
    out = tmp_path_factory.mktemp("tiny-run") / "q"
    res, model, tok = compress(str(tiny_llama_dir), TINY, out, calib=text_file, nsamples=4, seqlen=64)
    return SimpleNamespace(res=res, model=model, out=out, seconds=time.perf_counter() - t0)


def test_tiny_llama_roundtrip_logits_equal(tiny_run, text_file):
    t0 = time.perf_counter()
    res, model, out = tiny_run.res, tiny_run.model, tiny_run.out
    assert res.summary()["layers"] == 14 and 2.0 < res.report.bpw < 4.0
    loaded = load_quantized(out)
    assert sum(isinstance(m, VQuantLinear) for m in loaded.modules()) == 14
    # q/k/v and gate/up of both blocks are marked to share a launch on CUDA (ignored on CPU)
    marked = [n for n, m in loaded.named_modules() if getattr(m, "_vq_shared", None) is not None]
    assert len(marked) == 10 and all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
                                     for n in marked)
    assert "_vq_shared" not in str(list(loaded.state_dict()))
    ids = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "vptq"
    assert len(cfg["quantization_config"]["config_for_layers"]) == 14
    r = evaluate(str(out), text_file, windows=2, seqlen=64)
    assert r.tokens == 2 * 63 and r.perplexity > 1
    assert tiny_run.seconds + time.perf_counter() - t0 < 60  # the compress (in the fixture) and the rest


def test_original_hessian_mode_runs_and_differs(tiny_llama_dir, text_file, tiny_run):
    a = tiny_run.res
    b, _, _ = compress(str(tiny_llama_dir), TINY.with_(hessians="original"), None, calib=text_file, nsamples=4, seqlen=64)
    la = [r.proxy_loss for r in a.report.layers]
    lb = [r.proxy_loss for r in b.report.layers]
    assert la[:7] == lb[:7]  # block 0 sees the same inputs in both modes
    assert la[7:] != lb[7:]  # block 1 does not


def test_finetune_lowers_block_error(tiny_llama_dir, text_file):
    res, _, _ = compress(str(tiny_llama_dir), TINY.with_(finetune_steps=20, finetune_lr=1e-3), None,
                         calib=text_file, nsamples=8, seqlen=64)
    assert len(res.report.finetune) == 2
    for f in res.report.finetune:
        assert f["mse_after"] < f["mse_before"]


def test_end_to_end_finetune_lowers_kl_and_keeps_indices(tiny_llama_dir, text_file, tiny_run):
    cfg = TINY.with_(e2e_steps=20, e2e_lr=1e-3, e2e_batch=2)
    res, model, _ = compress(str(tiny_llama_dir), cfg, None, calib=text_file, nsamples=4, seqlen=64)
    e2e = res.report.e2e
    assert e2e["steps"] == 20 and e2e["kl_after"] < e2e["kl_before"]
    # indices are discrete and never trained: same codes as the run without fine-tuning
    ref_model = tiny_run.model
    for (n, a), (_, b) in zip(model.named_buffers(), ref_model.named_buffers(), strict=True):
        if n.endswith("indices"):
            assert torch.equal(a, b), n
    assert any(not torch.equal(a, b) for (n, a), (_, b) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True)
               if "centroids" in n)


def test_cached_teacher_matches_live_teacher(tiny_llama_dir, text_file, monkeypatch):
    """The teacher's log-probs cached once (fp16) train the same as a teacher run every step."""
    import vptq.finetune as ft

    cfg = TINY.with_(e2e_steps=6, e2e_lr=1e-3, e2e_batch=2)
    cached, _, _ = compress(str(tiny_llama_dir), cfg, None, calib=text_file, nsamples=4, seqlen=64)
    monkeypatch.setattr(ft, "TEACHER_CACHE_BYTES", 0)
    live, _, _ = compress(str(tiny_llama_dir), cfg, None, calib=text_file, nsamples=4, seqlen=64)
    a, b = cached.report.e2e, live.report.e2e
    assert a["kl_before"] == pytest.approx(b["kl_before"], rel=1e-2)
    assert a["kl_after"] == pytest.approx(b["kl_after"], rel=5e-2)


def test_tokenized_text_is_reused_only_for_the_same_tokenizer_and_text(tiny_llama_dir, text_file):
    """tokenize_text keeps recent ids: a repeat gives the ids of a fresh tokenization without
    running the tokenizer; another text or a tokenizer with another vocabulary runs it again."""
    from vptq.source import load_tokenizer, resolve

    class Counting:
        def __init__(self, tok):
            self.tok, self.calls, self.backend_tokenizer = tok, 0, tok.backend_tokenizer

        def __call__(self, *a, **kw):
            self.calls += 1
            return self.tok(*a, **kw)

    text = text_file.read_text()[:30000] + "\nzyzzyva quokkas\n"  # a text no other test tokenizes
    tok = Counting(load_tokenizer(resolve(str(tiny_llama_dir))))
    fresh = tok.tok(text, return_tensors="pt").input_ids
    first = tokenize_text(tok, text)
    first[0, :10] = -1  # the caller owns its ids: the kept copy is untouched
    again = tokenize_text(tok, text)
    assert tok.calls == 1 and torch.equal(again, fresh)
    assert tokenize_text(tok, text + " more").shape[1] > fresh.shape[1] and tok.calls == 2

    other = load_tokenizer(resolve(str(tiny_llama_dir)))
    other.add_tokens(["zyzzyva"])  # the same folder's tokenizer, one more word in its vocabulary
    other = Counting(other)
    ids = tokenize_text(other, text)
    assert other.calls == 1 and torch.equal(ids, other.tok(text, return_tensors="pt").input_ids)
    assert not torch.equal(ids, fresh)

    plain = load_tokenizer(resolve(str(tiny_llama_dir)))
    special = "hello <|endoftext|> world"
    joined = tokenize_text(plain, special)
    plain.split_special_tokens = True  # a switch outside the tokenizer's JSON: the token read as text
    split = tokenize_text(plain, special)
    assert torch.equal(split, plain(special, return_tensors="pt").input_ids) and split.shape[1] > joined.shape[1]


def test_tokenizer_is_built_once_per_version_of_its_files_and_handed_out_as_copies(tmp_path, monkeypatch):
    """Building a tokenizer takes seconds: one build per source and version of its files (size,
    mtime; weights do not count), each caller gets its own copy."""
    import os

    import transformers

    from vptq import source
    from vptq.source import load_tokenizer, resolve

    builds = []

    def build(path, gguf_file=None, **kw):
        builds.append(gguf_file or path.name)
        return {"vocab": ["a", "b"], "build": len(builds)}

    def touch(f):
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", build)
    monkeypatch.setattr(source, "_TOKENIZERS", {})  # this test's own; the other tests' stay kept
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    a, b = load_tokenizer(resolve(str(f))), load_tokenizer(resolve(str(f)))
    assert builds == ["m.gguf"] and a == b and a is not b and a["vocab"] is not b["vocab"]
    a["vocab"].append("c")
    assert load_tokenizer(resolve(str(f)))["vocab"] == ["a", "b"]
    touch(f)  # the file replaced: built again, once
    assert load_tokenizer(resolve(str(f)))["build"] == 2 and load_tokenizer(resolve(str(f)))["build"] == 2

    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (hf / name).write_text("{}")
    load_tokenizer(resolve(str(hf)))
    touch(hf / "model.safetensors")  # new weights, same tokenizer files: nothing to rebuild
    load_tokenizer(resolve(str(hf)))
    assert builds == ["m.gguf", "m.gguf", "hf"]
    touch(hf / "tokenizer.json")
    (hf / "special_tokens_map.json").write_text("{}")
    assert load_tokenizer(resolve(str(hf)))["build"] == 4

    for i in range(3):  # three more sources: five in all, the oldest kept one (m.gguf) is let go
        (tmp_path / f"m{i}.gguf").write_bytes(b"GGUF")
        load_tokenizer(resolve(str(tmp_path / f"m{i}.gguf")))
    assert load_tokenizer(resolve(str(hf)))["build"] == 4 and len(builds) == 7
    assert load_tokenizer(resolve(str(f)))["build"] == 8
