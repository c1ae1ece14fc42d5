"""The architecture matrix (issue 24): every common decoder-only family of transformers, as tiny random
models built from transformers' own config classes (2 blocks, hidden 64, SmolLM2's tokenizer).

For each supported family: quantize in process (vptq.pipeline.compress: the generic block driver, targets
found not listed), save, load with vptq.from_pretrained and with transformers after
vptq.patch_transformers(); the loaded model's logits equal the in-memory quantized model's; every
nn.Linear of the blocks (fused Phi-3 projections included) is quantized; generation runs; the streamed
view of the folder (vptq/stream.py) equals a whole-model load, inputs and block kwargs included. MoE
families (Mixtral, Qwen2-MoE, Qwen3-MoE: experts as 3-D parameters; JetMoE's ParallelExperts beyond the matrix)
are quantized one linear per expert.
Two families also go through the CLI (`vptq compress DIR --bits 2 --json`); one whose block weights are
mostly not linear maps (DeepSeek-V4's grouped projections, made large here) is refused before any work, one line naming it, exit 2,
nothing at --out; so are those whose blocks cannot be run one at a time (CPM-Ant, ProphetNet, RWKV:
vptq/preflight.py). Small matrix weights outside linears (Mamba's A_log and convolution) stay floating point.

Budget: the whole file must stay under ~110 s on 2 cores (tiny k-means, 2 windows x 32 tokens).
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

import vptq
from vptq import driver
from vptq.as_linear import as_linears
from vptq.config import ConfigError, QuantConfig
from vptq.layers import VQuantLinear
from vptq.targets import is_router

CFG = QuantConfig(vector_len=4, num_centroids=16, kmeans_iters=2, refine_iters=0, block_size=64)
SEQLEN, WINDOWS = 32, 2
# family -> (config class, its own fields): what makes each family itself
SUPPORTED = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {"head_dim": 16}),  # q/k norms
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 16}),  # scaled embeddings, soft-capping
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 16,  # + per-layer-type rotary
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", {}),  # fused qkv_proj / gate_up_proj
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {"embedding_multiplier": 2.0}),
    "starcoder2": ("Starcoder2Config", {}),  # non-gated MLP with biases (c_fc / c_proj)
    # MoE: experts stored as 3-D parameters (transformers 5), quantized one linear per expert (vptq/experts.py)
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 32}),  # + shared expert and its gate
    # 8 experts, top-1, 64 calibration tokens: experts with < 16 tokens take the pooled Hessian (a warning)
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 8, "num_experts_per_tok": 1, "moe_intermediate_size": 32}),
    # a dense first block, then routed experts (stored per expert) beside a shared one; multi-head latent
    # attention (q_a/q_b, kv_a/kv_b projections)
    "deepseek_v3": ("DeepseekV3Config", {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                         "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1,
                                         "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 16,
                                         "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}),
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
SECONDS: dict[str, float] = {}


def build(family: str, tokenizer, folder):
    """A 2-block random model of `family`, saved to `folder` with the tokenizer; the model."""
    cls, own = SUPPORTED[family]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, **own})
    arch = cls.replace("TextConfig", "Config").replace("Config", "ForCausalLM")
    model = getattr(transformers, arch)(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def calib(tmp_path_factory, text_file):
    p = tmp_path_factory.mktemp("arch-text") / "calib.txt"
    p.write_text(text_file.read_text()[:20_000])
    return p


@pytest.fixture(scope="module", autouse=True)
def report_seconds():
    """The matrix's cost (wall and this process's CPU seconds; `pytest -s` shows it): CI's budget is ~90 s."""
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    print(f"\narchitecture matrix: {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU; "
          + ", ".join(f"{k} {v:.1f}" for k, v in SECONDS.items()))


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear (quantized or not) inside the decoder blocks, routers excepted, by full name."""
    path = driver.layers_path(model)
    return {n: m for n, m in model.named_modules()
            if n.startswith(path + ".") and isinstance(m, (nn.Linear, VQuantLinear)) and not is_router(n, m)}


def same(a, b) -> bool:
    if isinstance(a, driver.PerWindow):
        return isinstance(b, driver.PerWindow) and same(a.value, b.value)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("family", list(SUPPORTED))
def test_family_quantizes_whole_saves_loads_and_generates(family, smol_tokenizer, calib, tmp_path):
    import vptq
    from vptq.generate import generate_text
    from vptq.pipeline import compress
    from vptq.stream import open_streamed

    t0 = time.perf_counter()
    src = tmp_path / family
    fp = build(family, smol_tokenizer, src)
    ids = torch.randint(0, len(smol_tokenizer), (2, 24), generator=torch.Generator().manual_seed(1))

    # the streamed view (blocks on disk, here across shards) hands the blocks what the whole model's forward does
    sharded = tmp_path / "sharded"
    fp.save_pretrained(sharded, max_shard_size="200KB")
    s = open_streamed(sharded)
    if family in MOE:  # transformers saves experts as experts.N.w1/w2/w3 (or per-expert *_proj) and converts
        assert s is None  # them on load: such a checkpoint is loaded whole, never half-read
        s = SimpleNamespace(model=fp, block=lambda i: driver.decoder_layers(fp)[i])
    assert s is not None and (family in MOE or len(set(s.wmap.values())) > 2)
    assert torch.equal(driver.embed(s.model, ids), driver.embed(fp, ids))
    assert same(driver.block_kwargs(s.model, 24), driver.block_kwargs(fp, 24))
    assert same(s.block(1).state_dict(), driver.decoder_layers(fp)[1].state_dict())
    # the captured inputs chain through the blocks to the model's own last hidden states
    with torch.no_grad():
        h, kws = driver.embed(fp, ids), driver.block_kwargs(fp, 24)
        for i, b in enumerate(driver.decoder_layers(fp)):
            h = driver.run_block(b, h, kws[i])
        want = fp(ids, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(fp.model.norm(h), want, atol=1e-5)

    out = tmp_path / "q"
    # Qwen3-MoE also runs one end-to-end fine-tuning step over its per-expert linears (teacher experts fused)
    cfg = CFG.with_(e2e_steps=1) if family == "qwen3_moe" else CFG
    res, model, _ = compress(str(src), cfg, out, calib=calib, nsamples=WINDOWS, seqlen=SEQLEN)
    lins = block_linears(model)
    assert lins and all(isinstance(m, VQuantLinear) for m in lins.values()), \
        [n for n, m in lins.items() if not isinstance(m, VQuantLinear)]  # nothing silently left in fp
    rep = res.report
    assert len(rep.layers) == len(lins) and rep.weights == sum(m.in_features * m.out_features for m in lins.values())
    assert 0 < rep.bpw < 16 and rep.bpw < rep.bits_per_param < 32  # the embeddings stay fp32
    if family in MOE:  # every expert's matrices quantized; routers (and Qwen2-MoE's shared-expert gate) stay fp
        experts = [n for n in lins if ".mlp.experts." in n]
        n_exp = {"mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts"}.get(family, "num_experts")
        moe_blocks = 1 if family == "deepseek_v3" else 2  # its first block is dense
        assert len(experts) == moe_blocks * 2 * getattr(fp.config, n_exp) and not any(isinstance(m, VQuantLinear)
                                                         for n, m in model.named_modules() if is_router(n, m))
        few = [w for w in rep.warnings if "Hessian pooled over" in w]
        assert all(".mlp.experts." in w for w in few) and (few or family != "qwen3_moe")
        assert family != "qwen3_moe" or rep.e2e["steps"] == 1
    summary = res.summary()
    assert summary["bits_per_param"] == round(rep.bits_per_param, 4) and summary["float_params"] > 0

    loaded = vptq.from_pretrained(out)
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(loaded(ids).logits, want)
    vptq.patch_transformers(allow_cpu=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, want)
    g = generate_text(loaded, smol_tokenizer, "The quick brown fox", max_new_tokens=4)
    assert g.tokens == 4 or g.tokens > 0
    SECONDS[family] = time.perf_counter() - t0


def test_a_moe_expert_without_tokens_gets_the_pooled_hessian_and_a_warning():
    from vptq.experts import MIN_EXPERT_TOKENS, with_pooled_fallback

    names = [f"mlp.experts.down_proj.{i}" for i in range(3)]
    hs = {names[0]: torch.eye(4), names[1]: 3 * torch.eye(4)}
    out, warn = with_pooled_fallback(hs, {names[0]: 100, names[1]: 300}, names)
    assert torch.allclose(out[names[2]], 2.5 * torch.eye(4)) and torch.equal(out[names[1]], hs[names[1]])
    assert list(warn) == [names[2]] and f"< {MIN_EXPERT_TOKENS}" in warn[names[2]]
    with pytest.raises(ValueError, match=r"mlp.experts.down_proj.\*: no expert received any calibration token"):
        with_pooled_fallback({}, {}, names)


# ----------------------------------------------------------------------------- the command line

PLAN_TINY = ["--nsamples", str(WINDOWS), "--seqlen", str(SEQLEN), "--finetune-steps", "0",
             "--set", "vector_len=4", "--set", "num_centroids=16", "--set", "kmeans_iters=2", "--set", "refine_iters=0"]
CLI_TINY = [*PLAN_TINY, "--eval-windows", "0"]


def cli(*args) -> tuple[int, str, str]:
    from typer.testing import CliRunner
    from vptq_service.cli.main import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def jobs_left(home) -> list[str]:
    if not (home / "vptq.db").exists():
        return []
    from vptq_service.store.repository import Repository

    with Repository.session_scope() as repo:
        return [j.status for j in repo.list_jobs()]


@pytest.mark.parametrize("family", ["gemma3", "qwen3_moe"])
def test_compress_command_quantizes_every_linear_and_says_what_stays_fp(family, smol_tokenizer, calib, home,
                                                                          tmp_path):
    import vptq

    t0 = time.perf_counter()
    src, out = tmp_path / family, tmp_path / "q"
    fp = build(family, smol_tokenizer, src)
    code, stdout, err = cli("compress", src, "--bits", "2", "--json", "--out", out, "--calib", calib, *CLI_TINY)
    assert code == 0, err
    s = json.loads(stdout)
    as_linears(fp)  # MoE experts one linear each (Conv1D as nn.Linear), as they are quantized
    names = list(block_linears(fp))
    assert s["layers"] == len(names) and s["bits_per_param"] > s["bpw"] > 0
    floating = s["float_tensors"]
    assert s["float_params"] == sum(floating.values())
    assert not any(k.endswith("proj.weight") for k in floating), floating  # fused qkv_proj/gate_up_proj too
    assert "model.embed_tokens.weight" in floating and "model.layers.*.input_layernorm.weight" in floating
    loaded = vptq.from_pretrained(out)
    assert sorted(n for n, m in loaded.named_modules() if isinstance(m, VQuantLinear)) == sorted(names)
    vptq.patch_transformers(allow_cpu=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, len(smol_tokenizer), (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, loaded(ids).logits)
    code, stdout, err = cli("generate", out, "Once upon a time", "--max-new-tokens", "3", "--json")
    assert code == 0 and json.loads(stdout)["tokens"] > 0, err
    SECONDS[f"cli-{family}"] = time.perf_counter() - t0


def test_targets_narrow_and_a_pattern_matching_nothing_is_refused(smol_tokenizer, calib, home, tmp_path):
    src, out = tmp_path / "qwen2", tmp_path / "q"
    build("qwen2", smol_tokenizer, src)
    code, _, err = cli("compress", src, "--bits", "2", "--out", out, "--calib", calib, "--targets", "nothing.*",
                       *CLI_TINY)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "'nothing.*' matches no linear" in lines[0], err
    assert not out.exists() and jobs_left(home) == []  # refused before a job row exists
    code, stdout, err = cli("plan", src, "--bits", "2", "--json", "--calib", calib, "--targets", "self_attn.*",
                            "--targets", "mlp.down_proj", *PLAN_TINY)
    assert code == 0, err
    p = json.loads(stdout)
    assert p["linears"] == 2 * 5  # q, k, v, o, down of each block
    assert {"model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight",
            "model.layers.*.self_attn.q_proj.bias"} <= set(p["float_tensors"])
    assert p["float_params"] == sum(p["float_tensors"].values()) and p["bits_per_param"] > p["bpw"]


def test_per_layer_rules_give_layers_their_own_codebooks(smol_tokenizer, calib, home, tmp_path):
    """--layer: the matching linears get their own shapes (a later rule winning), the checkpoint's
    config_for_layers says so and loads, plan's exact bits are the job's; a bad rule is one line, exit 2."""
    src, out = tmp_path / "qwen2", tmp_path / "q"
    build("qwen2", smol_tokenizer, src)
    rules = ["--layer", "*.k_proj:num_res_centroids=4", "--layer", "1.*_proj:num_centroids=32",
             "--layer", "1.mlp.down_proj:num_centroids=8,vector_len=2"]
    code, stdout, err = cli("compress", src, "--bits", "2", "--json", "--out", out, "--calib", calib, *rules,
                            *CLI_TINY)
    assert code == 0, err
    job = json.loads(stdout)
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["config_for_layers"]
    shape = {n: (e["vector_lens"][1], e["num_centroids"][1], e["num_res_centroids"][1]) for n, e in layers.items()}
    assert shape["model.layers.0.self_attn.k_proj"] == (4, 16, 4)
    assert shape["model.layers.0.self_attn.q_proj"] == shape["model.layers.0.mlp.down_proj"] == (4, 16, -1)
    assert shape["model.layers.1.self_attn.k_proj"] == (4, 32, 4)  # both rules, the later one's k
    assert shape["model.layers.1.self_attn.q_proj"] == (4, 32, -1)
    assert shape["model.layers.1.mlp.down_proj"] == (2, 8, -1)
    loaded = vptq.from_pretrained(out)
    ids = torch.randint(0, len(smol_tokenizer), (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).logits).all()
    code, stdout, err = cli("plan", src, "--bits", "2", "--json", "--calib", calib, *rules, *PLAN_TINY)
    assert code == 0, err
    assert json.loads(stdout)["bpw"] == pytest.approx(job["bpw"], abs=1e-4)  # the same exact bit count
    for bad, says in [("*.k_proj:e2e_steps=3", "'e2e_steps' cannot be set per layer"),
                      ("*.k_proj:num_res_centroids=3", "num_res_centroids=3"),
                      ("*.k_proj", "expected GLOB:FIELD=VALUE"),
                      ("2.*:num_centroids=8", "layer rule '2.*' matches no quantized linear")]:
        code, _, err = cli("compress", src, "--bits", "2", "--out", tmp_path / "bad", "--calib", calib,
                           "--layer", bad, *CLI_TINY)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and says in lines[0], err
        assert not (tmp_path / "bad").exists()


def test_layer_rules_match_paths_and_blocks_and_round_trip():
    cfg = CFG.with_(layers={"*.k_proj": {"num_res_centroids": 4}, "0.*": {"num_centroids": 8},
                            "0.self_attn.k_proj": {"num_res_centroids": 8}})
    assert cfg.for_layer("self_attn.k_proj", 1).num_res_centroids == 4
    assert cfg.for_layer("self_attn.k_proj", None).num_res_centroids == 4  # no block index: path rules only
    k0 = cfg.for_layer("self_attn.k_proj", 0)
    assert (k0.num_centroids, k0.num_res_centroids, k0.layers) == (8, 8, ())
    assert cfg.for_layer("mlp.up_proj", 1) == CFG  # no rule matches: the job's own config
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="cannot be set per layer"):
        CFG.with_(layers={"*": {"seed": 1}})
    for bad in ({"*": {"num_centroids": "big"}}, {"*": [1, 2, 3]}, {"*": {"num_centroids": True}}, ["*"]):
        with pytest.raises(ConfigError, match="layers"):  # a --config file's mistakes: one line, no traceback
            CFG.with_(layers=bad)
    assert CFG.with_(layers={"*": {"damp": 1}}).for_layer("mlp.up_proj").damp == 1.0  # an int where a float is due


def test_an_unsupported_architecture_is_refused_by_the_command(smol_tokenizer, calib, home, tmp_path):
    """DeepSeek-V4's grouped output projections (an nn.Linear subclass multiplying each head group by its own block
    of W: no linear map to this quantizer) are here a third of its block weights: refused, never half-quantized."""
    src, out = tmp_path / "deepseek_v4", tmp_path / "q"
    torch.manual_seed(0)
    transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(
        hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=1,
        head_dim=64, q_lora_rank=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, o_groups=4,
        o_lora_rank=16, max_position_embeddings=256, index_n_heads=4, index_head_dim=16, sliding_window=16,
        **token_ids(smol_tokenizer))).save_pretrained(src)
    smol_tokenizer.save_pretrained(src)
    code, stdout, err = cli("compress", src, "--bits", "2", "--json", "--out", out, "--calib", calib, *CLI_TINY)
    lines = err.strip().splitlines()
    says = "DeepseekV4ForCausalLM is not supported: model.layers.0.self_attn.o_a_proj.weight (+"
    assert code == 2 and len(lines) == 1 and says in lines[0] and "of its blocks' matrix weights" in lines[0], err
    assert "Traceback" not in err and stdout == "" and not out.exists()
    # refused before any work: from the model's config (no weights loaded), before a job row exists
    code, stdout, err = cli("submit", src, "--bits", "2", "--name", "g", "--calib", calib, *CLI_TINY)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and says in lines[0], err
    assert jobs_left(home) == []


@pytest.mark.parametrize("family", ["cpmant", "prophetnet", "rwkv", "gemma3n_text"])
def test_an_architecture_whose_blocks_cannot_run_alone_is_refused(family, smol_tokenizer, calib, home, tmp_path):
    """Blocks that fail when run one at a time on what the model's forward gives them (here: capturing those
    inputs, the model's loop reading each block's output in a form of its own), before any linear is quantized:
    refused as an unsupported architecture, one line naming it and the reason, exit 2, nothing at --out; the job
    row (it exists by then) ends failed with that line. `vptq plan` and the in-memory driver refuse it the same way."""
    from vptq.sequential import quantize_model

    src, out = tmp_path / family, tmp_path / "q"
    model = tiny_family(family, smol_tokenizer)
    model.save_pretrained(src)
    smol_tokenizer.save_pretrained(src)
    says = f"{type(model).__name__} is not supported: "
    code, stdout, err = cli("compress", src, "--bits", "2", "--json", "--out", out, "--calib", calib, *CLI_TINY)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and says in lines[0] and "nothing was quantized" in lines[0], err
    assert "Traceback" not in err and stdout == "" and not out.exists()
    code, stdout, err = cli("submit", src, "--bits", "2", "--name", "g", "--calib", calib, *CLI_TINY)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and says in lines[0], err
    from vptq_service.store.repository import Repository

    with Repository.session_scope() as repo:
        jobs = repo.list_jobs()
        assert jobs and all(j.status == "failed" and says in j.error for j in jobs), [(j.status, j.error) for j in jobs]
    code, stdout, err = cli("plan", src, "--bits", "2", "--json", "--calib", calib, *PLAN_TINY)
    assert code == 2 and len(err.strip().splitlines()) == 1 and says in err and stdout == "", err
    with pytest.raises(ConfigError, match=says):
        quantize_model(model.eval(), torch.zeros(WINDOWS, SEQLEN, dtype=torch.long), CFG)


def test_blocks_whose_state_the_model_sets_per_call_are_quantized_by_the_command(smol_tokenizer, calib, home,
                                                                                  tmp_path):
    """BigBird's forward switches its blocks to full attention for windows too short for its sparse attention:
    the job's copy of a block, read from the loaded model, must be taken after that forward ran (it failed in
    block 0 with 'Query sided sequence length must be multiple of block size'); quantized whole, it loads both
    ways with equal logits."""
    src, out = tmp_path / "big_bird", tmp_path / "q"
    model = tiny_family("big_bird", smol_tokenizer).eval()
    model.save_pretrained(src)
    smol_tokenizer.save_pretrained(src)
    code, stdout, err = cli("compress", src, "--bits", "2", "--json", "--out", out, "--calib", calib, *CLI_TINY)
    assert code == 0, err
    as_linears(model)
    assert json.loads(stdout)["layers"] == len(block_linears(model))
    ids = torch.randint(0, len(smol_tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = vptq.from_pretrained(out)(ids).logits
        assert torch.isfinite(want).all()
        vptq.patch_transformers(allow_cpu=True)
        assert torch.equal(transformers.AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits, want)


def test_a_model_without_decoder_blocks_is_refused(tmp_path):
    from vptq.sequential import quantize_model

    class NoBlocks(nn.Module):
        config = transformers.PretrainedConfig(num_hidden_layers=2)

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

    with pytest.raises(ConfigError, match="NoBlocks: no decoder blocks"):
        quantize_model(NoBlocks(), torch.zeros(1, 8, dtype=torch.long), CFG)


def test_target_globs_and_routers():
    """--targets globs match a linear's path inside its block or its last name; routers only when named."""
    from vptq.targets import selected

    assert selected("self_attn.q_proj", ("*",)) and selected("self_attn.q_proj", ("q_proj",))
    assert selected("self_attn.qkv_proj", ("*",)) and selected("mlp.gate_up_proj", ("*proj",))
    assert not selected("mlp.gate_proj", ("self_attn.*",)) and selected("mlp.experts.down_proj.3", ("mlp.experts.*",))
    assert not is_router("mlp.gate_proj") and not is_router("mlp.gate_up_proj") and not is_router("gate_proj.lora")
    for router in ("mlp.gate", "mlp.shared_expert_gate", "mlp.router", "mlp.gate.wg"):  # HunYuan-MoE: gate.wg
        assert not selected(router, ("*",)) and not selected(router, ("mlp.*",)) and selected(router, (router,))


