"""Triton Hessian accumulation ``H <- beta H + alpha X^T X`` against the plain-torch oracle.

On CPU tensors the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py); the "cuda"
variants run the same checks compiled on a GPU and are skipped without one.
"""
import pytest
import torch

pytest.importorskip("triton")

from pyprune import reference  # noqa: E402
from pyprune.triton_kernels._common import is_interpreted  # noqa: E402
from pyprune.triton_kernels.hessian import _hessian_kernel, hessian_update_triton  # noqa: E402
from tests.helpers import activations, check_hessian_update, sym_hessian  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
_sym_H, _X, _check = sym_hessian, activations, check_hessian_update


def _need(device):
    if device == "cpu" and not is_interpreted(_hessian_kernel):
        pytest.skip("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before import)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cols", [1, 37, 130, 256])
@pytest.mark.parametrize("k", [1, 50, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hessian_matches_reference(device, cols, k, dtype, rng):
    _need(device)
    H = _sym_H(cols, rng).to(device)
    X = _X(k, cols, dtype, rng).to(device)
    alpha, beta = 2.0 / (k + 10), 10.0 / (k + 10)
    H_out = H.clone()
    hessian_update_triton(H_out, X, alpha, beta)
    _check(H_out, H, X, alpha, beta, rng.initial_seed())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cols,k,block,split_k,group,dtype", [
    (37, 50, 16, 2, 1, torch.float32),     # several tiles per side, ragged last tile, split-K
    (130, 300, 32, 3, 1, torch.bfloat16),  # 5x5 tiles -> 15 programs per split, ragged k chunk
    (256, 300, 64, 5, 1, torch.float16),   # exact tile multiple
    (20, 7, 16, 4, 1, torch.float32),      # more splits requested than k chunks
    (100, 40, 16, 1, 2, torch.float32),    # 7x7 tiles in 2x2 super-tiles: idle programs, ragged super-tile
    (130, 50, 16, 2, 4, torch.bfloat16),   # 9x9 tiles in 4x4 super-tiles, with split-K
])
def test_hessian_tiles_split_k_and_grouping(device, cols, k, block, split_k, group, dtype, rng):
    _need(device)
    H = _sym_H(cols, rng).to(device)
    X = _X(k, cols, dtype, rng).to(device)
    H_out = H.clone()
    hessian_update_triton(H_out, X, 0.25, 0.75, _block=block, _block_k=16, _split_k=split_k, _group=group)
    _check(H_out, H, X, 0.25, 0.75, rng.initial_seed())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split_k", [1, 2])
def test_hessian_beta_zero_ignores_poisoned_H(device, split_k, rng):
    _need(device)
    cols, k = 70, 40
    X = _X(k, cols, torch.float16, rng).to(device)
    H = torch.full((cols, cols), float("nan"), device=device)
    hessian_update_triton(H, X, 0.5, 0.0, _block=32, _block_k=16, _split_k=split_k, _group=2)
    _check(H, torch.zeros(cols, cols, device=device), X, 0.5, 0.0, rng.initial_seed())


@pytest.mark.parametrize("device", DEVICES)
def test_hessian_reads_only_upper_triangle(device, rng):
    """H is symmetric by contract: the strict lower triangle is never read (poisoned here), only written."""
    _need(device)
    cols, k = 45, 20
    H = _sym_H(cols, rng).to(device)
    X = _X(k, cols, torch.float32, rng).to(device)
    H_poison = H.clone()
    lower = torch.ones(cols, cols, dtype=torch.bool, device=device).tril(-1)
    H_poison[lower] = float("nan")
    hessian_update_triton(H_poison, X, 0.1, 0.9, _block=16)
    _check(H_poison, H, X, 0.1, 0.9, rng.initial_seed())


