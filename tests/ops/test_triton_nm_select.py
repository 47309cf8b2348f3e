"""Triton N:M mask selection against the float64 oracle (interpreter on CPU tensors, compiled on CUDA).

Masks may differ from the oracle where two candidates tie to within rounding, so the checks are: exactly N pruned per
group; the chosen subset's float64 cost (or saliencies) within relative 1e-5 of the best; >= 99% identical masks.
"""
import itertools

import pytest
import torch

pytest.importorskip("triton")

from pyprune import reference  # noqa: E402
from pyprune.triton_kernels._common import is_interpreted  # noqa: E402
from pyprune.triton_kernels.nm_select import _nm_select_kernel, nm_select_triton  # noqa: E402
from tests.helpers import kernel_block  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _need(device):
    if device == "cpu" and not is_interpreted(_nm_select_kernel):
        pytest.skip("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before import)")


def spd_G(B, rng):
    return kernel_block(B, rng)[0]


def subset_costs64(W1, G, n, m):
    """(rows, groups, C(m, n)) float64 costs 1/2 w_S^T G[S,S]^-1 w_S in itertools.combinations order."""
    W = W1.double().cpu()
    Gd = G.double().cpu()
    rows, B = W.shape
    subsets = list(itertools.combinations(range(m), n))
    sub = torch.tensor(subsets)
    out = torch.empty(rows, B // m, len(subsets), dtype=torch.float64)
    for g in range(B // m):
        Gg = Gd[g * m:(g + 1) * m, g * m:(g + 1) * m]
        Q = torch.linalg.inv(Gg[sub[:, :, None], sub[:, None, :]])  # (S, n, n)
        w = W[:, g * m + sub]  # (rows, S, n)
        out[:, g] = 0.5 * torch.einsum("rsi,sij,rsj->rs", w, Q, w)
    return out, subsets


def _check_counts(mask, n, m):
    rows, B = mask.shape
    counts = mask.reshape(rows, B // m, m).sum(2)
    assert bool((counts == n).all()), f"group counts {counts.unique().tolist()} != {n}"


def _check_same(mask, ref, seed):
    same = (mask == ref).float().mean().item()
    assert same >= 0.99, f"seed {seed}: only {same:.4f} of the mask matches the reference"


def _check_exact_choice(mask, W1, G, n, m, seed):
    """Exactly n per group, and every chosen subset's float64 cost within relative 1e-5 of the group's best."""
    rows, B = mask.shape
    _check_counts(mask, n, m)
    costs, subsets = subset_costs64(W1, G, n, m)
    code = {S: s for s, S in enumerate(subsets)}
    chosen = torch.tensor([[code[tuple(torch.nonzero(grp).flatten().tolist())] for grp in row]
                           for row in mask.reshape(rows, B // m, m)])
    got = costs.gather(2, chosen[..., None])[..., 0]
    best = costs.min(2).values
    assert bool((got <= best * (1 + 1e-5) + 1e-12).all()), f"seed {seed}: chosen subset not the cheapest"


def _check_saliency_choice(mask, W1, G, n, m, seed):
    """Exactly n per group, and no pruned saliency w^2 / G_jj above a kept one of its group (relative 1e-5)."""
    rows, B = mask.shape
    _check_counts(mask, n, m)
    score = (W1.double() ** 2 / torch.diagonal(G).double()).reshape(rows, B // m, m)
    mk = mask.reshape(rows, B // m, m)
    worst_pruned = torch.where(mk, score, torch.zeros_like(score)).amax(2)
    best_kept = torch.where(mk, torch.full_like(score, float("inf")), score).amin(2)
    assert bool((worst_pruned <= best_kept * (1 + 1e-5)).all()), f"seed {seed}: pruned a larger saliency"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m,rows,B,dtype", [
    (2, 4, 1, 12, torch.float32),
    (2, 4, 33, 100, torch.float16),
    (2, 4, 7, 40, torch.bfloat16),
    (1, 4, 100, 12, torch.float32),
    (4, 8, 33, 40, torch.float32),
    (4, 8, 7, 16, torch.bfloat16),
    (3, 8, 100, 40, torch.float32),
    (3, 8, 1, 8, torch.float16),
    (2, 16, 7, 32, torch.float32),
])
def test_nm_select_exact(device, n, m, rows, B, dtype, rng):
    _need(device)
    G = spd_G(B, rng)
    W1 = torch.randn(rows, B, generator=rng).to(dtype)
    mask = nm_select_triton(W1.to(device), G.to(device), n, m, exact=True)
    assert mask.dtype == torch.bool and mask.shape == (rows, B) and mask.device.type == device
    mask = mask.cpu()
    seed = rng.initial_seed()
    _check_exact_choice(mask, W1, G, n, m, seed)
    _check_same(mask, reference.nm_select(W1, G, n, m, exact=True), seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m,rows,B,dtype", [
    (2, 4, 33, 100, torch.float32),
    (2, 4, 1, 12, torch.bfloat16),
    (1, 4, 7, 40, torch.float16),
    (4, 8, 100, 40, torch.float32),
    (3, 8, 7, 16, torch.bfloat16),
    (5, 16, 33, 32, torch.float32),
])
def test_nm_select_saliency(device, n, m, rows, B, dtype, rng):
    _need(device)
    G = spd_G(B, rng)
    W1 = torch.randn(rows, B, generator=rng).to(dtype)
    mask = nm_select_triton(W1.to(device), G.to(device), n, m, exact=False).cpu()
    seed = rng.initial_seed()
    _check_saliency_choice(mask, W1, G, n, m, seed)
    _check_same(mask, reference.nm_select(W1, G, n, m, exact=False), seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("n,m", [(2, 4), (3, 8)])
def test_nm_select_ties_first_wins(device, exact, n, m):
    """All candidates tie exactly (G = I, |w| equal): the first subset / lowest columns win, as in the oracle."""
    _need(device)
    B, rows = 2 * m, 5
    W1 = torch.ones(rows, B)
    W1[1] = -1.0
    G = torch.eye(B)
    mask = nm_select_triton(W1.to(device), G.to(device), n, m, exact=exact).cpu()
    assert torch.equal(mask, reference.nm_select(W1, G, n, m, exact=exact))
    first = torch.zeros(m, dtype=torch.bool)
    first[:n] = True
    assert torch.equal(mask, first.repeat(rows, B // m))


@pytest.mark.parametrize("device", DEVICES)
def test_nm_select_strided_rows_and_wrapper(device, rng):
    """W1 as a column slice of a wider weight; the same through pyprune.ops.nm_select(backend="triton")."""
    _need(device)
    from pyprune.ops import nm_select
    rows, B = 20, 24
    G = spd_G(B, rng).to(device)
    W = torch.randn(rows, B + 10, generator=rng).to(device)
    W1 = W[:, 3:3 + B]
    for exact in (True, False):
        mask = nm_select_triton(W1, G, 2, 4, exact=exact)
        _check_counts(mask.cpu(), 2, 4)
        assert torch.equal(mask, nm_select(W1, G, 2, 4, exact=exact, backend="triton"))
        _check_same(mask.cpu(), reference.nm_select(W1.cpu(), G.cpu(), 2, 4, exact=exact), rng.initial_seed())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("n,m,rows,B,dtype,block_r,block_g", [
    (2, 4, 37, 4 * 33, torch.float32, 8, 4),    # ragged tiles on both grid axes
    (4, 8, 5, 8 * 3, torch.bfloat16, 4, 2),
    (3, 6, 11, 6 * 5, torch.float16, 4, 4),     # m not a power of two: the stored tile is padded to 8
    (1, 4, 3, 4, torch.float32, 4, 4),          # one group, fewer rows than a tile
    (2, 16, 3, 48, torch.float32, 2, 4),        # m = 16 (the interpreter takes ~0.5 ms per block operation)
])
def test_nm_select_tiles_odd_shapes(device, exact, n, m, rows, B, dtype, block_r, block_g, rng):
    """Tiles of rows x groups that do not divide the problem; the mask does not depend on the tiling (every
    (row, group) is computed alone), so small tiles give the default launch's mask bit for bit."""
    _need(device)
    from pyprune.triton_kernels.nm_select import _nm_select_impl
    G = spd_G(B, rng)
    W1 = torch.randn(rows, B, generator=rng).to(dtype)
    mask = _nm_select_impl(W1.to(device), G.to(device), n, m, exact, block_r=block_r, block_g=block_g,
                           num_warps=1).cpu()
    seed = rng.initial_seed()
    (_check_exact_choice if exact else _check_saliency_choice)(mask, W1, G, n, m, seed)
    assert torch.equal(mask, nm_select_triton(W1.to(device), G.to(device), n, m, exact=exact).cpu())
    _check_same(mask, reference.nm_select(W1, G, n, m, exact=exact), seed)


@pytest.mark.parametrize("device", DEVICES)
def test_nm_select_exact_skips_singular_subsets(device, rng):
    """A subset whose G[S, S] is singular (two equal columns of G) is never taken, however small its weights; a
    group where every G[S, S] is singular (G's block is zero) gets the first subset, as an argmin over +inf."""
    _need(device)
    m, n, rows = 4, 2, 9
    G = torch.eye(3 * m)
    G[0:2, 0:2] = 1.0  # group 0: columns 0 and 1 equal, G[{0,1}, {0,1}] singular
    G[2 * m:, 2 * m:] = 0.0  # group 2: all zero
    W1 = torch.randn(rows, 3 * m, generator=rng)
    W1[:, 0:2] *= 1e-3  # {0, 1} would be the cheapest pair if it counted
    mask = nm_select_triton(W1.to(device), G.to(device), n, m).cpu()
    _check_counts(mask, n, m)
    assert not bool((mask[:, 0] & mask[:, 1]).any()), "took the singular subset {0, 1}"
    first = torch.tensor([True, True, False, False])
    assert torch.equal(mask[:, 2 * m:], first.repeat(rows, 1))
    _check_exact_choice(mask[:, m:2 * m], W1[:, m:2 * m], G[m:2 * m, m:2 * m], n, m, rng.initial_seed())


def test_nm_exact_table_is_the_inverse_factor(rng):
    """TAB's rows are X_S = chol(G[S, S])^{-1} scattered into the group's columns: X_S^T X_S = G[S, S]^{-1}."""
    from pyprune.triton_kernels.nm_select import exact_table
    n, m, B = 3, 8, 16
    G = spd_G(B, rng)
    tab = exact_table(G, n, m)
    subsets = list(itertools.combinations(range(m), n))
    assert tab.shape == (len(subsets), 1 + n * m, B // m) and tab.dtype == torch.float32
    assert bool((tab[:, 0] == 0).all())
    for g in range(B // m):
        for s, S in enumerate(subsets):
            X = tab[s, 1:, g].double().view(n, m)
            others = [j for j in range(m) if j not in S]
            assert bool((X[:, others] == 0).all())
            XS = X[:, list(S)]
            assert bool((XS.triu(1) == 0).all()), "X_S is not lower triangular"
            idx = [g * m + j for j in S]
            inv = torch.linalg.inv(G.double()[idx][:, idx])
            torch.testing.assert_close(XS.T @ XS, inv, rtol=1e-5, atol=1e-6 * inv.abs().max().item())


def test_nm_select_argument_errors():
    W1 = torch.zeros(3, 8)
    G = torch.eye(8)
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_select_triton(W1, G, 4, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_select_triton(W1, G, 0, 4)
    with pytest.raises(ValueError, match="at most 16"):
        nm_select_triton(torch.zeros(3, 32), torch.eye(32), 2, 32)
    with pytest.raises(ValueError, match="multiple of M"):
        nm_select_triton(torch.zeros(3, 10), torch.eye(10), 2, 4)
    with pytest.raises(ValueError, match="G must have shape"):
        nm_select_triton(W1, torch.eye(9), 2, 4)
    with pytest.raises(TypeError, match="G has dtype"):
        nm_select_triton(W1, G.double(), 2, 4)
    with pytest.raises(ValueError, match="unit column stride"):
        nm_select_triton(torch.zeros(8, 3).T, G, 2, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_nm_select_library_op(device, rng):
    """Registered as pyprune_triton::nm_select with a fake implementation: opcheck and torch.compile."""
    _need(device)
    G = spd_G(8, rng).to(device)
    W1 = torch.randn(6, 8, generator=rng).to(device)
    torch.library.opcheck(torch.ops.pyprune_triton.nm_select, (W1, G, 2, 4, True))
    f = torch.compile(lambda W, G: nm_select_triton(W, G, 2, 4).sum(), fullgraph=True, backend="aot_eager")
    assert int(f(W1, G)) == 6 * 2 * 2
