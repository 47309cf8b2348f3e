"""The Triton exchange + joint solve engine (triton_kernels/refine_solve.py) against the float64 reference, with the
bounds of tests/ops/test_refine_solve.py (the reference's exchanges except after near-ties, E and the loss within the
masked solve's bound), and against the C++ engine on the same inputs (interpreter on CPU tensors, compiled on CUDA)."""
import pytest
import torch

pytest.importorskip("triton")

from pyprune import ops, reference  # noqa: E402
from pyprune.reference.swap import REL_TOL_LOW  # noqa: E402
from pyprune.triton_kernels._common import is_interpreted  # noqa: E402
from pyprune.triton_kernels.refine_solve import _refine_solve_kernel, refine_solve_triton  # noqa: E402
from tests.helpers import kernel_block  # noqa: E402
from tests.ops.test_refine_solve import (HAS_CPP, check_against_reference, counts_mask, exact_loss,  # noqa: E402
                                         make_mask)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
F64 = torch.float64


def _need(device):
    if device == "cpu" and not is_interpreted(_refine_solve_kernel):
        pytest.skip("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before import)")


def _runner(G, U, m, device):
    def run(w, m0, k):
        out = ops.refine_solve(G.to(device), U.to(device), w.to(device), m0.to(device), k, m=m, backend="triton")
        return tuple(x.cpu() for x in out)
    return run


