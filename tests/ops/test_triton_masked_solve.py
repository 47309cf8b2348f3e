"""Triton batched masked solve against the plain-torch oracle (interpreter on CPU tensors, compiled on CUDA)."""
import pytest
import torch

pytest.importorskip("triton")

from pyprune import reference  # noqa: E402
from pyprune.triton_kernels._common import is_interpreted  # noqa: E402
from pyprune.triton_kernels.masked_solve import _masked_solve_kernel, masked_solve_triton  # noqa: E402
from tests.helpers import kernel_block  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _need(device):
    if device == "cpu" and not is_interpreted(_masked_solve_kernel):
        pytest.skip("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before import)")


def spd_block(B, rng):
    return kernel_block(B, rng)


def random_mask(rows, B, rng):
    """Per-row densities spread over [0, 1]; row 0 keeps everything, row 1 prunes everything."""
    mask = torch.rand(rows, B, generator=rng) < torch.rand(rows, 1, generator=rng)
    if rows >= 2:
        mask[0] = False
        mask[1] = True
    return mask


def _err(x, exact):
    return (x.double() - exact).norm().item()


def _check(G, U_B, W1, mask, E, loss, seed, status=None):
    """Error vs float64 <= 2x the error of the same solve done by plain torch in fp32 (+ a few ulps)."""
    E64, l64, _ = reference.masked_solve(G.double(), U_B.double(), W1.double(), mask)
    Et, lt, _ = reference.masked_solve(G, U_B, W1, mask)  # plain torch, fp32 (the kernel's compute dtype)
    assert E.dtype == torch.float32 and loss.dtype == torch.float32
    assert E.shape == W1.shape and loss.shape == (W1.shape[0],)
    for name, got, plain, exact in (("E", E, Et, E64), ("loss", loss, lt, l64)):
        err_k, err_t = _err(got, exact), _err(plain, exact)
        tiny = 4 * EPS32 * exact.norm().item() + 1e-30
        assert err_k <= 2 * err_t + tiny, f"seed {seed}: {name} error {err_k:.3e} vs torch fp32 {err_t:.3e}"
    if status is not None:
        assert status.dtype == torch.int32 and torch.equal(status.cpu(), torch.zeros(W1.shape[0], dtype=torch.int32))
    empty = ~mask.any(1)
    assert torch.equal(E[empty], torch.zeros_like(E[empty])) and torch.equal(loss[empty], torch.zeros_like(loss[empty]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,B,dtype", [
    (1, 12, torch.float32),
    (7, 12, torch.float16),
    (7, 40, torch.bfloat16),
    (33, 40, torch.float32),
    (100, 12, torch.float32),
    (100, 12, torch.bfloat16),
    (33, 100, torch.float32),
    (20, 100, torch.float16),
    (16, 64, torch.float32),
])
def test_masked_solve_matches_reference(device, rows, B, dtype, rng):
    _need(device)
    G, U_B = spd_block(B, rng)
    W1 = torch.randn(rows, B, generator=rng).to(dtype)
    mask = random_mask(rows, B, rng)
    G, U_B, W1, mask = (t.to(device) for t in (G, U_B, W1, mask))
    E, loss, status = masked_solve_triton(G, U_B, W1, mask)
    _check(G, U_B, W1, mask, E, loss, rng.initial_seed(), status)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_solve_B256(device, rng):
    """The largest supported block, including a fully pruned row (a 256 x 256 system)."""
    _need(device)
    rows, B = 5, 256
    G, U_B = spd_block(B, rng)
    W1 = torch.randn(rows, B, generator=rng)
    mask = random_mask(rows, B, rng)
    G, U_B, W1, mask = (t.to(device) for t in (G, U_B, W1, mask))
    E, loss, status = masked_solve_triton(G, U_B, W1, mask)
    _check(G, U_B, W1, mask, E, loss, rng.initial_seed(), status)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_solve_nm_mask_and_strided_rows(device, rng):
    """A 2:4 mask (same count in every row) and W1 as a column slice of a wider weight (unit column stride)."""
    _need(device)
    rows, B = 24, 40
    G, U_B = spd_block(B, rng)
    W = torch.randn(rows, B + 13, generator=rng)
    W1 = W[:, 5:5 + B]
    score = torch.rand(rows, B // 4, 4, generator=rng)
    mask = torch.zeros(rows, B // 4, 4, dtype=torch.bool).scatter_(2, score.argsort(2)[:, :, :2], True).reshape(rows, B)
    G, U_B, W1, mask = (t.to(device) for t in (G, U_B, W1, mask))
    E, loss, status = masked_solve_triton(G, U_B, W1, mask)
    _check(G, U_B, W1, mask, E, loss, rng.initial_seed(), status)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_solve_nothing_masked(device, rng):
    _need(device)
    G, U_B = spd_block(12, rng)
    W1 = torch.randn(9, 12, generator=rng)
    mask = torch.zeros(9, 12, dtype=torch.bool)
    E, loss, status = masked_solve_triton(G.to(device), U_B.to(device), W1.to(device), mask.to(device))
    assert torch.equal(E.cpu(), torch.zeros(9, 12)) and torch.equal(loss.cpu(), torch.zeros(9))
    assert torch.equal(status.cpu(), torch.zeros(9, dtype=torch.int32))
    E, loss, status = masked_solve_triton(G.to(device), U_B.to(device), W1[:0].to(device), mask[:0].to(device))
    assert E.shape == (0, 12) and loss.shape == (0,) and status.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_solve_B1_is_sparsegpt_step(device, rng):
    """B = 1: lambda = w / G, e = U * lambda = w / U, loss = w^2 / (2 U^2) -- SparseGPT's column step."""
    _need(device)
    U_B = torch.tensor([[0.7]])
    G = U_B * U_B
    W1 = torch.randn(6, 1, generator=rng)
    mask = torch.tensor([[True], [False], [True], [True], [False], [True]])
    E, loss, status = masked_solve_triton(G.to(device), U_B.to(device), W1.to(device), mask.to(device))
    m = mask.float()
    torch.testing.assert_close(E.cpu(), W1 / 0.7 * m, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.cpu(), (W1[:, 0] ** 2 / (2 * 0.49)) * m[:, 0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_solve_through_ops_wrapper(device, rng):
    _need(device)
    from pyprune.ops import masked_solve
    G, U_B = spd_block(20, rng)
    W1 = torch.randn(10, 20, generator=rng)
    mask = random_mask(10, 20, rng)
    G, U_B, W1, mask = (t.to(device) for t in (G, U_B, W1, mask))
    E, loss = masked_solve(G, U_B, W1, mask, backend="triton")
    _check(G, U_B, W1, mask, E, loss, rng.initial_seed())


def test_masked_solve_argument_errors():
    G = torch.eye(8)
    W1 = torch.zeros(3, 8)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    with pytest.raises(TypeError, match="G has dtype"):
        masked_solve_triton(G.double(), G, W1, mask)
    with pytest.raises(ValueError, match="U_B must have shape"):
        masked_solve_triton(G, torch.eye(7), W1, mask)
    with pytest.raises(ValueError, match="columns"):
        masked_solve_triton(G, G, torch.zeros(3, 9), mask)
    with pytest.raises(TypeError, match="mask has dtype"):
        masked_solve_triton(G, G, W1, mask.float())
    with pytest.raises(ValueError, match="mask must have shape"):
        masked_solve_triton(G, G, W1, mask[:2])
    with pytest.raises(ValueError, match="unit column stride"):
        masked_solve_triton(G, G, torch.zeros(8, 3).T, mask)
    with pytest.raises(ValueError, match="maximum 256"):
        masked_solve_triton(torch.eye(260), torch.eye(260), torch.zeros(1, 260), torch.zeros(1, 260, dtype=torch.bool))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_solve_library_op(device, rng):
    """Registered as pyprune_triton::masked_solve with a fake implementation: opcheck and torch.compile."""
    _need(device)
    G, U_B = spd_block(8, rng)
    W1 = torch.randn(5, 8, generator=rng)
    mask = random_mask(5, 8, rng)
    G, U_B, W1, mask = (t.to(device) for t in (G, U_B, W1, mask))
    torch.library.opcheck(torch.ops.pyprune_triton.masked_solve, (G, U_B, W1, mask))
    f = torch.compile(lambda *a: masked_solve_triton(*a)[1].sum(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(G, U_B, W1, mask), reference.masked_solve(G, U_B, W1, mask)[1].sum(),
                               rtol=1e-4, atol=1e-6)
