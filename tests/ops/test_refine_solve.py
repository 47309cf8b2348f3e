"""The fused exchange + joint solve engine (``pyprune.ops.refine_solve``; csrc/kernels/refine_solve.cuh) against the
float64 reference (``pyprune.reference.refine_solve``: the exchanges of ``reference.swap``, then the padded solve).

Bounds stated and tested here:
- exchanges: where the reference's chosen exchange wins by more than rounding, the engine makes the same exchanges in
  the same order, so its final mask and exchange count equal the reference's; rows that differ must be near-ties
  (the two final sets' exact float64 losses within 1e-4 of each other) and rare;
- the update E and the loss for the engine's final mask: error against float64 within 2x the error of the same solve
  in float32 torch, plus 1e-6 of the largest value (the rule of test_native_ops);
- the CPU op and the CUDA kernel's per-row code (run on the CPU by the emulation op, several threads per row): the
  same masks and exchange counts, E within 2e-5 of max |E| and the loss within 2e-5 relative (float32 rounding of
  the different summation orders).
"""
from __future__ import annotations

import pytest
import torch

from pyprune import ops, reference
from pyprune.ops._backend import _native_loaded, native_has
from pyprune.reference.swap import REL_TOL_LOW
from tests.helpers import kernel_block

F64 = torch.float64
HAS_CPP = _native_loaded() and native_has("refine_solve", torch.device("cpu"))
HAS_CUDA = torch.cuda.is_available() and _native_loaded() and native_has("refine_solve", torch.device("cuda"))
needs_cpp = pytest.mark.skipif(not (HAS_CPP and bool(torch.ops.pyprune._refine_solve_cpu_supported())),
                               reason="the C++ engine is not built for this processor")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device or kernels"))]


