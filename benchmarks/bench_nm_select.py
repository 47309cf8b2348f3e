"""Benchmark of N:M mask selection (pyprune.ops.nm_select): exact best subset per group (exact) and the saliency
rule w^2 / G_jj (saliency).

Backends: torch (the reference), cpp (CPU), cuda, triton. W1 is fp32 (the layer algorithm's compute dtype).
Bytes: W1 read and the bool mask written once (plus the diagonal of G or the per-(group, subset) tables); the
floor is bytes / measured copy bandwidth (the goal for cuda: >= 70% of it, i.e. pct_floor >= 70). One wide
block (B = 4096) shows the streaming rate apart from launch overheads. Usage: python benchmarks/bench_nm_select.py
[--quick] [--device cpu|cuda] [--out DIR].
"""
from __future__ import annotations

import math

import torch

from _timing import bench, bench_main, measure_peaks, try_run


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
                base = base_mask = None
                for be in ("torch", native, "triton") if gpu else ("torch", native):
                    if be == "torch" and B * ns > 8192 and B > 256:
                        out.append(dict(rows=rows, B=B, nm=f"{n}:{m}", mode="exact" if exact else "saliency",
                                        backend=be, error="skipped: the Python-loop reference is too slow here"))
                        continue
                    res, err = try_run(lambda: ops.nm_select(W, G, n, m, exact=exact, backend=be))
                    if err:
                        out.append(dict(rows=rows, B=B, nm=f"{n}:{m}", mode="exact" if exact else "saliency",
                                        backend=be, error=err))
                        continue
                    t = bench(lambda: ops.nm_select(W, G, n, m, exact=exact, backend=be), device,
                              warmup=1, iters=20 if gpu else 3, max_seconds=3.0)
                    if be == "torch":
                        base, base_mask = t, res
                    agree = (res == base_mask).double().mean().item() if base_mask is not None else None
                    out.append(dict(rows=rows, B=B, nm=f"{n}:{m}", mode="exact" if exact else "saliency",
                                    backend=be, us=t * 1e6, gbps=nbytes / t / 1e9, floor_us=floor * 1e6,
                                    pct_floor=100 * floor / t, vs_torch=(base / t) if base else None,
                                    agree=agree))
        if gpu:
            torch.cuda.empty_cache()
        if report is not None:
            report(out, peaks)
    return out, peaks


def main():
    bench_main("bench_nm_select", run,
               ["rows", "B", "nm", "mode", "backend", "us", "gbps", "floor_us", "pct_floor", "vs_torch",
                "agree", "error"],
               ["us: median per call; gbps: (W1 + mask + G's diagonal or tables) bytes / time",
                "pct_floor: bytes at the measured copy bandwidth / time, in % (goal for cuda: >= 70)",
                "agree: fraction of mask entries equal to the torch reference's"],
               __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
