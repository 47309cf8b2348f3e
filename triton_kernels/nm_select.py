"""N:M mask selection inside one block (docs/ALGORITHM.md section 4).

Design
------
One kernel for both rules. A program owns a tile of ``BLOCK_R`` rows x ``BLOCK_G`` groups (grid
``(cdiv(rows, BLOCK_R), cdiv(groups, BLOCK_G))``) and reads it as one ``(BLOCK_R, BLOCK_G * m)`` block contiguous
along the rows, so lanes run along a row's groups with vectorised loads. The earlier kernel gave a program
``BLOCK_R`` rows of one group: every lane of a warp read m values of a different row, the rows B * 4 bytes apart, and
it reached 0.1-8% of copy bandwidth on an H200 (benchmarks/results/gpu/bench_nm_select.md).

* Loads (m a power of two): the block is reshaped to ``(BLOCK_R, BLOCK_G, m)`` and its last axis halved with
  ``tl.split`` log2(m) times into the m columns ``w_0 .. w_{m-1}``, each ``(BLOCK_R, BLOCK_G)`` fp32 in registers
  (16-bit W is up-cast right after loading, as the interpreter needs). Compiled for sm_90 (no GPU here), Triton 3.6
  and 3.7 both give 128-bit loads and a compute layout with lanes along the groups; loading each column separately
  (every m-th element) instead left Triton 3.6 free to put the lanes along the rows, the old kernel's pattern, as it
  still does for the rare m that is not a power of two (m loads, every m-th element).
* Store: the chosen bit pattern per (row, group) expanded to ``(BLOCK_R, BLOCK_G, m)`` uint8 and stored as one block
  contiguous along the rows.

exact=True: the cost of subset S is ``1/2 w_S^T G[S,S]^{-1} w_S = 1/2 ||X_S w_S||^2`` with ``X_S = L^{-1}``,
``G[S,S] = L L^T`` (the CUDA kernel's form: a sum of squares). ``X_S`` is the same for every row, so the host builds
it once per call in float64 (batched torch) and stores it as float32 ``TAB[s, q, g]``: q = 0 a penalty (0, or +inf
where ``G[S,S]`` is not numerically positive definite), then the n rows of ``X_S`` scattered into the group's m
columns (zeros at the other columns); groups fastest, so a program's BLOCK_G coefficients are one contiguous load
shared by its BLOCK_R rows. The kernel loops over the subsets at run time and needs no member indices: row i of the
product is ``sum_j X[i, j] w_j`` over the columns j <= m - n + i (right of that X's row i is always zero), so a subset
costs ``n (m + 1) - n (n - 1) / 2`` multiply-adds per (row, group): 6 x 9 = 54 for 2:4 and 70 x 30 = 2100 for 4:8 (the
earlier kernel's padded 64 x 96 pair-by-subset product: 6144 for 4:8). The factor 1/2 is left out (it does not move
the argmin). Enumerating the subsets at compile time instead (members as constants, 980 for 4:8) took 5 minutes in
Triton 3.7's coalescing pass for the 800 loads of the unrolled 4:8 kernel: not usable.

The minimum is kept with a strict ``<`` in subset order (itertools.combinations): the first minimum wins, as the
reference's argmin.

exact=False: the n smallest saliencies ``w_j^2 / G_jj`` per group (ties: lowest column index): column j is pruned
when its rank ``#{i : s_i < s_j or (s_i == s_j and i < j)}`` is below n (m^2 compile-time comparisons, no sort).
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
def _nm_select_kernel(W, TAB, BITS, G, OUT, rows, groups, n_sub, stride_w, stride_o, stride_gd,
                      N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, LOG_MP: tl.constexpr,
                      EXACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    rv = r < rows
    gv = g < groups
    valid = rv[:, None] & gv[None, :]
    # the tile's columns w_0 .. w_{m-1}, each (BLOCK_R, BLOCK_G) in fp32
    ws = ()
    if M == MP:
        # one load contiguous along the row (lanes along it, vectorised), split in registers: reshape to
        # (.., m) and halve the last axis LOG_MP times; part p then holds column bit_reverse(p)
        c = tl.program_id(1) * (BLOCK_G * M) + tl.arange(0, BLOCK_G * M)
        t = tl.load(W + r[:, None].to(tl.int64) * stride_w + c[None, :], mask=rv[:, None] & (c < groups * M)[None, :],
                    other=0.0).to(tl.float32)
        parts = (tl.reshape(t, (BLOCK_R, BLOCK_G, M)),)
        for level in tl.static_range(LOG_MP):
            halves = ()
            for h in tl.static_range(1 << level):
                a, b = tl.split(tl.reshape(parts[h], (BLOCK_R, BLOCK_G, M // (2 << level), 2)))
                halves = halves + (a, b)
            parts = halves
        for j in tl.static_range(M):  # part index = j's LOG_MP bits reversed (m <= 16), inline to stay constexpr
            ws = ws + (tl.reshape(parts[(((j & 1) << 3) + ((j & 2) << 1) + ((j & 4) >> 1) + ((j & 8) >> 3))
                                        >> (4 - LOG_MP)], (BLOCK_R, BLOCK_G)),)
    else:
        # m not a power of two: m loads, column j of every group (every m-th element of the row segment)
        base = W + r[:, None].to(tl.int64) * stride_w + (g * M)[None, :]
        for j in tl.static_range(M):
            ws = ws + (tl.load(base + j, mask=valid, other=0.0).to(tl.float32),)

    if EXACT:
        Q: tl.constexpr = 1 + N * M  # table entries per (subset, group): the penalty, then X_S's n rows of m
        zero = tl.zeros((BLOCK_R, BLOCK_G), dtype=tl.float32)
        best = zero + float("inf")
        bits = tl.zeros((BLOCK_R, BLOCK_G), dtype=tl.int32) + ((1 << N) - 1)  # all +inf: the first subset
        for s in tl.range(0, n_sub, num_stages=1):  # no prefetch: the coefficients are cache hits
            tab = TAB + s * Q * groups + g
            cost = zero + tl.load(tab, mask=gv, other=0.0)[None, :]
            for i in tl.static_range(N):
                # row i of X_S is zero right of the subset's i-th member, which is at most column m - n + i
                y = zero
                for j in tl.static_range(M - N + i + 1):
                    y += tl.load(tab + (1 + i * M + j) * groups, mask=gv, other=0.0)[None, :] * ws[j]
                cost += y * y
            upd = cost < best  # strict: the first minimum in subset order wins
            best = tl.where(upd, cost, best)
            bits = tl.where(upd, tl.load(BITS + s), bits)
    else:
        ss = ()
        for j in tl.static_range(M):
            dg = tl.load(G + (g * M + j).to(tl.int64) * stride_gd, mask=gv, other=1.0)
            ss = ss + (ws[j] * ws[j] / dg[None, :],)
        bits = tl.zeros((BLOCK_R, BLOCK_G), dtype=tl.int32)
        for j in tl.static_range(M):
            rank = tl.zeros((BLOCK_R, BLOCK_G), dtype=tl.int32)
            for i in tl.static_range(M):
                if i < j:
                    rank += (ss[i] <= ss[j]).to(tl.int32)
                if i > j:
                    rank += (ss[i] < ss[j]).to(tl.int32)
            bits = bits | ((rank < N).to(tl.int32) << j)

    jj = tl.arange(0, MP)
    sel = ((bits[:, :, None] >> jj[None, None, :]) & 1).to(tl.uint8)  # (BLOCK_R, BLOCK_G, MP)
    if M == MP:  # one store contiguous along the row
        c = tl.program_id(1) * (BLOCK_G * M) + tl.arange(0, BLOCK_G * M)
        tl.store(OUT + r[:, None].to(tl.int64) * stride_o + c[None, :], tl.reshape(sel, (BLOCK_R, BLOCK_G * M)),
                 mask=rv[:, None] & (c < groups * M)[None, :])
    else:
        optr = OUT + r[:, None, None].to(tl.int64) * stride_o + (g * M)[None, :, None] + jj[None, None, :]
        tl.store(optr, sel, mask=valid[:, :, None] & (jj < M)[None, None, :])


@functools.lru_cache(maxsize=None)
def _host_subsets(n: int, m: int):
    """Subsets in itertools.combinations order (long, for the table) and their bit patterns (int32)."""
    subsets = list(itertools.combinations(range(m), n))
    sub = torch.tensor(subsets, dtype=torch.long)
    bits = torch.tensor([sum(1 << j for j in S) for S in subsets], dtype=torch.int32)
    return sub, bits


_device_subsets_cache: dict = {}


def _subsets(n: int, m: int, device: torch.device):
    key = (n, m, str(device))
    if key not in _device_subsets_cache:
        _device_subsets_cache[key] = tuple(t.to(device) for t in _host_subsets(n, m))
    return _device_subsets_cache[key]


def exact_table(G: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """TAB (C(m, n), 1 + n m, groups) float32: per subset S and group, the penalty (0, or +inf where G[S, S] is not
    positive definite) then X_S = chol(G[S, S])^{-1} (n x n, lower) scattered into the group's m columns, by rows;
    computed in float64."""
    B = G.shape[0]
    groups = B // m
    sub = _subsets(n, m, G.device)[0]
    n_sub = sub.shape[0]
    idx = torch.arange(B, device=G.device).view(groups, m)
    Gb = G.to(torch.float64)[idx[:, :, None], idx[:, None, :]]  # (groups, m, m)
    Gs = Gb[:, sub[:, :, None], sub[:, None, :]]  # (groups, S, n, n)
    L, info = torch.linalg.cholesky_ex(Gs)
    ok = info == 0
    eye = torch.eye(n, dtype=torch.float64, device=G.device)
    X = torch.linalg.solve_triangular(torch.where(ok[..., None, None], L, eye), eye, upper=False)
    Xm = torch.zeros(groups, n_sub, n, m, dtype=torch.float64, device=G.device)
    Xm.scatter_(3, sub[None, :, None, :].expand(groups, n_sub, n, n), X * ok[..., None, None])
    pen = torch.where(ok, 0.0, float("inf")).to(torch.float64)
    tab = torch.cat([pen[..., None], Xm.reshape(groups, n_sub, n * m)], dim=-1)  # (groups, S, 1 + n m)
    return tab.permute(1, 2, 0).to(torch.float32).contiguous()


def launch_config(rows: int, groups: int, m: int, exact: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_G, num_warps). Saliency: row segments of 128 values, 32 rows. Exact: segments of 64 values and
    64 rows, so that a thread holds more rows than groups and reuses each loaded coefficient over them (the
    compiler put 8 lanes along the groups and 4 along the rows for both, Triton 3.6 and 3.7). Chosen from compile-only
    checks (registers: 63-117 for 2:4 and 4:8, no spills); not yet timed on a GPU: benchmarks/bench_nm_select.py
    --sweep times other tiles."""
    per_row = 64 if exact else 128
    block_g = min(next_pow2(groups), max(1, per_row // next_pow2(m)))
    block_r = min(next_pow2(rows), 64 if exact else 32)
    return block_r, block_g, 4


def _nm_select_impl(W1: torch.Tensor, G: torch.Tensor, n: int, m: int, exact: bool, *,
                    tab: torch.Tensor | None = None, block_r: int | None = None, block_g: int | None = None,
                    num_warps: int | None = None) -> torch.Tensor:
    """The launch. ``tab``: a precomputed ``exact_table(G, n, m)`` (benchmarks time the kernel alone with it);
    ``block_r`` / ``block_g`` / ``num_warps``: override ``launch_config`` (tests and tuning)."""
    rows, B = W1.shape
    out = torch.empty(rows, B, dtype=torch.bool, device=W1.device)  # every entry is written
    if rows == 0 or B == 0:
        return out
    groups = B // m
    o8 = out.view(torch.uint8)
    br, bg, nw = launch_config(rows, groups, m, exact)
    block_r, block_g, num_warps = block_r or br, block_g or bg, num_warps or nw
    bits = _subsets(n, m, W1.device)[1]
    if not exact:
        tab = G  # not read
    elif tab is None:
        tab = exact_table(G, n, m)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(groups, block_g))
    _nm_select_kernel[grid](
        W1, tab, bits, G, o8, rows, groups, bits.shape[0], W1.stride(0), o8.stride(0), G.stride(0) + 1,
        N=n, M=m, MP=next_pow2(m), LOG_MP=next_pow2(m).bit_length() - 1, EXACT=bool(exact), BLOCK_R=block_r,
        BLOCK_G=block_g, num_warps=num_warps)
    return out


@torch.library.custom_op("pyprune_triton::nm_select", mutates_args=())
def _nm_select_op(W1: torch.Tensor, G: torch.Tensor, n: int, m: int, exact: bool) -> torch.Tensor:
    return _nm_select_impl(W1, G, n, m, exact)


@_nm_select_op.register_fake
def _nm_select_fake(W1, G, n, m, exact):
    return W1.new_empty(W1.shape, dtype=torch.bool)


def check_args(op: str, W1: torch.Tensor, G: torch.Tensor, n: int, m: int) -> None:
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
    check_device(_nm_select_kernel, op, W1=W1, G=G)


def nm_select_triton(W1: torch.Tensor, G: torch.Tensor, n: int, m: int, *, exact: bool = True) -> torch.Tensor:
    """Bool mask (rows, B), True = prune, exactly ``n`` per group of ``m`` consecutive columns of every row.

    W1: (rows, B) float32/float16/bfloat16 with unit column stride; G: (B, B) float32 contiguous (only its diagonal
    m x m blocks are used). exact=True: best subset by ``1/2 w_S^T G[S,S]^{-1} w_S`` (first minimum in
    itertools.combinations order; a subset whose G[S, S] is not positive definite is never preferred);
    exact=False: the n smallest ``w_j^2 / G_jj`` (ties: lowest column index).
    """
    check_args("nm_select_triton", W1, G, n, m)
    return torch.ops.pyprune_triton.nm_select(W1, G, int(n), int(m), bool(exact))