def make_mask(W: torch.Tensor, G: torch.Tensor, kind: str, rng: torch.Generator) -> tuple[torch.Tensor, int]:
    """A starting mask and its group size m: 'n:m' (the n smallest |w| / sqrt(G_jj) of every group), 'half' (per
    row), 'varied' (a random count per row; the first row prunes none, the last every weight)."""
    rows, B = W.shape
    score = W.abs().double() / torch.diagonal(G).double().sqrt()
    if ":" in kind:
        n, m = map(int, kind.split(":"))
        idx = score.view(rows, B // m, m).topk(n, dim=2, largest=False).indices
        return torch.zeros(rows, B // m, m, dtype=torch.bool).scatter_(2, idx, True).view(rows, B), m
    if kind == "half":
        counts = torch.full((rows,), B // 2)
    else:
        counts = torch.randint(0, B + 1, (rows,), generator=rng)
        if rows >= 2:
            counts[0], counts[-1] = 0, B
    rank = score.argsort(dim=1).argsort(dim=1)
    return rank < counts[:, None], 0


def exact_loss(W: torch.Tensor, G: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row 1/2 w_M^T G[M, M]^-1 w_M in float64."""
    out = torch.zeros(W.shape[0], dtype=F64)
    for i in range(W.shape[0]):
        M = torch.nonzero(mask[i]).flatten()
        if M.numel():
            w = W[i, M].double()
            out[i] = 0.5 * w @ torch.linalg.solve(G.double()[M][:, M], w)
    return out


def assert_close_rule(name, got, ref64, ref32):
    got, ref64, ref32 = got.detach().cpu().to(F64), ref64.cpu(), ref32.cpu().to(F64)
    err = (got - ref64).abs().max().item() if got.numel() else 0.0
    err_torch = (ref32 - ref64).abs().max().item() if got.numel() else 0.0
    atol = 1e-6 * max(ref64.abs().max().item() if got.numel() else 0.0, 1e-30)
    assert err <= 2 * err_torch + atol, f"{name}: error {err:.3g} > 2 x torch fp32 error {err_torch:.3g} + {atol:.3g}"


SHAPES = [(5, 7, "varied"), (33, 24, "half"), (40, 20, "2:4"), (17, 64, "4:8"), (64, 128, "2:4"),
          (64, 128, "half"), (29, 100, "varied"), (16, 36, "1:3")]


def check_against_reference(run, G, U, W, M0, m, rounds=16):
    """The bounds of this file's docstring for an engine ``run(W, M0, rounds) -> (E, loss, final, swaps)`` (CPU
    tensors out) on one block, against the float64 reference: the pattern kept, the reference's exchanges except
    after a near-tie (a differing row is replayed exchange by exchange: its first different exchange must tie within
    1e-4 of the row's float64 loss), E and the loss for the engine's own final mask within the masked solve's bound,
    and never a worse set than the start."""
    rows = W.shape[0]
    E, loss, final, swaps = run(W, M0, rounds)
    _, _, _, ref_final, ref_swaps = reference.refine_solve(G.to(F64), U.to(F64), W.to(F64), M0, rounds, m)
    # the pattern: counts per row (per group) never change
    assert torch.equal(final.sum(1), M0.sum(1))
    if m:
        assert torch.equal(final.view(rows, -1, m).sum(-1), M0.view(rows, -1, m).sum(-1))
    differ = torch.nonzero(~(final == ref_final).all(1) | (swaps != ref_swaps)).flatten().tolist()
    assert len(differ) <= max(1, rows // 8), f"{len(differ)} of {rows} rows took other exchanges"
    for i in differ:
        w, m0 = W[i:i + 1], M0[i:i + 1]
        for k in range(1, rounds + 1):
            got_k = run(w, m0, k)[2]
            ref_k = reference.swap_refine(w.to(F64), G.to(F64), m0, k, m=m)
            if not torch.equal(got_k, ref_k):
                l_got, l_ref = exact_loss(w, G, got_k), exact_loss(w, G, ref_k)
                rel = ((l_got - l_ref).abs() / l_ref.abs().clamp_min(1e-30)).item()
                assert rel < 1e-4, f"row {i}: exchange {k} differs from the reference's by {rel:.3g} of the loss"
                break
    # E and loss for the engine's own final mask
    E64, loss64, _ = reference.masked_solve(G.to(F64), U.to(F64), W.to(F64), final)
    E32, loss32, _ = reference.masked_solve(G, U, W.float(), final)
    assert_close_rule("E", E, E64, E32)
    assert_close_rule("loss", loss, loss64, loss32)
    # never worse than the start (float64 losses of both sets)
    assert bool((exact_loss(W, G, final) <= exact_loss(W, G, M0) * (1 + 1e-6) + 1e-12).all())
    return E, loss, final, swaps


@needs_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,B,kind", SHAPES)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_refine_solve_against_float64_reference(device, rows, B, kind, wdtype, rng):
    G, U = kernel_block(B, rng)
    W = (0.02 * torch.randn(rows, B, generator=rng)).to(wdtype)
    M0, m = make_mask(W, G, kind, rng)

    def run(w, m0, k):
        out = ops.refine_solve(G.to(device), U.to(device), w.to(device), m0.to(device), k, m=m,
                               backend="cpp" if device == "cpu" else "cuda")
        return tuple(x.cpu() for x in out)
    check_against_reference(run, G, U, W, M0, m)


@needs_cpp
@pytest.mark.parametrize("threads,warp", [(32, 8), (8, 4), (3, 1), (64, 32)])
@pytest.mark.parametrize("rows,B,kind", [(9, 24, "varied"), (12, 128, "2:4"), (10, 112, "varied"), (8, 40, "4:8")])
def test_refine_solve_emulated_cuda_partitioning(threads, warp, rows, B, kind, rng):
    """The CUDA kernel's per-row code on `threads` cooperating CPU threads (warps of `warp` lanes, the launcher's two
    tiers for B > 96) against the CPU op: same exchanges, E and loss within float32 rounding."""
    G, U = kernel_block(B, rng)
    W = (0.02 * torch.randn(rows, B, generator=rng)).to(torch.bfloat16)
    M0, m = make_mask(W, G, kind, rng)
    E, loss, status, final, swaps = torch.ops.pyprune._refine_solve_emulated(G, U, W, M0, 16, m, REL_TOL_LOW,
                                                                             threads, warp)
    assert torch.all(status == 0), "a row's status was not written (-1) or it failed"
    E1, loss1, status1, final1, swaps1 = torch.ops.pyprune.refine_solve(G, U, W, M0, 16, m, REL_TOL_LOW)
    assert torch.equal(final, final1) and torch.equal(swaps, swaps1)
    scale = max(E1.abs().max().item(), 1e-30)
    assert (E - E1).abs().max().item() <= 2e-5 * scale
    assert ((loss - loss1).abs() <= 2e-5 * loss1.abs().clamp_min(1e-30)).all()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def counts_mask(W: torch.Tensor, G: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each row prunes counts[row] of its smallest |w| / sqrt(G_jj)."""
    score = W.abs().double() / torch.diagonal(G).double().sqrt()
    return score.argsort(dim=1).argsort(dim=1) < counts[:, None]


@needs_cpp
@pytest.mark.parametrize("B,kind", [(128, "half"), (128, "2:4"), (64, "4:8"), (100, "counts"), (20, "counts"),
                                    (7, "counts"), (16, "mixed")])
def test_eight_row_path_equals_one_row_path(B, kind, rng):
    """The CPU op sets up eight rows with the same count together (vector lanes); every output must equal the one-row
    code's (the test-only op _refine_solve_rowwise) bit for bit: counts with and without a full set of eight, rows
    pruning none or all of the block, and (mixed) rows of one count of which some are N:M-grouped and some not."""
    rows = 8 * 4 + 5
    G, U = kernel_block(B, rng)
    W = (0.02 * torch.randn(rows, B, generator=rng)).to(torch.bfloat16)
    m = 0
    if kind in ("half", "2:4", "4:8"):
        M0, m = make_mask(W, G, kind, rng)
    elif kind == "counts":  # 16 rows of one count, 9 of another, 8 pruning none, 4 pruning all
        counts = torch.tensor([B // 3] * 16 + [B - 2] * 9 + [0] * 8 + [B] * 4)
        M0 = counts_mask(W, G, counts[torch.randperm(rows, generator=rng)])
    else:  # half of every row: 2:4 groups in some rows, unstructured in the others
        M0, m = make_mask(W, G, "2:4", rng)
        M0[::3] = counts_mask(W[::3], G, torch.full((len(range(0, rows, 3)),), B // 2))
    got = torch.ops.pyprune.refine_solve(G, U, W, M0, 16, m, REL_TOL_LOW)
    ref = torch.ops.pyprune._refine_solve_rowwise(G, U, W, M0, 16, m, REL_TOL_LOW)
    for name, a, b in zip(("E", "loss", "status", "mask", "swaps"), got, ref):
        assert same_bits(a, b), f"{name} differs between the eight-row and the one-row path"
    assert bool((got[2] == 0).all()) and int(got[4].sum()) > 0


@needs_cpp
def test_eight_row_path_with_a_non_positive_pivot(rng):
    """A zero pivot in one lane of an eight-row set: that set falls back to one row at a time, which reports it
    (status, NaN) exactly as the one-row code does; the other rows of the set are solved."""
    B, rows = 32, 24
    G, U = kernel_block(B, rng)
    G[5, :] = 0.0
    G[:, 5] = 0.0  # column 5 of the block is dead in G
    W = 0.02 * torch.randn(rows, B, generator=rng)
    others = torch.tensor([j for j in range(B) if j != 5])
    M0 = torch.zeros(rows, B, dtype=torch.bool)
    for i in range(rows):  # B / 2 pruned in every row; rows 3 and 11 (two of the three sets of eight) prune column 5
        pick = others[torch.randperm(B - 1, generator=rng)[:B // 2 - (i in (3, 11))]]
        M0[i, pick] = True
        M0[i, 5] = i in (3, 11)
    got = torch.ops.pyprune.refine_solve(G, U, W, M0, 8, 0, REL_TOL_LOW)
    ref = torch.ops.pyprune._refine_solve_rowwise(G, U, W, M0, 8, 0, REL_TOL_LOW)
    for name, a, b in zip(("E", "loss", "status", "mask", "swaps"), got, ref):
        assert same_bits(a, b), f"{name} differs between the eight-row and the one-row path"
    bad = M0[:, 5]
    assert bool(bad.any()) and bool((got[2][bad] == 6).all()) and bool((got[2][~bad] == 0).all())


@needs_cpp
def test_rounds_zero_is_the_masked_solve(rng):
    """rounds=0 is masked_solve itself (the joint method's swaps=0 path), bit for bit."""
    G, U = kernel_block(64, rng)
    W = 0.02 * torch.randn(21, 64, generator=rng)
    M0, _ = make_mask(W, G, "varied", rng)
    E, loss, final, swaps = ops.refine_solve(G, U, W, M0, 0)
    E0, loss0 = ops.masked_solve(G, U, W, M0)
    assert torch.equal(E, E0) and torch.equal(loss, loss0) and torch.equal(final, M0) and not swaps.any()


@needs_cpp
def test_not_positive_definite_status_and_error():
    B = 8
    G = -torch.eye(B)
    mask = torch.zeros(2, B, dtype=torch.bool)
    mask[:, :4] = True
    E, loss, status, final, swaps = torch.ops.pyprune.refine_solve(G, torch.eye(B), torch.randn(2, B), mask, 4, 0,
                                                                   1e-5)
    assert status.tolist() == [1, 1] and torch.isnan(E).all() and torch.isnan(loss).all()
    assert torch.equal(final, mask)
    with pytest.raises(ValueError, match="not positive definite"):
        ops.refine_solve(G, torch.eye(B), torch.randn(2, B), mask, 4)


@needs_cpp
def test_backends_and_options(rng):
    G, U = kernel_block(16, rng)
    W = 0.02 * torch.randn(6, 16, generator=rng)
    M0, m = make_mask(W, G, "2:4", rng)
    ref = ops.refine_solve(G, U, W, M0, 8, m=m, backend="torch")
    got = ops.refine_solve(G, U, W, M0, 8, m=m, backend="cpp")
    assert torch.equal(ref[2], got[2])
    with pytest.raises(TypeError, match="float64"):
        ops.refine_solve(G.double(), U.double(), W.double(), M0, 8, backend="cpp")
    f64 = ops.refine_solve(G.double(), U.double(), W.double(), M0, 8, m=m)  # auto: the torch reference
    assert f64[0].dtype == F64
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="rounds"):
            ops.refine_solve(G, U, W, M0, bad)
    with pytest.raises(ValueError, match="m=3 does not divide"):
        ops.refine_solve(G, U, W, M0, 4, m=3)


@needs_cpp
def test_opcheck_and_fake(rng):
    G, U = kernel_block(24, rng)
    W = 0.02 * torch.randn(5, 24, generator=rng)
    M0, _ = make_mask(W, G, "half", rng)
    torch.library.opcheck(torch.ops.pyprune.refine_solve.default, (G, U, W, M0, 4, 0, 1e-5))


@needs_cpp
@pytest.mark.parametrize("B,m,rows", [(128, 4, 24), (40, 8, 13), (36, 3, 9)])
def test_groups_on_an_ungrouped_mask(B, m, rows, rng):
    """m > 0 with starting masks that are not N:M (per-row counts, uneven across groups): exchanges stay inside groups
    of m, over the CPU op's every-pair scoring (its group filter) and the CUDA kernel's per-row code (emulated): the
    same masks and exchange counts, the group counts unchanged, and the float64 reference's exchanges except after a
    near-tie (the first rounds agree)."""
    G, U = kernel_block(B, rng)
    W = (0.02 * torch.randn(rows, B, generator=rng)).to(torch.bfloat16)
    counts = torch.randint(1, B, (rows,), generator=rng)
    M0 = counts_mask(W, G, counts)
    got = torch.ops.pyprune.refine_solve(G, U, W, M0, 16, m, REL_TOL_LOW)
    emu = torch.ops.pyprune._refine_solve_emulated(G, U, W, M0, 16, m, REL_TOL_LOW, 8, 4)
    assert torch.all(got[2] == 0) and torch.all(emu[2] == 0)
    assert torch.equal(got[3], emu[3]) and torch.equal(got[4], emu[4])
    assert int(got[4].sum()) > 0, "no exchange made: the case tests nothing"
    groups = lambda M: M.view(rows, B // m, m).sum(-1)  # noqa: E731
    assert torch.equal(groups(got[3]), groups(M0))
    one = torch.ops.pyprune.refine_solve(G, U, W, M0, 1, m, REL_TOL_LOW)[3]  # the first exchange of every row
    ref_one = reference.swap_refine(W.to(F64), G.to(F64), M0, 1, m=m)
    differ = (~(one == ref_one).all(1)).nonzero().flatten().tolist()
    for i in differ:  # only near-ties in float64
        l_got, l_ref = exact_loss(W[i:i + 1], G, one[i:i + 1]), exact_loss(W[i:i + 1], G, ref_one[i:i + 1])
        assert ((l_got - l_ref).abs() / l_ref.abs().clamp_min(1e-30)).item() < 1e-4
