"""The compiled ops of pyprune._C (C++ on CPU tensors, CUDA on CUDA tensors) against pyprune.reference.

Inputs are fresh random every run (the ``rng`` fixture). Accuracy rule (flash-attention's): the op's error against a
float64 reference must be at most twice the error of the same reference run in float32, plus a small absolute
term. Masks: near-ties may flip between float32 and float64, so a mask passes when its counts are exact, the cost of
every chosen subset is within a relative 1e-5 of the best one, and at least 99% of the groups agree.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import pyprune.ops  # noqa: F401  (imports pyprune._C and registers the fake implementations)
from pyprune import reference
from pyprune.ops._backend import _native_loaded, native_has
from tests.helpers import kernel_block  # noqa: E402

pytestmark = pytest.mark.skipif(not _native_loaded(), reason="pyprune._C is not built")

F64 = torch.float64
HAS_CUDA = torch.cuda.is_available() and _native_loaded() and native_has("masked_solve", torch.device("cuda"))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device or kernels"))]
WDTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------------------------------- inputs
def realistic_G(B: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel_block(B, rng)


def weights(rows: int, B: int, dtype: torch.dtype, rng: torch.Generator) -> torch.Tensor:
    return (0.02 * torch.randn(rows, B, generator=rng)).to(dtype)


def masks(rows: int, B: int, kind: str, rng: torch.Generator) -> torch.Tensor:
    """kind: 'half' (50% per row), 'varied' (a random fraction per row, so both CUDA tiers are used); row 0 has
    nothing pruned and the last row everything (when there are at least 2 rows)."""
    if kind == "half":
        order = torch.rand(rows, B, generator=rng).argsort(dim=1)
        mask = order < B // 2
    else:
        mask = torch.rand(rows, B, generator=rng) < torch.rand(rows, 1, generator=rng)
    if rows >= 2:
        mask[0] = False
        mask[-1] = True
    return mask


def assert_close_rule(name: str, got: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor) -> None:
    got, ref64, ref32 = got.detach().cpu().to(F64), ref64.cpu(), ref32.cpu().to(F64)
    err = (got - ref64).abs().max().item() if got.numel() else 0.0
    err_torch = (ref32 - ref64).abs().max().item() if got.numel() else 0.0
    atol = 1e-6 * max(ref64.abs().max().item() if got.numel() else 0.0, 1e-30)
    assert err <= 2 * err_torch + atol, f"{name}: error {err:.3g} > 2 x torch fp32 error {err_torch:.3g} + {atol:.3g}"


# ------------------------------------------------------------------------------------------------ masked_solve
MS_SHAPES = [(1, 12), (7, 40), (33, 100), (130, 64), (7, 256), (33, 128)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,B", MS_SHAPES)
@pytest.mark.parametrize("kind", ["half", "varied"])
def test_masked_solve_native(device, rows, B, kind, rng):
    dtype = WDTYPES[(rows + B) % 3]
    G, U = realistic_G(B, rng)
    W = weights(rows, B, dtype, rng)
    mask = masks(rows, B, kind, rng)
    E, loss, status = torch.ops.pyprune.masked_solve(G.to(device), U.to(device), W.to(device), mask.to(device))
    assert E.dtype == torch.float32 and loss.dtype == torch.float32 and status.dtype == torch.int32
    assert E.shape == (rows, B) and loss.shape == (rows,) and status.shape == (rows,)
    assert torch.all(status.cpu() == 0)
    E64, loss64, _ = reference.masked_solve(G.to(F64), U.to(F64), W.to(F64), mask)
    E32, loss32, _ = reference.masked_solve(G, U, W.float(), mask)
    assert_close_rule("E", E, E64, E32)
    assert_close_rule("loss", loss, loss64, loss32)
    empty = ~mask.any(dim=1)
    assert torch.all(E.cpu()[empty] == 0) and torch.all(loss.cpu()[empty] == 0)
    assert torch.all(loss.cpu() >= 0)


@pytest.mark.parametrize("threads,warp", [(4, 2), (6, 3), (3, 1)])
@pytest.mark.parametrize("rows,B", [(5, 40), (4, 100), (3, 130)])
def test_masked_solve_emulated_cuda_partitioning(threads, warp, rows, B, rng):
    """The CUDA kernel's per-row code with `threads` cooperating CPU threads in warps of `warp` lanes, and the CUDA
    launcher's two tiers (B > 96): catches partitioning and barrier mistakes without a GPU."""
    G, U = realistic_G(B, rng)
    W = weights(rows, B, torch.bfloat16, rng)
    mask = masks(rows, B, "varied", rng)
    E, loss, status = torch.ops.pyprune._masked_solve_emulated(G, U, W, mask, threads, warp)
    assert torch.all(status == 0), "a row's status was not written (-1) or it failed"
    E64, loss64, _ = reference.masked_solve(G.to(F64), U.to(F64), W.to(F64), mask)
    E32, loss32, _ = reference.masked_solve(G, U, W.float(), mask)
    assert_close_rule("E", E, E64, E32)
    assert_close_rule("loss", loss, loss64, loss32)


