"""Bad input gets a clear error naming the problem."""
import pytest
import torch

from pyprune import PruneConfig, Sparsity, prune_layer
from pyprune import ops
from tests.helpers import random_layer


@pytest.fixture
def layer(rng):
    return random_layer(8, 16, rng)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "abc", "4:2", "2:2", "0:4", "2:x", True, None])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity|N:M"):
        PruneConfig(sparsity=bad)


def test_sparsity_parsing():
    assert Sparsity.parse("2:4") == Sparsity(0.5, 2, 4)
    assert Sparsity.parse("0.6").fraction == 0.6 and not Sparsity.parse(0.6).structured
    assert str(Sparsity.parse("4:8")) == "4:8"


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="obs"), "unknown method"), (dict(block_size=0), "block_size"), (dict(damp=-1), "damp"),
    (dict(mask="exact", sparsity=0.5), "N:M"), (dict(sparsity="2:4", block_size=6), "multiple of M"),
    (dict(mask="foo"), "unknown mask"), (dict(mask_scope="x"), "mask_scope"), (dict(backend="x"), "backend")])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("what,value", [("nan", float("nan")), ("inf", float("inf"))])
@pytest.mark.parametrize("where", ["W", "H"])
def test_non_finite_inputs(layer, what, value, where):
    W, H = layer
    (W if where == "W" else H)[1, 2] = value
    with pytest.raises(ValueError, match=f"{'weight' if where == 'W' else 'H'} contains (NaN|Inf)"):
        prune_layer(W, H, PruneConfig())


def test_shape_and_dtype_errors(layer):
    W, H = layer
    with pytest.raises(ValueError, match=r"H must have shape \(16, 16\)"):
        prune_layer(W, H[:8, :8], PruneConfig())
    with pytest.raises(ValueError, match="weight must be 2-D"):
        prune_layer(W[0], H, PruneConfig())
    with pytest.raises(TypeError, match="weight has dtype torch.int64"):
        prune_layer(W.long(), H, PruneConfig())
    with pytest.raises(TypeError, match="H has dtype torch.float16"):
        prune_layer(W, H.half(), PruneConfig())
    with pytest.raises(ValueError, match="needs the layer's Hessian"):
        prune_layer(W, None, PruneConfig())
    with pytest.raises(ValueError, match=r"mask must have shape"):
        prune_layer(W, H, PruneConfig(), mask=torch.zeros(3, 3, dtype=torch.bool))


def test_nm_needs_columns_multiple_of_m(rng):
    W, H = random_layer(4, 18, rng)
    with pytest.raises(ValueError, match=r"columns \(18\) to be a multiple of M=4"):
        prune_layer(W, H, PruneConfig(sparsity="2:4"))


def test_indefinite_hessian(layer):
    W, H = layer
    with pytest.raises(ValueError, match="not positive definite"):
        prune_layer(W, -H - torch.eye(16, dtype=H.dtype), PruneConfig(damp=0.0))


def test_op_argument_errors(rng):
    G = torch.eye(8)
    W1 = torch.randn(3, 8, generator=rng)
    with pytest.raises(TypeError, match="mask has dtype"):
        ops.masked_solve(G, G, W1, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="not a multiple of M=3"):
        ops.nm_select(W1, G, 1, 3)
    with pytest.raises(ValueError, match="X has 5 columns"):
        ops.hessian_update_(torch.zeros(8, 8), torch.zeros(2, 5), 1.0, 1.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.accumulate_hessian(torch.zeros(8, 8), 0, torch.full((2, 8), float("nan")))
    with pytest.raises(ValueError, match="backend=.cuda. needs cuda tensors"):
        ops.masked_solve(G, G, W1, W1 > 0, backend="cuda")
