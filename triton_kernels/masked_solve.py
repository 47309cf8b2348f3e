"""Batched inverse-Hessian submatrix solve of one block (docs/ALGORITHM.md section 3).

Per row i with pruned set M_i (``mask[i]`` True):  ``G[M_i, M_i] lambda = w_i[M_i]``,  ``e_i = U_B[:, M_i] lambda``,
``loss_i = 1/2 lambda^T w_i[M_i]``.

Design
------
* One program per row; nothing of size B x B per row ever goes to global memory. Rows are bucketed on the host by
  their pruned count ``c`` (one sort and one device->host read of five bucket sizes); each bucket is one launch over
  its row ids with a compact tile ``BC`` in {16, 32, 64, 128, 256} (the bucket's power-of-two bound on ``c``), so
  e.g. a 50%-sparse B=128 block mostly works on 64x64 tiles and a few dense rows do not make every row pay for a
  large tile. Rows with nothing masked are never launched (e = 0, loss = 0).
* Compaction: the program reads the row's mask ``CH`` columns at a time, ranks the masked columns (``cumsum``) and
  builds ``idx[p]`` = the p-th masked column, then gathers ``A = G[idx, idx]`` (identity in the padding ``p >= c``:
  the contract's SPD system ``diag(m) G diag(m) + diag(1 - m)``, permuted) and ``w = W1[i, idx]``.
* Factorisation: the symmetric sweep operator (Goodnight; Gauss-Jordan inversion that keeps A symmetric) over the
  ``c`` used pivots turns A into ``-A^{-1}`` in place. Per step: one column extraction (masked row reduction), one
  rank-1 update with row/column k zeroed. No per-step row extraction, no triangular solves; ``c`` steps, not ``B``.
* ``lambda = A^{-1} w``, then one step of iterative refinement against ``G[idx, idx]`` re-read from memory (L1/L2):
  ``lambda += A^{-1} (w - G[idx, idx] lambda)``. Against float64 this is as accurate as torch's fp32 Cholesky solve
  (error ratio ~0.7-1.2 in E); without the refinement, plain Gauss-Jordan reached ~1.8.
* ``e = U_B[:, idx] lambda`` (gathered ``CH x BC`` slices of U_B), ``loss = 1/2 lambda^T w``.
* What limits B: registers. A program holds one ``BC x BC`` fp32 tile; ptxas (sm_90, compile-only on this machine)
  reports no spills for BC <= 64 and a few hundred bytes to ~1.5 KB of spills for BC = 128; BC = 256 (rows with more
  than 128 pruned weights) is 256 KB of fp32 -- the whole register file of an SM -- so it spills heavily to local
  memory: correct, slower. B <= 256 is enforced (``BP`` = next power of two of B is the width of the mask/E chunks).
* All arithmetic is fp32: W1 (fp32/fp16/bf16) is up-cast right after loading, which is also what the Triton
  interpreter needs for bf16.
* Failure contract (the same as the C++/CUDA op and the torch reference): a third output ``status`` (int32 per row)
  is 0 for a solved row, else 1 + the block column of the first non-positive (or NaN) sweep pivot -- the Schur
  complement that Cholesky would take the square root of, so the same column. The pivot is never divided by
  unchecked (a failed step divides by 1 and the row's E and loss are written as NaN). Two scalar selects per step;
  ptxas (sm_90, compile-only here) with the status output: no spills for BC <= 64, 956 bytes for BC = 128.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_block_args, check_device, compact_mask, next_pow2, sweep_inverse

__all__ = ["masked_solve_triton", "MAX_B"]

MAX_B = 256


@triton.jit
def _masked_solve_kernel(G, U, W, M, E, L, S, ROWS, B, stride_w, stride_m,
                         BP: tl.constexpr, BC: tl.constexpr, CH: tl.constexpr):
    row = tl.load(ROWS + tl.program_id(0)).to(tl.int64)
    p = tl.arange(0, BC)
    jc = tl.arange(0, CH)
    idx, cnt = compact_mask(M, row, stride_m, B, 1, BP, BC, CH)  # idx[p] = the p-th masked column
    pv = p < cnt
    gmask = pv[:, None] & pv[None, :]
    A = tl.load(G + (idx[:, None] * B + idx[None, :]), mask=gmask, other=0.0)
    A = tl.where(gmask, A, tl.where(p[:, None] == p[None, :], 1.0, 0.0))
    w = tl.load(W + row * stride_w + idx, mask=pv, other=0.0).to(tl.float32)
    A, bad = sweep_inverse(A, p, cnt)  # A -> -A^{-1} on the cnt used pivots (the identity padding untouched)
    lam = -tl.sum(A * w[None, :], axis=1)
    # one step of iterative refinement against the original system, re-read from memory (L1/L2 hits). The reload is
    # unmasked (padding slots read G[0, 0]; they only meet lambda = 0, and the padded entries of res are discarded by
    # the final where), so the compiler cannot merge it with the first load and keep a second tile live in the loop.
    A0 = tl.load(G + (idx[:, None] * B + idx[None, :]))
    res = w - tl.sum(A0 * lam[None, :], axis=1)
    lam = tl.where(pv, lam - tl.sum(A * res[None, :], axis=1), 0.0)
    failed = bad > 0
    tl.store(S + row, tl.where(failed, tl.sum(tl.where(p == bad - 1, idx, 0), axis=0) + 1, 0))
    tl.store(L + row, tl.where(failed, float("nan"), 0.5 * tl.sum(lam * w, axis=0)))
    # e = U_B[:, idx] lam, CH rows of U_B at a time
    for r0 in tl.static_range(0, BP, CH):
        r = r0 + jc
        rv = r < B
        ut = tl.load(U + r[:, None] * B + idx[None, :], mask=rv[:, None] & pv[None, :], other=0.0)
        tl.store(E + row * B + r, tl.where(failed, float("nan"), tl.sum(ut * lam[None, :], axis=1)), mask=rv)


def _masked_solve_impl(G: torch.Tensor, U_B: torch.Tensor, W1: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, B = W1.shape
    E = torch.zeros(rows, B, dtype=torch.float32, device=W1.device)
    loss = torch.zeros(rows, dtype=torch.float32, device=W1.device)
    status = torch.zeros(rows, dtype=torch.int32, device=W1.device)
    if rows == 0 or B == 0:
        return E, loss, status
    # Rows are bucketed by their pruned count c (compact tile BC = 16, 32, 64, 128, 256), one launch per bucket, so a
    # few dense rows do not make every row pay for a large tile. One device->host read (the bucket sizes).
    counts = mask.sum(dim=1)
    bucket = counts > 0  # 0: nothing masked; i >= 1: 16 * 2^(i-2) < c <= 16 * 2^(i-1)
    bucket = sum((counts > c for c in (16, 32, 64, 128)), bucket.long())
    order = torch.argsort(bucket).to(torch.int32)
    sizes = torch.bincount(bucket, minlength=6).tolist()
    BP = next_pow2(B, 16)
    m8 = mask.view(torch.uint8)
    start = sizes[0]  # rows with nothing masked keep e = 0, loss = 0, status = 0
    for i in range(1, len(sizes)):
        if sizes[i]:
            BC = 16 << (i - 1)
            _masked_solve_kernel[(sizes[i],)](G, U_B, W1, m8, E, loss, status, order[start:start + sizes[i]], B,
                                              W1.stride(0), m8.stride(0), BP=BP, BC=BC, CH=min(BP, 32),
                                              num_warps=min(16, BC // 8))
            start += sizes[i]
    return E, loss, status


@torch.library.custom_op("pyprune_triton::masked_solve", mutates_args=())
def _masked_solve_op(G: torch.Tensor, U_B: torch.Tensor, W1: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _masked_solve_impl(G, U_B, W1, mask)


@_masked_solve_op.register_fake
def _masked_solve_fake(G, U_B, W1, mask):
    rows, B = W1.shape
    return (W1.new_empty((rows, B), dtype=torch.float32), W1.new_empty((rows,), dtype=torch.float32),
            W1.new_empty((rows,), dtype=torch.int32))


def masked_solve_triton(G: torch.Tensor, U_B: torch.Tensor, W1: torch.Tensor,
                        mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched masked solve of one block. G, U_B: (B, B) float32 contiguous (U_B upper triangular, G = U_B^T U_B);
    W1: (rows, B) float32/float16/bfloat16 with unit column stride; mask: (rows, B) bool, True = pruned.
    Returns E (rows, B) float32, loss (rows,) float32 and status (rows,) int32: 0 = solved, else 1 + the block column
    of the first non-positive pivot (E and loss NaN in that row; nothing raises). B <= 256."""
    op = "masked_solve_triton"
    check_block_args(op, G, U_B, W1, mask, MAX_B)
    check_device(_masked_solve_kernel, op, G=G, U_B=U_B, W1=W1, mask=mask)
    return torch.ops.pyprune_triton.masked_solve(G, U_B, W1, mask)