def test_masked_solve_not_positive_definite_status():
    """The op does not raise for an indefinite G[M, M]: status = 1 + the failing block column, NaN in the row."""
    B = 8
    G = -torch.eye(B)
    mask = torch.ones(2, B, dtype=torch.bool)
    E, loss, status = torch.ops.pyprune.masked_solve(G, torch.eye(B), torch.randn(2, B), mask)
    assert status.tolist() == [1, 1]
    assert torch.isnan(E).all() and torch.isnan(loss).all()


def test_auto_backend_choice():
    """"auto": the compiled op on CPU tensors; on CUDA tensors what the op names from its H200 measurements (the
    Hessian: the library GEMM, backend "torch", for every X dtype), the compiled kernel otherwise; float64 always
    goes to torch."""
    from pyprune.ops._backend import resolve, triton_usable
    from pyprune.ops.hessian import hessian_backend
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve("auto", "hessian_update", cpu, auto_cuda="torch") == "native"
    assert resolve("auto", "masked_solve", cpu) == "native"
    assert resolve("auto", "hessian_update", cpu, float64=True, auto_cuda="torch") == "torch"
    assert resolve("auto", "hessian_update", cuda, auto_cuda="torch") == "torch"  # no device needed to decide
    if triton_usable(cuda):
        assert resolve("auto", "nm_select", cuda, auto_cuda="triton") == "triton"
    if native_has("masked_solve", cuda):
        assert resolve("auto", "masked_solve", cuda) == "native"
    H = torch.zeros(4, 4)
    assert hessian_backend(H, torch.zeros(2, 4)) == "native"
    assert hessian_backend(H.double(), torch.zeros(2, 4)) == "torch"
    assert hessian_backend(H, torch.zeros(2, 4), "torch") == "torch"
    with pytest.raises(ValueError, match="auto_cuda"):
        resolve("auto", "hessian_update", cpu, auto_cuda="cuda")


def test_masked_solve_wrapper_uses_cpp(rng):
    G, U = realistic_G(24, rng)
    W = weights(9, 24, torch.float32, rng)
    mask = masks(9, 24, "varied", rng)
    E, loss = pyprune.ops.masked_solve(G, U, W, mask, backend="cpp")
    E2, loss2, _ = torch.ops.pyprune.masked_solve(G, U, W, mask)
    assert torch.equal(E, E2) and torch.equal(loss, loss2)


