"""Benchmark of N:M mask selection (pyprune.ops.nm_select): exact best subset per group (exact) and the saliency
rule w^2 / G_jj (saliency).

Backends: torch (the reference), cpp (CPU), cuda, triton, all through pyprune.ops.nm_select (argument checks and, for
exact, the per-(group, subset) table included: what the block step pays), and triton_kernel: the Triton kernel's
launch alone, its exact table built beforehand. W1 is fp32 (the layer algorithm's compute dtype).
Bytes: W1 read and the bool mask written once (plus the diagonal of G or the per-(group, subset) tables); the copy
floor is bytes / measured copy bandwidth and pct_floor the percentage of it reached (issue 12's goal: >= 50 at
B = 4096). The exact rule also has a compute floor: the Triton kernel's multiply-adds (n (m + 1) - n (n - 1) / 2 per
subset, row and group) at the measured fp32 matmul peak; pct_bound is the larger floor / time. B = 4096 shows the
streaming rate apart from launch overheads; B = 128 is what the block step calls. PYPRUNE_NM_SWEEP=1 adds the Triton
kernel at other tile sizes (SWEEP) at B = 4096.
Usage: python benchmarks/bench_nm_select.py [--quick] [--device cpu|cuda] [--out DIR].
"""
from __future__ import annotations

import math
import os

import torch

from _timing import bench, bench_main, measure_peaks, try_run


# PYPRUNE_NM_SWEEP=1: also time the Triton kernel alone with these (BLOCK_R, BLOCK_G, num_warps) tiles at B = 4096
# (backend "triton_kernel r,g,w"; not in the GPU suite's run). The defaults are pyprune.triton_kernels.nm_select's
# launch_config.
SWEEP = {True: [(32, 16, 4), (64, 8, 4), (128, 4, 4), (64, 16, 8), (128, 8, 8)],
         False: [(32, 32, 4), (64, 16, 4), (16, 64, 4), (32, 32, 8), (64, 32, 8)]}


def kernel_call(W: torch.Tensor, G: torch.Tensor, n: int, m: int, exact: bool, tile=None):
    """The Triton kernel's launch alone (backend "triton_kernel"): the exact rule's table is built here, once.
    ``tile``: (BLOCK_R, BLOCK_G, num_warps) instead of the default."""
    from pyprune.triton_kernels.nm_select import _nm_select_impl, exact_table
    tab = exact_table(G, n, m) if exact else None
    br, bg, nw = tile or (None, None, None)
    return lambda: _nm_select_impl(W, G, n, m, exact, tab=tab, block_r=br, block_g=bg, num_warps=nw)


def run(device: torch.device, quick: bool, report=None) -> tuple[list[dict], dict]:
    import pyprune.ops as ops

    device = torch.device(device)
    gpu = device.type == "cuda"
    if gpu:
        shapes = [(8192, 128)] if quick else [(8192, 128), (28672, 128), (28672, 4096)]
    else:
        shapes = [(256, 128)] if quick else [(1024, 128), (1024, 256)]
    native = "cuda" if gpu else "cpp"
    peaks = measure_peaks(device, quick)
    gen = torch.Generator().manual_seed(0)
    out = []
    for rows, B in shapes:
        A = torch.randn(B, B, generator=gen) / B ** 0.5
        G = (A @ A.T + torch.eye(B)).to(device)
        W = torch.randn(rows, B, generator=gen).to(device)
        for (n, m) in ((2, 4), (4, 8)):
            for exact in (True, False):
                ns = math.comb(m, n)
                table = (B // m) * ns * (1 + n * (n + 1) // 2) * 4 * 2 if exact else B * 4
                nbytes = rows * B * (4 + 1) + table
                floor = nbytes / (peaks["copy_gbps"] * 1e9)
                fmas = rows * (B // m) * ns * (n * (m + 1) - n * (n - 1) // 2) if exact else 0
                bound = max(floor, 2 * fmas / (peaks["mm_fp32_tflops"] * 1e12))
                base = base_mask = None
                backends = ["torch", native, "triton", "triton_kernel"] if gpu else ["torch", native]
                if gpu and B >= 4096 and os.environ.get("PYPRUNE_NM_SWEEP") == "1":
                    backends += ["triton_kernel " + ",".join(map(str, t)) for t in SWEEP[exact]]
                for be in backends:
                    if be == "torch" and B * ns > 8192 and B > 256:
                        out.append(dict(rows=rows, B=B, nm=f"{n}:{m}", mode="exact" if exact else "saliency",
                                        backend=be, error="skipped: the Python-loop reference is too slow here"))
                        continue
                    if be.startswith("triton_kernel"):
                        tile = tuple(int(x) for x in be.split()[1].split(",")) if " " in be else None
                        call = kernel_call(W, G, n, m, exact, tile)
                    else:
                        call = lambda: ops.nm_select(W, G, n, m, exact=exact, backend=be)  # noqa: E731
                    res, err = try_run(call)
                    if err:
                        out.append(dict(rows=rows, B=B, nm=f"{n}:{m}", mode="exact" if exact else "saliency",
                                        backend=be, error=err))
                        continue
                    t = bench(call, device, warmup=1, iters=20 if gpu else 3, max_seconds=3.0)
                    if be == "torch":
                        base, base_mask = t, res
                    agree = (res == base_mask).double().mean().item() if base_mask is not None else None
                    out.append(dict(rows=rows, B=B, nm=f"{n}:{m}", mode="exact" if exact else "saliency",
                                    backend=be, us=t * 1e6, gbps=nbytes / t / 1e9, floor_us=floor * 1e6,
                                    pct_floor=100 * floor / t, pct_bound=100 * bound / t,
                                    vs_torch=(base / t) if base else None, agree=agree))
        if gpu:
            torch.cuda.empty_cache()
        if report is not None:
            report(out, peaks)
    return out, peaks


def main():
    bench_main("bench_nm_select", run,
               ["rows", "B", "nm", "mode", "backend", "us", "gbps", "floor_us", "pct_floor", "pct_bound",
                "vs_torch", "agree", "error"],
               ["us: median per call; gbps: (W1 + mask + G's diagonal or tables) bytes / time",
                "pct_floor: bytes at the measured copy bandwidth / time, in % (issue 12's goal: >= 50 at B = 4096)",
                "pct_bound: the larger of the copy floor and, for exact, the Triton kernel's multiply-adds at the "
                "fp32 matmul peak, / time, in %",
                "triton_kernel: the Triton launch alone (exact table built beforehand); the other backends go "
                "through pyprune.ops.nm_select with its checks",
                "agree: fraction of mask entries equal to the torch reference's"],
               __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
