"""PruneConfig.shrink (issue 22): the OBS methods prune with H_s = (1 - shrink) H + shrink diag(H)."""
import pytest
import torch

from pyprune import PruneConfig, prune_layer
from pyprune.config import DEFAULT_SHRINK, HIGH_SPARSITY_SHRINK, default_shrink
from pyprune.algorithms import layer_objective
from pyprune.algorithms.common import damped_hessian
from tests.helpers import optimal_for_mask, random_layer


def shrunk(H: torch.Tensor, s: float) -> torch.Tensor:
    """The float64 oracle: H with its off-diagonal scaled by 1 - s."""
    out = (1 - s) * H.to(torch.float64)
    out.diagonal().copy_(torch.diagonal(H).to(torch.float64))
    return out


def test_defaults():
    """The joint method shrinks by DEFAULT_SHRINK unless told; SparseGPT stays the published method."""
    assert PruneConfig().shrink == DEFAULT_SHRINK > 0
    assert PruneConfig(method="sparsegpt").shrink == 0.0
    assert PruneConfig(method="wanda").shrink == 0.0
    assert PruneConfig().replace(method="sparsegpt").shrink == 0.0
    assert PruneConfig(shrink=0.2).replace(sparsity="2:4").shrink == DEFAULT_SHRINK  # re-derived, as swaps is
    assert PruneConfig(shrink=0.2).replace(damp=0.1).shrink == 0.2


def test_default_shrink_rule():
    """DEFAULT_SHRINK up to 60% pruned, HIGH_SPARSITY_SHRINK from 70%, linear between; N:M by its fraction N/M."""
    assert (DEFAULT_SHRINK, HIGH_SPARSITY_SHRINK) == (0.5, 0.25)
    for sparsity, want in ((0.2, 0.5), (0.5, 0.5), ("2:4", 0.5), ("4:8", 0.5), (0.6, 0.5), (0.625, 0.4375),
                           (0.65, 0.375), (0.7, 0.25), ("6:8", 0.25), (0.9, 0.25)):
        assert default_shrink(sparsity) == want and PruneConfig(sparsity=sparsity).shrink == want, sparsity
        assert PruneConfig(method="sparsegpt", sparsity=sparsity).shrink == 0.0
    assert PruneConfig(sparsity=0.5).replace(sparsity=0.7).shrink == 0.25  # re-derived for the new sparsity
    assert PruneConfig(sparsity=0.7, shrink=0.5).shrink == 0.5  # an explicit value is kept


@pytest.mark.parametrize("sparsity,shrink", [(0.5, 0.5), ("2:4", 0.5), (0.7, 0.25)])
def test_the_default_is_the_shrunk_run(sparsity, shrink, rng):
    W, H = random_layer(24, 64, rng, dead=2, dtype=torch.float32)
    H = H.float()
    a = prune_layer(W, H, PruneConfig(sparsity=sparsity))
    b = prune_layer(W, H, PruneConfig(sparsity=sparsity, shrink=shrink))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask) and a.loss == b.loss


@pytest.mark.parametrize("rows,cols", [(16, 32), (9, 40), (33, 72)])
@pytest.mark.parametrize("s", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("sparsity", [0.5, "2:4", "4:8"])
def test_same_as_the_shrunk_hessian_given_directly(rows, cols, s, sparsity, rng):
    """shrink=s is the plain run on the oracle's H_s (the same mask and update), the joint update is the optimal
    reconstruction for its mask under the damped H_s (float64), and the reported loss is the objective on the damped
    calibration H (not H_s)."""
    W, H = random_layer(rows, cols, rng, dead=3)
    cfg = PruneConfig(sparsity=sparsity, block_size=cols, swaps=0, shrink=0.0)
    a = prune_layer(W, H, cfg.replace(shrink=s))
    b = prune_layer(W, shrunk(H, s), cfg)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-11)
    W_ref, H_d, _ = damped_hessian(W, H, cfg.damp, s)
    _, H_o, _ = damped_hessian(W, shrunk(H, s), cfg.damp)
    torch.testing.assert_close(H_d, H_o, rtol=1e-12, atol=1e-14)
    best = optimal_for_mask(W_ref, H_d, a.mask)
    torch.testing.assert_close(a.weight, best, rtol=1e-7, atol=1e-8)
    _, H_true, _ = damped_hessian(W, H, cfg.damp)
    true_rows = layer_objective(W_ref, a.weight, H_true)
    torch.testing.assert_close(a.row_loss, true_rows, rtol=1e-8, atol=1e-10)
    assert a.loss == pytest.approx(float(true_rows.sum()), rel=1e-8)
    assert b.loss == pytest.approx(float(layer_objective(W_ref, b.weight, H_o).sum()), rel=1e-8)  # b's own H


