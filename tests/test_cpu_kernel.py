"""The CPU kernels (vptq/kernels/cpu.py): y = x W^T straight from the packed codes, against the torch
oracle (dequantize_ref, then F.linear), on the presets' layouts with outliers, a permutation, a
per-channel scale/bias and a bias; the VQuantLinear route (opt-in) and a loaded model's logits;
resident memory = the packed layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("numba")

from tests.vq_layers import quantized_folder, random_layer  # noqa: E402
from vptq.config import QuantConfig  # noqa: E402
from vptq.io import load_quantized  # noqa: E402
from vptq.kernels import cpu, cpu_source  # noqa: E402
from vptq.kernels.dispatch import use_cpu_kernels  # noqa: E402
from vptq.kernels.layout import PackedLayer  # noqa: E402
from vptq.layers import VQuantLinear  # noqa: E402

# the presets' layouts (vector length, centroids, residual centroids)
PRESETS = {"2bit_v5k1024": (5, 1024, 0), "3bit_v5k1024r32": (5, 1024, 32), "4bit_v4k1024r64": (4, 1024, 64)}


def close(y: torch.Tensor, yr: torch.Tensor) -> None:
    """Equal up to fp32 summation order: relative to the output's scale."""
    err = (y.float() - yr.float()).abs().max().item()
    assert err <= 1e-5 * max(1.0, yr.abs().max().item()) * yr.shape[-1] ** 0.5, err


