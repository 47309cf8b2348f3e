"""Benchmark of the batched masked solve (pyprune.ops.masked_solve): per row, G[M,M] lambda = w[M], e = U_B[:,M]
lambda, loss = 1/2 lambda . w[M].

Backends: torch (the reference: a padded rows x B x B batch, torch.linalg.cholesky + cholesky_solve), cpp (CPU),
cuda, triton. Masks: 50% per row (unstructured) and 2:4. W1 is fp32 (the layer algorithm's compute dtype). Useful
flops per row: k^3/3 + 2k^2 + 2Bk (k = pruned weights of the row); bytes: W1, mask, E, loss once and G, U_B. The
floor is the larger of flops / measured fp32 peak and bytes / measured copy bandwidth. Goal for cuda: >= 5x torch.
Usage: python benchmarks/bench_masked_solve.py [--quick] [--device cpu|cuda] [--out DIR].
"""
from __future__ import annotations

import torch

from _timing import bench, bench_main, measure_peaks, try_run


def realistic_G(B: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n = 4 * B
    scale = torch.exp(0.5 * torch.randn(B, generator=gen, dtype=torch.float64))
    X = torch.randn(n, B, generator=gen, dtype=torch.float64) * scale
    H = X.T @ X / n
    H += 0.01 * H.diagonal().mean() * torch.eye(B, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    return (U.T @ U).float().to(device), U.float().contiguous().to(device)


def make_mask(rows: int, B: int, kind: str, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    if kind == "50%":
        return (torch.rand(rows, B, generator=gen).argsort(dim=1) < B // 2).to(device)
    groups = torch.rand(rows, B // 4, 4, generator=gen).argsort(dim=2) < 2  # 2:4
    return groups.reshape(rows, B).to(device)


def run(device: torch.device, quick: bool, report=None) -> tuple[list[dict], dict]:
    import pyprune.ops as ops

    device = torch.device(device)
    gpu = device.type == "cuda"
    if gpu:
        shapes = [(8192, 128)] if quick else [(r, b) for r in (8192, 28672) for b in (64, 128, 256)]
    else:
        shapes = [(256, 64), (256, 128)] if quick else [(1024, 64), (1024, 128), (512, 256)]
    native = "cuda" if gpu else "cpp"
    backends = ["torch", native, "triton"] if gpu else ["torch", native]
    peaks = measure_peaks(device, quick)
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for rows, B in shapes:
        G, U = realistic_G(B, device, gen)
        W = (0.02 * torch.randn(rows, B, generator=gen)).to(device)
        for kind in ("50%", "2:4"):
            mask = make_mask(rows, B, kind, device, gen)
            k = mask.sum(dim=1).double().cpu()
            flops = float((k ** 3 / 3 + 2 * k ** 2 + 2 * B * k).sum())
            nbytes = rows * B * (4 + 1 + 4) + rows * 4 + 2 * B * B * 4
            floor = max(flops / (peaks["mm_fp32_tflops"] * 1e12), nbytes / (peaks["copy_gbps"] * 1e9))
            base = base_E = None
            for be in backends:
                res, err = try_run(lambda: ops.masked_solve(G, U, W, mask, backend=be))
                if err:
                    rows_out.append(dict(rows=rows, B=B, mask=kind, backend=be, error=err))
                    continue
                E = res[0]
                t = bench(lambda: ops.masked_solve(G, U, W, mask, backend=be), device, warmup=1,
                          iters=10 if gpu else 3, max_seconds=4.0 if gpu else 3.0)
                if be == "torch":
                    base, base_E = t, E
                rel = ((E - base_E).abs().max() / base_E.abs().max()).item() if base_E is not None else None
                rows_out.append(dict(rows=rows, B=B, mask=kind, backend=be, ms=t * 1e3,
                                     gflops=flops / t / 1e9, gbps=nbytes / t / 1e9, floor_ms=floor * 1e3,
                                     pct_floor=100 * floor / t, vs_torch=(base / t) if base else None,
                                     rel_diff=rel))
        if gpu:
            torch.cuda.empty_cache()
        if report is not None:
            report(rows_out, peaks)
    return rows_out, peaks


def main():
    bench_main("bench_masked_solve", run,
               ["rows", "B", "mask", "backend", "ms", "gflops", "gbps", "floor_ms", "pct_floor", "vs_torch",
                "rel_diff", "error"],
               ["ms: median per call; gflops: useful flops (k^3/3 + 2k^2 + 2Bk per row) / time",
                "vs_torch: time of the torch padded reference / time (goal for cuda: >= 5)",
                "rel_diff: max |E - E_torch| / max |E_torch|"],
               __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
