"""N:M mask selection inside one block (ALGORITHM.md section 4).

Design
------
exact=True: the group loss of subset S is ``1/2 w_S^T (G[S, S])^{-1} w_S`` with ``G[S, S]`` from the group's diagonal
``m x m`` block. ``(G[S, S])^{-1}`` is the same for every row, so the host computes it once per (group, subset) with
torch (float64 inverse, tiny) and folds it into pair coefficients: with the ``m (m + 1) / 2`` pairs ``c <= d`` of a
group, ``cost[r, s] = sum_pair P[g, pair, s] * w[r, c] * w[r, d]`` -- a ``(rows x pairs) @ (pairs x subsets)`` product
per group. The kernel is then a bandwidth-bound pass over ``(rows x groups)``:

* grid ``(cdiv(rows, BLOCK_R), groups)``; a program gathers the pair products ``w_c w_d`` of its BLOCK_R rows
  (fp32, 16-bit W up-cast right after loading), loops over subset chunks of BLOCK_S with
  ``tl.dot(prod, P_chunk, input_precision="ieee")``, keeps the running minimum (``tl.argmin`` = first minimum inside a
  chunk, strict ``<`` across chunks: the first minimum in itertools.combinations order wins), and writes the chosen
  subset's bit pattern as the mask.
* Table sizes: 2:4 -> 6 subsets x 10 pairs, 4:8 -> 70 x 36, 8:16 -> 12870 x 136 per group (the largest case holds
  ~7 MB of fp32 coefficients per group; fine, but 8:16 is compute-heavy: ~1.7 M FMAs per row and group).

exact=False: the n smallest saliencies ``w_j^2 / G_jj`` per group (ties: lowest column index). Same grid; each program
computes, for every column j of the group, its rank ``#{i : s_i < s_j or (s_i == s_j and i < j)}`` with an
``(BLOCK_R, MP, MP)`` comparison and prunes rank < n (exact tie semantics, no sort).
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_2d, check_device, next_pow2

__all__ = ["nm_select_triton", "MAX_M"]

MAX_M = 16


@triton.jit
def _nm_exact_kernel(W, P, PC, PD, BITS, OUT, rows, stride_w, stride_o, n_sub, n_pairs, m,
                     BLOCK_R: tl.constexpr, NPP: tl.constexpr, BLOCK_S: tl.constexpr, MP: tl.constexpr):
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rv = r < rows
    q = tl.arange(0, NPP)
    qv = q < n_pairs
    c = tl.load(PC + q, mask=qv, other=0)
    d = tl.load(PD + q, mask=qv, other=0)
    base = W + r[:, None].to(tl.int64) * stride_w + g * m
    lmask = rv[:, None] & qv[None, :]
    wc = tl.load(base + c[None, :], mask=lmask, other=0.0).to(tl.float32)
    wd = tl.load(base + d[None, :], mask=lmask, other=0.0).to(tl.float32)
    prod = wc * wd  # (BLOCK_R, NPP): w_c w_d for every pair c <= d of the group
    best = tl.full((BLOCK_R,), float("inf"), dtype=tl.float32)
    best_i = tl.zeros((BLOCK_R,), dtype=tl.int32)
    s_off = tl.arange(0, BLOCK_S)
    pbase = P + g.to(tl.int64) * n_pairs * n_sub
    for s0 in tl.range(0, n_sub, BLOCK_S):
        s = s0 + s_off
        sv = s < n_sub
        coef = tl.load(pbase + q[:, None] * n_sub + s[None, :], mask=qv[:, None] & sv[None, :], other=0.0)
        cost = tl.dot(prod, coef, input_precision="ieee")  # (BLOCK_R, BLOCK_S)
        cost = tl.where(sv[None, :], cost, float("inf"))
        cmin = tl.min(cost, axis=1)
        carg = tl.argmin(cost, axis=1).to(tl.int32)
        upd = cmin < best
        best = tl.where(upd, cmin, best)
        best_i = tl.where(upd, s0 + carg, best_i)
    bits = tl.load(BITS + best_i, mask=rv, other=0)
    jj = tl.arange(0, MP)
    sel = ((bits[:, None] >> jj[None, :]) & 1) != 0
    tl.store(OUT + r[:, None].to(tl.int64) * stride_o + g * m + jj[None, :], sel.to(tl.uint8),
             mask=rv[:, None] & (jj[None, :] < m))


@triton.jit
def _nm_saliency_kernel(W, G, OUT, rows, B, stride_w, stride_o, n, m,
                        BLOCK_R: tl.constexpr, MP: tl.constexpr):
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rv = r < rows
    jj = tl.arange(0, MP)
    jv = jj < m
    col = g * m + jj
    w = tl.load(W + r[:, None].to(tl.int64) * stride_w + col[None, :], mask=rv[:, None] & jv[None, :],
                other=0.0).to(tl.float32)
    dg = tl.load(G + col.to(tl.int64) * (B + 1), mask=jv, other=1.0)
    s = tl.where(jv[None, :], w * w / dg[None, :], float("inf"))
    si = s[:, None, :]  # candidate i on axis 2
    sj = s[:, :, None]  # column j on axis 1
    ii = jj[None, None, :]
    ij = jj[None, :, None]
    before = ((si < sj) | ((si == sj) & (ii < ij))) & (ii < m)
    rank = tl.sum(before.to(tl.int32), axis=2)
    sel = (rank < n) & jv[None, :]
    tl.store(OUT + r[:, None].to(tl.int64) * stride_o + col[None, :], sel.to(tl.uint8),
             mask=rv[:, None] & jv[None, :])


@functools.lru_cache(maxsize=None)
def _host_tables(n: int, m: int):
    """Subsets (itertools order), pair list c <= d, subset -> pair map, subset bit patterns (CPU tensors)."""
    subsets = list(itertools.combinations(range(m), n))
    pairs = [(c, d) for c in range(m) for d in range(c, m)]
    pid = {p: i for i, p in enumerate(pairs)}
    pairmap = torch.tensor([[pid[(min(a, b), max(a, b))] for a in S for b in S] for S in subsets], dtype=torch.long)
    bits = torch.tensor([sum(1 << j for j in S) for S in subsets], dtype=torch.int32)
    pc = torch.tensor([p[0] for p in pairs], dtype=torch.int32)
    pd = torch.tensor([p[1] for p in pairs], dtype=torch.int32)
    sub = torch.tensor(subsets, dtype=torch.long)
    return sub, pairmap, bits, pc, pd


_device_tables_cache: dict = {}


def _tables(n: int, m: int, device: torch.device):
    key = (n, m, str(device))
    if key not in _device_tables_cache:
        _device_tables_cache[key] = tuple(t.to(device) for t in _host_tables(n, m))
    return _device_tables_cache[key]


def _pair_coefficients(G: torch.Tensor, n: int, m: int, sub: torch.Tensor, pairmap: torch.Tensor) -> torch.Tensor:
    """P[g, pair, s]: cost[r, s] = sum_pair P * w_c w_d = 1/2 w_S^T G[S,S]^{-1} w_S (group g's diagonal block)."""
    B = G.shape[0]
    groups = B // m
    n_sub = sub.shape[0]
    n_pairs = m * (m + 1) // 2
    idx = torch.arange(B, device=G.device).view(groups, m)
    Gb = G.to(torch.float64)[idx[:, :, None], idx[:, None, :]]  # (groups, m, m)
    Gs = Gb[:, sub[:, :, None], sub[:, None, :]]  # (groups, S, n, n)
    Q = torch.linalg.inv(Gs)
    half = (0.5 * Q).reshape(groups, n_sub, n * n).to(torch.float32)
    P = torch.zeros(groups, n_sub, n_pairs, dtype=torch.float32, device=G.device)
    P.scatter_add_(2, pairmap.unsqueeze(0).expand(groups, n_sub, n * n), half)
    return P.transpose(1, 2).contiguous()  # (groups, n_pairs, S)


def _nm_select_impl(W1: torch.Tensor, G: torch.Tensor, n: int, m: int, exact: bool) -> torch.Tensor:
    rows, B = W1.shape
    out = torch.zeros(rows, B, dtype=torch.bool, device=W1.device)
    if rows == 0 or B == 0:
        return out
    groups = B // m
    o8 = out.view(torch.uint8)
    MP = next_pow2(m)
    if not exact:
        BLOCK_R = 32
        _nm_saliency_kernel[(triton.cdiv(rows, BLOCK_R), groups)](
            W1, G, o8, rows, B, W1.stride(0), o8.stride(0), n, m, BLOCK_R=BLOCK_R, MP=MP, num_warps=4)
        return out
    sub, pairmap, bits, pc, pd = _tables(n, m, W1.device)
    P = _pair_coefficients(G, n, m, sub, pairmap)
    n_sub = sub.shape[0]
    n_pairs = m * (m + 1) // 2
    NPP = next_pow2(n_pairs, 16)
    # tile sizes picked so that ptxas (sm_90, compile-only) reports no spills: the (BLOCK_R x NPP) pair products and
    # the (NPP x BLOCK_S) coefficient chunk both live in registers for the fp32 FMA dot
    BLOCK_R = 64 if NPP <= 32 else 32
    BLOCK_S = min(next_pow2(n_sub, 16), 16 if NPP >= 256 else 32)
    _nm_exact_kernel[(triton.cdiv(rows, BLOCK_R), groups)](
        W1, P, pc, pd, bits, o8, rows, W1.stride(0), o8.stride(0), n_sub, n_pairs, m,
        BLOCK_R=BLOCK_R, NPP=NPP, BLOCK_S=BLOCK_S, MP=MP, num_warps=8 if NPP >= 256 else 4,
        num_stages=3 if NPP <= 64 else 2)
    return out


@torch.library.custom_op("pyprune_triton::nm_select", mutates_args=())
def _nm_select_op(W1: torch.Tensor, G: torch.Tensor, n: int, m: int, exact: bool) -> torch.Tensor:
    return _nm_select_impl(W1, G, n, m, exact)


@_nm_select_op.register_fake
def _nm_select_fake(W1, G, n, m, exact):
    return W1.new_empty(W1.shape, dtype=torch.bool)


def nm_select_triton(W1: torch.Tensor, G: torch.Tensor, n: int, m: int, *, exact: bool = True) -> torch.Tensor:
    """Bool mask (rows, B), True = prune, exactly ``n`` per group of ``m`` consecutive columns of every row.

    W1: (rows, B) float32/float16/bfloat16 with unit column stride; G: (B, B) float32 contiguous (only its diagonal
    m x m blocks are used). exact=True: best subset by ``1/2 w_S^T G[S,S]^{-1} w_S`` (first minimum in
    itertools.combinations order); exact=False: the n smallest ``w_j^2 / G_jj`` (ties: lowest column index).
    """
    op = "nm_select_triton"
    check_2d(op, "W1", W1, dtypes=FLOAT_DTYPES, contiguous=False)
    B = W1.shape[1]
    check_2d(op, "G", G, dtypes=(torch.float32,), shape=(B, B))
    if B > 1 and W1.stride(1) != 1:
        raise ValueError(f"{op}: W1 must have unit column stride (call .contiguous() first)")
    if isinstance(n, bool) or isinstance(m, bool) or not (isinstance(n, int) and isinstance(m, int)) \
            or not 0 < n < m:
        raise ValueError(f"{op}: N:M needs integers 0 < N < M, got {n}:{m}")
    if m > MAX_M:
        raise ValueError(f"{op}: M={m} is too large for best-subset enumeration (at most {MAX_M})")
    if B % m:
        raise ValueError(f"{op}: the block has {B} columns, not a multiple of M={m}")
    check_device(_nm_exact_kernel, op, W1=W1, G=G)
    return torch.ops.pyprune_triton.nm_select(W1, G, int(n), int(m), bool(exact))
