"""Argument checks shared by the ops and the layer algorithms: clear errors that name the problem."""
from __future__ import annotations

import numbers

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Symmetry tolerance, relative to max |M|. Measured here: H accumulated in fp32 (accumulate_hessian, every backend,
# bf16 and fp32 activations) is exactly symmetric, and an fp32 X^T X through a plain GEMM differs from float64 by at
# most 4e-7 of max |H| (so two mirror entries differ by less than 1e-6); G = U_B^T U_B in fp32 likewise. An H with
# only one triangle filled is off by the largest off-diagonal entry (tens of percent of max |H| for real
# activations). 1e-4 leaves two decades above fp32 rounding and still sees any asymmetry that moves the loss by more
# than about 1e-4 relative (the algorithms read one triangle only).
SYMMETRY_RTOL = 1e-4

# How symmetry_stats reads M without an n x n temporary (a 28672 x 28672 fp32 Hessian is 3.3 GB). CUDA: bands of rows
# of at most _CHUNK_ELEMENTS values (64 MB of fp32; few launches). CPU: 128 x 128 tiles against their mirror tiles,
# which stay in cache: 58 ms for 4096 x 4096 here against 383 ms for one band (the strided transposed read) and
# 1.2 s for its Cholesky factorisation; 8192 x 8192: 0.3 s.
_CHUNK_ELEMENTS = 1 << 24
_CPU_TILE = 128


def check_tensor_device(name: str, t: torch.Tensor) -> None:
    """Meta tensors (and other storage-less fakes) have no values to check or compute with."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shape only, no data); pyprune ops need tensors with values on the "
                         "CPU or a CUDA device (materialise it first, e.g. with .to_empty() and loading the weights)")


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite (non-floating tensors always are). NaN and Inf propagate into the
    minimum or the maximum, so one ``aminmax`` pass decides it with no temporary the size of ``t``, where
    ``torch.isfinite(t).all()`` makes a bool tensor (on the CPU, several passes for half precision). The one place
    pyprune checks a tensor's values for NaN/Inf. One host sync."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype not in FLOATS:  # float8 and other formats that aminmax and isfinite may not cover: widened
        return bool(torch.isfinite(t.float()).all())
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(torch.stack((lo, hi))).all())


def check_matrix(name: str, t: torch.Tensor, *, dtypes=FLOATS, shape=None, finite: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_tensor_device(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {', '.join(str(d) for d in dtypes)}")
    if finite and not all_finite(t):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ValueError(f"{name} contains {bad} values")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors are on different devices: " + ", ".join(f"{k}={v}" for k, v in devices.items()))


def check_count(name: str, n) -> int:
    """A non-negative Python/NumPy integer (not a bool); returns it as an int."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int, got {type(n).__name__} {n!r}")
    if n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n}")
    return int(n)


def symmetry_stats(M: torch.Tensor, *, rows: int | None = None) -> torch.Tensor:
    """``[max |M[i, j] - M[j, i]|, max |M|]`` as a float64 tensor on M's device (no host sync), reading M in bands of
    rows (no n x n temporary). ``rows``: compare only that many evenly spaced rows with the matching columns, a spot
    check reading O(rows * n) values instead of n^2 (the scale is then the largest of those rows and the diagonal)."""
    n = M.shape[0]
    if n == 0:
        return torch.zeros(2, dtype=torch.float64, device=M.device)
    if rows is not None and rows < n:
        idx = torch.linspace(0, n - 1, max(1, rows), device=M.device).round().long()
        band = M[idx, :]
        worst = (band - M[:, idx].T).abs().amax()
        scale = torch.maximum(band.abs().amax(), torch.diagonal(M).abs().amax())
        return torch.stack([worst, scale]).double()
    worst = []
    if M.device.type == "cpu":
        T = _CPU_TILE
        for i0 in range(0, n, T):  # tiles of the upper triangle against their mirror tiles
            for j0 in range(i0, n, T):
                worst.append((M[i0:i0 + T, j0:j0 + T] - M[j0:j0 + T, i0:i0 + T].T).abs().amax())
    else:
        step = max(1, _CHUNK_ELEMENTS // n)
        for i0 in range(0, n, step):  # the upper triangle against the lower one, one band of rows at a time
            i1 = min(n, i0 + step)
            worst.append((M[i0:i1, i0:] - M[i0:, i0:i1].T).abs().amax())
    lo, hi = torch.aminmax(M)
    return torch.stack([torch.stack(worst).amax(), torch.maximum(-lo, hi)]).double()


def symmetry_error(name: str, worst: float, scale: float, rtol: float, n: int) -> ValueError:
    return ValueError(
        f"{name} ({n} x {n}) must be symmetric: max |{name}[i, j] - {name}[j, i]| = {worst:.3g}, {worst / scale:.3g} "
        f"of max |{name}| = {scale:.3g} (tolerance {rtol:g}); only one triangle is read, so the result would depend on "
        f"which. Pass the full symmetric matrix (one triangle filled: {name}.triu() + {name}.triu(1).T; rounding "
        f"noise: ({name} + {name}.T) / 2)")


def check_symmetric(name: str, M: torch.Tensor, rtol: float = SYMMETRY_RTOL, *, rows: int | None = None) -> None:
    """Raise a ValueError naming ``name`` and the largest asymmetry unless the square matrix ``M`` satisfies
    ``max |M - M^T| <= rtol * max |M|``; one host sync. ``rows``: a spot check (see ``symmetry_stats``). NaN/Inf
    are not judged here (check_matrix's finite check is the one for them)."""
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(M).__name__}")
    check_tensor_device(name, M)
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(M.shape)}")
    worst, scale = symmetry_stats(M, rows=rows).tolist()
    if worst > rtol * scale:
        raise symmetry_error(name, worst, scale, rtol, M.shape[0])
