"""Benchmark of the Hessian accumulation H <- beta H + alpha X^T X (pyprune.ops.hessian_update_).

Per call: k tokens (16 x 2048 on a GPU, as the block driver feeds them) of bf16 activations X (k, cols). Compared:
  sparsegpt   SparseGPT's way, H.addmm_(X.float().T, X.float()) in fp32 (TF32 off: torch's default)
  torch_bf16  torch's bf16 product, H.mul_(beta).add_((X.T @ X).float(), alpha) (bf16-rounded output)
  cublas_fp32out  cuBLAS bf16 product with fp32 accumulation and fp32 output (torch.addmm(..., out_dtype=float32),
              CUDA only): the same exact-products-fp32-sums H as the kernels, at cuBLAS speed, full square
  torch       pyprune's reference through the wrapper (backend="torch")
  cpp / cuda / triton   pyprune's kernels through the wrapper
TFLOP/s use the GEMM convention 2 k cols^2; the floor is the symmetric half (k cols (cols + 1) flops) at the
measured bf16 peak, or the bytes (X once, H read + written) at the measured copy bandwidth, whichever is larger.
Ratios are against sparsegpt (the goal: >= 1.8x) in the same process. Usage: python benchmarks/bench_hessian.py
[--quick] [--device cpu|cuda] [--out DIR].
"""
from __future__ import annotations

import torch

from _timing import bench, bench_main, measure_peaks, try_run


def methods(device: torch.device) -> dict:
    import pyprune.ops as ops

    def sparsegpt(H, X, a, b):
        Xf = X.float()
        H.addmm_(Xf.T, Xf, beta=b, alpha=a)

    def torch_bf16(H, X, a, b):
        H.mul_(b).add_((X.T @ X).float(), alpha=a)

    m = {"sparsegpt": sparsegpt, "torch_bf16": torch_bf16,
         "torch": lambda H, X, a, b: ops.hessian_update_(H, X, a, b, backend="torch")}
    native = "cuda" if device.type == "cuda" else "cpp"
    m[native] = lambda H, X, a, b: ops.hessian_update_(H, X, a, b, backend=native)
    if device.type == "cuda":
        m["cublas_fp32out"] = lambda H, X, a, b: H.copy_(torch.addmm(H, X.T, X, beta=b, alpha=a,
                                                                       out_dtype=torch.float32))
        m["triton"] = lambda H, X, a, b: ops.hessian_update_(H, X, a, b, backend="triton")
    return m


def run(device: torch.device, quick: bool, report=None) -> tuple[list[dict], dict]:
    device = torch.device(device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
        shapes = [(8192, 4096)] if quick else [(8192, 32768), (28672, 32768)]  # (cols, tokens per call)
        total_tokens = 128 * 2048
    else:
        shapes = [(256, 512), (512, 512)] if quick else [(512, 2048), (1024, 2048)]
        total_tokens = 8 * 2048
    peaks = measure_peaks(device, quick)
    rows = []
    for cols, k in shapes:
        X = torch.randn(k, cols, device=device).to(torch.bfloat16)
        alpha, beta = 2.0 / (k + k), 0.5
        flops_gemm = 2.0 * k * cols * cols
        floor = max(k * cols * (cols + 1) / (peaks["mm_bf16_tflops"] * 1e12),
                    (k * cols * 2 + 2 * cols * cols * 4) / (peaks["copy_gbps"] * 1e9))
        ref = torch.zeros(cols, cols, device=device)
        methods(device)["sparsegpt"](ref, X, alpha, 0.0)
        base = None
        for name, fn in methods(device).items():
            H = torch.zeros(cols, cols, device=device)
            _, err = try_run(lambda: fn(H, X, alpha, 0.0))
            if err:
                rows.append(dict(cols=cols, tokens=k, method=name, error=err))
                continue
            acc = ((H - ref).abs().max() / ref.abs().max()).item()
            t = bench(lambda: fn(H, X, alpha, beta), device, warmup=1 if gpu else 1, iters=5 if gpu else 3,
                      max_seconds=6.0 if gpu else 3.0)
            if name == "sparsegpt":
                base = t
            rows.append(dict(cols=cols, tokens=k, method=name, ms=t * 1e3,
                             calib_s=t * total_tokens / k, tflops=flops_gemm / t / 1e12,
                             floor_ms=floor * 1e3, pct_floor=100 * floor / t,
                             vs_sparsegpt=(base / t) if base else None, rel_diff=acc))
        del X, ref
        if gpu:
            torch.cuda.empty_cache()
        if report is not None:
            report(rows, peaks)
    return rows, peaks


def main():
    bench_main("bench_hessian", run,
               ["cols", "tokens", "method", "ms", "calib_s", "tflops", "floor_ms", "pct_floor", "vs_sparsegpt",
                "rel_diff", "error"],
               ["ms: median per call; calib_s: one layer's full calibration set (128 x 2048 tokens on a GPU) at "
                "that rate; tflops: 2 k cols^2 / time",
                "rel_diff: max |H - H_sparsegpt| / max |H_sparsegpt| after one call from H = 0",
                "vs_sparsegpt: time of SparseGPT's fp32 addmm / time (goal for cuda: >= 1.8)"],
               __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
