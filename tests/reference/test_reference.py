"""The oracles themselves, checked against brute force written differently (loops, explicit index sets)."""
import pytest
import torch

from pyprune import reference
from tests.helpers import nm_brute_force, random_mask, spd_block


@pytest.mark.parametrize("cols,batches", [(1, [3]), (13, [5, 1, 40]), (64, [100, 7])])
def test_running_hessian_equals_full_mean(cols, batches, rng):
    Xs = [torch.randn(k, cols, generator=rng, dtype=torch.float64) for k in batches]
    H, n = torch.zeros(cols, cols, dtype=torch.float64), 0
    for X in Xs:
        H, n = reference.accumulate_hessian(H, n, X)
    X = torch.cat(Xs)
    assert n == X.shape[0]
    torch.testing.assert_close(H, 2.0 / n * X.T @ X, rtol=1e-12, atol=1e-12)


def test_hessian_accepts_low_precision_activations(rng):
    X = torch.randn(50, 24, generator=rng).to(torch.bfloat16)
    H, _ = reference.accumulate_hessian(torch.zeros(24, 24), 0, X)
    Xf = X.double()
    torch.testing.assert_close(H.double(), 2 / 50 * Xf.T @ Xf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,B", [(1, 1), (9, 12), (33, 40)])
def test_masked_solve_matches_explicit_index_sets(rows, B, rng):
    U_B, G = spd_block(B, rng)
    W1 = torch.randn(rows, B, generator=rng, dtype=torch.float64)
    mask = random_mask(rows, B, rng, 0.5)
    mask[0] = True
    if rows > 1:
        mask[1] = False
    E, loss, status = reference.masked_solve(G, U_B, W1, mask)
    assert status.dtype == torch.int32 and torch.all(status == 0)
    for i in range(rows):
        M = mask[i].nonzero().flatten()
        e, l = torch.zeros(B, dtype=torch.float64), 0.0
        if len(M):
            lam = torch.linalg.solve(G[M][:, M], W1[i, M])
            e = U_B[:, M] @ lam
            l = 0.5 * float(lam @ W1[i, M])
        torch.testing.assert_close(E[i], e, rtol=1e-9, atol=1e-9)
        assert abs(float(loss[i]) - l) <= 1e-9 * max(1.0, abs(l))
    # removing the set zeroes it: (w - e^T U_B)[M] = 0
    W_new = W1 - E @ U_B
    assert float(W_new[mask].abs().max()) < 1e-9


@pytest.mark.parametrize("n,m,B", [(2, 4, 8), (1, 4, 12), (4, 8, 16), (3, 8, 8)])
def test_nm_select_exact_matches_brute_force(n, m, B, rng):
    U_B, G = spd_block(B, rng)
    W1 = torch.randn(6, B, generator=rng, dtype=torch.float64)
    mask = reference.nm_select(W1, G, n, m, exact=True)
    assert torch.equal(mask, nm_brute_force(W1, G, n, m))
    assert torch.all(mask.reshape(6, B // m, m).sum(-1) == n)


def test_nm_select_saliency_and_diagonal_exact_agree(rng):
    W1 = torch.randn(20, 16, generator=rng, dtype=torch.float64)
    d = torch.rand(16, generator=rng, dtype=torch.float64) + 0.1
    sal = reference.nm_select(W1, torch.diag(d), 2, 4, exact=False)
    ex = reference.nm_select(W1, torch.diag(d), 2, 4, exact=True)
    assert torch.equal(sal, ex)
    score = (W1 ** 2 / d).reshape(20, 4, 4)
    kth = score.sort(-1).values[..., 1:2]
    assert torch.equal(sal.reshape(20, 4, 4), score <= kth)
