"""One failure contract on every backend (issue 11, items 6, 7, 12 and the op-level part of 14).

* symmetric inputs (H, G) are checked within rounding: an accumulated H passes, a one-triangle H does not;
* accumulate_hessian checks n and the values of X (and of H when it reads it) before it writes: on error H is
  unchanged;
* masked_solve: every backend's op returns a per-row status (0, or 1 + the block column of the first non-positive
  pivot) and never raises for it; pyprune.ops.masked_solve raises the same ValueError for every backend;
* meta tensors and unavailable backends are ValueErrors naming the argument / option.

CUDA cases are parametrised and skipped where there is no GPU (they run in the GPU suite).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyprune.ops as ops
from pyprune import reference
from pyprune.ops import _checks
from pyprune.ops._backend import _native_loaded, native_has, resolve, triton_usable
from tests.helpers import kernel_block, random_layer

CPU, CUDA_DEV = torch.device("cpu"), torch.device("cuda")
HAS_CUDA = torch.cuda.is_available()
HAS_NATIVE_CUDA = HAS_CUDA and native_has("masked_solve", CUDA_DEV)
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


def _available(backend: str, device: str) -> bool:
    dev = torch.device(device)
    if device == "cuda" and not HAS_CUDA:
        return False
    if backend == "cpp":
        return device == "cpu" and native_has("masked_solve", dev)
    if backend == "cuda":
        return device == "cuda" and native_has("masked_solve", dev)
    if backend == "triton":
        return triton_usable(dev)
    return True


# (backend, device) pairs: every backend of this machine; the CUDA ones run on the GPU machine
BACKENDS = [("torch", "cpu"), ("cpp", "cpu"), ("triton", "cpu"),
            pytest.param("torch", "cuda", marks=cuda_only), pytest.param("cuda", "cuda", marks=cuda_only),
            pytest.param("triton", "cuda", marks=cuda_only)]


def _need(backend: str, device: str) -> None:
    if not _available(backend, device):
        pytest.skip(f"backend {backend} on {device} is not available here")


# --------------------------------------------------------------------------------------------- item 6: symmetry
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_accumulated_hessian_passes_symmetry_check(backend, device, xdtype, rng):
    """H accumulated in fp32 from (correlated, unevenly scaled) activations is symmetric within the tolerance."""
    _need(backend, device)
    cols = 96
    mix = torch.randn(cols, cols, generator=rng) / cols ** 0.5 + torch.eye(cols)
    H, n = torch.zeros(cols, cols, device=device), 0
    for k in (50, 130, 7):
        X = (torch.randn(k, cols, generator=rng) @ mix) * (0.05 + 3 * torch.rand(cols, generator=rng))
        n = ops.accumulate_hessian(H, n, X.to(xdtype).to(device), backend=backend)
    assert n == 187
    _checks.check_symmetric("H", H)


def test_gram_matrices_pass_symmetry_check(rng):
    """A plain fp32 X^T X and G = U_B^T U_B (as the joint method forms it) pass: rounding is far below 1e-4."""
    X = torch.randn(3000, 200, generator=rng) * (0.01 + torch.rand(200, generator=rng))
    _checks.check_symmetric("H", X.T @ X)
    _checks.check_symmetric("H", X.T.contiguous() @ X.clone())
    _, H = random_layer(1, 160, rng)
    H = H + 0.01 * H.diagonal().mean() * torch.eye(160, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    U_B = U[32:160, 32:160]
    _checks.check_symmetric("G", U_B.T @ U_B)


def test_one_triangle_and_asymmetric_rejected(rng):
    _, H = random_layer(1, 64, rng, dtype=torch.float32)
    H = H.float()
    with pytest.raises(ValueError, match=r"H \(64 x 64\) must be symmetric: max \|H\[i, j\] - H\[j, i\]\| = "):
        _checks.check_symmetric("H", H.triu())
    with pytest.raises(ValueError, match="must be symmetric"):
        _checks.check_symmetric("H", H.tril())
    noisy = H + 1e-3 * H.abs().max() * torch.rand(64, 64, generator=rng)
    with pytest.raises(ValueError, match="H .* must be symmetric"):
        _checks.check_symmetric("H", noisy)
    _checks.check_symmetric("H", (noisy + noisy.T) / 2)  # the fix the message names
    _checks.check_symmetric("H", H.triu() + H.triu(1).T)
    with pytest.raises(ValueError, match="square"):
        _checks.check_symmetric("H", H[:3])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_symmetry_stats_in_pieces_and_spot_check(monkeypatch, device, rng):
    """The pass in tiles (CPU) or bands (CUDA), without an n x n temporary, finds the same maximum as M - M^T; the
    row spot check sees a one-triangle matrix."""
    M = torch.randn(70, 70, generator=rng, dtype=torch.float64)
    want = (M - M.T).abs().max().item()
    monkeypatch.setattr(_checks, "_CHUNK_ELEMENTS", 3 * 70)  # bands of 3 rows
    monkeypatch.setattr(_checks, "_CPU_TILE", 16)  # 5 x 5 tiles, the last ones partial
    worst, scale = _checks.symmetry_stats(M.to(device)).tolist()
    assert worst == want and scale == M.abs().max().item()
    M = M.to(device)
    S = M + M.T
    assert _checks.symmetry_stats(S).tolist()[0] == 0.0
    assert _checks.symmetry_stats(S.triu(), rows=4).tolist()[0] > 0.1 * S.abs().max().item()
    assert _checks.symmetry_stats(S, rows=4).tolist()[0] == 0.0
    assert _checks.symmetry_stats(torch.zeros(0, 0)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ops_reject_asymmetric_G(backend, device, rng):
    _need(backend, device)
    G, U = kernel_block(16, rng)
    G, U = G.to(device), U.to(device)
    W1 = torch.randn(5, 16, generator=rng).to(device)
    mask = torch.rand(5, 16, generator=rng).to(device) < 0.5
    with pytest.raises(ValueError, match="G .* must be symmetric"):
        ops.masked_solve(G.triu(), U, W1, mask, backend=backend)
    with pytest.raises(ValueError, match="G .* must be symmetric"):
        ops.nm_select(W1, G.triu(), 2, 4, backend=backend)
    ops.masked_solve(G, U, W1, mask, backend=backend)
    ops.nm_select(W1, G, 2, 4, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_check_values_false_skips_only_the_value_checks(backend, device, rng):
    """check_values=False (the drivers' blocks, finite and symmetric by construction) skips the passes over the values
    (finite entries, G's symmetry) and nothing else: the results are those of the checked call, and wrong shapes,
    dtypes and masks are still refused, naming the argument."""
    _need(backend, device)
    G, U = kernel_block(16, rng)
    G, U = G.to(device), U.to(device)
    W1 = torch.randn(5, 16, generator=rng).to(device)
    mask = ops.nm_select(W1, G, 2, 4, backend=backend)
    assert torch.equal(ops.nm_select(W1, G, 2, 4, backend=backend, check_values=False), mask)
    for a, b in zip(ops.masked_solve(G, U, W1, mask, backend=backend),
                    ops.masked_solve(G, U, W1, mask, backend=backend, check_values=False)):
        assert torch.equal(a, b)
    for a, b in zip(ops.refine_solve(G, U, W1, mask, 4, m=4, backend=backend),
                    ops.refine_solve(G, U, W1, mask, 4, m=4, backend=backend, check_values=False)):
        assert torch.equal(a, b)
    bad = W1.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="W1 contains NaN"):
        ops.masked_solve(G, U, bad, mask, backend=backend)
    with pytest.raises(ValueError, match="G .* must be symmetric"):
        ops.refine_solve(G.triu(), U, W1, mask, 4, m=4, backend=backend)
    with pytest.raises(ValueError, match="mask must have shape"):
        ops.refine_solve(G, U, W1, mask[:, :12], 4, m=4, backend=backend, check_values=False)
    with pytest.raises(ValueError, match="U_B must have shape"):
        ops.masked_solve(G, U[:8, :8], W1, mask, backend=backend, check_values=False)
    with pytest.raises(ValueError, match="G must have shape"):
        ops.nm_select(W1, G[:8, :8], 2, 4, backend=backend, check_values=False)
    with pytest.raises(TypeError, match="mask has dtype"):
        ops.masked_solve(G, U, W1, mask.float(), backend=backend, check_values=False)


# ------------------------------------------------------------------------------------ item 7: check, then write
@pytest.mark.parametrize("bad,err,match", [(-1, ValueError, "n must be a non-negative int, got -1"),
                                           (-5, ValueError, "non-negative"), (True, TypeError, "got bool"),
                                           (2.0, TypeError, "got float"), (None, TypeError, "non-negative int")])
def test_accumulate_hessian_bad_count(bad, err, match, rng):
    H = torch.eye(8)
    with pytest.raises(err, match=match):
        ops.accumulate_hessian(H, bad, torch.randn(5, 8, generator=rng))
    assert torch.equal(H, torch.eye(8))
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        reference.accumulate_hessian(H, -5, torch.randn(5, 8, generator=rng))


def test_accumulate_hessian_numpy_count(rng):
    H = torch.zeros(8, 8)
    assert ops.accumulate_hessian(H, np.int64(0), torch.randn(5, 8, generator=rng)) == 5


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("n", [0, 40])
@pytest.mark.parametrize("what", ["nan", "inf", "-inf", "overflow"])
def test_accumulate_hessian_bad_X_leaves_H_unchanged(backend, device, n, what, rng):
    _need(backend, device)
    cols = 24
    A = torch.randn(cols, cols, generator=rng)
    H0 = (A @ A.T / cols).to(device)
    H = H0.clone()
    X = torch.randn(3, 10, cols, generator=rng)
    X[1, 4, 5] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "overflow": 3e19}[what]
    found = "NaN" if what == "nan" else "Inf"
    match = "overflows" if what == "overflow" else rf"X contains NaN or Inf values \(found {found}\)"
    with pytest.raises(ValueError, match=match):
        ops.accumulate_hessian(H, n, X.to(device), backend=backend)
    assert torch.equal(H, H0), "H was written before the error"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_accumulate_hessian_checks_H_when_it_reads_it(backend, device, rng):
    """n > 0: H is read, so its diagonal must be finite and a spot check must find it symmetric; n = 0: H is not
    read at all (an uninitialised H holding NaN is fine)."""
    _need(backend, device)
    cols = 40
    X = torch.randn(30, cols, generator=rng).to(device)
    _, Hs = random_layer(1, cols, rng)
    Hs = Hs.float().to(device)
    for bad, match in ((Hs.triu(), "H .* must be symmetric"), (Hs.clone().fill_diagonal_(float("nan")), "diagonal")):
        H = bad.clone()
        with pytest.raises(ValueError, match=match):
            ops.accumulate_hessian(H, 100, X, backend=backend)
        assert torch.equal(H.nan_to_num(7.0), bad.nan_to_num(7.0))
    H = torch.full((cols, cols), float("nan"), device=device)
    assert ops.accumulate_hessian(H, 0, X, backend=backend) == 30
    ref = 2.0 / 30 * X.double().T @ X.double()
    assert (H.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


# ------------------------------------------------------------------------------ item 12: masked_solve status
def indefinite_problem(B: int, rng: torch.Generator):
    """A realistic G made indefinite in two ways: column c is decoupled with G[c, c] = -1 (any mask with c fails at
    c), and the pair (a, b), a < b, is coupled beyond positive definiteness (a mask with both fails at b). Returns
    G, U_B, W1, mask and the expected status per row."""
    G, U = kernel_block(B, rng)
    c, a, b = B // 2, 1, B - 2
    G[c, :] = 0
    G[:, c] = 0
    G[c, c] = -1.0
    G[a, b] = G[b, a] = 1.5 * float((G[a, a] * G[b, b]).sqrt())
    rows = 12
    mask = torch.rand(rows, B, generator=rng) < 0.4
    mask[:, [a, b, c]] = False
    mask[0] = False                     # nothing pruned: fine
    mask[1, c] = True                   # fails at c
    mask[2, [a, b]] = True              # fails at b
    mask[3, [a, c]] = True              # fails at c (the first failing pivot)
    mask[4, a] = True                   # a alone is fine
    mask[5, b] = True                   # b alone is fine
    mask[6, [a, b, c]] = True           # c < b: fails at c
    mask[7] = True                      # everything: fails at c
    mask[8, [a, b]] = True
    mask[8, c] = False                  # fails at b
    expected = torch.zeros(rows, dtype=torch.int32)
    expected[[1, 3, 6, 7]] = c + 1
    expected[[2, 8]] = b + 1
    W1 = torch.randn(rows, B, generator=rng)
    return G, U, W1, mask, expected


def _op_for(backend: str):
    if backend in ("cpp", "cuda"):
        return lambda *a: torch.ops.pyprune.masked_solve(*a)
    if backend == "triton":
        from pyprune.triton_kernels.masked_solve import masked_solve_triton
        return masked_solve_triton
    return reference.masked_solve


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("B", [12, 40, 130])
def test_masked_solve_status_every_backend(backend, device, B, rng):
    """Every backend's op returns (E, loss, status) without raising: status = 1 + the failing block column, NaN in
    the failing rows only, and the rows that are fine solved as usual."""
    _need(backend, device)
    if backend == "triton" and device == "cpu" and B > 40:
        pytest.skip("large blocks are slow in the Triton interpreter")
    G, U, W1, mask, expected = indefinite_problem(B, rng)
    E, loss, status = _op_for(backend)(G.to(device), U.to(device), W1.to(device), mask.to(device))
    assert status.dtype == torch.int32 and status.shape == (W1.shape[0],)
    assert torch.equal(status.cpu(), expected)
    bad = expected != 0
    E, loss = E.cpu(), loss.cpu()
    assert torch.isnan(E[bad]).all() and torch.isnan(loss[bad]).all()
    assert torch.isfinite(E[~bad]).all() and torch.isfinite(loss[~bad]).all()
    ok = ~bad
    E64, l64, s64 = reference.masked_solve(G.double(), U.double(), W1.double(), mask)
    assert torch.equal(s64, expected)
    assert torch.allclose(E[ok].double(), E64[ok], rtol=1e-3, atol=1e-4 * E64[ok].abs().max().item())
    assert torch.allclose(loss[ok].double(), l64[ok], rtol=1e-3, atol=1e-6)


@pytest.mark.skipif(not _native_loaded(), reason="pyprune._C is not built")
@pytest.mark.parametrize("threads,warp", [(4, 2), (3, 1)])
def test_masked_solve_status_emulated_cuda_code(threads, warp, rng):
    """The CUDA kernel's per-row code (both tiers, team of threads) writes the same status."""
    G, U, W1, mask, expected = indefinite_problem(130, rng)
    E, loss, status = torch.ops.pyprune._masked_solve_emulated(G, U, W1, mask, threads, warp)
    assert torch.equal(status, expected)
    assert torch.isnan(loss[expected != 0]).all() and torch.isfinite(loss[expected == 0]).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ops_masked_solve_raises_same_error_every_backend(backend, device, rng):
    _need(backend, device)
    G, U, W1, mask, expected = indefinite_problem(12, rng)
    with pytest.raises(ValueError) as info:
        ops.masked_solve(G.to(device), U.to(device), W1.to(device), mask.to(device), backend=backend)
    msg = str(info.value)
    assert "not positive definite for 6 of 12 rows (first: row 1" in msg
    assert f"block column {int(expected[1]) - 1}" in msg
    assert "the damped Hessian block is not positive definite; increase damp" in msg
    # the rows that are fine are returned as usual
    ok = expected == 0
    E, loss = ops.masked_solve(G.to(device), U.to(device), W1[ok].to(device), mask[ok].to(device), backend=backend)
    assert torch.isfinite(E).all() and torch.isfinite(loss).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ops_masked_solve_zero_pivot_raises(backend, device):
    """A rank-one G[M, M] whose second pivot is exactly 0 in fp32: a ValueError, not a division by zero."""
    _need(backend, device)
    B = 8
    v = torch.tensor([1.0, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0])
    G = torch.eye(B)
    G[:2, :2] = torch.outer(v[:2], v[:2]) * 4  # rank one: the second pivot is 0
    U = torch.eye(B)
    mask = torch.zeros(2, B, dtype=torch.bool)
    mask[0, [0, 1]] = True
    mask[1, [2, 3]] = True
    with pytest.raises(ValueError, match=r"first: row 0,.*block column 1\)"):
        ops.masked_solve(G.to(device), U.to(device), torch.ones(2, B, device=device), mask.to(device),
                         backend=backend)


@pytest.mark.skipif(not _native_loaded(), reason="pyprune._C is not built")
def test_fake_and_compile_with_status(rng):
    G, U = kernel_block(16, rng)
    W = torch.randn(7, 16, generator=rng)
    mask = torch.rand(7, 16, generator=rng) < 0.5
    torch.library.opcheck(torch.ops.pyprune.masked_solve.default, (G, U, W, mask))
    f = torch.compile(lambda *a: torch.ops.pyprune.masked_solve(*a), fullgraph=True, backend="aot_eager")
    E, loss, status = f(G, U, W, mask)
    assert status.dtype == torch.int32 and torch.all(status == 0)


# ------------------------------------------------------------------------- item 14: meta tensors and backends
META_CALLS = {
    "masked_solve": lambda m: ops.masked_solve(torch.eye(4, device=m), torch.eye(4, device=m),
                                               torch.randn(2, 4, device=m),
                                               torch.ones(2, 4, dtype=torch.bool, device=m)),
    "nm_select": lambda m: ops.nm_select(torch.randn(2, 4, device=m), torch.eye(4, device=m), 2, 4),
    "hessian_update_": lambda m: ops.hessian_update_(torch.zeros(4, 4, device=m), torch.randn(3, 4, device=m), 1.0,
                                                     0.0),
    "accumulate_hessian": lambda m: ops.accumulate_hessian(torch.zeros(4, 4, device=m), 0, torch.randn(3, 4,
                                                                                                       device=m)),
    "accumulate_hessian_X": lambda m: ops.accumulate_hessian(torch.zeros(4, 4), 0, torch.randn(3, 4, device=m)),
    "check_symmetric": lambda m: _checks.check_symmetric("H", torch.eye(4, device=m)),
}


@pytest.mark.parametrize("call", sorted(META_CALLS))
def test_meta_tensors_raise_value_error(call):
    with pytest.raises(ValueError, match="is a meta tensor"):
        META_CALLS[call]("meta")


def test_unavailable_backends_are_value_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton_usable reads it per call: CPU tensors cannot use Triton
    with pytest.raises(ValueError, match="backend='triton' is not available"):
        resolve("triton", "masked_solve", CPU)
    with pytest.raises(ValueError, match="backend='cuda' needs cuda tensors"):
        resolve("cuda", "masked_solve", CPU)
    with pytest.raises(ValueError, match="backend='cpp' needs cpu tensors"):
        resolve("cpp", "masked_solve", CUDA_DEV)
    with pytest.raises(ValueError, match="no Triton implementation"):
        resolve("triton", "masked_solve", CPU, triton_op=False)
    with pytest.raises(ValueError, match="unknown backend"):
        resolve("gpu", "masked_solve", CPU)
    if not HAS_NATIVE_CUDA:
        with pytest.raises(ValueError, match="backend='cuda': the compiled extension pyprune._C has no cuda kernel"):
            resolve("cuda", "masked_solve", CUDA_DEV)
    import pyprune.ops._backend as be
    monkeypatch.setattr(be, "native_has", lambda op, device: False)
    with pytest.raises(ValueError, match="backend='cpp': the compiled extension pyprune._C has no cpu kernel"):
        be.resolve("cpp", "masked_solve", CPU)


def test_unavailable_triton_through_op(monkeypatch, rng):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    G, U = kernel_block(8, rng)
    with pytest.raises(ValueError, match="backend='triton' is not available"):
        ops.masked_solve(G, U, torch.randn(2, 8), torch.ones(2, 8, dtype=torch.bool), backend="triton")