# ----------------------------------------------------------------------------- families beyond the matrix

def token_ids(tokenizer) -> dict:
    """The config fields a tiny model takes from the tokenizer it is run with: vocabulary size, pad/bos/eos ids."""
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def tiny_family(family: str, tokenizer):
    """Tiny models of families whose blocks differ from the matrix's in what the driver and the loaders must
    handle (bench/arch_sweep.py found each failing): RoBERTa-style decoders (blocks inside an encoder whose
    forward starts from hidden states, the mask passed positionally, decoder weight and bias tied to other
    tensors), BLOOM (ALiBi biases with one slice per window of a batch), GPT-BigCode (its _init_weights
    reaches into c_proj.weight from the MLP, which transformers' loader runs around a VQuantLinear), Gemma 3's
    vision-language checkpoint (the decoder's depth in its text config, the vision tower left floating point),
    GPT-2 (Conv1D modules: the weight stored in x out) and MoE experts in transposed 3-D layouts (Llama 4: every
    expert runs on every token, unrouted rows zeroed; GPT-OSS: biases, interleaved gate/up, a clamped SwiGLU)."""
    ids = token_ids(tokenizer)
    torch.manual_seed(0)
    if family == "camembert":
        return transformers.CamembertForCausalLM(transformers.CamembertConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, is_decoder=True,
            max_position_embeddings=128, **ids))
    if family == "gemma3_vision":  # a vision-language checkpoint (Gemma-3 4B and up): its text decoder is quantized
        text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 16, "max_position_embeddings": 256,
                "layer_types": ["sliding_attention", "full_attention"], **ids}
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "image_size": 28, "patch_size": 14}
        return transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=1, eoi_token_index=2,
            image_token_index=3))
    if family == "bloom":
        return transformers.BloomForCausalLM(transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **ids))
    if family == "gpt2":  # block weights in Conv1D modules (stored in x out)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                                    **ids))
    if family == "openai-gpt":  # Conv1D too, and its blocks return a list
        return transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(n_embd=64, n_layer=2, n_head=4,
                                                                              n_positions=128, **ids))
    moe = {"hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, **ids}
    if family == "llama4_text":  # experts (E, in, out), every expert run on all tokens, unrouted ones zeroed
        return transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
            intermediate_size_mlp=128, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1, **moe))
    if family == "gpt_oss":  # experts (E, in, out) with biases, gate and up interleaved, a clamped SwiGLU
        return transformers.GptOssForCausalLM(transformers.GptOssConfig(
            num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"], **moe))
    if family == "trocr":  # a decoder with cross-attention, run without an encoder: those linears never run
        return transformers.TrOCRForCausalLM(transformers.TrOCRConfig(
            d_model=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128, max_position_embeddings=128,
            **ids))
    if family == "qwen3_next":  # gated delta-net (a depthwise conv) and full attention, MoE blocks
        return transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, linear_num_value_heads=4, linear_num_key_heads=2,
            linear_key_head_dim=16, linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"],
            max_position_embeddings=256, **ids))
    if family == "falcon_h1":  # hybrid attention + Mamba-2 blocks; a non-persistent buffer (mup_vector) per block
        return transformers.FalconH1ForCausalLM(transformers.FalconH1Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
            max_position_embeddings=256, **ids))
    if family == "aria_text":  # experts (E, in, out) without biases, beside shared experts
        return transformers.AriaTextForCausalLM(transformers.AriaTextConfig(
            moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1, **moe))
    if family in ("mamba", "falcon_mamba"):  # state-space stacks: A_log (d_inner, d_state), a depthwise conv
        cls = {"mamba": (transformers.MambaConfig, transformers.MambaForCausalLM),
               "falcon_mamba": (transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM)}[family]
        return cls[1](cls[0](hidden_size=64, num_hidden_layers=2, state_size=16, **ids))
    if family == "rwkv":  # its loop unpacks (hidden states, state, attentions) from each block: refused (preflight)
        return transformers.RwkvForCausalLM(transformers.RwkvConfig(
            hidden_size=64, num_hidden_layers=2, attention_hidden_size=64, intermediate_size=128,
            context_length=128, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id))
    if family == "falcon":  # FalconLinear: an nn.Linear subclass with a forward of its own computing x W^T + b
        return transformers.FalconForCausalLM(transformers.FalconConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=4, new_decoder_architecture=True,
            **ids))
    if family == "jamba":  # Mamba (dt_proj read as a weight), attention and MoE blocks in one stack
        return transformers.JambaForCausalLM(transformers.JambaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            mamba_d_state=8, mamba_dt_rank=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
            expert_layer_offset=1, num_experts=2, max_position_embeddings=256, **ids))
    if family == "bamba":  # Mamba-2 and attention blocks, each returning (hidden states, attention weights)
        return transformers.BambaForCausalLM(transformers.BambaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=8,
            mamba_chunk_size=16, max_position_embeddings=256, **ids))
    if family == "granitemoehybrid":  # Granite 4 hybrid: a Mamba-2 block and an attention block, MoE MLPs
        return transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2, layer_types=["mamba", "attention"], mamba_n_heads=4,
            mamba_d_head=32, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=16, max_position_embeddings=256,
            **ids))
    if family == "gemma3n_text":  # per-layer inputs computed from the tokens (refused: the blocks' arguments are
        # captured once per window length); its text model's init computes buffers from its own hidden size
        return transformers.Gemma3nForCausalLM(transformers.Gemma3nTextConfig(
            hidden_size=64, intermediate_size=[128, 128], num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=16, max_position_embeddings=256, num_kv_shared_layers=0,
            layer_types=["sliding_attention", "full_attention"], laurel_rank=8, hidden_size_per_layer_input=16,
            activation_sparsity_pattern=[0.0, 0.0], **ids))
    if family == "jetmoe":  # ParallelExperts (E, out, in) called on rows sorted by expert, in its MLP and attention
        return transformers.JetMoeForCausalLM(transformers.JetMoeConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
            num_key_value_heads=2, kv_channels=16, max_position_embeddings=256, **ids))
    if family == "mixtral":  # experts (E, out, in)
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(
            num_local_experts=4, num_experts_per_tok=2, **moe))
    # bench/arch_sweep.py found each failing in block 0: BigBird (the job's copy of a block predated the forward that
    # sets its state), CPM-Ant and ProphetNet (their blocks cannot be run one at a time: refused)
    if family == "big_bird":  # its forward switches its blocks to full attention for short windows, per call
        return transformers.BigBirdForCausalLM(transformers.BigBirdConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, is_decoder=True, **ids))
    if family == "cpmant":  # its encoder unpacks each block's output as (hidden states, attention weights)
        return transformers.CpmAntForCausalLM(transformers.CpmAntConfig(
            vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, dim_head=16, dim_ff=128,
            num_hidden_layers=2))
    if family == "prophetnet":  # its decoder takes [0] of each block's output (12 blocks by default)
        return transformers.ProphetNetForCausalLM(transformers.ProphetNetConfig(
            hidden_size=64, encoder_ffn_dim=128, decoder_ffn_dim=128,
            num_encoder_attention_heads=4, num_decoder_attention_heads=4, max_position_embeddings=256, **ids))
    return transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(
        n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=128, **ids))