# the shapes of test_refine_solve with fewer rows (the interpreter runs a program per row)
SHAPES = [(5, 7, "varied"), (33, 24, "half"), (40, 20, "2:4"), (17, 64, "4:8"), (12, 128, "2:4"), (12, 128, "half"),
          (15, 100, "varied"), (16, 36, "1:3")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,B,kind", SHAPES)
def test_triton_refine_solve_against_float64_reference(device, rows, B, kind, rng):
    _need(device)
    G, U = kernel_block(B, rng)
    W = (0.02 * torch.randn(rows, B, generator=rng)).to(torch.bfloat16 if B % 2 else torch.float32)
    M0, m = make_mask(W, G, kind, rng)
    _, _, _, swaps = check_against_reference(_runner(G, U, m, device), G, U, W, M0, m)
    assert int(swaps.sum()) > 0 or kind == "varied" and B < 10, "no exchange made: the case tests nothing"


@pytest.mark.parametrize("device", DEVICES)
def test_triton_rows_past_128_pruned(device, rng):
    """B = 256: rows that prune more than 128 weights (256-wide tiles: U by rank-one steps), every weight, one, and
    a 2:4 start whose groups constrain the exchanges."""
    _need(device)
    B = 256
    G, U = kernel_block(B, rng)
    W = 0.02 * torch.randn(5, B, generator=rng)
    M0 = counts_mask(W, G, torch.tensor([200, 140, 256, 1, 60]))
    check_against_reference(_runner(G, U, 0, device), G, U, W, M0, 0, rounds=4)
    W2 = 0.02 * torch.randn(3, B, generator=rng)
    M2, m = make_mask(W2, G, "2:4", rng)
    check_against_reference(_runner(G, U, m, device), G, U, W2, M2, m, rounds=4)


@pytest.mark.skipif(not HAS_CPP, reason="the C++ engine is not built")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,B,kind", [(16, 128, "2:4"), (16, 128, "half"), (12, 40, "varied"), (9, 36, "ungrouped")])
def test_triton_engine_equals_cpp_engine(device, rows, B, kind, rng):
    """The same exchanges as the C++ engine on the same inputs (no near-ties drawn here), E within 2e-5 of max |E| and
    the loss within 2e-5 relative (float32 rounding of other summation orders: the bound between the C++ op and the
    CUDA kernel's code)."""
    _need(device)
    if not bool(torch.ops.pyprune._refine_solve_cpu_supported()):
        pytest.skip("the C++ engine does not run on this processor")
    G, U = kernel_block(B, rng)
    W = (0.02 * torch.randn(rows, B, generator=rng)).to(torch.bfloat16)
    if kind == "ungrouped":  # m = 3 with per-row counts: groups filter the pairs, the start is not N:M
        M0, m = counts_mask(W, G, torch.randint(1, B, (rows,), generator=rng)), 3
    else:
        M0, m = make_mask(W, G, kind, rng)
    E, loss, status, final, swaps = (x.cpu() for x in refine_solve_triton(
        G.to(device), U.to(device), W.to(device), M0.to(device), 16, m=m, tol=REL_TOL_LOW))
    E1, loss1, status1, final1, swaps1 = torch.ops.pyprune.refine_solve(G, U, W, M0, 16, m, REL_TOL_LOW)
    assert torch.equal(status, status1) and not status.any()
    assert torch.equal(final, final1) and torch.equal(swaps, swaps1)
    assert int(swaps.sum()) > 0
    assert (E - E1).abs().max().item() <= 2e-5 * max(E1.abs().max().item(), 1e-30)
    assert ((loss - loss1).abs() <= 2e-5 * loss1.abs().clamp_min(1e-30)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_triton_rounds_zero_and_empty_rows(device, rng):
    """rounds = 0: no exchange, the masked solve of the start (as the Triton masked solve computes it); rows that prune
    nothing: e = 0, loss 0, their mask."""
    _need(device)
    G, U = kernel_block(40, rng)
    W = 0.02 * torch.randn(9, 40, generator=rng)
    M0, _ = make_mask(W, G, "varied", rng)
    E, loss, status, final, swaps = (x.cpu() for x in refine_solve_triton(
        G.to(device), U.to(device), W.to(device), M0.to(device), 0))
    E0, loss0 = (x.cpu() for x in ops.masked_solve(G.to(device), U.to(device), W.to(device), M0.to(device),
                                                    backend="triton"))
    assert torch.equal(final, M0) and not swaps.any() and not status.any()
    torch.testing.assert_close(E, E0, rtol=1e-5, atol=1e-6 * E0.abs().max().item())
    torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=0.0)
    assert torch.equal(E[0], torch.zeros(40)) and loss[0] == 0  # make_mask's row 0 prunes nothing
    out = refine_solve_triton(G.to(device), U.to(device), W[:0].to(device), M0[:0].to(device), 4)
    assert [tuple(x.shape) for x in out] == [(0, 40), (0,), (0,), (0, 40), (0,)]


@pytest.mark.parametrize("device", DEVICES)
def test_triton_not_positive_definite(device):
    """A non-positive pivot: status 1 + its block column, NaN in E and the loss, the starting mask, no exchange; the
    ops wrapper raises the masked solve's error."""
    _need(device)
    B = 8
    G = -torch.eye(B)
    mask = torch.zeros(2, B, dtype=torch.bool)
    mask[:, 2:6] = True
    E, loss, status, final, swaps = (x.cpu() for x in refine_solve_triton(
        G.to(device), torch.eye(B).to(device), torch.randn(2, B).to(device), mask.to(device), 4))
    assert status.tolist() == [3, 3] and torch.isnan(E).all() and torch.isnan(loss).all()
    assert torch.equal(final, mask) and not swaps.any()
    with pytest.raises(ValueError, match="not positive definite"):
        ops.refine_solve(G.to(device), torch.eye(B).to(device), torch.randn(2, B).to(device), mask.to(device), 4,
                         backend="triton")


@pytest.mark.parametrize("device", DEVICES)
def test_triton_library_op(device, rng):
    """Registered as pyprune_triton::refine_solve with a fake implementation: opcheck and torch.compile."""
    _need(device)
    G, U = kernel_block(16, rng)
    W = 0.02 * torch.randn(5, 16, generator=rng)
    M0, m = make_mask(W, G, "2:4", rng)
    G, U, W, M0 = (t.to(device) for t in (G, U, W, M0))
    torch.library.opcheck(torch.ops.pyprune_triton.refine_solve, (G, U, W, M0, 4, m, REL_TOL_LOW))
    f = torch.compile(lambda *a: refine_solve_triton(*a, m=m)[1].sum(), fullgraph=True, backend="aot_eager")
    final = refine_solve_triton(G, U, W, M0, 4, m=m)[3]
    want = reference.masked_solve(G.cpu().to(F64), U.cpu().to(F64), W.cpu().to(F64), final.cpu())[1].sum()
    torch.testing.assert_close(f(G, U, W, M0, 4).cpu().to(F64), want, rtol=1e-4, atol=1e-9)
    assert float(exact_loss(W.cpu(), G.cpu(), final.cpu()).sum()) <= float(exact_loss(W.cpu(), G.cpu(),
                                                                                     M0.cpu()).sum()) * (1 + 1e-6)


def test_triton_refine_solve_argument_errors():
    G = torch.eye(8)
    W = torch.zeros(3, 8)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    with pytest.raises(TypeError, match="G has dtype"):
        refine_solve_triton(G.double(), G, W, mask, 4)
    with pytest.raises(ValueError, match="columns"):
        refine_solve_triton(G, G, torch.zeros(3, 9), mask, 4)
    with pytest.raises(ValueError, match="mask must have shape"):
        refine_solve_triton(G, G, W, mask[:2], 4)
    with pytest.raises(ValueError, match="rounds"):
        refine_solve_triton(G, G, W, mask, -1)
    with pytest.raises(ValueError, match="m must be"):
        refine_solve_triton(G, G, W, mask, 4, m=3)
    with pytest.raises(ValueError, match="maximum 256"):
        refine_solve_triton(torch.eye(260), torch.eye(260), torch.zeros(1, 260), torch.zeros(1, 260, dtype=torch.bool),
                            4)
