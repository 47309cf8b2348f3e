"""The OBS setup (issue 12): U from one Cholesky of the flipped H_d, the same factor as SparseGPT's four-step
formula; the damping retry (issue 11 item 13).

The exact OBS math on the calibration H: every config here sets shrink=0 (test_shrink.py ties shrink > 0 to it)."""
import pytest
import torch

from pyprune import PruneConfig, prune_layer
from pyprune.algorithms import MAX_DAMP, common
from pyprune.algorithms.common import damp_schedule, inverse_cholesky_upper
from tests.algorithms.test_joint import reported_equals_objective
from tests.helpers import random_layer


def old_inverse_cholesky_upper(H_d: torch.Tensor) -> torch.Tensor:
    """SparseGPT's formula, the package's before issue 12: Cholesky, L^{-1}, L^{-T} L^{-1}, upper Cholesky."""
    L = torch.linalg.cholesky(H_d)
    L_inv = torch.linalg.solve_triangular(L, torch.eye(H_d.shape[0], dtype=H_d.dtype), upper=False)
    return torch.linalg.cholesky(L_inv.T @ L_inv, upper=True)


def random_spd(n: int, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A damped Hessian of correlated inputs with uneven scales (condition number about 500 at 130 and 257 columns)."""
    _, H = random_layer(1, n, g)
    return (H + 0.01 * torch.diagonal(H).mean() * torch.eye(n, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("n", [1, 7, 130, 257])
def test_same_factor_as_the_old_formula(n, rng):
    H_d = random_spd(n, rng)
    H0 = H_d.clone()
    U = inverse_cholesky_upper(H_d)
    assert torch.equal(H_d, H0)  # overwrite=False leaves H_d alone
    ref = old_inverse_cholesky_upper(H_d)
    # measured over 20 seeds: at most 3e-15 of max |U| apart; a wrong factor is O(1) off
    assert float((U - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    assert torch.all(U.tril(-1) == 0) and torch.all(torch.diagonal(U) > 0)
    torch.testing.assert_close(U @ H_d @ U.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [1, 7, 130, 257])
def test_overwrite_returns_the_factor_in_place(n, rng):
    H_d = random_spd(n, rng)
    ref = inverse_cholesky_upper(H_d)
    work = H_d.clone()
    U = inverse_cholesky_upper(work, overwrite=True)
    assert U.data_ptr() == work.data_ptr()
    assert torch.equal(U, ref)


def test_float32_factor_is_close_to_float64(rng):
    H_d = random_spd(257, rng)
    ref = old_inverse_cholesky_upper(H_d)
    U = inverse_cholesky_upper(H_d.float()).double()
    # measured over 20 seeds: 4e-7 to 7e-7 of max |U| from float64 (the old formula in float32: the same)
    assert float((U - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_direct_call_names_the_fix():
    with pytest.raises(ValueError, match="not positive definite .*increase damp"):
        inverse_cholesky_upper(-torch.eye(5, dtype=torch.float64))


def test_damp_schedule():
    assert damp_schedule(0.01) == pytest.approx([0.01, 0.1, 1.0])
    assert damp_schedule(0.03) == pytest.approx([0.03, 0.3, 1.0])
    assert damp_schedule(0.0) == pytest.approx([0.0, 1e-4, 1e-3, 1e-2, 0.1, 1.0])
    assert damp_schedule(2.0) == [2.0] and damp_schedule(MAX_DAMP) == [MAX_DAMP]


def spectrum_hessian(eigenvalues: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    H = Q @ torch.diag(eigenvalues.double()) @ Q.T
    return (H + H.T) / 2


def count_factorisations(monkeypatch) -> list:
    calls = []
    real = common.inverse_cholesky_upper

    def counted(H_d, **kw):
        calls.append(H_d.shape[0])
        return real(H_d, **kw)
    monkeypatch.setattr(common, "inverse_cholesky_upper", counted)
    return calls


@pytest.mark.parametrize("method,sparsity", [("joint", 0.5), ("joint", "2:4"), ("sparsegpt", 0.5)])
def test_indefinite_at_the_default_damp_is_retried(method, sparsity, rng, monkeypatch):
    """One eigenvalue at -5% of the mean curvature: indefinite at damp 0.01, definite at 0.1."""
    cols = 32
    lam = 0.5 + torch.rand(cols, generator=rng, dtype=torch.float64)
    lam[3] = -0.05 * lam.mean()
    H = spectrum_hessian(lam, rng)
    W = torch.randn(8, cols, generator=rng, dtype=torch.float64)
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_cholesky_upper(H + 0.01 * torch.diagonal(H).mean() * torch.eye(cols, dtype=torch.float64))
    calls = count_factorisations(monkeypatch)
    cfg = PruneConfig(shrink=0.0, method=method, sparsity=sparsity, block_size=16)
    res = prune_layer(W, H, cfg)
    assert len(calls) == 2 and res.damp == pytest.approx(0.1)
    direct = prune_layer(W, H, cfg.replace(damp=res.damp))
    assert torch.equal(res.weight, direct.weight) and torch.equal(res.mask, direct.mask) and res.loss == direct.loss
    reported_equals_objective(W, H, res, damp=res.damp)


def test_fails_past_the_limit_naming_it(rng, monkeypatch):
    """Half the eigenvalues at -2 x the mean curvature: indefinite at every damp up to 1."""
    cols = 24
    lam = torch.full((cols,), 10.0, dtype=torch.float64)
    lam[cols // 2:] = -5.0  # mean diag 2.5, smallest eigenvalue -5
    H = spectrum_hessian(lam, rng)
    W = torch.randn(4, cols, generator=rng, dtype=torch.float64)
    calls = count_factorisations(monkeypatch)
    with pytest.raises(ValueError, match=r"even at damp=1 \(tried 0\.01, 0\.1, 1; .*MAX_DAMP=1\).*larger "
                                         r"PruneConfig\(damp=\.\.\.\)"):
        prune_layer(W, H, PruneConfig(shrink=0.0))
    assert len(calls) == 3
    # a damp above the limit is the user's explicit choice: tried once, and here it is enough
    calls.clear()
    res = prune_layer(W, H, PruneConfig(shrink=0.0, damp=3.0))
    assert len(calls) == 1 and res.damp == 3.0


def test_damp_is_recorded_for_every_method(rng):
    W, H = random_layer(6, 16, rng)
    for method in ("joint", "sparsegpt", "wanda", "magnitude"):
        assert prune_layer(W, H, PruneConfig(shrink=0.0, method=method, damp=0.02)).damp == 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU memory accounting")
def test_overwrite_holds_at_most_two_buffers():
    n = 4096
    g = torch.Generator().manual_seed(0)
    H_d = random_spd(n, g, torch.float32).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    inverse_cholesky_upper(H_d, overwrite=True)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / (4 * n * n)
    assert extra <= 1.3, extra  # J H_d J, plus the flips' bands and the solver's workspace
