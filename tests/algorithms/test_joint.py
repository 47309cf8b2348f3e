"""docs/ALGORITHM.md section 6: what a correct implementation shows, on fresh random float64 problems.

The exact OBS math on the calibration H: every config here sets shrink=0 (test_shrink.py ties shrink > 0 to
it)."""
import pytest
import torch

from pyprune import PruneConfig, prune_layer
from pyprune.algorithms import layer_objective
from pyprune.algorithms.common import damped_hessian
from tests.helpers import optimal_for_mask, random_layer, random_mask


def reported_equals_objective(W, H, res, damp=0.01):
    W_ref, H_d, _ = damped_hessian(W, H, damp)
    obj = float(layer_objective(W_ref, res.weight, H_d).sum())
    assert abs(res.loss - obj) <= 1e-8 * max(1.0, abs(obj)), (res.loss, obj)
    torch.testing.assert_close(res.row_loss, layer_objective(W_ref, res.weight, H_d), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("rows,cols,B", [(16, 32, 8), (7, 37, 10), (1, 5, 128), (33, 64, 64), (20, 50, 1)])
@pytest.mark.parametrize("sparsity", [0.5, 0.3, "2:4"])
def test_reported_loss_is_the_objective(rows, cols, B, sparsity, rng):
    if sparsity == "2:4" and (cols % 4 or B % 4):
        pytest.skip("N:M needs cols and B multiples of M (errors are tested in test_errors.py)")
    cfg = PruneConfig(shrink=0.0, sparsity=sparsity, block_size=B)
    W, H = random_layer(rows, cols, rng, dead=2)
    res = prune_layer(W, H, cfg)
    reported_equals_objective(W, H, res)
    assert torch.all(res.weight[res.mask] == 0)


@pytest.mark.parametrize("rows,cols", [(16, 32), (5, 23)])
def test_block_size_one_is_sparsegpt(rows, cols, rng):
    W, H = random_layer(rows, cols, rng)
    mask = random_mask(rows, cols, rng)
    joint = prune_layer(W, H, PruneConfig(shrink=0.0, block_size=1), mask=mask)
    sgpt = prune_layer(W, H, PruneConfig(shrink=0.0, method="sparsegpt", block_size=7), mask=mask)
    torch.testing.assert_close(joint.weight, sgpt.weight, rtol=1e-10, atol=1e-10)
    assert abs(joint.loss - sgpt.loss) <= 1e-10 * sgpt.loss


@pytest.mark.parametrize("rows,cols", [(16, 32), (6, 45)])
def test_one_block_reaches_the_exact_optimum_for_its_mask(rows, cols, rng):
    W, H = random_layer(rows, cols, rng)
    mask = random_mask(rows, cols, rng)
    res = prune_layer(W, H, PruneConfig(shrink=0.0, block_size=cols), mask=mask)
    _, H_d, _ = damped_hessian(W, H, 0.01)
    best = optimal_for_mask(W, H_d, mask)
    torch.testing.assert_close(res.weight, best, rtol=1e-7, atol=1e-8)
    best_loss = float(layer_objective(W, best, H_d).sum())
    assert abs(res.loss - best_loss) <= 1e-8 * best_loss
    # no method with the same mask ends lower: SparseGPT, smaller joint blocks
    for other in (PruneConfig(shrink=0.0, method="sparsegpt"), PruneConfig(shrink=0.0, block_size=4), PruneConfig(shrink=0.0, block_size=cols // 3)):
        assert prune_layer(W, H, other, mask=mask).loss >= res.loss * (1 - 1e-10)


def test_sparsegpt_is_independent_of_its_lazy_block_size(rng):
    W, H = random_layer(12, 40, rng)
    mask = random_mask(12, 40, rng)
    results = [prune_layer(W, H, PruneConfig(shrink=0.0, method="sparsegpt", block_size=B), mask=mask) for B in (1, 3, 16, 40)]
    for r in results[1:]:
        torch.testing.assert_close(r.weight, results[0].weight, rtol=1e-10, atol=1e-10)


def test_joint_loss_falls_with_block_size(rng):
    """Fixed random mask, as in docs/ALGORITHM.md's float64 check of 16 x 32 weights (section 6): B = 1 is SparseGPT,
    B = cols is the optimum and ends well under SparseGPT (over 200 seeds the ratio was 0.68 median, 0.79 worst).
    Intermediate B is not guaranteed to beat SparseGPT (in 29 of those 200 seeds some B in {4, 8, 16} did not), so
    it is not asserted."""
    W, H = random_layer(16, 32, rng)
    mask = random_mask(16, 32, rng)
    sgpt = prune_layer(W, H, PruneConfig(shrink=0.0, method="sparsegpt"), mask=mask).loss
    losses = {B: prune_layer(W, H, PruneConfig(shrink=0.0, block_size=B), mask=mask).loss for B in (1, 4, 8, 16, 32)}
    assert abs(losses[1] - sgpt) <= 1e-9 * sgpt
    assert losses[32] == min(losses.values())
    assert losses[32] < 0.97 * sgpt


@pytest.mark.parametrize("n,m,cols,B", [(2, 4, 32, 8), (4, 8, 48, 16), (1, 4, 20, 4), (3, 8, 24, 24)])
@pytest.mark.parametrize("method,mask", [("joint", "exact"), ("joint", "diag"), ("joint", "sparsegpt"),
                                         ("sparsegpt", None), ("wanda", None), ("magnitude", None)])
def test_nm_output_has_exactly_n_zeros_per_group(n, m, cols, B, method, mask, rng):
    W, H = random_layer(9, cols, rng)
    cfg = PruneConfig(shrink=0.0, method=method, sparsity=f"{n}:{m}", block_size=B, mask=mask)
    res = prune_layer(W, H, cfg)
    assert torch.all(res.mask.reshape(9, cols // m, m).sum(-1) == n)
    assert torch.all((res.weight.reshape(9, cols // m, m) == 0).sum(-1) == n)
    assert res.sparsity == n / m


@pytest.mark.parametrize("scope", ["block", "row"])
@pytest.mark.parametrize("p", [0.5, 0.7, 0.0])
def test_unstructured_sparsity_is_met(scope, p, rng):
    rows, cols, B = 10, 45, 16
    W, H = random_layer(rows, cols, rng)
    res = prune_layer(W, H, PruneConfig(shrink=0.0, sparsity=p, block_size=B, mask_scope=scope))
    expect = 0
    for b0 in range(0, cols, B):
        width = min(B, cols - b0)
        expect += rows * round(p * width) if scope == "row" else round(p * rows * width)
    assert int(res.mask.sum()) == expect
    assert torch.all(res.weight[res.mask] == 0)
    if scope == "row":
        counts = res.mask[:, :B].sum(1)
        assert torch.all(counts == round(p * B))


def test_dead_columns_are_pruned_first(rng):
    W, H = random_layer(8, 32, rng, dead=3)
    dead = torch.diagonal(H) == 0
    for method in ("joint", "sparsegpt", "wanda"):
        res = prune_layer(W, H, PruneConfig(shrink=0.0, method=method, sparsity=0.5, mask="diag" if method == "joint" else None))
        assert torch.all(res.mask[:, dead]), method
        assert torch.all(res.weight[:, dead] == 0)


def test_exact_nm_mask_is_optimal_for_a_single_group(rng):
    """With one group per row and one block, the best-subset mask is the best of all C(M, N) masks. (Across
    several groups it is not guaranteed: coupling between groups is left to the joint solve; measured in the
    accuracy benchmark.)"""
    import itertools
    rows, m, n = 6, 8, 4
    W, H = random_layer(rows, m, rng)
    exact = prune_layer(W, H, PruneConfig(shrink=0.0, sparsity=f"{n}:{m}", block_size=m, mask="exact"))
    for S in itertools.combinations(range(m), n):
        mask = torch.zeros(rows, m, dtype=torch.bool)
        mask[:, list(S)] = True
        other = prune_layer(W, H, PruneConfig(shrink=0.0, block_size=m), mask=mask)
        assert torch.all(exact.row_loss <= other.row_loss * (1 + 1e-9) + 1e-12)


def test_joint_beats_baselines_on_random_problems(rng):
    W, H = random_layer(32, 64, rng)
    cfg = dict(sparsity=0.5, block_size=64)
    joint = prune_layer(W, H, PruneConfig(shrink=0.0, **cfg)).loss
    sgpt = prune_layer(W, H, PruneConfig(shrink=0.0, method="sparsegpt", **cfg)).loss
    wanda = prune_layer(W, H, PruneConfig(shrink=0.0, method="wanda", **cfg)).loss
    mag = prune_layer(W, H, PruneConfig(shrink=0.0, method="magnitude", **cfg)).loss
    assert joint <= sgpt * (1 + 1e-9) and joint < wanda and joint < mag


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_weights_keep_their_dtype(dtype, rng):
    W64, H = random_layer(12, 32, rng)
    W = W64.to(dtype)
    res = prune_layer(W, H.float(), PruneConfig(shrink=0.0, sparsity="2:4", block_size=16))
    ref = prune_layer(W.double(), H, PruneConfig(shrink=0.0, sparsity="2:4", block_size=16))
    assert res.weight.dtype == dtype
    assert torch.all(res.weight[res.mask] == 0)
    # same mask up to near ties; loss close to the float64 run
    assert (res.mask == ref.mask).float().mean() > 0.95
    assert abs(res.loss - ref.loss) <= 0.02 * ref.loss


def test_inputs_are_not_modified(rng):
    W, H = random_layer(8, 16, rng, dead=1)
    W0, H0 = W.clone(), H.clone()
    for method in ("joint", "sparsegpt", "wanda", "magnitude"):
        prune_layer(W, H, PruneConfig(shrink=0.0, method=method))
    assert torch.equal(W, W0) and torch.equal(H, H0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_zero_masked_is_masked_fill(dtype, rng):
    """The driver's zeroing of a block's pruned weights (a bit AND on a strided column block) gives masked_fill_'s
    bits: +0.0 where pruned (also over -0.0, NaN and Inf), every other bit unchanged, nothing outside the block."""
    from pyprune.algorithms.common import zero_masked_
    W = torch.randn(37, 300, generator=rng).to(dtype)
    block = W[:, 51:178]
    block[0, :4] = torch.tensor([float("nan"), -float("inf"), -0.0, -2.5]).to(dtype)
    mask = torch.rand(37, 127, generator=rng) < 0.5
    mask[0, :4] = torch.tensor([True, True, True, False])
    want = W.clone()
    want[:, 51:178].masked_fill_(mask, 0.0)
    zero_masked_(block, mask)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[W.element_size()]
    assert torch.equal(W.view(ints), want.view(ints))
    assert int(block[0, 3].float()) == -2 and block[mask].view(ints).eq(0).all()
