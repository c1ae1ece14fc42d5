"""numba.cuda kernels against their torch oracles.

Without a GPU (CI) the kernels run in numba's CUDA simulator on CPU tensors; with one, the
same tests run on real CUDA. Shapes are small and are not multiples of the tiles.
"""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:  # must be set before numba is imported; CPU code never routes to the simulator
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

pytest.importorskip("numba")
pytest.importorskip("numba.cuda")

from tests.vq_layers import random_layer  # noqa: E402
from vptq.kernels import _numba as nb  # noqa: E402
from vptq.kernels import dispatch  # noqa: E402
from vptq.kernels.assign import assign, assign_ref  # noqa: E402
from vptq.kernels.dequant import dequant2_config, dequantize, dequantize_ref  # noqa: E402
from vptq.kernels.gemv import gemv, gemv_ref  # noqa: E402
from vptq.kernels.layout import PackedLayer  # noqa: E402

DEV = torch.device("cuda" if HAS_GPU else "cpu")


@pytest.fixture(autouse=True, scope="module")
def _fast_thread_handoff():
    """The simulator runs a block as one Python thread per CUDA thread that meet at every
    syncthreads; with Python's default 5 ms GIL switch interval each meeting waits out switch
    slices, and one test took 1-78 s depending on the machine's load. 50 µs: 2.6-4.1 s."""
    import sys

    saved = sys.getswitchinterval()
    if not HAS_GPU:
        sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(saved)


SMALL = {} if HAS_GPU else {"threads": 32}  # the simulator runs one Python thread per CUDA thread


def _layer(m=37, n=29, v=4, k=16, kr=4, o=5, v0=2, k0=8, g=2, perm=True, norm=True, bias=True, seed=0):
    """A random VQuantLinear in the published stored format, on the test device."""
    return random_layer(m=m, n=n, v=v, k=k, kr=kr, o=o, v0=v0, k0=k0, g=g, perm=perm, norm=norm, bias=bias,
                        seed=seed).to(DEV)


LAYERS = {
    # everything: outliers (v0=2), 2 groups, residual, perm, norm, bias; 24-bit-ish codes cross words
    "full": dict(),
    # released 2-bit format v8-k65536-style (16-bit codes), M not a multiple of v
    "v8_16bit": dict(m=45, n=33, v=8, k=65536, kr=0, o=0, g=1),
    # 3-bit released style: 16 + 8 bit codes
    "v8_res256": dict(m=19, n=27, v=8, k=65536, kr=256, o=0, g=1, bias=False),
    # odd vector length, no perm / norm / bias, 12-bit codes
    "v6_plain": dict(m=23, n=31, v=6, k=4096, kr=0, o=3, v0=4, g=4, perm=False, norm=False, bias=False),
    # the gemv fast path (16-bit codes, 1 group, no outliers, even words per row); 44 columns:
    # a partial pass of 8 codes at the end
    "v8_fast": dict(m=45, n=44, v=8, k=65536, kr=0, o=0, g=1),
    # codebook-in-shared-memory formats (one group, no outliers); M, N not multiples of v / 8 / tiles
    # the paper's 2-bit LLaMA-2 layout: v6-k4096, 12-bit codes
    "v6_k4096": dict(m=37, n=70, v=6, k=4096, kr=0, o=0, g=1),
    # 3-bit style v6 + residual (18-bit codes cross words), no bias
    "v6_res": dict(m=23, n=45, v=6, k=256, kr=4, o=0, g=1, bias=False),
    # odd vector length (int64 + int16 planes), 5-bit codes, no perm / norm
    "v5_plain": dict(m=13, n=33, v=5, k=32, kr=0, o=0, g=1, perm=False, norm=False),
    # v12 (three int64 planes), N a multiple of 8 (vector stores in dequantize), 6-bit codes
    "v12": dict(m=25, n=96, v=12, k=64, kr=0, o=0, g=1),
}
SMEM_LAYERS = ["v6_k4096", "v6_res", "v5_plain", "v12"]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-3) -> None:
    a, b = a.float().cpu(), b.float().cpu()
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= rel * max(1.0, b.abs().max().item()), err


