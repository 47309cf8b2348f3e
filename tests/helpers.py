"""Problem generators and float64 oracles shared by the tests."""
from __future__ import annotations

import itertools

import torch


def random_layer(rows: int, cols: int, g: torch.Generator, *, tokens: int | None = None, dead: int = 0,
                 dtype=torch.float64):
    """A random weight and the Hessian H = 2/n X^T X of correlated random inputs (like real activations)."""
    n = tokens or 4 * cols
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols ** 0.5 + torch.eye(cols, dtype=torch.float64)
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ mix
    X = X * (0.2 + torch.rand(cols, generator=g, dtype=torch.float64))  # uneven input scales
    if dead:
        X[:, torch.randperm(cols, generator=g)[:dead]] = 0
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return W.to(dtype), (2.0 / n) * X.T @ X


def spd_block(B: int, g: torch.Generator, dtype=torch.float64):
    """U_B and G = U_B^T U_B taken from a realistic damped inverse Hessian."""
    _, H = random_layer(1, B + 7, g)
    H = H + 0.01 * torch.diagonal(H).mean() * torch.eye(B + 7, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    U_B = U[3:3 + B, 3:3 + B].contiguous()
    return U_B.to(dtype), (U_B.T @ U_B).to(dtype)


def random_mask(rows: int, cols: int, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    return torch.rand(rows, cols, generator=g) < p


def optimal_for_mask(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """argmin over W_hat with W_hat[mask] = 0 of sum_i (w_i - w_hat_i) H (w_i - w_hat_i)^T, row by row, as a
    float64 least-squares problem ||L^T (w - w_hat)|| with H = L L^T."""
    L = torch.linalg.cholesky(H.to(torch.float64))
    A = L.T
    out = torch.zeros_like(W, dtype=torch.float64)
    for i in range(W.shape[0]):
        keep = ~mask[i]
        if keep.any():
            sol = torch.linalg.lstsq(A[:, keep], (A @ W[i].to(torch.float64))[:, None]).solution[:, 0]
            out[i, keep] = sol
    return out


def nm_brute_force(W1: torch.Tensor, G: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Row by row, group by group: the best n-subset by 1/2 w_S^T G[S,S]^{-1} w_S (first minimum wins)."""
    rows, B = W1.shape
    mask = torch.zeros(rows, B, dtype=torch.bool)
    for i in range(rows):
        for g0 in range(0, B, m):
            best, best_S = None, None
            for S in itertools.combinations(range(g0, g0 + m), n):
                S = list(S)
                w = W1[i, S].to(torch.float64)
                c = 0.5 * float(w @ torch.linalg.solve(G[S][:, S].to(torch.float64), w))
                if best is None or c < best:
                    best, best_S = c, S
            mask[i, best_S] = True
    return mask


def greedy_brute_force(W1: torch.Tensor, G: torch.Tensor, counts=None, n: int = 0, m: int = 0) -> torch.Tensor:
    """Row by row: grow the pruned set S one index at a time, each time adding the j whose joint removal cost
    1/2 w_T^T G[T,T]^{-1} w_T (T = S + j, original weights) is least; N:M: only from groups holding < n."""
    rows, B = W1.shape
    mask = torch.zeros(rows, B, dtype=torch.bool)
    for i in range(rows):
        S: list[int] = []
        steps = (B // m) * n if m else int(counts[i])
        for _ in range(steps):
            best, best_j = None, None
            for j in range(B):
                if j in S or (m and sum(1 for s in S if s // m == j // m) >= n):
                    continue
                T = S + [j]
                w = W1[i, T].to(torch.float64)
                c = 0.5 * float(w @ torch.linalg.solve(G[T][:, T].to(torch.float64), w))
                if best is None or c < best:
                    best, best_j = c, j
            S.append(best_j)
        mask[i, S] = True
    return mask


def kernel_block(B: int, g: torch.Generator, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, U_B) in a kernel's dtype from ``spd_block``; G is formed from the rounded U_B so that G = U_B^T U_B holds
    for the values the kernel sees."""
    U_B, _ = spd_block(B, g)
    U_B = U_B.to(dtype).contiguous()
    return (U_B.double().T @ U_B.double()).to(dtype).contiguous(), U_B


def sym_hessian(cols: int, g: torch.Generator) -> torch.Tensor:
    """An exactly symmetric fp32 H (a Hessian under accumulation)."""
    A = torch.randn(cols, 2 * cols + 1, generator=g)
    return (A @ A.T / (2 * cols + 1)).contiguous()


def activations(k: int, cols: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """(k, cols) activations with uneven input scales, in ``dtype``."""
    scale = 0.2 + torch.rand(cols, generator=g)
    return (torch.randn(k, cols, generator=g) * scale).to(dtype)


def check_hessian_update(H_out: torch.Tensor, H_in: torch.Tensor, X: torch.Tensor, alpha: float, beta: float,
                         seed: int) -> None:
    """``H_out`` (one ``H <- beta H + alpha X^T X`` from ``H_in``) against float64: its error at most 2x the error of
    plain fp32 torch (the up-cast X^T X), plus the rounding a plain fp32 sum of k terms may make (4 sqrt(k) ulps of
    |H|: cuBLAS's fp32 GEMM on an H200 was up to 100x more accurate than that, so 2x its error alone failed a correct
    tensor-core kernel at k=300, with errors of 6 ulps), and exactly symmetric."""
    from pyprune import reference
    H_out, H_in, X = H_out.cpu(), H_in.cpu(), X.cpu()
    exact = reference.hessian_update(H_in.double(), X.double(), alpha, beta)
    plain = reference.hessian_update(H_in.float(), X, alpha, beta)  # fp32 X^T X of the up-cast X
    err_k = (H_out.double() - exact).norm().item()
    err_t = (plain.double() - exact).norm().item()
    tiny = 4 * torch.finfo(torch.float32).eps * max(1, X.shape[0]) ** 0.5 * exact.norm().item() + 1e-30
    assert torch.isfinite(H_out).all(), f"seed {seed}"
    assert err_k <= 2 * err_t + tiny, f"seed {seed}: error {err_k:.3e} vs torch fp32 {err_t:.3e}"
    assert torch.equal(H_out, H_out.T), f"seed {seed}: result not exactly symmetric"
