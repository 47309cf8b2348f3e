"""Helpers shared by the Triton launchers: interpreter detection, argument checks, small launch heuristics.

Only torch and triton are imported here (this folder is installed as ``pyprune.triton_kernels``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# dtypes the kernels read directly
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` (a @triton.jit object) runs in the Triton interpreter (TRITON_INTERPRET=1 when the
    kernel was defined). The interpreter keeps bf16 as raw bits (arithmetic on it is silently wrong), so kernels up-cast
    16-bit loads to fp32 under an ``UPCAST`` constexpr that is true only there; on a GPU the 16-bit tensor-core path
    is kept."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of older/newer triton
        return False
    return isinstance(kernel, InterpretedFunction)


def check_device(kernel, op: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device that this kernel can run on; returns that device (else a ValueError, like every
    unavailable backend in pyprune.ops)."""
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"{op}: tensors are on different devices: "
                         + ", ".join(f"{k}={t.device}" for k, t in tensors.items()))
    dev = devices.pop()
    if dev.type == "cuda":
        return dev
    if dev.type == "cpu":
        if not is_interpreted(kernel):
            raise ValueError(f"{op}: the Triton kernel got CPU tensors but is compiled for the GPU; CPU tensors run "
                             f"only in the Triton interpreter (set TRITON_INTERPRET=1 before importing "
                             f"pyprune.triton_kernels)")
        return dev
    raise ValueError(f"{op}: Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                     f"got {dev.type} tensors")


def check_2d(op: str, name: str, t: torch.Tensor, *, dtypes=None, shape=None, contiguous: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected one of "
                        + ", ".join(str(d) for d in dtypes))
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (call .contiguous() first)")


def next_pow2(x: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(max(1, int(x))))


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_block_args(op: str, G: torch.Tensor, U_B: torch.Tensor, W1: torch.Tensor, mask: torch.Tensor,
                     max_b: int) -> None:
    """The arguments of a per-row solve of one block: G, U_B (B, B) float32 contiguous; W1 (rows, B) in a float dtype
    and mask (rows, B) bool, both with unit column stride; B <= max_b."""
    check_2d(op, "G", G, dtypes=(torch.float32,))
    B = G.shape[0]
    check_2d(op, "G", G, shape=(B, B))
    check_2d(op, "U_B", U_B, dtypes=(torch.float32,), shape=(B, B))
    check_2d(op, "W1", W1, dtypes=FLOAT_DTYPES, contiguous=False)
    if W1.shape[1] != B:
        raise ValueError(f"{op}: W1 has {W1.shape[1]} columns but G is {B} x {B}")
    check_2d(op, "mask", mask, dtypes=(torch.bool,), shape=W1.shape, contiguous=False)
    for name, t in (("W1", W1), ("mask", mask)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{op}: {name} must have unit column stride (call .contiguous() first)")
    if B > max_b:
        raise ValueError(f"{op}: block size B={B} is larger than the supported maximum {max_b}")


@triton.jit
def compact_mask(M, row, stride_m, B, want, BP: tl.constexpr, BT: tl.constexpr, CH: tl.constexpr):
    """(idx, count): idx[t] (t < BT) = the t-th column of the row whose mask byte is nonzero (want = 1) or zero
    (want = 0), ascending; 0 past the count. The mask is read CH columns at a time and ranked by a cumsum."""
    t = tl.arange(0, BT)
    jc = tl.arange(0, CH)
    cnt = tl.sum(tl.zeros((CH,), dtype=tl.int32), axis=0)
    idx = tl.zeros((BT,), dtype=tl.int32)
    for j0 in tl.static_range(0, BP, CH):
        j = j0 + jc
        mj = (tl.load(M + row * stride_m + j, mask=j < B, other=0) != 0).to(tl.int32)
        hit = tl.where(j < B, tl.where(want != 0, mj, 1 - mj), 0)
        pos = cnt + tl.cumsum(hit, axis=0) - hit
        sel = (pos[:, None] == t[None, :]) & (hit[:, None] != 0)
        idx += tl.sum(tl.where(sel, j[:, None], 0), axis=0)
        cnt += tl.sum(hit, axis=0)
    return idx, cnt


@triton.jit
def sweep_inverse(A, p, c):
    """The symmetric sweep operator (Goodnight; Gauss-Jordan inversion that keeps A symmetric) over pivots 0 .. c-1
    of the tile A (slots p = tl.arange): returns (-A^{-1} on those slots, the rest untouched; bad = 1 + the slot of
    the first non-positive or NaN pivot, 0 = none). A failed pivot is divided by 1, never unchecked. Per step: one
    column extraction (a masked row reduction) and one rank-one update with row/column k zeroed."""
    bad = c * 0
    for k in tl.range(0, c):
        ck = p[None, :] == k
        col = tl.sum(tl.where(ck, A, 0.0), axis=1)  # column k (= row k: A stays symmetric)
        d = tl.sum(tl.where(p == k, col, 0.0), axis=0)  # pivot
        ok = d > 0.0  # False for NaN too
        bad = tl.where(ok | (bad > 0), bad, k + 1)
        d = tl.where(ok, d, 1.0)
        # A[i,j] -= col_i col_j / d off row/col k; A[i,k] = A[k,i] = col_i / d; A[k,k] = -1 / d: one rank-one
        # update of A with row/col k zeroed, a = col / d (a_k = -1 / d), b = col (b_k = -1)
        a = tl.where(p == k, -1.0 / d, col / d)
        b = tl.where(p == k, -1.0, col)
        A = tl.where((p[:, None] == k) | ck, 0.0, A) - a[:, None] * b[None, :]
    return A, bad