# ------------------------------------------------------------------------------ assign
def _grid_data(n, k, v, seed):
    """Coordinates on a 1/4 grid: every distance is exact in fp16/fp32, so ties are real ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 9, (n, v), generator=g).float() / 4
    c = torch.randint(-8, 9, (k, v), generator=g).float() / 4
    return x.to(DEV), c.to(DEV)


@pytest.mark.skipif(HAS_GPU, reason="the simulator's shared memory only")
def test_simulator_shared_array_is_one_array_per_block_across_thread_switches():
    """CI once saw wrong nearest-centroid indices in a launch's first block: two simulated
    threads each created the block's shared tile. Force a switch between lookup and store."""
    import threading
    import time

    import numpy as np
    from numba.cuda.simulator import kernelapi

    nb.cuda()  # installs the lock

    class SlowLookup(dict):
        def get(self, key, default=None):
            found = super().get(key, default)
            time.sleep(0.005)  # every other thread runs here, between the lookup and the store
            return found

    shared = kernelapi.FakeCUDAShared(0)
    shared._allocations = SlowLookup()
    got = []
    threads = [threading.Thread(target=lambda: got.append(shared.array(8, np.float32))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(a is got[0] for a in got)


@pytest.mark.parametrize("v,n,k,dtype", [(8, 301, 300, torch.float32), (2, 45, 70, torch.float16),
                                         (6, 77, 33, torch.float32), (16, 40, 19, torch.float16)])
def test_assign_exact_indices(v, n, k, dtype):
    x, c = _grid_data(n, k, v, seed=v)
    w = torch.rand(n, generator=torch.Generator().manual_seed(1)).to(DEV)
    cfg = {} if HAS_GPU else {"threads": 32, "tile_k": 64, "rows_per_thread": 2}
    idx, dist = assign(x.to(dtype), c, w, **cfg)
    ridx, rdist = assign_ref(x.to(dtype), c, w)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert torch.equal(idx.cpu(), ridx.cpu())  # exact arithmetic: ties go to the lowest index
    _close(dist, rdist, 1e-6)


def test_assign_default_tiles_random_floats():
    """Default launch config (tile 256 > K here, 128 threads) on real-valued data."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(150, 8, generator=g).to(DEV)
    c = torch.randn(261, 8, generator=g).to(DEV)
    idx, dist = assign(x, c)
    ridx, rdist = assign_ref(x, c)
    true = ((x[:, None, :].double() - c[None].double()) ** 2).sum(-1)
    # same index, or an index whose exact distance ties the best to float32 rounding
    picked = true.gather(1, idx[:, None]).squeeze(1)
    assert torch.all(picked <= true.min(1).values * (1 + 1e-5) + 1e-6)
    assert (idx == ridx).float().mean() > 0.99
    _close(dist, rdist, 1e-5)


def test_dispatch_nearest_matches_reference():
    x, c = _grid_data(64, 40, 4, seed=5)
    assert torch.equal(dispatch.nearest(x, c).cpu(), assign_ref(x, c)[0].cpu())


@pytest.mark.parametrize("bad,match", [
    (lambda x, c: (x, c[:, :4].contiguous()), "centroids: vector length 4"),
    (lambda x, c: (x[:, :5].contiguous(), c[:, :5].contiguous()), "x: vector length 5"),
    (lambda x, c: (x.double(), c), "x: dtype"),
    (lambda x, c: (x[::2], c), "x: must be contiguous"),
    (lambda x, c: (x, c.t()), "centroids"),
])
def test_assign_bad_input(bad, match):
    x, c = _grid_data(16, 10, 8, seed=0)
    xb, cb = bad(x, c)
    with pytest.raises(ValueError, match=match):
        assign(xb, cb)


# ------------------------------------------------------------------------------ dequantize
@pytest.mark.parametrize("name", list(LAYERS))
def test_dequant_matches_oracle(name):
    mod = _layer(**LAYERS[name])
    p = PackedLayer.from_module(mod)
    ref = dequantize_ref(p, torch.float16)
    # the oracle is the format: it equals vptq's own dequantization bit for bit
    assert torch.equal(ref, mod.dequantized_weight(torch.float16))
    w = dequantize(p, torch.float16, **SMALL)
    assert w.dtype == torch.float16 and w.shape == (mod.out_features, mod.in_features)
    _close(w, ref)  # kernel rounds once from fp32; the oracle rounds after each fp16 op
    _close(dequantize(p, torch.float32, **SMALL), dequantize_ref(p, torch.float32), 1e-5)


@pytest.mark.parametrize("name", ["v6_k4096", "v6_res", "v5_plain", "v12", "v8_16bit", "v8_fast", "v6_plain"])
@pytest.mark.parametrize("path", ["staged", "columns"])
def test_dequant_both_kernels_match_oracle(name, path):
    """Row-staged kernel (shared-memory codebook for small k, global for v8-k65536; 16-byte
    stores where N % 8 == 0) and the per-column kernel, fp16 and fp32 output."""
    p = PackedLayer.from_module(_layer(**LAYERS[name]))
    if path == "staged" and p.outlier_size:
        with pytest.raises(ValueError, match="path: the row-staged kernel"):
            dequantize(p, torch.float16, path=path, **SMALL)
        return
    _close(dequantize(p, torch.float16, path=path, **SMALL), dequantize_ref(p, torch.float16))
    _close(dequantize(p, torch.float32, path=path, **SMALL), dequantize_ref(p, torch.float32), 1e-5)


# layouts of the half2 dequantize (fp16 out, v <= 8, N % 8 == 0): byte codes (8 and 8+8 bit), odd v
# (int64 + int16 planes), v6 (int64 + int32 planes), a global codebook (k = 65536), two groups (and with
# a residual, codes crossing words)
H2_LAYERS = {
    "v4_k256": dict(m=37, n=64, v=4, k=256, kr=0, o=0, g=1),
    "v8_k256_res": dict(m=21, n=48, v=8, k=256, kr=256, o=0, g=1, bias=False),
    "v5_k32": dict(m=13, n=40, v=5, k=32, kr=0, o=0, g=1, norm=False),
    "v6_k4096": dict(m=11, n=72, v=6, k=4096, kr=0, o=0, g=1),
    "v8_k65536": dict(m=19, n=56, v=8, k=65536, kr=0, o=0, g=1),
    "v4_two_groups": dict(m=19, n=64, v=4, k=16, kr=0, o=0, g=2),
    # two groups with a residual and 7-bit codes that cross words (the group terms of main and residual)
    "v5_res_two_groups": dict(m=13, n=48, v=5, k=32, kr=4, o=0, g=2),
}


@pytest.mark.parametrize("name", list(H2_LAYERS))
def test_dequant_half2_matches_oracle(name):
    """The half2 variant (values paired with prmt, residual and scale/bias in f16x2) and the fp32
    variant of the row-staged kernel both equal the oracle and differ by at most two fp16 steps of
    the largest value (the half2 variant rounds main + residual to fp16 before scaling)."""
    p = PackedLayer.from_module(_layer(**H2_LAYERS[name]))
    ref = dequantize_ref(p, torch.float16)
    a = dequantize(p, torch.float16, path="staged", h2=True, **SMALL)
    b = dequantize(p, torch.float16, path="staged", h2=False, **SMALL)
    _close(a, ref)
    _close(b, ref)
    assert (a.float() - b.float()).abs().max() <= 2 * torch.finfo(torch.float16).eps * b.float().abs().max()
    with pytest.raises(ValueError, match="h2: the half2 kernel"):
        dequantize(p, torch.float32, path="staged", h2=True, **SMALL)


@pytest.mark.parametrize("rb,grid,ranges", [(4, None, True), (3, 2, True), (1, 3, True), (2, 9, True),
                                           (3, 2, False), (1, 3, False)])
def test_dequant_row_ranges(rb, grid, ranges):
    """Each block's contiguous range of rows (uneven: 10 rows of vectors over 2, 3 or 9 blocks, steps of
    rb that do not divide them; more blocks than steps) and the grid-stride steps both cover every row once."""
    p = PackedLayer.from_module(_layer(**H2_LAYERS["v4_k256"]))
    assert p.rows == 10
    # the output's memory held NaNs just before (the allocators hand a freed block of this size back):
    # a row no block writes stays wrong
    torch.full((p.out_features, p.in_features), float("nan"), dtype=torch.float16, device=p.device).sum()
    w = dequantize(p, torch.float16, path="staged", rb=rb, grid=grid, ranges=ranges, **SMALL)
    _close(w, dequantize_ref(p, torch.float16))
    with pytest.raises(ValueError, match="grid: 0 blocks"):
        dequantize(p, torch.float16, path="staged", grid=0, **SMALL)


# layouts whose column map is the identity (one group, no permutation, no outliers: every preset's
# stored layout): 8-bit, 10-bit (plain, and 8 + 2 with a residual; 40 columns: both bit offsets of
# a thread's first code within its word) and 16-bit (8 + 8) codes
CONTIG_LAYERS = {
    "v4_k256": dict(m=37, n=64, v=4, k=256, kr=0, o=0, g=1, perm=False),
    "v5_k1024": dict(m=23, n=40, v=5, k=1024, kr=0, o=0, g=1, perm=False),
    "v5_k1024_nonorm": dict(m=13, n=56, v=5, k=1024, kr=0, o=0, g=1, perm=False, norm=False),
    "v4_k256_res4": dict(m=21, n=48, v=4, k=256, kr=4, o=0, g=1, perm=False, bias=False),
    "v8_k256_res256": dict(m=19, n=40, v=8, k=256, kr=256, o=0, g=1, perm=False),
}


@pytest.mark.parametrize("name", list(CONTIG_LAYERS))
def test_dequant_contiguous_codes(name):
    """Without a permutation (one group, no outliers) the half2 kernel reads each thread's 8 consecutive
    codes together and no column map: chosen by default, equal to the code-at-a-time kernel and the oracle;
    asked for on a layout with a permutation, a ValueError."""
    p = PackedLayer.from_module(_layer(**CONTIG_LAYERS[name]))
    assert dequant2_config(p, torch.float16)["contig"]
    a = dequantize(p, torch.float16, path="staged", **SMALL)
    b = dequantize(p, torch.float16, path="staged", contig=False, **SMALL)
    assert torch.equal(a, b)
    _close(a, dequantize_ref(p, torch.float16))
    permuted = PackedLayer.from_module(_layer(**{**CONTIG_LAYERS[name], "perm": True}))
    assert not dequant2_config(permuted, torch.float16)["contig"]
    with pytest.raises(ValueError, match="contig: needs"):
        dequantize(permuted, torch.float16, path="staged", contig=True, **SMALL)


# ------------------------------------------------------------------------------ gemv
@pytest.mark.parametrize("name,batch", [("v6_k4096", 1), ("v6_k4096", 3), ("v6_res", 2), ("v5_plain", 1),
                                        ("v12", 8), ("v12", 1)])
def test_gemv_smem_matches_oracle(name, batch):
    """The codebook-in-shared-memory kernel is what small codebooks get, and equals the oracle."""
    from vptq.kernels.gemv import GemvPlan

    mod = _layer(**LAYERS[name])
    p = PackedLayer.from_module(mod)
    plan = GemvPlan(p, **SMALL)
    assert plan.path == "smem"
    x = torch.randn(batch, mod.in_features, generator=torch.Generator().manual_seed(batch)).half().to(DEV)
    y = plan(x)
    assert y.dtype == torch.float16 and y.shape == (batch, mod.out_features)
    _close(y, gemv_ref(x.float(), p), 3e-3)
    xf = x.float()
    _close(plan(xf), gemv_ref(xf, p), 1e-4)


@pytest.mark.parametrize("name,batch,n0", [("v6_k4096", 1, None), ("v6_res", 2, None), ("v12", 1, None),
                                           ("v6_k4096", 1, 96)])
def test_gemv_smem_split_k_plan(name, batch, n0):
    """Shared-memory kernel with several column chunks (atomics + last-block epilogue), several
    row tiles, 4 warps and more rows than warps (warp jobs of several rows: next-row prefetch),
    the plan reused: workspace and counters are left zeroed by each call."""
    from vptq.kernels.gemv import GemvPlan

    warp = 1 if nb.simulator_enabled() else 32
    # > 2 chunks of 32 lanes x 32 codes on a GPU; n0 = 96: rows of 36 words, 16-byte code loads
    n = (n0 or LAYERS[name]["n"]) + (0 if warp == 1 else 2048)
    mod = _layer(**{**LAYERS[name], "m": 61, "n": n})
    p = PackedLayer.from_module(mod)
    plan = GemvPlan(p, threads=4 * warp, kc=32 * warp, rt=5)
    cfg = plan.smem_config(batch)
    assert plan.path == "smem" and cfg["nsplit"] > 1 and plan.tiles > 1 and cfg["rg"] > 1
    assert n0 is None or cfg["wload"] == 4
    for seed in (1, 2):
        x = torch.randn(batch, mod.in_features, generator=torch.Generator().manual_seed(seed)).half().to(DEV)
        _close(plan(x), gemv_ref(x.float(), p), 3e-3)
        assert not plan.cnt.any() and not plan.workspace(batch, True).any()


def test_gemv_paths_agree_and_bad_plans():
    """Forcing the L2 kernel on a small codebook gives the same result; a layout the shared-memory
    kernel cannot take, or bad launch parameters, are ValueErrors naming them, before any launch."""
    from vptq.kernels.gemv import GemvPlan

    p = PackedLayer.from_module(_layer(**LAYERS["v6_k4096"]))
    x = torch.randn(2, p.in_features, generator=torch.Generator().manual_seed(0)).half().to(DEV)
    _close(GemvPlan(p, path="l2", **SMALL)(x), GemvPlan(p, **SMALL)(x), 3e-3)
    full = PackedLayer.from_module(_layer(**LAYERS["full"]))
    with pytest.raises(ValueError, match="path: the shared-memory kernel"):
        GemvPlan(full, path="smem")
    assert GemvPlan(full, **SMALL).path == "l2"
    with pytest.raises(ValueError, match="path:"):
        GemvPlan(p, path="fast")
    with pytest.raises(ValueError, match="kc:"):
        GemvPlan(p, kc=33)
    with pytest.raises(ValueError, match="u:"):
        GemvPlan(p, u=3)


@pytest.mark.parametrize("name,batch", [("full", 1), ("full", 3), ("v8_16bit", 2), ("v8_res256", 1),
                                        ("v6_plain", 8)])
def test_gemv_matches_oracle(name, batch):
    mod = _layer(**LAYERS[name])
    p = PackedLayer.from_module(mod)
    x = torch.randn(batch, mod.in_features, generator=torch.Generator().manual_seed(batch)).half().to(DEV)
    y = gemv(x, p, **SMALL)
    assert y.dtype == torch.float16 and y.shape == (batch, mod.out_features)
    _close(y, gemv_ref(x.float(), p), 3e-3)


@pytest.mark.parametrize("name,batch", [("v8_fast", 1), ("v8_fast", 2), ("full", 2), ("v8_res256", 1)])
def test_gemv_split_k_plan(name, batch):
    """Split-K (several column chunks, atomics + last-block epilogue), rows tiles of 2 rows per
    warp, plan reused across calls: the workspace and counters are left zeroed by each call."""
    from vptq.kernels.gemv import GemvPlan

    wide = {"v8_fast": 300, "full": 301, "v8_res256": 300}[name]  # > one 256-column chunk on CUDA
    mod = _layer(**{**LAYERS[name], "n": wide})
    p = PackedLayer.from_module(mod)
    warp = 1 if nb.simulator_enabled() else 32
    threads = 2 * warp  # 2 warps x 2 rows per warp: tiles of 4 rows of vectors
    plan = GemvPlan(p, threads=threads, kc=warp * 8, rw=2)
    assert plan.nsplit > 1 and plan.tiles == -(-p.rows // 4)
    for seed in (1, 2):
        x = torch.randn(batch, mod.in_features, generator=torch.Generator().manual_seed(seed)).half().to(DEV)
        y = plan(x)
        _close(y, gemv_ref(x.float(), p), 3e-3)
        assert not plan.cnt.any() and not plan.workspace(batch).any()
    if name == "v8_fast":
        assert plan.fast16
    xf = torch.randn(1, mod.in_features, generator=torch.Generator().manual_seed(3)).to(DEV)
    _close(plan(xf), gemv_ref(xf, p), 1e-4)


def test_layer_forward_routes_to_kernels():
    """VQuantLinear on the kernels (gemv for <= 8 rows, dequant + F.linear above) = torch path."""
    mod = _layer(**LAYERS["full"])
    with torch.no_grad():
        for rows in (2, 11):
            x = torch.randn(1, rows, mod.in_features, generator=torch.Generator().manual_seed(rows))
            x = x.half().to(DEV)
            if HAS_GPU:
                y = mod(x)  # the real route
            else:
                if rows <= dispatch.FUSED_MAX_ROWS:  # full-size blocks are slow in the simulator
                    continue
                y = dispatch.vq_linear_forward(mod, x, force=True)
            assert y is not None and y.shape == (1, rows, mod.out_features)
            yr = torch.nn.functional.linear(x.float(), dequantize_ref(PackedLayer.from_module(mod), torch.float32),
                                            mod.bias.float())
            _close(y, yr, 3e-3)


@pytest.mark.parametrize("name", ["v5_k1024", "v4_plain"])
def test_layer_above_eight_rows_routes(name, monkeypatch):
    """Above the gemv's 8 rows both routes give the torch path's numbers: the fused gemv on chunks of 8
    rows (up to VPTQ_CHUNKED_ROWS) and the layer's prepared dequantize + F.linear, each called twice (on
    a GPU the second call of the prepared dequantize launches its pre-marshalled record); the launch
    configuration is searched once per dtype (searching it at every call cost milliseconds of host
    time a layer on an H100); a value that is not a row count is refused by name."""
    mod = _layer(**ROWS_LAYERS[name])
    p = PackedLayer.from_module(mod)
    w = dequantize_ref(p, torch.float32)
    b = None if mod.bias is None else mod.bias.float()
    with torch.no_grad():
        for chunked in ("32", "0"):
            monkeypatch.setenv("VPTQ_CHUNKED_ROWS", chunked)
            mod._kernel_state = None  # read when the layer's plans are built
            for rows in (11,):  # a full chunk and a partial one
                x = torch.randn(2, rows, mod.in_features, generator=torch.Generator().manual_seed(rows))
                x = x.half().to(DEV)
                for _ in range(2):
                    y = dispatch.vq_linear_forward(mod, x, force=True)
                    assert y is not None and y.shape == (2, rows, mod.out_features)
                    _close(y, torch.nn.functional.linear(x.float(), w, b), 3e-3)
        dq = mod._kernel_state[3]
        from vptq.kernels import dequant

        searched = []
        real_config = dequant.dequant2_config
        monkeypatch.setattr(dequant, "dequant2_config", lambda *a, **k: searched.append(1) or real_config(*a, **k))
        for dt in (torch.float16, torch.float32):
            for _ in range(2):
                _close(dq(dt), w, 2e-3 if dt == torch.float16 else 1e-5)
        assert len(searched) == 1  # fp32's configuration, once (fp16's was found by the layer calls above)
        if HAS_GPU:  # the pre-marshalled launch wrote the dispatcher's bytes, so it was kept
            assert set(dq._fast) == {torch.float16, torch.float32}
        x0 = torch.zeros(2, 0, mod.in_features, dtype=torch.float16, device=DEV)  # no token rows: an empty output
        assert dispatch.vq_linear_forward(mod, x0, force=True).shape == (2, 0, mod.out_features)
        monkeypatch.setenv("VPTQ_CHUNKED_ROWS", "many")
        mod._kernel_state = None
        with pytest.raises(ValueError, match="VPTQ_CHUNKED_ROWS"):
            dispatch.vq_linear_forward(mod, x, force=True)


def test_interleaved_codes_switch(monkeypatch):
    """VPTQ_INTERLEAVE_CODES=1: the layer's batch-1 plan reads its interleaved copy of the codes and
    gives the same numbers; 0 (the default) keeps the stored codes; anything else is refused by name."""
    mod = _layer(**{**ROWS_LAYERS["v4_k256"], "m": 40, "n": 128})
    x = torch.randn(1, 1, mod.in_features, generator=torch.Generator().manual_seed(8)).half().to(DEV)
    yr = torch.nn.functional.linear(x.float(), dequantize_ref(PackedLayer.from_module(mod), torch.float32),
                                    mod.bias.float())
    with torch.no_grad():
        for val, ilv in (("1", True), ("0", False)):
            monkeypatch.setenv("VPTQ_INTERLEAVE_CODES", val)
            mod._kernel_state = None  # the plan is built (and the switch read) once per layer state
            y = dispatch.vq_linear_forward(mod, x, force=True)
            plan = mod._kernel_state[2]
            assert plan.path == "rows" and plan.rows_cfg["ilv"] == ilv
            assert (plan.ridx64.data_ptr() != mod.indices.data_ptr()) == ilv
            _close(y, yr, 3e-3)
        monkeypatch.setenv("VPTQ_INTERLEAVE_CODES", "yes")
        mod._kernel_state = None
        with pytest.raises(ValueError, match="VPTQ_INTERLEAVE_CODES: 'yes' is not 0 or 1"):
            dispatch.vq_linear_forward(mod, x, force=True)


def test_cpu_forward_never_uses_kernels(monkeypatch):
    """CPU tensors keep the torch path (bit-for-bit), also with the simulator on."""
    import vptq.kernels.dispatch as d

    mod = _layer(**LAYERS["v8_16bit"]).cpu()
    monkeypatch.setattr(d, "vq_linear_forward", lambda *a, **k: pytest.fail("kernel route on CPU"))
    x = torch.randn(2, mod.in_features).half()
    with torch.no_grad():
        y = mod(x)
    assert torch.equal(y, torch.nn.functional.linear(x, mod.dequantized_weight(torch.float16), mod.bias))
    assert not nb.use_kernels(x)


# ------------------------------------------------------------------------------ bad input
def _replace(p: PackedLayer, **kw) -> PackedLayer:
    from dataclasses import replace

    return replace(p, **kw)


@pytest.mark.parametrize("mutate,match", [
    (lambda p: _replace(p, num_centroids=32), "centroids: holds 16 codes"),
    (lambda p: _replace(p, centroids=p.centroids[:, :-1].contiguous()), "centroids: row length"),
    (lambda p: _replace(p, outlier_indices=torch.full_like(p.outlier_indices, 9)), "outlier_indices: values out"),
    (lambda p: _replace(p, indices=p.indices.transpose(1, 2).contiguous().transpose(1, 2)), "indices: must be contiguous"),
    (lambda p: _replace(p, indices=p.indices.long()), "indices: dtype"),
    (lambda p: _replace(p, centroids=p.centroids.float(), res_centroids=p.res_centroids.float(),
                        outlier_centroids=p.outlier_centroids.float()), "centroids: the kernels read fp16"),
    (lambda p: _replace(p, perm=p.perm.to(torch.int64) + 100), "perm: values out of range"),
    (lambda p: _replace(p, group_size=p.group_size + 1), "in_features"),
])
def test_layer_bad_input(mutate, match):
    p = mutate(PackedLayer.from_module(_layer(**LAYERS["full"])))
    with pytest.raises(ValueError, match=match):
        dequantize(p)
    x = torch.randn(1, p.in_features).half().to(DEV)
    with pytest.raises(ValueError, match=match):
        gemv(x, p)


def test_gemv_bad_x():
    p = PackedLayer.from_module(_layer(**LAYERS["full"]))
    with pytest.raises(ValueError, match="x: expected"):
        gemv(torch.randn(1, p.in_features + 1).half().to(DEV), p)
    with pytest.raises(ValueError, match="x: batch 9"):
        gemv(torch.randn(9, p.in_features).half().to(DEV), p)
    with pytest.raises(ValueError, match="x: must be contiguous"):
        gemv(torch.randn(p.in_features, 2).half().to(DEV).t(), p)


# ------------------------------------------------------------------------------ gemv, row per lane
ROWS_LAYERS = {
    # 2-bit v4-k256 (8-bit codes); M not a multiple of v nor of a row tile
    "v4_k256": dict(m=150, n=96, v=4, k=256, kr=0, o=0, g=1),
    # 2-bit v8 with a 256-entry residual (16-bit codes: main byte | residual byte), no bias
    "v8_k256_r256": dict(m=45, n=48, v=8, k=256, kr=256, o=0, g=1, bias=False),
    # no perm, norm or bias
    "v4_plain": dict(m=21, n=64, v=4, k=256, kr=0, o=0, g=1, perm=False, norm=False, bias=False),
    # the 2-bit preset's layout: v5-k1024, 10-bit codes (five 64-bit words per step, codes straddle
    # words), the fifth centroid value in its own fp16 plane
    "v5_k1024": dict(m=43, n=64, v=5, k=1024, kr=0, o=0, g=1),
    # v = 5 with byte codes; v8 with 10-bit codes
    "v5_k256": dict(m=23, n=64, v=5, k=256, kr=0, o=0, g=1, bias=False),
    "v8_k1024": dict(m=40, n=96, v=8, k=1024, kr=0, o=0, g=1, perm=False),
    # the 4-bit preset's layout: v4-k1024 + a 64-entry residual (16-bit codes: 10-bit main, 6-bit residual)
    "v4_k1024_r64": dict(m=38, n=64, v=4, k=1024, kr=64, o=0, g=1),
    # the 3-bit preset's layout: v5-k1024 + a 32-entry residual (15-bit codes: 64 a step, 15 words; both
    # codebooks in 16-byte slots)
    "v5_k1024_r32": dict(m=23, n=128, v=5, k=1024, kr=32, o=0, g=1),
}


@pytest.mark.parametrize("name", list(ROWS_LAYERS))
def test_gemv_rows_matches_oracle(name):
    """Byte codes and small codebooks take the row-per-lane kernel at batch 1; it equals the oracle
    in fp16 and fp32."""
    from vptq.kernels.gemv import GemvPlan

    mod = _layer(**ROWS_LAYERS[name])
    p = PackedLayer.from_module(mod)
    plan = GemvPlan(p)
    assert plan.path == "rows" and plan.base == "smem"
    x = torch.randn(1, mod.in_features, generator=torch.Generator().manual_seed(1)).half().to(DEV)
    y = plan(x)
    assert y.dtype == torch.float16 and y.shape == (1, mod.out_features)
    _close(y, gemv_ref(x.float(), p), 3e-3)
    xf = torch.randn(1, mod.in_features, generator=torch.Generator().manual_seed(5)).to(DEV)
    _close(plan(xf), gemv_ref(xf, p), 1e-4)


# the residual layout splits the same way; in the simulator it costs ~100 s, so it runs on CUDA only
@pytest.mark.parametrize("name", ["v4_k256"] + (["v8_k256_r256"] if HAS_GPU else []))
def test_gemv_rows_split_k(name):
    """Several column chunks (atomics + last-block epilogue) and row tiles, the plan reused: the
    workspace and counters are left zeroed by each call."""
    from vptq.kernels.gemv import GemvPlan

    gpu = not nb.simulator_enabled()
    # a GPU's tiles are 64 rows of vectors: 75 rows make two
    mod = _layer(**{**ROWS_LAYERS[name], "n": 4096 if gpu else 256, "m": 300 if gpu else 150})
    p = PackedLayer.from_module(mod)
    probe = GemvPlan(p)
    unit = probe.rows_cfg["cs"] * probe.rows_cfg["cps"]
    plan = GemvPlan(p, kc=unit)
    c = plan.rows_cfg
    assert plan.path == "rows" and c["nsplit"] > 1 and c["tiles"] > 1 and c["kc"] == unit
    for seed in (1, 2):
        x = torch.randn(1, mod.in_features, generator=torch.Generator().manual_seed(seed)).half().to(DEV)
        _close(plan(x), gemv_ref(x.float(), p), 3e-3)
        assert not plan.rcnt.any() and not plan.workspace(1, True).any()


# v4-k256: one partial row tile (3 rows of vectors), 4 steps a lane (2 with two chunks): simulator 81 -> 6.7 s
@pytest.mark.parametrize("name,m,n", [("v4_k256", 12, 512), ("v5_k1024", 20, 256)])
def test_gemv_rows_several_steps_per_lane(name, m, n):
    """A lane walks several steps of codes (8-bit: loads two steps ahead; 10-bit: one step ahead,
    five words a step; the half2 sums flushed into fp32), with one column chunk and with two."""
    from vptq.kernels.gemv import GemvPlan

    n = 16 * n if HAS_GPU else n  # a GPU block's column runs are 32 or 64 lanes wide
    p = PackedLayer.from_module(_layer(**{**ROWS_LAYERS[name], "m": m, "n": n}))
    for kc in (n, n // 2):
        plan = GemvPlan(p, kc=kc)
        c = plan.rows_cfg
        assert plan.path == "rows" and c["kc"] == kc
        if kc == n:
            assert kc // c["cs"] >= 2 * c["cps"]
        for seed, dtype, tol in ((3, torch.float16, 3e-3), (4, torch.float32, 1e-4)):
            x = torch.randn(1, p.in_features, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)
            _close(plan(x), gemv_ref(x.float(), p), tol)


# lanes sharing a row: 8-bit codes (two 16-byte pieces a step, interleaved), 16-bit codes with the
# residual (8 codes a piece), 10-bit codes (a whole 5-word step a piece)
# rw: rows of a tile (the simulator's warp is 4 lanes: rw 2 = a warp of 2 rows x 2 lanes, rw 8 =
# two warps side by side over the rows)
@pytest.mark.parametrize("name,m,n,lpr,rw", [("v4_k256", 12, 512, 2, 4), ("v4_k256", 9, 512, 4, 4),
                                             ("v5_k1024", 20, 256, 2, 4), ("v8_k256_r256", 16, 128, 2, 4),
                                             ("v4_k256", 11, 512, 2, 2), ("v4_k256", 19, 256, 1, 8),
                                             ("v4_k1024_r64", 10, 256, 4, 4), ("v5_k1024_r32", 10, 512, 4, 4)])
@pytest.mark.skipif(HAS_GPU, reason="tiles sized for the simulator's 4-lane warp (a GPU's 32 lanes need rw >= 32 / lpr); "
                    "the GPU runs lpr 2 and 4 in the persistent and default-plan tests")
def test_gemv_rows_lanes_per_row(name, m, n, lpr, rw):
    """lpr lanes take turns over a row's codes (one warp-wide load reads whole sectors of fewer
    rows); each lane's partial sums join the column runs' in the block reduction; tiles of fewer
    or more rows than a warp's. Equal to the oracle with one column chunk and with two
    (split-K), fp16 and fp32."""
    from vptq.kernels.gemv import GemvPlan

    p = PackedLayer.from_module(_layer(**{**ROWS_LAYERS[name], "m": m, "n": n}))
    for kc in (n, n // 2):
        plan = GemvPlan(p)
        c = plan.configure_rows(kc, lpr=lpr, rw=rw)
        assert plan.path == "rows" and c["lpr"] == lpr and c["kc"] == kc and c["rw"] == rw
        if kc == n:  # each lane walks several steps of its row
            assert kc // (c["cs"] // lpr) >= 2 * lpr * c["cps"]
        for seed, dtype, tol in ((3, torch.float16, 3e-3), (4, torch.float32, 1e-4)):
            x = torch.randn(1, p.in_features, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)
            _close(plan(x), gemv_ref(x.float(), p), tol)
        assert not plan.rcnt.any() and not plan.workspace(1, True).any()


# persistent blocks: codebook copies and x' once per block, then row tiles blockIdx.x, + gridDim.x,
# ...; v5-k1024 with 16-byte centroid slots (wide), byte codes with the word layout
# (on a GPU: 64-row tiles and 512-column units, so 20x the rows and 4x the columns)
@pytest.mark.parametrize("name,m,n,gx", [("v5_k1024", 70, 256, 2), ("v4_k256", 70, 512, 3), ("v5_k1024", 45, 256, 1),
                                        ("v4_k1024_r64", 70, 256, 2), ("v5_k1024_r32", 25, 512, 1)])
def test_gemv_rows_persistent(name, m, n, gx):
    """gx blocks per column chunk walk every row tile (more tiles than blocks, a short last
    tile) and equal the oracle with one column chunk and with two (split-K), fp16 and fp32; the
    split-K counters and workspace are left zeroed; a second call gives the same result (to
    rounding: the x . wbias and split-K sums are atomics)."""
    from vptq.kernels.gemv import GemvPlan

    if HAS_GPU:
        m, n = 20 * m, 4 * n
    p = PackedLayer.from_module(_layer(**{**ROWS_LAYERS[name], "m": m, "n": n}))
    for kc in (n, n // 2):
        plan = GemvPlan(p)
        c = plan.configure_rows(kc, persist=True, gx=gx)
        assert c["persist"] and c["gx"] == gx and c["tiles"] > gx and c["wide"] == (p.vector_len == 5)
        for seed, dtype, tol in ((3, torch.float16, 3e-3), (4, torch.float32, 1e-4)):
            x = torch.randn(1, p.in_features, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)
            y = plan(x)
            _close(y, gemv_ref(x.float(), p), tol)
            assert not plan.rcnt.any() and not plan.workspace(1, True).any()
        _close(plan(x), y, 1e-5)  # a second call: the counters and workspace were left ready


def test_persist_kc_balances_tiles_over_the_sms():
    """The persistent chunk: whole rows when the tiles alone fill the SMs; split-K when they are few."""
    from vptq.kernels.gemv_rows import persist_kc

    assert persist_kc(8192, 1024, 1000, 132) == 8192  # 1000 tiles: no split needed
    kc = persist_kc(8192, 1024, 26, 132)  # 26 tiles: split the columns to use the SMs
    assert kc < 8192 and 26 * (8192 // kc) >= 100
    with pytest.raises(ValueError, match="gx: only a persistent"):
        from vptq.kernels.gemv import GemvPlan

        GemvPlan(PackedLayer.from_module(_layer(**{**ROWS_LAYERS["v4_k256"], "m": 16, "n": 128}))).configure_rows(gx=2)


@pytest.mark.parametrize("name,ahead", [("v4_k256", 3), ("v5_k1024", 2)])
def test_gemv_rows_codes_loaded_further_ahead(name, ahead):
    """Codes requested `ahead` steps before they are used (a probe knob; the defaults are 2 for
    byte codes, 1 for 10-bit codes): each lane walks more steps than that, and the result equals
    the oracle."""
    from vptq.kernels.gemv import GemvPlan

    m, n = (640, 2048) if HAS_GPU else (20, 512)
    p = PackedLayer.from_module(_layer(**{**ROWS_LAYERS[name], "m": m, "n": n}))
    plan = GemvPlan(p)
    c = plan.configure_rows(n, ahead=ahead)
    assert c["ahead"] == ahead and n // (c["cs"] // c["lpr"]) > ahead * c["lpr"] * c["cps"]
    x = torch.randn(1, n, generator=torch.Generator().manual_seed(5)).half().to(DEV)
    _close(plan(x), gemv_ref(x.float(), p), 3e-3)


@pytest.mark.parametrize("bits,n", [(8, 64), (16, 32), (10, 64), (10, 96), (7, 32)])
def test_permute_code_columns(bits, n, monkeypatch):
    """Columns of packed codes reordered (whole bytes, and codes that straddle words, in row chunks)
    equal packing the reordered codes; a wrong column count or a padded row is refused."""
    from vptq.kernels import code_columns
    from vptq.packing import pack_indices

    monkeypatch.setattr(code_columns, "ROWS_PER_CHUNK", 5)  # 37 rows: several chunks and a short one
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (1, 37, n), generator=g)
    order = torch.randperm(n, generator=g)
    out = code_columns.permute_code_columns(pack_indices(codes, bits), bits, order)
    assert torch.equal(out, pack_indices(codes[..., order], bits))
    with pytest.raises(ValueError, match="order: expected"):
        code_columns.permute_code_columns(pack_indices(codes, bits), bits, order[:-1])
    with pytest.raises(ValueError, match="not whole"):
        code_columns.permute_code_columns(pack_indices(codes[..., :3], 10), 10, order[:3])


@pytest.mark.parametrize("name,lpr,persist,tiles_of_two_warps", [
    ("v4_k256", 2, False, False), ("v4_k256", 1, False, False), ("v4_k256", 2, False, True),
    ("v8_k256_r256", 2, False, False), ("v5_k1024", 4, False, False), ("v5_k1024", 2, True, False),
    ("v4_plain", 2, False, False), ("v4_k1024_r64", 2, True, False), ("v5_k1024_r32", 4, True, False)])
def test_gemv_rows_interleaved_codes(name, lpr, persist, tiles_of_two_warps):
    """Codes copied into the warp-interleaved order (ilv: one contiguous run per load instruction of
    a warp; rows padded to whole warps), their columns in the original order where the layer has a
    permutation (x' then read in order: xperm False): the plan's copy holds those codes, and the
    result equals the oracle, for byte, 16-bit and 10-bit codes, one and several rows of a warp per
    lane group, rows that are not whole warps, row tiles of two warps' rows, a persistent launch and
    a layer without a permutation; the row kernel's group launch too."""
    from vptq.kernels.code_columns import permute_code_columns
    from vptq.kernels.gemv import GemvPlan
    from vptq.kernels.gemv_group import RowsGroupPlan
    from vptq.kernels.layout import perm64

    m, n = (650, 2048) if HAS_GPU else (43, 512)
    p = PackedLayer.from_module(_layer(**{**ROWS_LAYERS[name], "m": m, "n": n}))
    plan = GemvPlan(p)
    rw = 2 * (32 if HAS_GPU else 4) if tiles_of_two_warps else None  # 4: the simulator's warp (SIM_WARP)
    c = plan.configure_rows(n, lpr=lpr, persist=persist, ilv=True, rw=rw)
    assert c["ilv"] and c["lpr"] == lpr and c["persist"] == persist and (rw is None or c["rw"] == rw)
    assert not c["xperm"]
    codes = p.indices
    if p.perm is not None:
        codes = permute_code_columns(codes, p.code_bits, torch.argsort(perm64(p.perm)))
        assert not torch.equal(codes, p.indices)
    idx = codes.view(torch.int64)
    rpw = c["gsz"] // lpr
    assert plan.ridx64.shape == (1, -(-p.rows // rpw) * rpw, idx.shape[2]) and plan.ridx64.data_ptr() != idx.data_ptr()
    assert torch.equal(plan.ridx64.flatten().sort().values,
                       torch.cat([idx.flatten(), idx.new_zeros(plan.ridx64.numel() - idx.numel())]).sort().values)
    x = torch.randn(1, n, generator=torch.Generator().manual_seed(6)).half().to(DEV)
    _close(plan(x), gemv_ref(x.float(), p), 3e-3)
    other = PackedLayer.from_module(_layer(**{**ROWS_LAYERS[name], "m": m // 2, "n": n, "seed": 9}))
    plan2 = GemvPlan(other)
    plan2.configure_rows(n, lpr=lpr, persist=persist, ilv=True, rw=rw)
    group = RowsGroupPlan([plan, plan2])
    for y, q in zip(group.split(group(x)), (p, other), strict=True):
        _close(y, gemv_ref(x.float(), q), 3e-3)
    plan2.configure_rows(n, lpr=lpr, persist=persist, rw=rw)
    with pytest.raises(ValueError, match="order of their codes"):
        RowsGroupPlan([plan, plan2])


def test_persistent_launch_fits_the_device(monkeypatch):
    """The persistent shape of the preset's layout on a GPU (32-lane warps): 8 copies of 16-byte
    slots within an H100/H200 block's 227 KiB; fewer copies where a block may take less shared
    memory (an RTX-class 99 KiB), and blocks for the device's SMs."""
    from vptq.kernels import _numba as nb
    from vptq.kernels.gemv_rows import rows_config

    p = PackedLayer.from_module(_layer(**{**ROWS_LAYERS["v5_k1024"], "m": 640, "n": 1024}))
    monkeypatch.setattr(nb, "smem_optin", lambda: 227 * 1024)
    c = rows_config(p, 512, 32, persist=True)
    assert c["wide"] and c["replicas"] == 8 and 128 * 1024 < c["shmem"] <= 227 * 1024
    monkeypatch.setattr(nb, "smem_optin", lambda: 99 * 1024)
    monkeypatch.setattr(nb, "sm_count", lambda: 46)
    c = rows_config(p, 512, 32, persist=True)
    assert c["replicas"] == 4 and c["shmem"] <= 99 * 1024 and c["gx"] * c["nsplit"] <= 46
    # the grid is what is resident at the register cap it is sized for: byte codes at 64 registers
    # (4 blocks of 256 threads per SM) against the default 128 (2)
    from bench.kernel_table import make_layer

    monkeypatch.setattr(nb, "smem_optin", lambda: 227 * 1024)
    monkeypatch.setattr(nb, "sm_count", lambda: 132)
    q = make_layer(81920, 1024, v=4, k=256, device="cpu")  # 640 tiles of 32 rows
    c128, c64 = (rows_config(q, 256, 32, 1024, persist=True, maxreg=mr, rw=32) for mr in (None, 64))
    assert c128["nsplit"] == c64["nsplit"] == 1 and (c128["gx"], c64["gx"]) == (264, 528)


def test_lanes_per_row_falls_back_where_rows_are_short():
    """lpr halves until the row is whole steps of lpr lanes and it divides the warp's rows."""
    from vptq.kernels.gemv_rows import lanes_per_row

    p = PackedLayer.from_module(_layer(**{**ROWS_LAYERS["v4_k256"], "n": 96}))  # 3 steps of 32 codes
    assert lanes_per_row(p, 32, 32, 256, 4) == 1
    with pytest.raises(ValueError, match="rw: 8 rows per tile"):  # a warp of 32 lanes needs 4 lanes a row
        lanes_per_row(p, 8, 32, 256, 1)
    p = PackedLayer.from_module(_layer(**{**ROWS_LAYERS["v4_k256"], "n": 128}))
    assert lanes_per_row(p, 32, 32, 256, 4) == 4 and lanes_per_row(p, 8, 32, 256, 1) == 4
    assert lanes_per_row(p, 4, 4, 8, 4) == 2  # 2 warps of 4 lanes: 4 lanes a row would need 4 warps


def _group_layers(n=256):
    """q/k/v-like layers: same input width and format, different widths out (GQA) and values."""
    return [_layer(**{**ROWS_LAYERS["v4_k256"], "m": m, "n": n, "seed": s}) for s, m in ((1, 150), (2, 40), (3, 44))]


def test_gemv_group_equals_each_layer():
    """One launch for three layers on the same x (split-K: several column chunks) = each layer's
    oracle; the workspace and counters are left zeroed for the next call."""
    from vptq.kernels.gemv import GemvPlan
    from vptq.kernels.gemv_group import RowsGroupPlan

    ps = [PackedLayer.from_module(m) for m in _group_layers(4096 if HAS_GPU else 256)]
    group = RowsGroupPlan([GemvPlan(p) for p in ps])
    assert group.cfg["nsplit"] > 1 and [o for _, o in group.group] == [150, 40, 44]
    for seed, dtype, tol in ((1, torch.float16, 3e-3), (2, torch.float32, 1e-4)):
        x = torch.randn(1, ps[0].in_features, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)
        ys = group.split(group(x))
        for y, p in zip(ys, ps, strict=True):
            assert y.dtype == dtype
            _close(y, gemv_ref(x.float(), p), tol)
        assert not group.cnt.any() and not group.ws.any()
    with pytest.raises(ValueError, match="group: layers differ in in_features"):
        RowsGroupPlan([GemvPlan(ps[0]), GemvPlan(PackedLayer.from_module(_group_layers(512)[1]))])


def test_gemv_group_persistent():
    """A persistent group launch (the 2-bit preset's layout): each layer's blocks walk its own
    tiles (fewer blocks than tiles) with one and two column chunks, = each layer's oracle."""
    from vptq.kernels.gemv import GemvPlan
    from vptq.kernels.gemv_group import RowsGroupPlan, layer_blocks

    assert layer_blocks([10, 3, 3], 8) == [5, 1, 1] and layer_blocks([2, 2], 100) == [2, 2]
    f, n = (10, 1024) if HAS_GPU else (1, 256)  # a GPU's tiles are 32 rows, its column unit 512
    mods = [_layer(**{**ROWS_LAYERS["v5_k1024"], "m": f * m, "n": n, "seed": s}) for s, m in ((1, 150), (2, 40), (3, 45))]
    ps = [PackedLayer.from_module(m) for m in mods]
    for kc in (n, n // 2):
        plans = [GemvPlan(p) for p in ps]
        for pl in plans:
            pl.configure_rows(kc, persist=True)
        group = RowsGroupPlan(plans, gx=5)
        tiles = [t for t, _, _ in group.group]
        assert group.cfg["persist"] and sum(b for _, _, b in group.group) == group.cfg["gx"] < sum(tiles)
        for seed, dtype, tol in ((1, torch.float16, 3e-3), (2, torch.float32, 1e-4)):
            x = torch.randn(1, n, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)
            for y, p in zip(group.split(group(x)), ps, strict=True):
                _close(y, gemv_ref(x.float(), p), tol)
            assert not group.cnt.any() and not group.ws.any()


def test_shared_input_serves_siblings_from_one_launch(monkeypatch):
    """share_inputs marks q/k/v; the first call launches once for all three, the siblings get their
    outputs (same numbers as their own plans); another x, or x changed in place, recomputes."""
    from vptq.kernels.gemv_group import RowsGroupPlan
    from vptq.layers import share_inputs

    mods = _group_layers(128)
    attn = torch.nn.Module()
    for name, m in zip(("q_proj", "k_proj", "v_proj"), mods, strict=True):
        attn.add_module(name, m.to(DEV))
    assert share_inputs(attn) == 1
    calls = []
    orig = RowsGroupPlan.__call__
    monkeypatch.setattr(RowsGroupPlan, "__call__", lambda self, x: calls.append(1) or orig(self, x))

    def run(x):
        return [dispatch.vq_linear_forward(m, x, force=True) for m in mods]

    with torch.no_grad():
        x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(7)).half().to(DEV)
        ys = run(x)
        assert len(calls) == 1
        for y, m in zip(ys, mods, strict=True):
            assert y.shape == (1, 1, m.out_features)
            _close(y[0], gemv_ref(x[0].float(), PackedLayer.from_module(m)), 3e-3)
        x2 = x.clone()  # same values, another tensor: recomputed
        run(x2)
        assert len(calls) == 2
        y_q = dispatch.vq_linear_forward(mods[0], x, force=True)
        x.mul_(2)  # changed in place after q: k is recomputed from the new values
        y_k = dispatch.vq_linear_forward(mods[1], x, force=True)
        assert len(calls) == 4
        _close(y_k[0], gemv_ref(x[0].float(), PackedLayer.from_module(mods[1])), 3e-3)
        assert y_q is not None
        x3 = x.clone()
        dispatch.vq_linear_forward(mods[0], x3, force=True)  # q computes all three, keeps k and v ...
        assert len(calls) == 5
        mods[1].centroids.weight.mul_(-1)  # ... then k's weights change before k is called
        y_k = dispatch.vq_linear_forward(mods[1], x3, force=True)
        assert len(calls) == 6  # k's kept output (old weights) is not used: recomputed
        y_v = dispatch.vq_linear_forward(mods[2], x3, force=True)
        assert len(calls) == 6  # v's, from the recomputation, is
        for y, m in ((y_k, mods[1]), (y_v, mods[2])):
            _close(y[0], gemv_ref(x3[0].float(), PackedLayer.from_module(m)), 3e-3)


def test_gemv_rows_applies_only_where_it_can():
    from vptq.kernels.gemv import GemvPlan
    from vptq.kernels.gemv_rows import rows_path_ok

    odd = PackedLayer.from_module(_layer(**{**ROWS_LAYERS["v4_k256"], "n": 40}))  # rows not whole 32-byte steps
    assert not rows_path_ok(odd) and GemvPlan(odd, **SMALL).path == "smem"
    with pytest.raises(ValueError, match="path: the row-per-lane kernel"):
        GemvPlan(odd, path="rows")
    p = PackedLayer.from_module(_layer(**ROWS_LAYERS["v4_plain"]))
    assert GemvPlan(p, path="smem", **SMALL).path == "smem"  # forcing another kernel still works
    x = torch.randn(2, p.in_features, generator=torch.Generator().manual_seed(2)).half().to(DEV)
    _close(GemvPlan(p, **SMALL)(x), gemv_ref(x.float(), p), 3e-3)  # batch 2: the base (smem) kernel
