"""Fused Hessian accumulation ``H <- beta * H + alpha * X^T X`` (docs/ALGORITHM.md section 1), in place.

Design
------
* Tiles: BLOCK x BLOCK (128 on GPU, 64 in the interpreter). Only the T (T + 1) / 2 upper-triangle tiles
  ``(ti, tj)``, ``ti <= tj``, ``T = cdiv(cols, BLOCK)``, are computed: half the flops of a full GEMM.
* Grid ``(n_prog, SPLIT)``: programs are grouped in GROUP x GROUP super-tiles (GROUP = 8 on GPU when T >= 16, else
  1), the super-tiles enumerated column by column over the upper triangle (``p = sj (sj + 1) / 2 + si``, decoded with
  one sqrt and an integer fix-up), so programs in flight together read few column panels of X (L2 reuse, the GEMM
  GROUP_M idea). The lower half of diagonal super-tiles and tiles past T are idle programs (their k loop is empty).
* Each program loads ``X[k-chunk, I]^T`` (BLOCK x BLOCK_K) and ``X[k-chunk, J]`` (BLOCK_K x BLOCK) in X's own dtype
  (no fp32 copy of X), and accumulates ``tl.dot`` in fp32 (tensor cores for bf16/fp16; fp32 X uses
  ``input_precision="ieee"`` unless ``allow_tf32``). Products of two 16-bit floats are exact in fp32.
* Epilogue (fused): ``out = beta * H[I, J] + alpha * acc`` (H is not read at all when ``beta == 0``, so NaN garbage
  in H is ignored), stored at ``(I, J)`` and, transposed, at ``(J, I)``. In diagonal tiles only the upper part (with
  the diagonal) is computed-and-stored and its mirror fills the lower part. Only H's upper triangle is ever read (H is
  symmetric by contract) and the result is exactly symmetric.
* Split-K (long X, few tiles): when there are fewer tiles than ~2x the SM count, k is cut into ``SPLIT`` chunks;
  each program writes its fp32 partial tile to a workspace, and a second kernel sums the partials in a fixed order
  (deterministic, no atomics, symmetry stays exact) and runs the same epilogue.
* Interpreter (``TRITON_INTERPRET=1``): 16-bit loads are up-cast to fp32 right after loading (``UPCAST``), because the
  interpreter's bf16 arithmetic is silently wrong; on a GPU ``UPCAST`` is False and the 16-bit dot is used.
* GPU register use (ptxas, sm_90, compile-only on a CPU machine): 128x128 tiles with 8 warps, no spills in the main
  loop for bf16/fp16 (a few in the epilogue); not tuned on hardware yet.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_2d, check_device, is_interpreted, sm_count

__all__ = ["hessian_update_triton"]


@triton.jit
def _tile_coords(pid):
    """Upper-triangle tile (ti, tj), ti <= tj, for linear id pid = tj (tj + 1) / 2 + ti."""
    tj = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= pid, tj + 1, tj)
    tj = tl.where(tj * (tj + 1) // 2 > pid, tj - 1, tj)
    ti = pid - tj * (tj + 1) // 2
    return ti, tj


@triton.jit
def _tile_of(pid, n_tiles, GROUP: tl.constexpr):
    """Program id -> tile (ti, tj) and whether the program has a tile. Programs come in groups of GROUP x GROUP tiles
    (one super-tile of the upper triangle of super-tiles, enumerated column by column): programs running at the same
    time then share few column panels of X (L2 reuse, like GROUP_M swizzling of a GEMM). Inside diagonal super-tiles
    the lower GROUP (GROUP - 1) / 2 programs, and programs past the last tile, have nothing to do (valid False)."""
    sp = pid // (GROUP * GROUP)
    loc = pid % (GROUP * GROUP)
    si, sj = _tile_coords(sp)
    ti = si * GROUP + loc % GROUP
    tj = sj * GROUP + loc // GROUP
    valid = (ti <= tj) & (tj < n_tiles)
    return ti, tj, valid


@triton.jit
def _store_symmetric(H, acc, alpha, beta, ti, tj, valid_tile, cols, BLOCK: tl.constexpr, BETA_ZERO: tl.constexpr):
    loc = tl.arange(0, BLOCK)
    ra = ti * BLOCK + loc
    cb = tj * BLOCK + loc
    valid = (ra[:, None] < cols) & (cb[None, :] < cols) & valid_tile
    off_diag = ti < tj
    upper = valid & (off_diag | (loc[:, None] <= loc[None, :]))
    mirror = valid & (off_diag | (loc[:, None] < loc[None, :]))
    ptr = H + ra[:, None].to(tl.int64) * cols + cb[None, :]
    if BETA_ZERO:
        out = alpha * acc
    else:
        h = tl.load(ptr, mask=upper, other=0.0)
        out = beta * h + alpha * acc
    tl.store(ptr, out, mask=upper)
    tl.store(H + cb[None, :].to(tl.int64) * cols + ra[:, None], out, mask=mirror)


@triton.jit
def _hessian_kernel(H, X, WS, alpha, beta, k, cols, stride_xk, k_per_split, n_prog, n_tiles,
                    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
                    BETA_ZERO: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    ti, tj, valid_tile = _tile_of(pid, n_tiles, GROUP)
    offs_a = ti * BLOCK + tl.arange(0, BLOCK)
    offs_b = tj * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    ma = offs_a < cols
    mb = offs_b < cols
    k_lo = sid * k_per_split
    k_hi = tl.where(valid_tile, tl.minimum(k, k_lo + k_per_split), k_lo)  # idle programs skip the loop
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        km = kk < k_hi
        row = kk.to(tl.int64) * stride_xk
        a = tl.load(X + offs_a[:, None] + row[None, :], mask=ma[:, None] & km[None, :], other=0.0)  # X[kk, I]^T
        b = tl.load(X + row[:, None] + offs_b[None, :], mask=km[:, None] & mb[None, :], other=0.0)  # X[kk, J]
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if WRITE_PARTIAL:
        loc = tl.arange(0, BLOCK)
        base = (sid * n_prog + pid).to(tl.int64) * (BLOCK * BLOCK)
        tl.store(WS + base + loc[:, None] * BLOCK + loc[None, :], acc)
    else:
        _store_symmetric(H, acc, alpha, beta, ti, tj, valid_tile, cols, BLOCK, BETA_ZERO)


@triton.jit
def _hessian_reduce_kernel(H, WS, alpha, beta, cols, n_prog, n_tiles, n_split,
                           BLOCK: tl.constexpr, GROUP: tl.constexpr, BETA_ZERO: tl.constexpr):
    pid = tl.program_id(0)
    ti, tj, valid_tile = _tile_of(pid, n_tiles, GROUP)
    loc = tl.arange(0, BLOCK)
    tile = loc[:, None] * BLOCK + loc[None, :]
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for s in tl.range(0, n_split):  # fixed order: deterministic
        acc += tl.load(WS + (s * n_prog + pid).to(tl.int64) * (BLOCK * BLOCK) + tile)
    _store_symmetric(H, acc, alpha, beta, ti, tj, valid_tile, cols, BLOCK, BETA_ZERO)


_WORKSPACE_LIMIT = 512 * 2 ** 20  # bytes of split-K partials we allow ourselves


def _check_tiles(block: int, block_k: int) -> None:
    """0 means automatic; anything else must be a power of two >= 16."""
    for name, v in (("block", block), ("block_k", block_k)):
        if v and (v < 16 or v & (v - 1)):
            raise ValueError(f"hessian_update_triton: {name} must be a power of two >= 16, got {v}")


def _config(H: torch.Tensor, X: torch.Tensor, block: int, block_k: int, split_k: int, group: int):
    interp = is_interpreted(_hessian_kernel)
    cols, k = H.shape[0], X.shape[0]
    if block <= 0:
        block = 64 if interp or cols <= 64 else 128
    if block_k <= 0:
        block_k = 64 if interp else 32
    _check_tiles(block, block_k)
    n_tiles = triton.cdiv(cols, block)
    if group <= 0:
        group = 1 if interp or n_tiles < 16 else 8
    n_super = triton.cdiv(n_tiles, group)
    n_prog = n_super * (n_super + 1) // 2 * group * group
    n_pairs = n_tiles * (n_tiles + 1) // 2
    if split_k <= 0:  # auto: split k only when the triangle has too few tiles to fill the GPU
        split_k = 1
        if not interp:
            target = 2 * sm_count(H.device)
            if n_pairs < target:
                split_k = min(triton.cdiv(target, n_pairs), k // 512, 32)
                split_k = max(1, min(split_k, _WORKSPACE_LIMIT // (n_prog * block * block * 4)))
    k_per_split = max(block_k, triton.cdiv(triton.cdiv(max(k, 1), split_k), block_k) * block_k)
    split_k = max(1, triton.cdiv(k, k_per_split))
    return block, block_k, group, split_k, k_per_split, n_prog, n_tiles, interp


def _hessian_update_impl(H: torch.Tensor, X: torch.Tensor, alpha: float, beta: float, allow_tf32: bool,
                         block: int, block_k: int, split_k: int, group: int) -> None:
    cols, k = H.shape[0], X.shape[0]
    if cols == 0:
        return
    block, block_k, group, split_k, k_per_split, n_prog, n_tiles, interp = _config(H, X, block, block_k, split_k,
                                                                                   group)
    upcast = interp and X.dtype != torch.float32
    precision = "ieee" if (X.dtype == torch.float32 and not allow_tf32) or interp else "tf32"
    beta_zero = float(beta) == 0.0
    num_warps = 8 if block >= 128 else 4
    num_stages = 3
    ws = H if split_k == 1 else torch.empty(split_k * n_prog * block * block, dtype=torch.float32, device=H.device)
    _hessian_kernel[(n_prog, split_k)](
        H, X, ws, float(alpha), float(beta), k, cols, X.stride(0), k_per_split, n_prog, n_tiles,
        BLOCK=block, BLOCK_K=block_k, GROUP=group, WRITE_PARTIAL=split_k > 1, BETA_ZERO=beta_zero, UPCAST=upcast,
        PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    if split_k > 1:
        _hessian_reduce_kernel[(n_prog,)](H, ws, float(alpha), float(beta), cols, n_prog, n_tiles, split_k,
                                          BLOCK=block, GROUP=group, BETA_ZERO=beta_zero, num_warps=num_warps)


@torch.library.custom_op("pyprune_triton::hessian_update", mutates_args=("H",))
def _hessian_update_op(H: torch.Tensor, X: torch.Tensor, alpha: float, beta: float, allow_tf32: bool,
                       block: int, block_k: int, split_k: int, group: int) -> None:
    _hessian_update_impl(H, X, alpha, beta, allow_tf32, block, block_k, split_k, group)


@_hessian_update_op.register_fake
def _hessian_update_fake(H, X, alpha, beta, allow_tf32, block, block_k, split_k, group) -> None:
    return None


def hessian_update_triton(H: torch.Tensor, X: torch.Tensor, alpha: float, beta: float, *, allow_tf32: bool = False,
                          _block: int = 0, _block_k: int = 0, _split_k: int = 0, _group: int = 0) -> None:
    """In place ``H <- beta * H + alpha * X^T X``.

    H: (cols, cols) float32 contiguous, symmetric (only its upper triangle is read; the result is exactly symmetric).
    X: (k, cols) float32/float16/bfloat16 with unit column stride, read in its own dtype, fp32 accumulation.
    ``allow_tf32`` lets fp32 X use TF32 tensor cores. ``_block``/``_block_k``/``_split_k``/``_group`` override the tile
    size, the k step, the split-K factor and the tile grouping (0 = automatic); they exist for tests and tuning.
    """
    op = "hessian_update_triton"
    check_2d(op, "H", H, dtypes=(torch.float32,))
    cols = H.shape[0]
    check_2d(op, "H", H, shape=(cols, cols))
    check_2d(op, "X", X, dtypes=FLOAT_DTYPES, contiguous=False)
    if X.shape[1] != cols:
        raise ValueError(f"{op}: X has {X.shape[1]} columns but H is {cols} x {cols}")
    if X.shape[1] > 1 and X.stride(1) != 1:
        raise ValueError(f"{op}: X must have unit column stride (call .contiguous() first)")
    _check_tiles(int(_block), int(_block_k))  # argument errors before the device check, on any device
    check_device(_hessian_kernel, op, H=H, X=X)
    torch.ops.pyprune_triton.hessian_update(H, X, float(alpha), float(beta), bool(allow_tf32),
                                            int(_block), int(_block_k), int(_split_k), int(_group))
