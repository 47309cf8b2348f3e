"""Benchmark of the OBS setup, U = upper Cholesky factor of H_d^{-1} (inverse_cholesky_upper in
pyprune/algorithms/common.py), old formula against new, in the same process (issue 12 part 2).

  old  SparseGPT's formula, the package's before issue 12: Cholesky of H_d, L^{-1} by a triangular solve against I,
       the product L^{-T} L^{-1} (a GEMM), upper Cholesky of that: about 3.7 cols^3 flops (cols^3 / 3 + cols^3 +
       2 cols^3 + cols^3 / 3).
  new  one Cholesky of the flipped H_d (J H_d J = L L^T) and one triangular solve against I, U = J L^{-1} J:
       about 1.3 cols^3 flops (cols^3 / 3 + cols^3), two cols x cols buffers.
Floor: 1.3 cols^3 at the peak fp32 matmul rate measured in the same process (the best of a 1024 product and of
products of the row's size, at most 2048 on the CPU and 8192 on a GPU, timed between the old and new calls);
pct_floor = floor / new. The Hessian is a damped 2/n X^T X of correlated random inputs with uneven scales (fp32, as
the package computes it for fp16/bf16/fp32 weights). Old and new calls alternate; times are the fastest of ``--reps``
(the CPU is shared), ratio = old / new of those, ratio_median the median of the per-pair ratios. rel_diff:
max |U_new - U_old| / max |U_old|. GPU: peak_buffers = peak memory above the input, in cols x cols fp32 buffers.

Measured (results/bench_setup_cpu.md; a shared 2-core x86 box, MKL, torch 2.13): 1 thread, old/new 2.2x at 1024,
2.5x at 2048, 2.6x at 4096 columns (1.46 s against 3.85 s), new at 47%, 61%, 68% of the floor; 2 threads (more
disturbed by other jobs) 1.9x, 2.2x, 2.2x. Below the flop ratio 3.7 / 1.3 = 2.8: the old formula's GEMM ran near
peak, the triangular solve both share at about a third of it.

Usage: python benchmarks/bench_setup.py [--threads N] [--cols 1024 2048 4096] [--device cpu|cuda] [--reps R]
[--out DIR]; on a GPU: python benchmarks/bench_setup.py --device cuda --cols 8192 28672.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _timing import environment, measure_peaks, out_dir, sync, write_results


def old_inverse_cholesky_upper(H_d: torch.Tensor) -> torch.Tensor:
    """The package's function before issue 12 (overwrite=False path), for comparison."""
    H_d = H_d.clone()
    info = torch.empty((), dtype=torch.int32, device=H_d.device)
    torch.linalg.cholesky_ex(H_d, out=(H_d, info))
    L_inv = torch.linalg.solve_triangular(H_d, torch.eye(H_d.shape[0], dtype=H_d.dtype, device=H_d.device),
                                          upper=False)
    torch.matmul(L_inv.T, L_inv, out=H_d)
    del L_inv
    torch.linalg.cholesky_ex(H_d, upper=True, out=(H_d, info))
    return H_d


def damped_problem(cols: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    n = min(2 * cols, 8192)  # tokens; fewer than cols leaves H singular before the damping, as short calibrations do
    scale = torch.exp(0.7 * torch.randn(cols, generator=gen))
    shared = torch.randn(n, 16, generator=gen) @ torch.randn(16, cols, generator=gen) * 0.3
    X = ((torch.randn(n, cols, generator=gen) + shared) * scale).to(device)
    H = (2.0 / n) * (X.T @ X)
    del X
    H += 0.01 * torch.diagonal(H).mean() * torch.eye(cols, device=device)
    return H.float()


def timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def peak_buffers(fn, H: torch.Tensor) -> float | None:
    if H.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / (H.numel() * H.element_size())


def measure(cols: int, device: torch.device, gen: torch.Generator, reps: int, mm_tflops: float) -> dict:
    from pyprune.algorithms.common import inverse_cholesky_upper

    H = damped_problem(cols, device, gen)
    m = min(cols, 8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(m, m, device=device), torch.randn(m, m, device=device)
    old_fn = lambda: old_inverse_cholesky_upper(H)  # noqa: E731
    new_fn = lambda: inverse_cholesky_upper(H)  # noqa: E731
    U_old, _ = timed(old_fn, device)  # warm-up (solver handles, workspaces)
    U_new, _ = timed(new_fn, device)
    rel_diff = float((U_new - U_old).abs().max() / U_old.abs().max())
    del U_old, U_new
    t_old, t_new, t_mm = [], [], []
    for _ in range(reps):  # the matmul peak is measured between them: the CPU is shared
        t_mm.append(timed(lambda: a @ b, device)[1])
        t_old.append(timed(old_fn, device)[1])
        t_new.append(timed(new_fn, device)[1])
    tflops = max(mm_tflops, 2 * m ** 3 / min(t_mm) / 1e12)
    floor = 1.3 * cols ** 3 / (tflops * 1e12)
    return dict(cols=cols, old_s=min(t_old), new_s=min(t_new), ratio=min(t_old) / min(t_new),
                ratio_median=statistics.median(o / n for o, n in zip(t_old, t_new)), floor_s=floor,
                pct_floor=100 * floor / min(t_new), mm_tflops=tflops, rel_diff=rel_diff,
                old_peak_buffers=peak_buffers(old_fn, H), new_peak_buffers=peak_buffers(new_fn, H))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cols", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
    peaks = measure_peaks(device, quick=False)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for cols in args.cols:
        row = measure(cols, device, gen, args.reps, peaks["mm_fp32_tflops"])
        rows.append(row)
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if gpu:
            torch.cuda.empty_cache()
    columns = ["cols", "old_s", "new_s", "ratio", "ratio_median", "floor_s", "pct_floor", "mm_tflops", "rel_diff"]
    if gpu:
        columns += ["old_peak_buffers", "new_peak_buffers"]
    notes = ["old: Cholesky, solve against I, L^-T L^-1, upper Cholesky (3.7 cols^3 flops); new: Cholesky of J H_d J "
             "and one solve against I (1.3 cols^3)",
             "times: fastest of the alternating old/new calls; ratio = old_s / new_s; ratio_median: median of the "
             "per-pair ratios",
             "floor_s: 1.3 cols^3 at mm_tflops (fp32 matmul peak measured in this process); "
             "pct_floor = floor_s / new_s",
             "rel_diff: max |U_new - U_old| / max |U_old| (fp32)"]
    meta = {"env": environment(device), "peaks": peaks, "reps": args.reps}
    path = write_results(f"bench_setup_{device.type}", out_dir(args.out), meta, rows, columns, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