@pytest.mark.parametrize("family", ["camembert", "bloom", "gpt_bigcode", "gemma3_vision", "gpt2", "llama4_text",
                                    "gpt_oss", "trocr", "openai-gpt", "qwen3_next", "falcon_h1", "mamba", "jetmoe",
                                    "falcon", "jamba", "granitemoehybrid", "bamba"])
def test_families_beyond_the_matrix_quantize_whole_and_load_both_ways(family, smol_tokenizer, calib, tmp_path):
    from vptq.pipeline import compress

    src, out = tmp_path / family, tmp_path / "q"
    fp = tiny_family(family, smol_tokenizer).eval()
    fp.save_pretrained(src)
    smol_tokenizer.save_pretrained(src)
    # 3 windows: blocks run on batches of several windows (BLOOM's biases must be repeated per window); Falcon-H1
    # also fine-tunes (block and end-to-end): in training mode its mixer reads out_proj.weight directly
    cfg = CFG.with_(finetune_steps=1, e2e_steps=1) if family == "falcon_h1" else CFG
    res, model, _ = compress(str(src), cfg, out, calib=calib, nsamples=3, seqlen=16)
    lins = block_linears(model)
    if family in ("mamba", "jamba"):  # the mixer reads dt_proj's weight and never calls it: that linear stays fp
        read = {n: lins.pop(n) for n in list(lins) if n.endswith("dt_proj")}
        assert len(read) == (2 if family == "mamba" else 1) and all(type(m) is nn.Linear for m in read.values())
    assert lins and all(isinstance(m, VQuantLinear) for m in lins.values())
    assert len(res.report.layers) == len(lins)
    assert family != "gemma3_vision" or (  # the text decoder's blocks, not the vision tower's
        all(".language_model.layers." in n for n in lins) and len(lins) == 14
        and not any(isinstance(m, VQuantLinear) for n, m in model.named_modules() if "vision_tower" in n))
    if family in ("llama4_text", "gpt_oss", "jetmoe"):  # every expert's matrices, one linear each; routers stay fp
        experts = [n for n in lins if ".experts." in n]  # JetMoE: its MLP's and its attention's experts
        assert len(experts) == 2 * 2 * 4 * (2 if family == "jetmoe" else 1) and not any(
            isinstance(m, VQuantLinear) for n, m in model.named_modules() if is_router(n, m))
    if family == "qwen3_next":  # the delta-net's short depthwise convolution stays fp, and is reported so
        from vptq.targets import float_tensors

        assert "model.layers.*.linear_attn.conv1d.weight" in float_tensors(fp, CFG)["groups"]
    if family == "mamba":  # its state-space parameters and convolution stay fp, and are reported so
        from vptq.targets import float_tensors

        kept = float_tensors(fp, CFG)["groups"]
        assert {"backbone.layers.*.mixer.A_log", "backbone.layers.*.mixer.conv1d.weight",
                "backbone.layers.*.mixer.dt_proj.weight"} <= set(kept), kept
    never = [w for w in res.report.warnings if "never ran during calibration" in w]
    assert all(".encoder_attn." in w for w in never) and (len(never) == 2 * 4 if family == "trocr" else not never)
    ids = torch.randint(0, len(smol_tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        assert torch.isfinite(want).all()
        assert torch.equal(vptq.from_pretrained(out)(ids).logits, want)  # tied copies stored once, tied again
        vptq.patch_transformers(allow_cpu=True)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert torch.equal(hf(ids).logits, want)


def test_blocks_split_across_lists_are_refused_before_any_work(smol_tokenizer):
    """XLM keeps attentions, norms and FFNs in separate lists: no list holds whole blocks, so none is taken
    for the decoder blocks (a half-block chain would quantize and run the attentions alone)."""
    from vptq.targets import check_model

    torch.manual_seed(0)
    xlm = transformers.XLMWithLMHeadModel(transformers.XLMConfig(
        vocab_size=len(smol_tokenizer), emb_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64))
    with pytest.raises(ConfigError, match="XLMWithLMHeadModel: its blocks are split across transformer.attentions"):
        check_model(xlm, CFG)


@pytest.mark.parametrize("family", ["gpt2", "llama4_text", "gpt_oss", "aria_text", "mixtral", "jetmoe"])
def test_linears_in_other_forms_compute_as_before_once_rewritten(family, smol_tokenizer):
    """Conv1D and every 3-D experts layout become nn.Linear modules (one per expert and projection) that give
    the model's logits as before (to float rounding); nothing of the blocks is left outside nn.Linear."""
    from vptq.as_linear import as_linears
    from vptq.targets import decoder_layers, unsupported_weights

    model = tiny_family(family, smol_tokenizer).eval()
    ids = torch.randint(0, len(smol_tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        for block in decoder_layers(model):
            assert as_linears(block) and not unsupported_weights(block)
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def test_moe_experts_kept_fp_by_the_targets_load_back(smol_tokenizer, calib, tmp_path):
    """Attention-only targets on a MoE model: its experts were rewritten one linear each and saved in floating
    point that way, and both loaders read them back."""
    from vptq.pipeline import compress

    src, out = tmp_path / "mixtral", tmp_path / "q"
    tiny_family("mixtral", smol_tokenizer).save_pretrained(src)
    smol_tokenizer.save_pretrained(src)
    _, model, _ = compress(str(src), CFG.with_(targets=("self_attn.*",)), out, calib=calib, nsamples=2, seqlen=16)
    ids = torch.randint(0, len(smol_tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(vptq.from_pretrained(out)(ids).logits, want)
        vptq.patch_transformers(allow_cpu=True)
        assert torch.equal(transformers.AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits, want)


@pytest.mark.parametrize("family", ["gpt2", "llama4_text"])
def test_plan_probes_blocks_whose_model_names_its_final_norm_otherwise(family, smol_tokenizer, calib, home, tmp_path):
    """`vptq plan` times block 0 and a fine-tuning step through the final norm and the head: GPT-2 calls its
    final norm `ln_f` (not `norm`), Llama 4's experts are rewritten as linears; both are planned, every linear
    of the blocks counted."""
    src = tmp_path / family
    tiny_family(family, smol_tokenizer).save_pretrained(src)
    smol_tokenizer.save_pretrained(src)
    code, stdout, err = cli("plan", src, "--bits", "2", "--json", "--calib", calib, *PLAN_TINY)
    assert code == 0, err
    p = json.loads(stdout)
    assert p["linears"] == {"gpt2": 2 * 4, "llama4_text": 2 * (4 + 3 + 2 * 4)}[family]
    assert p["bits_per_param"] > p["bpw"] > 0


@pytest.mark.parametrize("family", ["falcon_h1", "gemma3n_text"])
def test_streamed_blocks_compute_their_non_persistent_buffers(family, smol_tokenizer, tmp_path):
    """Falcon-H1 keeps a computed multiplier (`mamba.mup_vector`) in each block, never stored, and computed by its
    backbone's init: a block read from the shards had uninitialised memory there (and the quantization NaN). Such a
    checkpoint is loaded whole (transformers' loader computes it), or its streamed blocks carry the right values.
    Gemma 3n's text model computes its buffers (per-layer input scales) in its own `_init_weights`, from its own
    hidden size, which the head's init does not have: the streamed shell failed with "no attribute 'hidden_size'"."""
    from vptq.stream import open_streamed

    fp = tiny_family(family, smol_tokenizer).eval()
    fp.save_pretrained(tmp_path)
    s = open_streamed(tmp_path)
    if s is not None:  # the shell's computed buffers, outside the blocks, as the whole load has them
        want = {n: b for n, b in fp.named_buffers() if not n.startswith("model.layers.")}
        got = {n: b for n, b in s.model.named_buffers() if not n.startswith("model.layers.")}
        assert got.keys() == want.keys() and all(torch.equal(got[n], b) for n, b in want.items())
    for i, want in enumerate(driver.decoder_layers(fp) if s is not None else []):
        got = dict(s.block(i).named_buffers())
        assert got.keys() == dict(want.named_buffers()).keys()
        assert all(torch.equal(got[n], b) for n, b in want.named_buffers()), i


def test_experts_whose_gate_reads_an_unset_limit_compute_as_before_once_rewritten():
    """Ling's (BailingHybrid) experts clamp in their own `_apply_gate` when a per-layer limit is set and keep
    `limit = None` where it is not: the rewrite carries None over too (it carried numbers only, and the rewritten
    experts failed with "no attribute 'limit'" after the Hessians were collected)."""
    from transformers.models.bailing_hybrid.modeling_bailing_hybrid import BailingHybridExperts

    torch.manual_seed(0)
    for limits in (None, [7.0, 0.0]):  # no limit anywhere; a limit on layer 0, none (0) on layer 1
        cfg = transformers.BailingHybridConfig(hidden_size=64, moe_intermediate_size=32, num_experts=4,
                                               num_experts_per_tok=2, num_hidden_layers=2, swiglu_limits=limits)
        for layer in (0, 1):
            mod = BailingHybridExperts(cfg, layer)
            nn.init.normal_(mod.gate_up_proj, std=0.5)
            nn.init.normal_(mod.down_proj, std=0.5)
            x = torch.randn(6, 64)
            idx, w = torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
            with torch.no_grad():
                want = mod(x, idx, w)
                holder = nn.Module()
                holder.experts = mod
                assert as_linears(holder) == ["experts"]
                got = holder.experts(x, idx, w)
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (limits, layer, (got - want).abs().max())


def test_a_linear_subclass_is_quantized_only_where_it_computes_a_linear_map():
    """A subclass of nn.Linear with a forward of its own is quantized only where that forward computes x W^T + b
    (Falcon's FalconLinear, on real weights and on the meta device); DeepSeek-V4's grouped output projection,
    which multiplies each head group by its own block of W, stays floating point (a VQuantLinear in its place
    multiplied the whole input by W: a shape error after the Hessians were collected), counted among the weights
    outside linears."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4GroupedLinear
    from transformers.models.falcon.modeling_falcon import FalconLinear

    from vptq.targets import plain_linear, target_linears, unsupported_weights

    torch.manual_seed(0)
    block = nn.Module()
    block.falcon = FalconLinear(64, 96, bias=True)
    block.grouped = DeepseekV4GroupedLinear(16, 32, n_groups=4)
    block.plain = nn.Linear(64, 64)
    assert plain_linear(block.falcon) and plain_linear(block.plain) and not plain_linear(block.grouped)
    assert list(target_linears(block, CFG)) == ["falcon", "plain"]
    assert unsupported_weights(block) == ["grouped.weight"]
    with torch.device("meta"):
        meta = FalconLinear(64, 96), DeepseekV4GroupedLinear(16, 32, n_groups=4)
    assert plain_linear(meta[0]) and not plain_linear(meta[1])


def test_linears_whose_weight_the_model_reads_stay_floating_point(smol_tokenizer):
    """Mamba's mixer multiplies by `self.dt_proj.weight` and never calls dt_proj (nor do Falcon-Mamba and Jamba
    outside the branch transformers keeps for its own quantizers); reads of every projection's weight in Mamba's
    fused training branch are not counted: only dt_proj stays floating point. A VQuantLinear there had no weight
    to read ("no attribute 'weight'" after the block was quantized). BLOOM reads its MLP's weights in an optional
    tensor-parallel path and calls them otherwise: quantized."""
    from vptq.targets import read_as_weights

    for family, want in (("mamba", {"mixer.dt_proj"}), ("falcon_mamba", {"mixer.dt_proj"}),
                         ("jamba", {"mamba.dt_proj"}), ("bloom", set())):
        assert read_as_weights(driver.decoder_layers(tiny_family(family, smol_tokenizer))[0]) == want, family
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=128))
    assert read_as_weights(driver.decoder_layers(llama)[0]) == set()
