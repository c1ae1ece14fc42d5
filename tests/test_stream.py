"""Layer streaming (vptq/stream.py): blocks read from safetensors shards one at a time, equal to a
whole-model load; a job on a streamed model writes the bytes of a job on the whole model."""

from __future__ import annotations

import json

import torch

from tests.test_flow import TINY, checkpoint_bytes, run
from vptq.stream import open_streamed


def whole(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_streamed_blocks_equal_the_whole_model_across_shards(tiny_llama_dir, tmp_path):
    ref = whole(tiny_llama_dir)
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="100KB")  # many shards, blocks split across them
    assert (sharded / "model.safetensors.index.json").is_file()
    for folder in (tiny_llama_dir, sharded):
        s = open_streamed(folder)
        assert s is not None
        assert all(p.is_meta for p in s.model.model.layers.parameters())  # blocks stay on disk
        assert not any(p.is_meta for n, p in s.model.named_parameters() if not n.startswith("model.layers."))
        for i in range(2):
            assert same_state(s.block(i), ref.model.layers[i])
        lin = s.linear(1, "mlp.down_proj")
        assert torch.equal(lin.weight, ref.model.layers[1].mlp.down_proj.weight)
        full = s.full()
        assert same_state(full, ref)
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.no_grad():
            assert torch.equal(full(ids).logits, ref(ids).logits)


def test_not_streamable_sources_are_loaded_whole(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert open_streamed(tmp_path) is None  # no safetensors weights


def test_the_plan_probes_the_streamed_model_and_a_whole_load_alike(tiny_llama_dir, tmp_path):
    """vptq plan reads what its probe runs through vptq.stream (block 0 only, as the job streams it); a
    source that does not stream (.bin weights) is loaded whole: both equal from_pretrained's values."""
    from vptq.plan import load_parts
    from vptq.source import resolve

    ref = whole(tiny_llama_dir)
    binf = tmp_path / "bin"
    binf.mkdir()
    for f in tiny_llama_dir.iterdir():  # config and tokenizer
        if f.suffix != ".safetensors":
            (binf / f.name).write_bytes(f.read_bytes())
    torch.save(ref.state_dict(), binf / "pytorch_model.bin")
    from vptq import driver

    ids = torch.randint(0, ref.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    for folder, streamed in ((tiny_llama_dir, True), (binf, False)):
        p = load_parts(resolve(str(folder)))
        assert p.full is not streamed and p.file_bytes > 0
        if streamed:  # the other blocks stay on disk
            assert all(t.is_meta for t in p.model.model.layers.parameters())
        assert same_state(p.block0, ref.model.layers[0])
        assert same_state(p.embed, ref.model.embed_tokens) and same_state(p.norm, ref.model.norm)
        assert torch.equal(p.head.weight, ref.lm_head.weight)
        # what the probe hands block 0: the inputs and kwargs the whole model's forward gives it
        assert torch.equal(driver.embed(p.model, ids), driver.embed(ref, ids))
        got, want = driver.block_kwargs(p.model, 5)[0], driver.block_kwargs(ref, 5)[0]
        assert got.keys() == want.keys()
        assert all(torch.equal(a, b) for a, b in zip(got["position_embeddings"], want["position_embeddings"],
                                                     strict=True))


def test_a_job_on_a_streamed_model_writes_the_bytes_of_a_whole_model_job(home, tiny_llama_dir, text_file,  # noqa: F811
                                                                         tmp_path, monkeypatch):
    from vptq_service.store.registry import Registry
    from vptq_service.tasks.workspace import load_fp_model

    outs = {}
    for stream in ("1", "0"):
        monkeypatch.setenv("VPTQ_STREAM", stream)
        monkeypatch.setenv("VPTQ_HOME", str(tmp_path / f"home-{stream}"))
        load_fp_model.cache_clear()
        code, out, err = run("submit", tiny_llama_dir, "--name", "tiny", "--calib", text_file, *TINY,
                             "--set", "e2e_steps=2")
        assert code == 0, err
        s = json.loads(out)
        assert s["status"] == "succeeded" and s["peak_host_rss_mb"] > 0
        Registry.open().pull(s["artifact"], tmp_path / f"out-{stream}")
        outs[stream] = checkpoint_bytes(tmp_path / f"out-{stream}")
        outs[stream].pop("vptq_report.json")  # holds the fine-tuning stage's timings
    load_fp_model.cache_clear()
    assert outs["1"] == outs["0"] and any(k.endswith(".safetensors") for k in outs["1"])
