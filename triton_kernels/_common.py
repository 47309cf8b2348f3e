"""Helpers shared by the Triton launchers: interpreter detection, argument checks, small launch heuristics.

Only torch and triton are imported here (this folder is installed as ``pyprune.triton_kernels``).
"""
from __future__ import annotations

import torch
import triton

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