@pytest.mark.parametrize("batch", [1, cpu.ROWS_APART, cpu.ROWS_APART + 2, 8, cpu.MAX_ROWS + 3])
@pytest.mark.parametrize("extras", ["outliers_perm_norm_bias", "perm_norm_bias", "as_stored"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_kernel_matches_oracle(preset, extras, batch):
    """Every preset's layout, with outliers + 2 groups + perm + scale/bias + bias, without the outliers,
    and as the quantizer stores it (one group, none of those); batch 1, ROWS_APART (a histogram per row),
    ROWS_APART + 2 (batched, padded with zero rows), 8 (batched) and above MAX_ROWS (dequantized per call:
    the numba dequantize kernel, or the torch oracle where outliers are)."""
    v, k, kr = PRESETS[preset]
    kw = {"outliers_perm_norm_bias": {}, "perm_norm_bias": dict(o=0, n=76),
          "as_stored": dict(o=0, g=1, perm=False, norm=False, bias=False, n=76)}[extras]
    p = PackedLayer.from_module(random_layer(v=v, k=k, kr=kr, **kw))
    x = torch.randn(batch, p.in_features, generator=torch.Generator().manual_seed(batch))
    close(cpu.CpuPlan.build(p)(x), cpu.gemm_ref(x, p))


@pytest.mark.parametrize("k,kr", [(64, 0), (4096, 2), (1024, 128)])
def test_histogram_kernel_reads_codes_of_other_widths(k, kr):
    """The histogram kernel reads the codes in whole blocks of lcm(bits, 32) bits, then one by one for the
    columns left over: beside the presets' 10-, 15- and 16-bit codes, 6-, 13- and 17-bit ones (blocks of
    16 and 32 codes, codes crossing words), 36 columns a group (whole blocks and a remainder, or a
    remainder only). The other modes read every code one by one (the tests above)."""
    p = PackedLayer.from_module(random_layer(v=5, k=k, kr=kr, n=77))
    assert p.code_bits == (k * max(kr, 1)).bit_length() - 1
    plan = cpu.CpuPlan.build(p)
    x = torch.randn(1, p.in_features, generator=torch.Generator().manual_seed(1))
    plan.mode = "hist"  # what the rule picks for these codebooks on wider layers
    close(plan(x), cpu.gemm_ref(x, p))
    x3 = torch.randn(3, p.in_features, generator=torch.Generator().manual_seed(2))  # three histograms, one call
    close(plan(x3), cpu.gemm_ref(x3, p))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_batch1_modes_agree(preset):
    """Batch 1 takes the histogram kernel on the presets' layouts (and so do up to rows_apart() token rows,
    one histogram per row in one call); the direct one (large codebooks) gives the same numbers; the rule picks direct where the codebook outweighs the columns (v8-k65536)."""
    v, k, kr = PRESETS[preset]
    p = PackedLayer.from_module(random_layer(n=581, v=v, k=k, kr=kr))  # outliers + 2 groups of 288 columns
    plan = cpu.CpuPlan.build(p)
    x = torch.randn(1, p.in_features, generator=torch.Generator().manual_seed(3))
    assert plan.mode == "hist"
    y_hist = plan(x)
    last = cpu.rows_apart(kr > 0)  # this layout's last row count on histograms
    xs = torch.randn(last + 1, p.in_features, generator=torch.Generator().manual_seed(4))
    for rows in (2, last, last + 1):  # histograms per row, then the batched mode (padded)
        close(plan(xs[:rows]), cpu.gemm_ref(xs[:rows], p))
    plan.mode = "direct"
    close(plan(x), y_hist)
    close(y_hist, cpu.gemm_ref(x, p))
    assert cpu.batch1_mode(8, 65536, 0, 4096) == "direct" and cpu.batch1_mode(5, 1024, 32, 576) == "hist"


def test_layer_route_is_opt_in_and_matches_the_torch_path():
    """Not opted in: the torch path, bit for bit, and no plan. Opted in: the kernels (no dense weight
    cached), same numbers, any leading shape and float dtype; under autograd the torch path."""
    mod = random_layer(**dict(zip(("v", "k", "kr"), PRESETS["3bit_v5k1024r32"], strict=True)))
    x = torch.randn(2, 3, mod.in_features)
    with torch.no_grad():
        y_torch = mod(x)
        assert getattr(mod, "_cpu_plan", None) is None and mod._cache is not None
        assert use_cpu_kernels(nn.Sequential(mod)) == 1
        assert mod._cache is None
        y = mod(x)
        assert mod._cache is None and mod._cpu_plan is not None
        close(y, y_torch)
        yb = mod(x.bfloat16())
        assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, mod.out_features)
    mod.centroids.weight.requires_grad_(True)
    y_grad = mod(x)  # autograd needs the graph: the torch path
    assert y_grad.requires_grad
    use_cpu_kernels(mod, on=False)
    with torch.no_grad():
        assert torch.equal(mod(x), y_torch)


def test_plan_follows_weight_updates():
    """An in-place change of the codebook (load_state_dict, a fine-tuning step) rebuilds the plan."""
    mod = random_layer(v=4, k=1024, kr=64, o=0, g=1, n=76)
    use_cpu_kernels(mod)
    x = torch.randn(1, mod.in_features)
    with torch.no_grad():
        y0 = mod(x)
        mod.centroids.weight.mul_(2)
        y1 = mod(x)
    assert not torch.allclose(y0, y1)
    close(y1, cpu.gemm_ref(x, PackedLayer.from_module(mod)))


def test_resident_memory_is_the_packed_layer():
    """A SmolLM2-sized MLP linear (576 -> 1536) at the 2-bit preset's layout: after calls at batch 1
    and 8 the layer holds its stored tensors plus float32 codebooks, no dense weight; <= 1/5 of fp32."""
    mod = random_layer(m=1536, n=576, v=5, k=1024, kr=0, o=0, g=1, perm=False, norm=False, bias=False)
    use_cpu_kernels(mod)
    with torch.no_grad():
        for b in (1, 8):
            mod(torch.randn(b, 576))
    stored = sum(t.nbytes for t in mod.state_dict().values())
    plan = mod._cpu_plan[1]
    assert plan.nbytes == 4 * mod.centroids.weight.numel() + 4 * 5  # fp32 codebook + an empty residual
    assert cpu.resident_bytes(mod) == stored + plan.nbytes
    tensors = [t for t in vars(mod).values() if isinstance(t, torch.Tensor)]
    assert all(t.numel() < 1536 * 576 for t in tensors) and mod._cache is None
    assert cpu.resident_bytes(mod) <= 1536 * 576 * 4 / 5


@pytest.fixture(scope="module")
def tiny_quantized(tiny_llama_dir, smol_tokenizer, tmp_path_factory):
    cfg = QuantConfig(vector_len=4, num_centroids=64, num_res_centroids=16, kmeans_iters=3, refine_iters=0)
    return quantized_folder(tiny_llama_dir, cfg, smol_tokenizer, tmp_path_factory.mktemp("cpu") / "q")


def test_loaded_model_gives_the_torch_paths_logits(tiny_quantized):
    """A quantized folder, loaded: logits of a prompt (batched kernel), of one decode step on the KV
    cache (batch-1 kernel) and of a long prompt (above MAX_ROWS: dequantized per call) match. The
    loader marks q/k/v and gate/up as sharing their input; these layers carry a per-channel norm, so
    they cannot share one call and each keeps its own plan."""
    ref = load_quantized(tiny_quantized).eval()
    model = load_quantized(tiny_quantized).eval()
    assert use_cpu_kernels(model) == 14
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    long = torch.randint(0, 1000, (1, cpu.MAX_ROWS + 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for inp in (ids, long):
            close(model(inp).logits, ref(inp).logits)
        out, out_ref = model(ids, use_cache=True), ref(ids, use_cache=True)
        step = torch.tensor([[42]])
        close(model(step, cache=out.cache).logits, ref(step, cache=out_ref.cache).logits)
    vq = [m for m in model.modules() if isinstance(m, VQuantLinear)]
    assert all(m._cpu_plan is not None for m in vq)
    assert all(m._vq_shared.cpu_group._plan is None for m in vq if hasattr(m, "_vq_shared"))
    stored = sum(t.nbytes for m in vq for t in m.state_dict().values())
    assert sum(cpu.resident_bytes(m) for m in vq) == stored + sum(m._cpu_plan[1].nbytes for m in vq)


def shared_on_cpu(mods: list, monkeypatch) -> list[int]:
    """mods marked as reading one x (share_input) on the CPU kernels; the list that each CpuPlan call then
    appends its member count to."""
    from vptq.kernels.dispatch import share_input

    share_input(mods)
    use_cpu_kernels(nn.ModuleList(mods))
    calls: list[int] = []
    real_call = cpu.CpuPlan.__call__
    monkeypatch.setattr(cpu.CpuPlan, "__call__", lambda self, x: calls.append(len(self.layers)) or real_call(self, x))
    return calls


@pytest.mark.parametrize("batch", [1, 3, cpu.MAX_ROWS + 1])
def test_layers_sharing_an_input_take_one_call(batch, monkeypatch):
    """q/k/v-like layers of one layout (no perm, no norm) marked by share_input: the first call computes
    all three in one kernel call, the others get their part; same numbers as each layer alone; another
    x, or a changed weight, computes again."""

    v, k, kr = PRESETS["3bit_v5k1024r32"]
    mods = [random_layer(m=m, n=76, v=v, k=k, kr=kr, o=0, g=1, perm=False, norm=False, bias=m != 20, seed=m)
            for m in (67, 20, 20)]
    calls = shared_on_cpu(mods, monkeypatch)
    x = torch.randn(batch, 76, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        ys = [m(x) for m in mods]
        assert calls == [3]
        for m, y in zip(mods, ys, strict=True):
            close(y, cpu.gemm_ref(x, PackedLayer.from_module(m)))
        mods[1](x.clone())  # another x: a call of its own
        mods[2].centroids.weight.mul_(2)
        y2 = mods[2](x)  # weights changed: the group's plan is rebuilt
    assert calls == [3, 3, 3]
    close(y2, cpu.gemm_ref(x, PackedLayer.from_module(mods[2])))
    grp = mods[0]._vq_shared.cpu_group
    assert cpu.resident_bytes(mods[0]) == sum(t.nbytes for t in mods[0].state_dict().values()) + grp._plan.nbytes



def test_a_kept_output_is_handed_out_while_its_own_weights_stand(monkeypatch):
    """A member's kept output depends on its own weights and x only: a sibling's changed weights leave it
    standing (no call), its own changed weights compute again (the group's plan rebuilt)."""

    mods = [random_layer(m=40, n=76, v=5, k=1024, kr=0, o=0, g=1, perm=False, norm=False, bias=False, seed=s)
            for s in (1, 2, 3)]
    calls = shared_on_cpu(mods, monkeypatch)
    x = torch.randn(1, 76, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mods[0](x)
        mods[2].centroids.weight.mul_(3)  # a sibling's weights change after the group's call
        y1 = mods[1](x)
        assert calls == [3]  # mods[1]'s kept output stands
        y2 = mods[2](x)
        assert calls == [3, 3]  # its own weights changed: computed again
    close(y1, cpu.gemm_ref(x, PackedLayer.from_module(mods[1])))
    close(y2, cpu.gemm_ref(x, PackedLayer.from_module(mods[2])))

def test_bad_layouts_are_refused():
    mod = random_layer(v=5, k=1024, o=0, g=1, n=76)
    p = PackedLayer.from_module(mod)
    with pytest.raises(ValueError, match="vector_len"):
        cpu_source.kernel(17, False, "hist", 10)
    import dataclasses

    with pytest.raises(ValueError, match="indices: expected shape"):
        cpu.CpuPlan.build(dataclasses.replace(p, indices=p.indices[:, :-1]))


def test_thread_pool_keeps_torchs_thread_count():
    """The kernels' pool starts on an OpenMP layer where one loads (the workqueue pool woke its threads
    for every call: 3x the kernel's time on a small layer), and starting it, which resets the OpenMP
    thread count shared with torch, leaves torch's own count as the user set it. In a fresh process:
    the pool starts once per process."""
    import os
    import subprocess
    import sys

    if "NUMBA_THREADING_LAYER" in os.environ:
        pytest.skip("NUMBA_THREADING_LAYER set: the user chose the layer")
    code = ("import torch; torch.set_num_threads(1)\n"
            "from tests.vq_layers import random_layer\n"
            "from vptq.kernels import cpu\n"
            "from vptq.kernels.layout import PackedLayer\n"
            "import numba\n"
            "assert cpu.available()\n"
            "p = PackedLayer.from_module(random_layer(v=5, k=64, kr=0))\n"
            "cpu.CpuPlan.build(p)(torch.randn(1, p.in_features))\n"
            "print(torch.get_num_threads(), numba.threading_layer())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    threads, layer = out.stdout.split()
    assert threads == "1"
    assert layer != "workqueue"


def test_a_compiled_decode_step_gives_the_eager_logits(tiny_quantized, monkeypatch):
    """torch.compile traces around a VQuantLinear (its forward is a graph break): greedy decode steps on a
    static cache, compiled (dynamo and AOT autograd, no code generation: seconds), give the eager
    steps' logits, and the numba kernels still run inside the compiled step."""
    from transformers import StaticCache

    from vptq.compiled import compile_step

    model = load_quantized(tiny_quantized).eval()
    use_cpu_kernels(model)
    cache = StaticCache(config=model.config, max_cache_len=24)
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    tok, pos = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)

    def step():
        return model(input_ids=tok, cache_position=pos, position_ids=pos[None], cache=cache).logits

    def decode(fn):
        cache.reset()
        at = torch.arange(ids.shape[1])
        nxt = model(input_ids=ids, cache_position=at, position_ids=at[None], cache=cache).logits[:, -1]
        out = []
        for i in range(4):
            tok.copy_(nxt.argmax(-1)[:, None])
            pos.fill_(ids.shape[1] + i)
            out.append(fn().clone())
            nxt = out[-1][:, -1]
        return torch.cat(out)

    calls = []
    real_call = cpu.CpuPlan.__call__
    monkeypatch.setattr(cpu.CpuPlan, "__call__", lambda self, x: calls.append(1) or real_call(self, x))
    with torch.no_grad():
        want = decode(step)
        torch._dynamo.reset()
        eager_calls, calls[:] = len(calls), []
        got = decode(compile_step(step, backend="aot_eager"))
    torch._dynamo.reset()
    close(got, want)
    assert len(calls) == eager_calls > 0
