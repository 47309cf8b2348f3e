"""The joint solve with exchange refinement of one block (docs/ALGORITHM.md section 4), the Triton engine beside the
C++/CUDA one (csrc/kernels/refine_solve.cuh); ``pyprune.reference.swap`` states the rule and its updates in torch.

Per row i with pruned set M (c weights) and kept set K (B - c): factor A = G[M, M] once, score every exchange of a
pruned weight j and a kept weight k (N:M: of the same group) by the exact change of the row's block loss, apply the
best while it lowers the loss by more than ``tol`` of it (at most ``rounds`` times), updating A^{-1}, U = A^{-1} G[M,
K] and the Schur complements s by rank-two formulas (no new factorisation), then solve the final set from the same
A^{-1}: ``e = U_B[:, M] lambda``, ``loss = 1/2 lambda . w_M``.

Design
------
* One program per row, its whole state in registers: A^{-1} (``BC x BC``), U (``BC x BK``) and s, lambda, the
  weights (vectors). Rows are bucketed on the host by the power-of-two bounds ``BC`` >= c and ``BK`` >= B - c (16 to
  256 each), one launch per bucket over its row ids, so a 50% block works on 64 x 64 tiles; rows that prune nothing
  are not launched (e = 0, loss = 0, the mask unchanged).
* Compaction and factorisation shared with the masked solve (``_common.compact_mask``, ``_common.sweep_inverse``):
  ``idxM[p]`` = the p-th pruned column, ``idxK[q]`` the q-th kept one (ascending); the symmetric sweep operator over
  the c used pivots turns A into -A^{-1}; a non-positive pivot sets the status (1 + its block column), and the row
  writes NaN in e and the loss, its starting mask and 0 exchanges, as the C++/CUDA op does. U = A^{-1} G[M, K] is
  one ``tl.dot`` in IEEE fp32 (no TF32; rank-one steps when c > 128, where a 256-wide dot needs more shared memory
  than an SM has), s_k = G_kk - G[k, M] . U[:, k].
* Each round recomputes lambda = A^{-1} w_M and r = w_K - G[K, M] lambda from the state (a few ``BC x BK`` passes,
  G re-read from L1/L2), scores every allowed pair

      delta = r_k t_k / 2 - (lambda_j - U_jk t_k)^2 / (2 (A^{-1}_jj + U_jk^2 / s_k)),   t = r / max(s, tiny),

  takes the smallest (of equal ones the first in the order j K + k, NaN never wins), and applies the rank-two
  updates of ``reference.swap`` (U's row of the leaving weight from the state, v^T G[M', K'] from G).
* The final solve: lambda = A^{-1} w_M plus one step of iterative refinement against G[M, M] re-read from memory,
  in fp32 (the Triton masked solve's rule; the C++/CUDA engine accumulates that residual in fp64).
* Rounding: the engines share the rule, not the summation order. Where no two exchanges tie within float32 rounding
  they make the same exchanges as the C++ engine and the float64 reference; E and the loss for the final mask meet
  the masked solve's bound against float64 (tests/ops/test_triton_refine_solve.py).
* What limits B: registers, as for the masked solve (two ``BC x BK``/``BC x BC`` tiles live across the rounds).
  B <= 256 is enforced. Compiled for sm_90 (tests/ops/test_triton_compile.py): the 64 x 64 tiles take 234 registers
  with 8 warps and do not spill; 128 x 128 spills (about 8 KB) and stages 160 KB of shared memory for its dot.
* W1 (fp32/fp16/bf16) is up-cast right after loading (what the interpreter needs for bf16 too).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_block_args, check_device, compact_mask, next_pow2, sweep_inverse

__all__ = ["refine_solve_triton", "MAX_B"]

MAX_B = 256
_TILES = (16, 32, 64, 128, 256)


@triton.jit(do_not_specialize=["rounds", "m"])  # one compile for every count (1 would be made a constant)
def _refine_solve_kernel(G, U_B, W, M, E, L, S, MO, NS, ROWS, B, stride_w, stride_m, rounds, m, tol,
                         BP: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr):
    row = tl.load(ROWS + tl.program_id(0)).to(tl.int64)
    p = tl.arange(0, BC)
    q = tl.arange(0, BK)
    jc = tl.arange(0, CH)
    idxM, c = compact_mask(M, row, stride_m, B, 1, BP, BC, CH)
    idxK, K = compact_mask(M, row, stride_m, B, 0, BP, BK, CH)
    pv = p < c
    qv = q < K
    mm = tl.maximum(m, 1)
    gmask = pv[:, None] & pv[None, :]
    kmask = pv[:, None] & qv[None, :]
    eye = p[:, None] == p[None, :]
    # the sweep operator on the c used pivots: A -> -A^{-1} (identity padding untouched)
    A = tl.load(G + (idxM[:, None] * B + idxM[None, :]), mask=gmask, other=0.0)
    A = tl.where(gmask, A, tl.where(eye, 1.0, 0.0))
    A, bad = sweep_inverse(A, p, c)
    Ai = tl.where(gmask, -A, 0.0)  # A^{-1}, zero in the padding
    failed = bad > 0
    wM = tl.load(W + row * stride_w + idxM, mask=pv, other=0.0).to(tl.float32)
    wK = tl.load(W + row * stride_w + idxK, mask=qv, other=0.0).to(tl.float32)
    GMK = tl.load(G + (idxM[:, None] * B + idxK[None, :]), mask=kmask, other=0.0)
    if BC <= 128:
        U = tl.dot(Ai, GMK, input_precision="ieee")
    else:  # a 256-wide dot stages more shared memory than an SM has: rank-one steps instead
        U = tl.zeros((BC, BK), dtype=tl.float32)
        for i in tl.range(0, c):
            ci = tl.sum(tl.where(p[None, :] == i, Ai, 0.0), axis=1)
            gi = tl.sum(tl.where(p[:, None] == i, GMK, 0.0), axis=0)
            U += ci[:, None] * gi[None, :]
    s = tl.load(G + idxK * (B + 1), mask=qv, other=1.0) - tl.sum(GMK * U, axis=0)
    tiny = tl.full((), 1.1754943508222875e-38, tl.float32)  # the smallest normal fp32
    big = BC * BK
    flat = p[:, None] * BK + q[None, :]
    done = c * 0
    go = (rounds > 0) & (K > 0) & (bad == 0)
    while go:
        lam = tl.sum(Ai * wM[None, :], axis=1)
        L0 = 0.5 * tl.sum(lam * wM, axis=0)
        # G[M, K] re-read from L1/L2 every round, though an exchange's update just loaded it: carried across the
        # rounds instead, it stays live beside Ai and U and the 64 x 64 tiles spill (tests/ops/test_triton_compile.py)
        GMK = tl.load(G + (idxM[:, None] * B + idxK[None, :]), mask=kmask, other=0.0)
        r = wK - tl.sum(GMK * lam[:, None], axis=0)
        sq = tl.maximum(s, tiny)
        tq = r / sq
        ad = tl.sum(tl.where(eye, Ai, 0.0), axis=1)
        num = lam[:, None] - U * tq[None, :]
        den = tl.where(kmask, ad[:, None] + U * U / sq[None, :], 1.0)  # (the padding: 0 / 0)
        dl = (0.5 * r * tq)[None, :] - 0.5 * num * num / den
        allowed = kmask & (dl == dl)
        if m > 0:
            allowed = allowed & ((idxM // mm)[:, None] == (idxK // mm)[None, :])
        dl = tl.where(allowed, dl, float("inf"))
        best = tl.min(dl, axis=1)
        best = tl.min(best, axis=0)
        bidx = tl.min(tl.min(tl.where(allowed & (dl == best), flat, big), axis=1), axis=0)
        take = best < -tol * tl.abs(L0)
        if take:
            pp = bidx // BK
            qq = bidx % BK
            rp = p == pp
            cq = q == qq
            av = tl.sum(tl.where(rp[:, None], Ai, 0.0), axis=0)  # A^{-1}'s row p (= column p), slot-indexed
            app = tl.sum(tl.where(rp, av, 0.0), axis=0)
            urow = tl.sum(tl.where(rp[:, None], U, 0.0), axis=0)
            j = tl.sum(tl.where(rp, idxM, 0), axis=0)
            kk = tl.sum(tl.where(cq, idxK, 0), axis=0)
            wj = tl.sum(tl.where(rp, wM, 0.0), axis=0)
            wk = tl.sum(tl.where(cq, wK, 0.0), axis=0)
            idxM = tl.where(rp, kk, idxM)
            idxK = tl.where(cq, j, idxK)
            wM = tl.where(rp, wk, wM)
            wK = tl.where(cq, wj, wK)
            bv = tl.load(G + kk * B + idxM, mask=pv, other=0.0)  # G[M', k]
            ab = tl.sum(av * bv, axis=0) / app
            u = tl.where(rp, 0.0, tl.sum(Ai * bv[None, :], axis=1) - av * ab)  # D b (u_p = 0)
            sk = tl.maximum(tl.load(G + kk * (B + 1)) - tl.sum(u * bv, axis=0), tiny)
            v = tl.where(rp, -1.0, u)  # u - e_p
            GMK = tl.load(G + (idxM[:, None] * B + idxK[None, :]), mask=kmask, other=0.0)
            vg = tl.sum(GMK * v[:, None], axis=0)  # v^T G[M', K']
            ia = 1.0 / app
            is_ = 1.0 / sk
            Ai = Ai - (av * ia)[:, None] * av[None, :] + (v * is_)[:, None] * v[None, :]
            vgq = tl.sum(tl.where(cq, vg, 0.0), axis=0)
            s = tl.where(cq, ia - vgq * vgq * is_, s + urow * urow * ia - vg * vg * is_)
            colq = v * (vgq * is_) - av * ia + tl.where(rp, 1.0, 0.0)
            U = U - (av * ia)[:, None] * urow[None, :] + (v * is_)[:, None] * vg[None, :]
            U = tl.where(cq[None, :], colq[:, None], U)
            done += 1
        go = take & (done < rounds)
    # the solve of the final set from the same A^{-1}, one refinement step against G[M, M]
    lam = tl.sum(Ai * wM[None, :], axis=1)
    A0 = tl.load(G + (idxM[:, None] * B + idxM[None, :]), mask=gmask, other=0.0)
    res = wM - tl.sum(A0 * lam[None, :], axis=1)
    lam = tl.where(pv, lam + tl.sum(Ai * res[None, :], axis=1), 0.0)
    tl.store(S + row, tl.where(failed, tl.sum(tl.where(p == bad - 1, idxM, 0), axis=0) + 1, 0))
    tl.store(L + row, tl.where(failed, float("nan"), 0.5 * tl.sum(lam * wM, axis=0)))
    tl.store(NS + row, done)
    for r0 in tl.static_range(0, BP, CH):
        rr = r0 + jc
        rv = rr < B
        ut = tl.load(U_B + rr[:, None] * B + idxM[None, :], mask=rv[:, None] & pv[None, :], other=0.0)
        tl.store(E + row * B + rr, tl.where(failed, float("nan"), tl.sum(ut * lam[None, :], axis=1)), mask=rv)
        inm = tl.sum(tl.where((idxM[None, :] == rr[:, None]) & pv[None, :], 1, 0), axis=1) > 0
        tl.store(MO + row * B + rr, inm.to(tl.uint8), mask=rv & ~failed)


def _launch_options(B: int, BC: int, BK: int) -> tuple[dict, dict]:
    """The kernel's constexprs and launch options for block size B and the tiles BC x BK (one place: the launcher and
    tests/ops/test_triton_compile.py's sm_90 compile)."""
    BP = next_pow2(B, 16)
    return dict(BP=BP, BC=BC, BK=BK, CH=min(BP, 32)), dict(num_warps=min(16, max(BC, BK) // 8))


def _bucket(x: torch.Tensor) -> torch.Tensor:
    """Index into _TILES of the smallest tile >= x (x >= 0)."""
    return sum((x > t for t in _TILES[:-1]), torch.zeros_like(x))


def _refine_solve_impl(G: torch.Tensor, U_B: torch.Tensor, W1: torch.Tensor, mask: torch.Tensor, rounds: int, m: int,
                       tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, B = W1.shape
    E = torch.zeros(rows, B, dtype=torch.float32, device=W1.device)
    loss = torch.zeros(rows, dtype=torch.float32, device=W1.device)
    status = torch.zeros(rows, dtype=torch.int32, device=W1.device)
    final = mask.clone(memory_format=torch.contiguous_format)
    swaps = torch.zeros(rows, dtype=torch.int32, device=W1.device)
    if rows == 0 or B == 0:
        return E, loss, status, final, swaps
    # buckets by (tile of c, tile of B - c); rows that prune nothing come first and are not launched. One
    # device->host read (the bucket sizes).
    counts = mask.sum(dim=1)
    n = len(_TILES)
    key = torch.where(counts > 0, 1 + _bucket(counts) * n + _bucket(B - counts), torch.zeros_like(counts))
    order = torch.argsort(key).to(torch.int32)
    sizes = torch.bincount(key, minlength=1 + n * n).tolist()
    m8, f8 = mask.view(torch.uint8), final.view(torch.uint8)
    start = sizes[0]
    for i in range(1, len(sizes)):
        if sizes[i]:
            consts, opts = _launch_options(B, _TILES[(i - 1) // n], _TILES[(i - 1) % n])
            _refine_solve_kernel[(sizes[i],)](G, U_B, W1, m8, E, loss, status, f8, swaps,
                                              order[start:start + sizes[i]], B, W1.stride(0), m8.stride(0),
                                              int(rounds), int(m), float(tol), **consts, **opts)
            start += sizes[i]
    return E, loss, status, final, swaps


@torch.library.custom_op("pyprune_triton::refine_solve", mutates_args=())
def _refine_solve_op(G: torch.Tensor, U_B: torch.Tensor, W1: torch.Tensor, mask: torch.Tensor, rounds: int, m: int,
                     tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _refine_solve_impl(G, U_B, W1, mask, rounds, m, tol)


@_refine_solve_op.register_fake
def _refine_solve_fake(G, U_B, W1, mask, rounds, m, tol):
    rows, B = W1.shape
    return (W1.new_empty((rows, B), dtype=torch.float32), W1.new_empty((rows,), dtype=torch.float32),
            W1.new_empty((rows,), dtype=torch.int32), mask.new_empty((rows, B)),
            W1.new_empty((rows,), dtype=torch.int32))


def refine_solve_triton(G: torch.Tensor, U_B: torch.Tensor, W1: torch.Tensor, mask: torch.Tensor, rounds: int, *,
                        m: int = 0, tol: float = 1e-5
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exchanges and the joint solve of one block. G, U_B: (B, B) float32 contiguous (U_B upper triangular, G =
    U_B^T U_B); W1: (rows, B) float32/float16/bfloat16 and mask: (rows, B) bool, True = pruned, the starting mask,
    both with unit column stride; rounds >= 0: at most this many exchanges per row; m > 0: exchanges stay inside
    groups of m consecutive columns; tol: the fraction of the row's loss an exchange must lower it by.
    Returns E (rows, B) float32, loss (rows,) float32, status (rows,) int32 (0 = solved, else 1 + the block column of
    the first non-positive pivot: NaN in that row's E and loss, its starting mask, no exchange; nothing raises), the
    final mask (rows, B) bool and the exchanges made per row (int32). B <= 256."""
    op = "refine_solve_triton"
    check_block_args(op, G, U_B, W1, mask, MAX_B)
    B = G.shape[0]
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"{op}: rounds must be an integer >= 0, got {rounds!r}")
    if isinstance(m, bool) or not isinstance(m, int) or m < 0 or (m and B % m):
        raise ValueError(f"{op}: m must be 0 or a positive divisor of B={B}, got {m!r}")
    check_device(_refine_solve_kernel, op, G=G, U_B=U_B, W1=W1, mask=mask)
    return torch.ops.pyprune_triton.refine_solve(G, U_B, W1, mask, int(rounds), int(m), float(tol))