@pytest.mark.parametrize("s", [0.3, 0.95, 1.0])
@pytest.mark.parametrize("method", ["joint", "sparsegpt"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_reported_loss_is_on_the_calibration_hessian_in_float32(s, method, wdtype, rng):
    """float32 H, float32 or bfloat16 weights: the O(rows x cols) formula (s <= 0.9) and the direct product (s > 0.9)
    within float32 rounding of the float64 objective, with the shrunk H's damping. With bfloat16 weights the formula
    takes the solve's float32 loss and the differences of the returned (rounded) weights, so it is the returned
    weights' objective within a few bfloat16 roundings only (2^-6; the worst of 120 random layers was 0.66%)."""
    W, H = random_layer(40, 96, rng, dead=3)
    W = W.to(wdtype).double()  # the weights the run sees
    cfg = PruneConfig(method=method, sparsity=0.5, shrink=s)
    r = prune_layer(W.to(wdtype), H.float(), cfg)
    W_ref, H_true, _ = damped_hessian(W, H, cfg.damp)
    want = layer_objective(W_ref, r.weight.double(), H_true)
    rtol = 2 ** -6 if wdtype == torch.bfloat16 and s <= 0.9 else 2e-4
    torch.testing.assert_close(r.row_loss.double(), want, rtol=rtol, atol=1e-6 * float(want.max()))


@pytest.mark.parametrize("method,extra", [("joint", {}), ("joint", dict(mask_scope="block")),
                                          ("sparsegpt", dict(mask_scope="row")), ("sparsegpt", {})])
@pytest.mark.parametrize("sparsity", [0.5, 0.3, "2:4"])
def test_one_is_wanda(method, extra, sparsity, rng):
    """shrink=1 without damping leaves each input's own curvature only: the OBS methods' per-row mask is Wanda's
    score and no kept weight changes (the block-scope joint mask is the same score over a rows x B block)."""
    W, H = random_layer(20, 64, rng, dead=0)
    if isinstance(sparsity, str):
        extra = {}
    cfg = PruneConfig(method=method, sparsity=sparsity, shrink=1.0, damp=0.0, **extra)
    got = prune_layer(W, H, cfg)
    kept = ~got.mask
    assert torch.equal(got.weight[kept], W[kept])
    assert bool((got.weight[got.mask] == 0).all())
    if cfg.mask_scope in (None, "row"):  # N:M, or the fraction of every row
        ref = prune_layer(W, H, PruneConfig(method="wanda", sparsity=sparsity))
        assert torch.equal(got.mask, ref.mask)
    else:  # the same score, the smallest fraction of each rows x B block
        score = W.abs() * torch.diagonal(H).sqrt()
        for b0 in range(0, 64, cfg.block_size):
            blk = score[:, b0:b0 + cfg.block_size]
            k = int(round(sparsity * blk.numel()))
            assert float(blk[got.mask[:, b0:b0 + cfg.block_size]].max()) <= float(
                blk[~got.mask[:, b0:b0 + cfg.block_size]].min())
            assert int(got.mask[:, b0:b0 + cfg.block_size].sum()) == k


def test_what_it_trades_on_a_fixed_mask(rng):
    """On a fixed mask and one block, shrink=0 is the optimal update for the calibration H; any shrink > 0 reports a
    calibration loss at least that (it fits H_s instead), and shrink=1 makes no update at all."""
    W, H = random_layer(24, 48, rng)
    mask = torch.rand(24, 48, generator=rng) < 0.5
    cfg = PruneConfig(block_size=48, swaps=0)
    best = prune_layer(W, H, cfg.replace(shrink=0.0), mask=mask).loss
    for s in (0.2, 0.5, 0.8):
        assert prune_layer(W, H, cfg.replace(shrink=s), mask=mask).loss >= best * (1 - 1e-12)
    none = prune_layer(W, H, cfg.replace(shrink=1.0, damp=0.0), mask=mask)
    assert torch.equal(none.weight, W.masked_fill(mask, 0.0))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError, match="shrink must be a fraction in"):
        PruneConfig(shrink=bad)


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_only_the_obs_methods_take_it(method):
    with pytest.raises(ValueError, match="OBS methods"):
        PruneConfig(method=method, shrink=0.5)


def test_settings_name_it():
    assert PruneConfig(shrink=0.25).settings()["shrink"] == 0.25
    assert PruneConfig().settings()["shrink"] == DEFAULT_SHRINK
    assert "shrink" not in PruneConfig(shrink=0.0).settings()
    assert "shrink" not in PruneConfig(method="sparsegpt").settings()