# --------------------------------------------------------------------------------------------------- nm_select
def subset_costs(W: torch.Tensor, G: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, list]:
    """float64 costs 1/2 w_S^T G[S,S]^-1 w_S of every subset: (rows, groups, C(m, n)), and the subsets."""
    subsets = list(itertools.combinations(range(m), n))
    S = torch.tensor(subsets)
    W64, G64 = W.to(F64), G.to(F64)
    rows, B = W.shape
    out = torch.empty(rows, B // m, len(subsets), dtype=F64)
    for g in range(B // m):
        Gg = G64[g * m:(g + 1) * m, g * m:(g + 1) * m]
        inv = torch.linalg.inv(Gg[S[:, :, None], S[:, None, :]])  # (ns, n, n)
        w = W64[:, g * m:(g + 1) * m][:, S]  # (rows, ns, n)
        out[:, g] = 0.5 * torch.einsum("rsi,sij,rsj->rs", w, inv, w)
    return out, subsets


def check_nm_mask(mask: torch.Tensor, W: torch.Tensor, G: torch.Tensor, n: int, m: int, exact: bool,
                  ref_mask: torch.Tensor | None) -> None:
    rows, B = W.shape
    mask = mask.cpu()
    assert mask.dtype == torch.bool and mask.shape == (rows, B)
    groups = mask.reshape(rows, B // m, m)
    assert torch.all(groups.sum(dim=2) == n), "not exactly N pruned in every group of M"
    if exact:
        costs, subsets = subset_costs(W, G, n, m)
        chosen = torch.zeros(rows, B // m, dtype=torch.long)
        index = {S: i for i, S in enumerate(subsets)}
        for r in range(rows):
            for g in range(B // m):
                chosen[r, g] = index[tuple(torch.nonzero(groups[r, g]).flatten().tolist())]
        got = costs.gather(2, chosen[..., None])[..., 0]
        best = costs.min(dim=2).values
        assert torch.all(got <= best * (1 + 1e-5) + 1e-30), "a chosen subset is not (near) optimal"
        best_mask = torch.zeros(rows, B // m, m, dtype=torch.bool)
        S = torch.tensor(subsets)
        first = costs.argmin(dim=2)
        best_mask.scatter_(2, S[first], True)
        agree = (best_mask == groups).all(dim=2).double().mean().item()
    else:
        score = (W.to(F64) ** 2 / G.to(F64).diagonal()).reshape(rows, B // m, m)
        hi = torch.where(groups, score, torch.tensor(-1.0, dtype=F64)).max(dim=2).values
        lo = torch.where(groups, torch.tensor(float("inf"), dtype=F64), score).min(dim=2).values
        assert torch.all(hi <= lo * (1 + 1e-5) + 1e-30), "a pruned weight has a larger saliency than a kept one"
        agree = 1.0
    if ref_mask is not None:
        agree = min(agree, (ref_mask.reshape(rows, B // m, m) == groups).all(dim=2).double().mean().item())
    assert agree >= 0.99, f"only {agree:.1%} of the groups agree with the float64 reference"


NM_CASES = [(1, 12, 2, 4), (7, 40, 4, 8), (33, 100, 1, 4), (130, 64, 2, 4), (33, 256, 2, 4), (7, 40, 3, 8),
            (9, 96, 3, 4), (5, 32, 5, 16), (4, 48, 7, 16), (11, 24, 5, 6)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,B,n,m", NM_CASES)
@pytest.mark.parametrize("exact", [True, False])
def test_nm_select_native(device, rows, B, n, m, exact, rng):
    dtype = WDTYPES[(rows + B + n) % 3]
    G, _ = realistic_G(B, rng)
    W = weights(rows, B, dtype, rng)
    mask = torch.ops.pyprune.nm_select(W.to(device), G.to(device), n, m, exact)
    small = rows * len(list(itertools.combinations(range(m), n))) * (B // m) <= 20000
    ref_mask = reference.nm_select(W, G, n, m, exact=exact) if small else None
    check_nm_mask(mask, W, G, n, m, exact, ref_mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("exact", [True, False])
def test_nm_select_ties_follow_reference(device, n, m, exact, rng):
    """Exact ties (small integer weights, G = I): first subset in itertools order / lowest index wins."""
    rows, B = 17, 4 * m
    W = torch.randint(-2, 3, (rows, B), generator=rng).float()
    G = torch.eye(B)
    mask = torch.ops.pyprune.nm_select(W.to(device), G.to(device), n, m, exact)
    assert torch.equal(mask.cpu(), reference.nm_select(W, G, n, m, exact=exact))


# ---------------------------------------------------------------------------------------------- hessian_update
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,cols", [(1, 1), (37, 12), (300, 100), (64, 130), (0, 20), (129, 257)])
@pytest.mark.parametrize("xdtype", WDTYPES)
@pytest.mark.parametrize("beta", [0.75, 0.0])
def test_hessian_update_native(device, k, cols, xdtype, beta, rng):
    A = torch.randn(cols, cols, generator=rng)
    H0 = A @ A.T / max(cols, 1)
    H0 = (H0 + H0.T) / 2  # exactly symmetric, as every accumulated Hessian is
    X = torch.randn(k, cols, generator=rng).to(xdtype)
    alpha = 2.0 / max(k, 1)
    H = H0.to(device).clone()
    torch.ops.pyprune.hessian_update(H, X.to(device), alpha, beta, False)
    ref64 = reference.hessian_update(H0.to(F64), X, alpha, beta)
    ref32 = reference.hessian_update(H0, X, alpha, beta)
    assert_close_rule("H", H, ref64, ref32)
    assert torch.equal(H.cpu(), H.cpu().T), "H is not exactly symmetric"


@pytest.mark.skipif(not HAS_CUDA, reason="TF32 is a CUDA path")
def test_hessian_update_cuda_tf32(rng):
    cols, k = 200, 333
    X = torch.randn(k, cols, generator=rng)
    H = torch.zeros(cols, cols, device="cuda")
    torch.ops.pyprune.hessian_update(H, X.cuda(), 1.0 / k, 0.0, True)
    ref = (X.to(F64).T @ X.to(F64)) / k
    assert (H.cpu().to(F64) - ref).abs().max().item() <= 2e-3 * ref.abs().max().item()


def test_hessian_update_wrapper_cpp(rng):
    cols = 24
    H = torch.zeros(cols, cols)
    n = 0
    Xs = [torch.randn(s, cols, generator=rng).bfloat16() for s in (5, 11, 3)]
    for X in Xs:
        n = pyprune.ops.accumulate_hessian(H, n, X, backend="cpp")
    Xall = torch.cat(Xs).to(F64)
    ref = 2.0 / Xall.shape[0] * Xall.T @ Xall
    assert (H.to(F64) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_masked_solve_cuda_block_too_large():
    B = 400
    with pytest.raises(ValueError, match="too large"):
        torch.ops.pyprune.masked_solve(torch.eye(B, device="cuda"), torch.eye(B, device="cuda"),
                                       torch.randn(2, B, device="cuda"),
                                       torch.ones(2, B, dtype=torch.bool, device="cuda"))


# ------------------------------------------------------------------------------------------------ bad inputs
def _good(device="cpu"):
    B = 8
    return dict(G=torch.eye(B, device=device), U=torch.eye(B, device=device), W=torch.randn(3, B, device=device),
                mask=torch.ones(3, B, dtype=torch.bool, device=device), H=torch.eye(B, device=device),
                X=torch.randn(5, B, device=device))


BAD = {
    "ms_W_cols": lambda t: torch.ops.pyprune.masked_solve(t["G"], t["U"], torch.randn(3, 7), t["mask"]),
    "ms_G_dtype": lambda t: torch.ops.pyprune.masked_solve(t["G"].double(), t["U"], t["W"], t["mask"]),
    "ms_mask_dtype": lambda t: torch.ops.pyprune.masked_solve(t["G"], t["U"], t["W"], t["mask"].float()),
    "ms_mask_shape": lambda t: torch.ops.pyprune.masked_solve(t["G"], t["U"], t["W"], t["mask"][:2]),
    "ms_U_shape": lambda t: torch.ops.pyprune.masked_solve(t["G"], t["U"][:4], t["W"], t["mask"]),
    "ms_noncontig": lambda t: torch.ops.pyprune.masked_solve(t["G"], t["U"], t["W"].T.contiguous().T, t["mask"]),
    "ms_1d": lambda t: torch.ops.pyprune.masked_solve(t["G"], t["U"], t["W"][0], t["mask"][0]),
    "nm_B_not_multiple": lambda t: torch.ops.pyprune.nm_select(t["W"], t["G"], 2, 3, True),
    "nm_n_ge_m": lambda t: torch.ops.pyprune.nm_select(t["W"], t["G"], 4, 4, True),
    "nm_m_too_big": lambda t: torch.ops.pyprune.nm_select(torch.randn(2, 32), torch.eye(32), 2, 32, True),
    "nm_G_shape": lambda t: torch.ops.pyprune.nm_select(t["W"], torch.eye(4), 2, 4, True),
    "nm_W_dtype": lambda t: torch.ops.pyprune.nm_select(t["W"].double(), t["G"], 2, 4, True),
    "nm_W_int": lambda t: torch.ops.pyprune.nm_select(t["W"].int(), t["G"], 2, 4, False),
    "h_X_cols": lambda t: torch.ops.pyprune.hessian_update(t["H"], torch.randn(5, 7), 1.0, 1.0, False),
    "h_H_dtype": lambda t: torch.ops.pyprune.hessian_update(t["H"].double(), t["X"], 1.0, 1.0, False),
    "h_H_square": lambda t: torch.ops.pyprune.hessian_update(torch.zeros(8, 9), t["X"], 1.0, 1.0, False),
    "h_X_int": lambda t: torch.ops.pyprune.hessian_update(t["H"], t["X"].int(), 1.0, 1.0, False),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_raise(case):
    with pytest.raises((ValueError, TypeError), match="pyprune"):
        BAD[case](_good())


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_mixed_devices_raise():
    t = _good()
    with pytest.raises((ValueError, RuntimeError), match="device"):
        torch.ops.pyprune.masked_solve(t["G"].cuda(), t["U"], t["W"], t["mask"])
    with pytest.raises((ValueError, RuntimeError), match="device"):
        torch.ops.pyprune.nm_select(t["W"].cuda(), t["G"], 2, 4, True)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        torch.ops.pyprune.hessian_update(t["H"].cuda(), t["X"], 1.0, 1.0, False)


# ------------------------------------------------------------------------------------ torch.library integration
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, rng):
    G, U = realistic_G(16, rng)
    W = weights(7, 16, torch.bfloat16, rng)
    mask = masks(7, 16, "varied", rng)
    d = device
    torch.library.opcheck(torch.ops.pyprune.nm_select.default, (W.to(d), G.to(d), 2, 4, True))
    torch.library.opcheck(torch.ops.pyprune.nm_select.default, (W.to(d), G.to(d), 1, 4, False))
    torch.library.opcheck(torch.ops.pyprune.masked_solve.default, (G.to(d), U.to(d), W.to(d), mask.to(d)))
    H = torch.eye(16, device=d)
    torch.library.opcheck(torch.ops.pyprune.hessian_update.default, (H, W.to(d), 0.5, 0.5, False))


def test_torch_compile_fullgraph(rng):
    G, U = realistic_G(16, rng)
    W = weights(7, 16, torch.float32, rng)
    X = torch.randn(9, 16, generator=rng)

    def step(H, X, W, G, U):
        torch.ops.pyprune.hessian_update(H, X, 0.5, 0.5, False)
        mask = torch.ops.pyprune.nm_select(W, G, 2, 4, True)
        E, loss, status = torch.ops.pyprune.masked_solve(G, U, W, mask)
        return E, loss, status, mask

    H1, H2 = torch.eye(16), torch.eye(16)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(H1, X, W, G, U)
    want = step(H2, X, W, G, U)
    assert torch.equal(H1, H2)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
