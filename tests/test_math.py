"""Invariants of the method on toy shapes."""

import pytest
import torch

from vptq.baselines import gptq_weight, rtn_weight
from vptq.config import QuantConfig
from vptq.kmeans import nearest, weighted_kmeans, weighted_subsample
from vptq.quantizer import LayerReport, dequantize, inverse_hessian_factor, proxy_error, quantize_linear

from .conftest import correlated_problem


def _weighted_err(x, w, c):
    return float((w * ((x - c[nearest(x, c)]) ** 2).sum(1)).sum())


def test_weighted_kmeans_beats_unweighted_on_weighted_error():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 2, generator=g)
    w = torch.where(x[:, 0] > 1.0, 50.0, 0.1)  # a few vectors matter much more
    cw = weighted_kmeans(x, 16, w, iters=50, seed=0)
    cu = weighted_kmeans(x, 16, None, iters=50, seed=0)
    assert _weighted_err(x, w, cw) < 0.8 * _weighted_err(x, w, cu)


def test_kmeans_subsample_keeps_the_heavy_vectors():
    # Qwen2.5's massive-activation channels (bench/RESULTS.md): a few vectors carry most of the weighted error;
    # a uniform 131k sample of millions dropped most of them and the layer's codebook could not serve them
    g = torch.Generator().manual_seed(4)
    light = torch.randn(60000, 2, generator=g)
    heavy = 8.0 + 4.0 * torch.randn(60, 2, generator=g)  # far from the bulk, scattered
    x = torch.cat([light, heavy])
    w = torch.cat([torch.ones(60000), torch.full((60,), 2000.0)])
    full = _weighted_err(x, w, weighted_kmeans(x, 64, w, iters=30, seed=0))
    def sampled(how):
        return [_weighted_err(x, w, weighted_kmeans(x, 64, w, iters=30, seed=s, max_samples=3000, sample=how))
                for s in range(3)]

    # a uniform 5 % sample keeps ~3 of the 60 and lands at 30-80x the full fit; the weighted one at 0.9-1.5x
    assert max(sampled("weighted")) < 2.0 * full < min(sampled("uniform"))


def test_weighted_subsample_size_weights_and_heavy_vectors():
    g = torch.Generator().manual_seed(5)
    w = torch.exp(3.0 * torch.randn(200000, generator=g))  # heavy-tailed, as H[j,j] of massive channels
    pick, ws = weighted_subsample(w, 10000, torch.Generator().manual_seed(0))
    assert abs(pick.numel() - 10000) < 500  # Poisson sampling: about m
    assert abs(float(ws.sum() / w.sum()) - 1) < 0.05  # Horvitz-Thompson: the total weight is kept
    heavy = (w > w.sum() / 10000 * 2).nonzero().squeeze(1)  # far above the capping level: always kept
    assert heavy.numel() > 100 and torch.isin(heavy, pick).all()
    zero, wz = weighted_subsample(torch.zeros(50000), 1000, torch.Generator().manual_seed(0))
    assert 800 < zero.numel() < 1200 and not wz.any()  # a dead layer: uniform, no weight invented


def test_kmeans_is_deterministic_and_uses_every_code():
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(2))
    c1 = weighted_kmeans(x, 64, torch.rand(3000, generator=torch.Generator().manual_seed(0)), iters=20, seed=3)
    c2 = weighted_kmeans(x, 64, torch.rand(3000, generator=torch.Generator().manual_seed(0)), iters=20, seed=3)
    assert torch.equal(c1, c2)
    assert nearest(x, c1).unique().numel() == 64


def test_vptq_beats_kmeans_beats_rtn_at_matched_bits():
    """At the same all-in bits per weight (codebooks and RTN's fp16 scale + zero per group counted): VPTQ <
    plain k-means (the same codebook shape, before the column loop) < RTN. The matrix is large enough that a
    256 x 4 codebook costs 1/8 bit a weight (a 64 x 48 one would cost 2.7 and the comparison would mean nothing)."""
    from torch import nn

    from vptq.baselines import rtn_linear
    from vptq.config import layer_bpw

    m, n = 256, 512
    w, h = correlated_problem(m=m, n=n, tokens=4096)
    cfg = QuantConfig(vector_len=4, num_centroids=256, enable_norm=False, kmeans_iters=20, refine_iters=0)
    _, rep = quantize_linear(w, h, cfg)
    lin = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    _, rtn = rtn_linear(2, group=256)("w", lin, h, cfg)
    assert abs(layer_bpw(cfg, m, n) - rtn.bpw) <= 0.05, (layer_bpw(cfg, m, n), rtn.bpw)  # 2.125 both
    assert rep.proxy_loss < rep.proxy_loss_kmeans < rtn.proxy_loss
    assert rep.proxy_loss < 0.5 * rep.proxy_loss_kmeans  # the column loop is doing real work (0.016 vs 0.142)
    assert rep.proxy_loss_kmeans < 0.7 * rtn.proxy_loss  # vectors beat scalars at equal bits (0.142 vs 0.320)


