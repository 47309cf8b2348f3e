"""The Hessian's library backend (backend="torch": one library GEMM in place, then the upper triangle mirrored),
what ``backend="auto"`` takes on CUDA tensors, against the float64 oracle.

On a CUDA device the "cuda" variants check the out_dtype=float32 cuBLAS call on 16-bit activations; here they are
skipped.
"""
import pytest
import torch

import pyprune.ops.hessian as hessian_mod
from pyprune import reference
from pyprune.ops import accumulate_hessian, hessian_update_
from tests.helpers import activations, check_hessian_update, sym_hessian

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cols", [1, 37, 130, 257])
@pytest.mark.parametrize("k", [1, 50, 300])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.75, 0.0])
def test_library_matches_float64(device, cols, k, dtype, beta, rng):
    H = sym_hessian(cols, rng).to(device)
    X = activations(k, cols, dtype, rng).to(device)
    alpha = 2.0 / (k + 10)
    H_out = H.clone()
    assert hessian_update_(H_out, X, alpha, beta, backend="torch") is H_out
    check_hessian_update(H_out, H, X, alpha, beta, rng.initial_seed())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cols,tile", [(37, 8), (100, 32), (64, 64), (65, 64)])
def test_library_mirror_tiles(device, cols, tile, rng, monkeypatch):
    """Several mirror tiles per side, a ragged last tile, one tile exactly, one element past it."""
    monkeypatch.setitem(hessian_mod._MIRROR_TILE, device, tile)
    monkeypatch.setattr(hessian_mod, "_MIRROR_TILE_DEFAULT", tile)
    H = sym_hessian(cols, rng).to(device)
    X = activations(40, cols, torch.bfloat16, rng).to(device)
    H_out = H.clone()
    hessian_update_(H_out, X, 0.3, 0.6, backend="torch")
    check_hessian_update(H_out, H, X, 0.3, 0.6, rng.initial_seed())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_library_reads_only_upper_triangle(device, dtype, rng):
    """The strict lower triangle is never read (poisoned here), and beta = 0 reads nothing (H all NaN)."""
    cols, k = 45, 20
    H = sym_hessian(cols, rng).to(device)
    X = activations(k, cols, dtype, rng).to(device)
    H_poison = H.clone()
    lower = torch.ones(cols, cols, dtype=torch.bool, device=device).tril(-1)
    H_poison[lower] = float("nan")
    hessian_update_(H_poison, X, 0.1, 0.9, backend="torch")
    check_hessian_update(H_poison, H, X, 0.1, 0.9, rng.initial_seed())
    H_nan = torch.full((cols, cols), float("nan"), device=device)
    hessian_update_(H_nan, X, 0.5, 0.0, backend="torch")
    check_hessian_update(H_nan, torch.zeros(cols, cols), X, 0.5, 0.0, rng.initial_seed())


@pytest.mark.parametrize("device", DEVICES)
def test_library_float64_H_and_strided_X(device, rng):
    """float64 H (what "auto" gives float64 problems) with bf16 X; X as a row-strided column slice."""
    cols = 40
    H = sym_hessian(cols, rng).double().to(device)
    X = activations(33, cols, torch.bfloat16, rng).to(device)
    H_out = H.clone()
    hessian_update_(H_out, X, 0.25, 0.5)
    exact = reference.hessian_update(H.cpu(), X.cpu().double(), 0.25, 0.5)
    assert H_out.dtype == torch.float64 and torch.equal(H_out, H_out.T)
    torch.testing.assert_close(H_out.cpu(), exact, rtol=1e-12, atol=1e-12 * exact.abs().max().item())
    big = activations(70, cols + 9, torch.float16, rng).to(device)
    Xs = big[::2, 4:4 + cols]
    H32 = sym_hessian(cols, rng).to(device)
    H_out = H32.clone()
    hessian_update_(H_out, Xs, 0.3, 1.0, backend="torch")
    check_hessian_update(H_out, H32, Xs, 0.3, 1.0, rng.initial_seed())


@pytest.mark.parametrize("device", DEVICES)
def test_auto_accumulation_equals_float64(device, rng):
    """accumulate_hessian with every backend default over batches of mixed sizes: the running mean of float64."""
    cols = 50
    Xs = [activations(s, cols, torch.bfloat16, rng).to(device) for s in (7, 64, 1, 30)]
    H = torch.zeros(cols, cols, device=device)
    H_lib = torch.zeros(cols, cols, device=device)
    n = n_lib = 0
    for X in Xs:
        n = accumulate_hessian(H, n, X)
        n_lib = accumulate_hessian(H_lib, n_lib, X, backend="torch")
    H64, n64 = torch.zeros(cols, cols, dtype=torch.float64), 0
    for X in Xs:
        H64, n64 = reference.accumulate_hessian(H64, n64, X.cpu().double())
    assert n == n_lib == n64 == 102
    for got in (H, H_lib):
        assert torch.equal(got, got.T)
        err = (got.cpu().double() - H64).abs().max().item()
        assert err <= 4e-6 * H64.abs().max().item(), f"seed {rng.initial_seed()}: error {err:.3g}"
