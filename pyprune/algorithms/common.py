"""Pieces every layer algorithm shares: argument checks, the damped Hessian and its inverse Cholesky factor (with
the damping retry), unstructured mask selection, the result type and the layer objective."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import Sparsity
from ..ops._checks import all_finite, check_matrix, check_same_device, check_symmetric

# Damping retry (hessian_setup): when the Cholesky factorisation of H + damp * mean(diag(H)) * I fails, damp is
# multiplied by DAMP_STEP (0 becomes DAMP_FROM_ZERO) and the setup tried again, up to MAX_DAMP: config.damp = 0.01
# tries 0.01, 0.1 and 1.0. At damp = 1 the added diagonal equals the average curvature, so the update already leans
# heavily towards the identity (magnitude-like); a PSD H (an accumulated 2/n X^T X of finite activations) factors
# with far less, so failing there means the Hessian itself is broken (activations out of range for their dtype, a
# wrong accumulation), and going on would prune with a meaningless H. A PruneConfig(damp=...) above MAX_DAMP is tried
# once.
DAMP_STEP = 10.0
DAMP_FROM_ZERO = 1e-4
MAX_DAMP = 1.0


@dataclass
class PruneResult:
    """weight: the pruned weight in the input's dtype; mask: bool, True = pruned: exactly the weights the method set
    to zero (its chosen set, plus the weights of dead inputs, which the OBS methods zero: see ``prune_group``), so
    ``sparsity`` is the fraction of zeros the method made; loss: the layer loss sum_i 1/2 (w_i - w_hat_i) H_d
    (w_i - w_hat_i)^T (as a float; H_d the damped calibration Hessian, not shrunk) over the live inputs (dead inputs, diag(H) = 0, cost nothing on the calibration
    data); row_loss: per row; damp: the relative damping of H_d actually used (config.damp, or larger after the
    OBS methods' Cholesky retry; NaN when a method core is called directly without recording it); fallback: None,
    or why the method was not applied and what was done instead (``FALLBACK_ALL_DEAD``); exchanges, exchange_s:
    the joint method's mask exchanges made over all rows and blocks (``PruneConfig.swaps``) and the seconds spent
    in the op that makes them and solves their final set."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float
    row_loss: torch.Tensor
    damp: float = float("nan")
    fallback: str | None = None
    exchanges: int = 0
    exchange_s: float = 0.0

    @property
    def sparsity(self) -> float:
        return float(self.mask.float().mean()) if self.mask.numel() else 0.0


FALLBACK_ALL_DEAD = "magnitude: every input is dead (zero Hessian), so H carries no information"


class NotPositiveDefiniteError(ValueError):
    """The damped Hessian's Cholesky factorisation failed (``hessian_setup`` retries with more damping)."""


@dataclass
class HessianSetup:
    """The part of a layer's setup that depends on H alone, shared by every weight that reads the same input (q/k/v,
    gate/up): ``dead`` (cols,) bool, the inputs with diag(H) == 0; ``damp`` the relative damping used; ``U`` the upper
    Cholesky factor of H_d^{-1} in the compute dtype, None when every input is dead (``all_dead``: nothing to
    factor; the methods fall back to magnitude pruning)."""

    U: torch.Tensor | None
    dead: torch.Tensor
    damp: float
    all_dead: bool
    shrink: float = 0.0
    lam: float = 0.0  # the damping added to the diagonal, damp * mean(diag(H)) (dead columns counted as 1)
    has_dead: bool = field(init=False)  # dead.any(), read once: the per-weight steps skip their dead-column passes

    def __post_init__(self):
        self.has_dead = bool(self.dead.any())


def compute_dtype(W: torch.Tensor) -> torch.dtype:
    """float64 stays float64; fp16/bf16/fp32 weights are processed in float32 (as SparseGPT does)."""
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def check_layer(W: torch.Tensor, H: torch.Tensor | None, sparsity: Sparsity) -> None:
    check_matrix("weight", W)
    rows, cols = W.shape
    if H is not None:
        check_matrix("H", H, dtypes=(torch.float32, torch.float64), shape=(cols, cols))
        check_same_device(weight=W, H=H)
        check_symmetric("H", H)  # both triangles are read: an upper-only H would be pruned as a wrong one
    if sparsity.structured and cols % sparsity.m:
        raise ValueError(f"{sparsity} sparsity needs the number of input columns ({cols}) to be a multiple of "
                         f"M={sparsity.m}")


def _damped(H: torch.Tensor, damp: float, dtype: torch.dtype,
            shrink: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(H_d, dead, lam): a ``dtype`` copy of H with its off-diagonal scaled by ``1 - shrink`` (PruneConfig.shrink),
    ``H[j, j] = 1`` on dead columns, then the damping lam = damp * mean(diag) added to the diagonal."""
    H = H.to(dtype).clone()
    diag = torch.diagonal(H)
    if shrink:
        d = diag.clone()
        H.mul_(1.0 - shrink)
        diag.copy_(d)
    dead = diag == 0
    H[dead, dead] = 1.0
    lam = damp * torch.mean(diag)
    diag.add_(lam)
    return H, dead, float(lam)


def damped_hessian(W: torch.Tensor, H: torch.Tensor, damp: float,
                   shrink: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (W', H_d, dead): a compute-dtype copy of W with dead columns zeroed, the damped (and ``shrink``-ed)
    Hessian with ``H[j, j] = 1`` on dead columns (zero diagonal), and the dead-column mask (docs/ALGORITHM.md
    section 1)."""
    W = W.to(compute_dtype(W), copy=True)
    H, dead, _ = _damped(H, damp, W.dtype, shrink)
    if bool(dead.any()):
        W[:, dead] = 0.0
    return W, H, dead


def _reverse_(A: torch.Tensor) -> torch.Tensor:
    """A.flip(0, 1) in A's own storage, a band of rows at a time through two preallocated bands (an eighth of A;
    band temporaries from Tensor.flip left 0.6 of A more resident on the CPU, measured at 4096 columns)."""
    n = A.shape[0]
    step = max(1, n // 16)
    cols = torch.arange(n - 1, -1, -1, device=A.device)
    t1 = torch.empty(step, n, dtype=A.dtype, device=A.device)
    t2 = torch.empty_like(t1)
    for r0 in range(0, n // 2, step):
        r1 = min(r0 + step, n // 2)
        top, bottom = A[r0:r1], A[n - r1:n - r0]
        rows = torch.arange(r1 - r0 - 1, -1, -1, device=A.device)
        a, b = t1[:r1 - r0], t2[:r1 - r0]
        torch.index_select(top, 0, rows, out=a)
        torch.index_select(a, 1, cols, out=b)  # b = top.flip(0, 1)
        torch.index_select(bottom, 0, rows, out=a)
        torch.index_select(a, 1, cols, out=top)  # top = bottom.flip(0, 1)
        bottom.copy_(b)
    if n % 2:
        mid = A[n // 2]
        t1[0].copy_(mid)
        torch.index_select(t1[0], 0, cols, out=mid)
    return A


def inverse_cholesky_upper(H_d: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
    """Upper Cholesky factor U of H_d^{-1} (H_d^{-1} = U^T U): the same U as SparseGPT's Cholesky, inverse, Cholesky,
    for about a third of the arithmetic.

    With J the reversal permutation and L = cholesky(J H_d J): H_d = R R^T with R = J L J upper triangular, so
    H_d^{-1} = R^{-T} R^{-1} and U = R^{-1} (upper, positive diagonal: the unique factor). Cost: the Cholesky
    (cols^3 / 3) and a triangular solve against I (cols^3 as BLAS counts it), 1.3 cols^3 against 3.7 for Cholesky,
    solve, L^{-T} L^{-1} product and second Cholesky; two flips, memory-bound. Measured (benchmarks/bench_setup.py,
    CPU, 1 thread): 2.2x, 2.5x, 2.6x faster than the old formula at 1024, 2048, 4096 columns. Inverting R by blocks
    (triangular solves on halves, cols^3 / 3) was no faster on the CPU here (MKL, 2048 columns, 1 and 2 threads:
    within 5%), and torch.linalg.inv_ex (LU) was slower, so the solve against I it is. A single Cholesky also removes
    the old second failure point (L^{-T} L^{-1} losing definiteness in fp32).

    ``overwrite=True`` lets the work run in H_d's own storage and returns U in it, so that at most two cols x cols
    buffers are alive (H_d and J H_d J, 3.3 GB each in fp32 for a 70B down_proj's 28672 columns, plus an eighth of
    one for the flip; measured on the CPU at 4096 columns: 1.2 buffers above H_d, the old code's 2.1). Raises
    NotPositiveDefiniteError (a ValueError) when the Cholesky factorisation fails."""
    n = H_d.shape[0]
    A = H_d.flip(0, 1)  # J H_d J, a new buffer
    info = torch.empty((), dtype=torch.int32, device=H_d.device)
    # L, in place: through the column-major view A.T (the upper factor of A.T = A, which is L^T there), LAPACK
    # works in A's storage; cholesky_ex on row-major A itself made a full copy (measured on the CPU)
    torch.linalg.cholesky_ex(A.T, upper=True, out=(A.T, info))
    if int(info) != 0:
        raise NotPositiveDefiniteError("the damped Hessian is not positive definite (Cholesky failed: its trailing "
                                       f"block from column {n - int(info)} is not); increase damp or check the "
                                       "calibration activations")
    _reverse_(A)  # R = J L J
    U = H_d if overwrite else torch.empty_like(H_d)
    U.zero_()
    U.diagonal().fill_(1.0)
    torch.linalg.solve_triangular(A, U, upper=True, out=U)  # R^{-1}, in place over I
    del A
    if not all_finite(U):
        raise NotPositiveDefiniteError("the inverse of the damped Hessian overflows in this precision; increase damp")
    return U


def calibration_row_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, setup: HessianSetup,
                         row_loss: torch.Tensor) -> torch.Tensor:
    """Per-row ``1/2 d (H + lam I) d^T``, d = w - w_hat on the live inputs (W: the layer's input weight, any dtype;
    dead columns count as zero), on the calibration H itself, from the method's ``row_loss`` (in the compute dtype)
    on the shrunk H_s = (1 - s) H + s diag(H) (+ lam I): with q_s = d H_s d^T = (1 - s) d H d^T + s sum_j H_jj d_j^2,
    d H d^T = (q_s - s sum_j H_jj d_j^2) / (1 - s), an O(rows x cols) step (no rows x cols x cols product) whose
    rounding grows as 1 / (1 - s); at s > 0.9 it is computed directly. ``setup.shrink == 0``: ``row_loss`` itself."""
    s = setup.shrink
    if not s:
        return row_loss
    dtype = row_loss.dtype
    D = W.to(dtype, copy=True).sub_(W_hat)
    if setup.has_dead:
        D[:, setup.dead] = 0.0
    if s > 0.9:
        q = ((D @ H.to(dtype)) * D).sum(1)
        return 0.5 * (q + setup.lam * (D * D).sum(1))
    # sum_j d_j^2 and sum_j H_jj d_j^2 in one pass over d^2
    sums = D.square_() @ torch.stack([torch.ones(D.shape[1], dtype=dtype, device=D.device),
                                      torch.diagonal(H).to(dtype)], 1)
    dd, hdd = sums.unbind(1)
    q = (2.0 * row_loss - setup.lam * dd - s * hdd) / (1.0 - s)
    return 0.5 * (q + setup.lam * dd)


def damp_schedule(damp: float) -> list[float]:
    """The relative dampings ``hessian_setup`` tries, in order: ``damp``, then x DAMP_STEP up to MAX_DAMP."""
    out = [damp]
    while out[-1] < MAX_DAMP:
        out.append(min(MAX_DAMP, out[-1] * DAMP_STEP if out[-1] > 0 else DAMP_FROM_ZERO))
    return out


def hessian_setup(H: torch.Tensor, damp: float, dtype: torch.dtype, shrink: float = 0.0) -> HessianSetup:
    """Dead inputs, damped H (its off-diagonal first scaled by ``1 - shrink``) and its factor U in ``dtype``, once per
    Hessian. A failed factorisation is retried with more damping (``damp_schedule``); past MAX_DAMP it raises,
    naming the limit. Does not modify H."""
    dead = torch.diagonal(H).to(dtype) == 0  # as _damped sees it
    if bool(dead.all()):
        return HessianSetup(None, dead, damp, True)
    tried = []
    for d in damp_schedule(damp):
        H_d, _, lam = _damped(H, d, dtype, shrink)
        try:
            return HessianSetup(inverse_cholesky_upper(H_d, overwrite=True), dead, d, False, shrink, lam)
        except NotPositiveDefiniteError:
            tried.append(d)
        del H_d
    raise NotPositiveDefiniteError(
        f"the damped Hessian is not positive definite even at damp={tried[-1]:g} (tried "
        f"{', '.join(f'{d:g}' for d in tried)}; the retry stops at pyprune.algorithms.common.MAX_DAMP={MAX_DAMP:g}): "
        "H should be positive semi-definite, so check the calibration activations (finite, in range for their "
        "dtype, H accumulated as 2/n X^T X), or pass a larger PruneConfig(damp=...) to go further")


def obs_setup(W: torch.Tensor, H: torch.Tensor, config, mask: torch.Tensor | None,
              setup: HessianSetup | None = None):
    """What the OBS-family methods (joint, SparseGPT) start from: the compute-dtype copy of W (dead columns
    zeroed), U = upper Cholesky factor of H_d^{-1}, an empty mask and zero per-row losses. ``setup`` (from
    ``hessian_setup``, arguments already checked: ``prune_group``) shares the per-Hessian work between weights;
    without it the arguments are checked and the setup computed here."""
    if setup is None:
        check_layer(W, H, config.sparsity)
        check_fixed_mask(mask, W)
        setup = hessian_setup(H, config.damp, compute_dtype(W), config.shrink)
    if setup.all_dead:
        raise ValueError("every input of this layer is dead (zero Hessian): prune it with pyprune.prune_layer or "
                         "prune_group, which fall back to magnitude pruning")
    Wc = W.to(compute_dtype(W), copy=True)
    if setup.has_dead:
        Wc[:, setup.dead] = 0.0
    rows, cols = Wc.shape
    return (Wc, setup.U, torch.zeros(rows, cols, dtype=torch.bool, device=W.device),
            torch.zeros(rows, dtype=Wc.dtype, device=W.device))


def smallest_mask(score: torch.Tensor, fraction: float, scope: str) -> torch.Tensor:
    """True on the ``round(fraction * count)`` smallest scores, counted over each row (scope="row") or over the
    whole matrix (scope="block"). Ties are broken by position, as a stable sort would (NaN counts as the largest).
    Computed as the k-th smallest value per row (``kthvalue``), everything below it, and of the entries equal to it
    the first ones: 2-6x faster than sorting on the CPU, the same mask."""
    rows, cols = score.shape
    flat = score if scope == "row" else score.reshape(1, -1)
    k = int(round(fraction * flat.shape[1]))
    if k == 0 or score.numel() == 0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=score.device)
    t = torch.kthvalue(flat, k, dim=1, keepdim=True).values
    below, equal = flat < t, flat == t
    nan_t = torch.isnan(t)
    if bool(nan_t.any()):  # the k-th is NaN: every number is below it, NaNs tie with it
        nan = torch.isnan(flat)
        below |= nan_t & ~nan
        equal |= nan_t & nan
    need = k - below.sum(1, keepdim=True)
    return (below | (equal & (equal.cumsum(1) <= need))).reshape(rows, cols)


def nm_smallest_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True on the ``n`` smallest scores of every group of ``m`` consecutive columns (ties: lowest index)."""
    rows, cols = score.shape
    idx = torch.sort(score.reshape(rows, cols // m, m), dim=2, stable=True).indices[:, :, :n]
    return torch.zeros(rows, cols // m, m, dtype=torch.bool, device=score.device).scatter_(2, idx, True).reshape(
        rows, cols)


def zero_masked_(W: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``W.masked_fill_(mask, 0.0)`` for a floating ``W`` (any strides), with the same result (+0.0 where ``mask``):
    an AND of W's bits with a keep mask, several times faster than masked_fill_ on the CPU."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[W.element_size()]
    return W.view(ints).bitwise_and_(mask.logical_not().to(ints).neg_()).view(W.dtype)


def layer_objective(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row ``1/2 (w - w_hat) H (w - w_hat)^T`` (docs/ALGORITHM.md section 1), in H's dtype."""
    D = W.to(H.dtype) - W_hat.to(H.dtype)
    return 0.5 * ((D @ H) * D).sum(1)


def check_fixed_mask(mask: torch.Tensor | None, W: torch.Tensor) -> None:
    if mask is not None:
        check_matrix("mask", mask, dtypes=(torch.bool,), shape=W.shape, finite=False)
        check_same_device(weight=W, mask=mask)