@pytest.mark.parametrize("device", DEVICES)
def test_hessian_empty_batch_scales_only(device, rng):
    _need(device)
    H = _sym_H(33, rng).to(device)
    X = torch.empty(0, 33, device=device)
    H_out = H.clone()
    hessian_update_triton(H_out, X, 1.0, 0.5)
    _check(H_out, H, X, 1.0, 0.5, rng.initial_seed())


@pytest.mark.parametrize("device", DEVICES)
def test_hessian_strided_rows_and_tf32_flag(device, rng):
    """X may be a row-strided view (unit column stride); allow_tf32 only changes fp32 precision on the GPU."""
    _need(device)
    cols = 40
    big = _X(60, cols + 9, torch.float32, rng).to(device)
    X = big[::2, 4:4 + cols]
    H = _sym_H(cols, rng).to(device)
    H_out = H.clone()
    hessian_update_triton(H_out, X, 0.3, 1.0, allow_tf32=False)
    _check(H_out, H, X, 0.3, 1.0, rng.initial_seed())
    H_tf32 = H.clone()
    hessian_update_triton(H_tf32, X, 0.3, 1.0, allow_tf32=True)
    exact = reference.hessian_update(H.double(), X.double(), 0.3, 1.0)
    assert torch.equal(H_tf32, H_tf32.T)
    assert (H_tf32.double() - exact).norm() <= 1e-2 * exact.norm()  # tf32 keeps ~10 mantissa bits


@pytest.mark.parametrize("device", DEVICES)
def test_hessian_through_ops_wrapper(device, rng):
    _need(device)
    from pyprune.ops import accumulate_hessian
    cols = 24
    H = torch.zeros(cols, cols, device=device)
    Xs = [_X(10, cols, torch.bfloat16, rng).to(device) for _ in range(3)]
    n = 0
    for X in Xs:
        n = accumulate_hessian(H, n, X, backend="triton")
    H64 = torch.zeros(cols, cols, dtype=torch.float64, device=device)
    n64 = 0
    for X in Xs:
        H64, n64 = reference.accumulate_hessian(H64, n64, X.double())
    assert n == n64 == 30
    assert torch.equal(H, H.T)
    torch.testing.assert_close(H.double(), H64, rtol=1e-5, atol=1e-6)


def test_hessian_argument_errors():
    H = torch.zeros(8, 8)
    with pytest.raises(TypeError, match="H has dtype"):
        hessian_update_triton(H.double(), torch.zeros(3, 8), 1.0, 0.0)
    with pytest.raises(ValueError, match="columns"):
        hessian_update_triton(H, torch.zeros(3, 7), 1.0, 0.0)
    with pytest.raises(ValueError, match="contiguous"):
        hessian_update_triton(torch.zeros(8, 16)[:, ::2], torch.zeros(3, 8), 1.0, 0.0)
    with pytest.raises(ValueError, match="unit column stride"):
        hessian_update_triton(H, torch.zeros(8, 3).T, 1.0, 0.0)
    with pytest.raises(TypeError, match="X has dtype"):
        hessian_update_triton(H, torch.zeros(3, 8, dtype=torch.int32), 1.0, 0.0)
    with pytest.raises(ValueError, match="power of two"):
        hessian_update_triton(H, torch.zeros(3, 8), 1.0, 0.0, _block=24)


@pytest.mark.parametrize("device", DEVICES)
def test_hessian_library_op(device, rng):
    """Registered as pyprune_triton::hessian_update with a fake implementation: opcheck and torch.compile."""
    _need(device)
    H = _sym_H(8, rng).to(device)
    X = _X(5, 8, torch.float32, rng).to(device)
    torch.library.opcheck(torch.ops.pyprune_triton.hessian_update, (H.clone(), X, 0.5, 0.5, False, 0, 0, 0, 0))

    def step(H, X):
        hessian_update_triton(H, X, 0.5, 0.5)
        return H * 2

    H1 = H.clone()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(H1, X)
    expected = reference.hessian_update(H, X, 0.5, 0.5)
    torch.testing.assert_close(H1, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, 2 * expected, rtol=1e-5, atol=1e-6)