@pytest.mark.parametrize("kw", [
    dict(), dict(enable_norm=True), dict(enable_perm=False), dict(group_num=2),
    dict(num_res_centroids=16), dict(outlier_percent=5.0, outlier_vector_len=2, outlier_centroids=64),
    dict(vector_len=6), dict(error_feedback=False), dict(weighted_kmeans=False),
])
def test_every_part_dequantizes_consistently(kw):
    w, h = correlated_problem(m=50, n=40, seed=3)
    cfg = QuantConfig(vector_len=4, num_centroids=64, kmeans_iters=10).with_(**kw)
    q, rep = quantize_linear(w, h, cfg)
    what = dequantize(q)
    assert what.shape == w.shape
    hn = h / torch.diag(h).mean()
    assert abs(proxy_error(what - w, hn) / proxy_error(w, hn) - rep.proxy_loss) < 1e-4
    assert 0 <= rep.proxy_loss < 1.0


@pytest.mark.parametrize("kw", [dict(), dict(enable_norm=True, num_res_centroids=16), dict(group_num=2),
                                dict(outlier_percent=5.0, outlier_vector_len=2, outlier_centroids=64)])
def test_permutation_folded_into_the_column_order(kw, monkeypatch):
    """With one group and no outlier columns the act-order permutation is folded into the codes'
    column order and not stored; the weights are exactly those of the unfolded layer. Groups and
    outlier columns keep it."""
    import vptq.quantizer as qz

    w, h = correlated_problem(m=50, n=40, seed=5)
    cfg = QuantConfig(vector_len=4, num_centroids=64, kmeans_iters=10).with_(**kw)
    q, rep = quantize_linear(w, h, cfg)
    monkeypatch.setattr(qz, "FOLD_PERM", False)
    q0, rep0 = quantize_linear(w, h, cfg)
    assert q0.perm is not None and not torch.equal(q0.perm, torch.arange(40))
    folded = cfg.group_num == 1 and cfg.outlier_percent == 0
    assert (q.perm is None) == folded
    if folded:
        assert not torch.equal(q.indices, q0.indices)
    assert torch.equal(dequantize(q), dequantize(q0)) and rep.proxy_loss == rep0.proxy_loss


def test_residual_codebook_lowers_error():
    w, h = correlated_problem(seed=5)
    base = QuantConfig(vector_len=4, num_centroids=64, kmeans_iters=20, enable_norm=False)
    _, r0 = quantize_linear(w, h, base)
    _, r1 = quantize_linear(w, h, base.with_(num_res_centroids=64))
    assert r1.proxy_loss < 0.8 * r0.proxy_loss


def test_gptq_beats_rtn():
    w, h = correlated_problem(seed=7)
    hn = h / torch.diag(h).mean()
    e_rtn = proxy_error(rtn_weight(w, 3, 16) - w, hn)
    e_gptq = proxy_error(gptq_weight(w, h, 3, 16) - w, hn)
    assert e_gptq < e_rtn


def test_cholesky_retries_with_more_damping_and_records_it():
    n = 16
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0)))
    eig = torch.ones(n)
    eig[0] = -0.05  # indefinite: fails at damp 0.01 (mean diag ~0.93), works at 0.1
    h = q @ torch.diag(eig) @ q.t()
    rep = LayerReport()
    u = inverse_hessian_factor(h, 0.01, rep)
    assert torch.isfinite(u).all() and rep.damp_used == pytest.approx(0.1)
    assert rep.warnings and "damp" in rep.warnings[0]


def test_cholesky_total_failure_degrades_with_warning():
    w = torch.randn(8, 8)
    h = torch.eye(8)
    h[0, 1] = h[1, 0] = 1e6  # eigenvalue ~ -1e6: no damping rescues it
    q, rep = quantize_linear(w, h, QuantConfig(vector_len=4, num_centroids=4, kmeans_iters=5, enable_norm=False))
    assert any("disabled" in m for m in rep.warnings)
    assert torch.isfinite(dequantize(q)).all()


@pytest.mark.parametrize("tiny", [0.0, 1e-9, 3e-6])
def test_scalar_baselines_stay_finite_on_all_zero_and_tiny_groups(tiny):
    """A group whose range is below fp16's smallest normal (all zeros, as some real checkpoints hold) must
    not get a zero fp16 scale: Qwen2.5-0.5B's RTN 4-bit scored NaN perplexity through one."""
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[:, :32] = tiny * torch.randn(8, 32).sign()  # the first group of 32: (near) zero
    h = torch.eye(64) + 0.1
    for q in (rtn_weight(w, 4, 32), gptq_weight(w, h, 4, 32)):
        assert torch.isfinite(q).all()
        assert (q[:, :32] - w[:, :32]).abs().max() <= max(tiny, 1e-4)
        assert (q[:, 32:] - w[:, 32:]).abs().max() < 0.5
