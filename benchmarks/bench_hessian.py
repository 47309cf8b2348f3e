"""Benchmark of the Hessian accumulation H <- beta H + alpha X^T X (pyprune.ops.hessian_update_).

Per call: k tokens (32768 on a GPU) of activations X (k, cols), bf16 (the model's dtype) and, at one smaller shape,
fp32. Compared, all in one process against the library call:
  library     the bare library call: torch.addmm(H, X.T, X, out_dtype=float32, out=H) for 16-bit X on CUDA (cuBLAS
              reads X in its own dtype, fp32 sums and output), H.addmm_ of X in H's dtype otherwise (the CPU build
              has no out_dtype addmm); no mirror, so H is symmetric only to rounding (asym)
  sparsegpt   SparseGPT's way, H.addmm_(X.float().T, X.float()) in fp32 (TF32 off: torch's default)
  torch_bf16  torch's 16-bit product, H.mul_(beta).add_((X.T @ X).float(), alpha) (16-bit-rounded output)
  torch       pyprune's backend "torch": the library call, then the upper triangle mirrored (exactly symmetric H)
  cpp / cuda / triton   pyprune's kernels through the wrapper (explicit backends)
  library_strips  (CUDA) the library call on 1024-row strips of H's upper triangle, half the flops, no mirror
  auto        backend="auto"; the picks column names what it ran
TFLOP/s use the GEMM convention 2 k cols^2; the floor is the symmetric half (k cols (cols + 1) flops) at the
measured peak for X's dtype (bf16, or fp32 without TF32), or the bytes (X once, H read + written) at the measured
copy bandwidth, whichever is larger. vs_library = library time / time (issue 12's goal for a kernel: >= 1.5);
vs_sparsegpt likewise. rel_diff: max |H - H_sparsegpt| / max |H_sparsegpt| after one call from H = 0; asym:
max |H - H^T| / max |H| after it. Usage: python benchmarks/bench_hessian.py [--quick] [--device cpu|cuda] [--out DIR].
"""
from __future__ import annotations

import torch

from _timing import bench, bench_main, measure_peaks, try_run


def library_call(H: torch.Tensor, X: torch.Tensor, a: float, b: float) -> None:
    """The bare library call (no mirror)."""
    if H.is_cuda and X.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(H, X.T, X, beta=b, alpha=a, out_dtype=torch.float32, out=H)
    else:
        Xc = X.to(H.dtype)
        H.addmm_(Xc.T, Xc, beta=b, alpha=a)


def library_strips(H: torch.Tensor, X: torch.Tensor, a: float, b: float, strip: int = 1024) -> None:
    """The library call on strips of H's upper triangle (H[i0:i1, i0:] from X[:, i0:i1]^T X[:, i0:]), about half
    the flops, no mirror: what the CPU op does with 128-256-row strips (csrc/cpu/hessian.cpp), measured on a GPU to
    decide whether backend "torch" should do the same there (it computes the whole product today)."""
    n = H.shape[0]
    Xc = X if H.is_cuda and X.dtype in (torch.float16, torch.bfloat16) else X.to(H.dtype)
    for i0 in range(0, n, strip):
        i1 = min(n, i0 + strip)
        out = H[i0:i1, i0:]
        if H.is_cuda and Xc.dtype != H.dtype:
            torch.addmm(out, Xc[:, i0:i1].T, Xc[:, i0:], beta=b, alpha=a, out_dtype=torch.float32, out=out)
        else:
            out.addmm_(Xc[:, i0:i1].T, Xc[:, i0:], beta=b, alpha=a)


def methods(device: torch.device, dtype: torch.dtype) -> dict:
    import pyprune.ops as ops

    def sparsegpt(H, X, a, b):
        Xf = X.float()
        H.addmm_(Xf.T, Xf, beta=b, alpha=a)

    def torch_16bit(H, X, a, b):
        H.mul_(b).add_((X.T @ X).float(), alpha=a)

    m = {"library": library_call, "sparsegpt": sparsegpt}
    if dtype != torch.float32:
        m["torch_bf16"] = torch_16bit
    m["torch"] = lambda H, X, a, b: ops.hessian_update_(H, X, a, b, backend="torch")
    native = "cuda" if device.type == "cuda" else "cpp"
    m[native] = lambda H, X, a, b: ops.hessian_update_(H, X, a, b, backend=native)
    if device.type == "cuda":
        m["triton"] = lambda H, X, a, b: ops.hessian_update_(H, X, a, b, backend="triton")
        m["library_strips"] = library_strips
    m["auto"] = lambda H, X, a, b: ops.hessian_update_(H, X, a, b)
    return m


def auto_picks(H: torch.Tensor, X: torch.Tensor) -> str:
    from pyprune.ops.hessian import hessian_backend
    which = hessian_backend(H, X)
    return {"native": "cuda" if H.is_cuda else "cpp"}.get(which, which)


def run(device: torch.device, quick: bool, report=None) -> tuple[list[dict], dict]:
    device = torch.device(device)
    gpu = device.type == "cuda"
    bf16, fp32 = torch.bfloat16, torch.float32
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
        # (cols, tokens per call, X dtype): the 70B widths in bf16, and fp32 X at the smaller width
        shapes = [(8192, 4096, bf16)] if quick else [(8192, 32768, bf16), (28672, 32768, bf16), (8192, 8192, fp32)]
    else:
        shapes = [(256, 512, bf16), (512, 512, bf16)] if quick else [(512, 2048, bf16), (1024, 2048, bf16),
                                                                      (512, 2048, fp32)]
    peaks = measure_peaks(device, quick)
    rows = []
    for cols, k, dtype in shapes:
        X = torch.randn(k, cols, device=device).to(dtype)
        alpha, beta = 2.0 / (k + k), 0.5
        flops_gemm = 2.0 * k * cols * cols
        peak = peaks["mm_bf16_tflops"] if dtype != fp32 else peaks["mm_fp32_tflops"]
        floor = max(k * cols * (cols + 1) / (peak * 1e12),
                    (k * cols * X.element_size() + 2 * cols * cols * 4) / (peaks["copy_gbps"] * 1e9))
        ref = torch.zeros(cols, cols, device=device)
        methods(device, dtype)["sparsegpt"](ref, X, alpha, 0.0)
        scale = ref.abs().max()
        base = {}
        dname = str(dtype).replace("torch.", "")
        for name, fn in methods(device, dtype).items():
            H = torch.zeros(cols, cols, device=device)
            picks = auto_picks(H, X) if name == "auto" else None
            _, err = try_run(lambda: fn(H, X, alpha, 0.0))
            if err:
                rows.append(dict(cols=cols, tokens=k, dtype=dname, method=name, picks=picks, error=err))
                continue
            if name == "library_strips":  # its lower triangle is never written: compare the upper one
                H = torch.triu(H) + torch.triu(H, 1).T
            acc = ((H - ref).abs().max() / scale).item()
            asym = ((H - H.T).abs().max() / scale).item()
            t = bench(lambda: fn(H, X, alpha, beta), device, warmup=1, iters=5 if gpu else 3,
                      max_seconds=6.0 if gpu else 3.0)
            if name in ("library", "sparsegpt"):
                base[name] = t
            rows.append(dict(cols=cols, tokens=k, dtype=dname, method=name, picks=picks, ms=t * 1e3,
                             tflops=flops_gemm / t / 1e12, floor_ms=floor * 1e3, pct_floor=100 * floor / t,
                             vs_library=base["library"] / t if "library" in base else None,
                             vs_sparsegpt=base["sparsegpt"] / t if "sparsegpt" in base else None,
                             rel_diff=acc, asym=asym))
        del X, ref
        if gpu:
            torch.cuda.empty_cache()
        if report is not None:
            report(rows, peaks)
    return rows, peaks


COLUMNS = ["cols", "tokens", "dtype", "method", "picks", "ms", "tflops", "floor_ms", "pct_floor", "vs_library",
           "vs_sparsegpt", "rel_diff", "asym", "error"]


def main():
    bench_main("bench_hessian", run, COLUMNS,
               ["ms: median per call; tflops: 2 k cols^2 / time; floor_ms: k cols (cols + 1) flops at the measured "
                "peak for X's dtype, or the bytes at the copy bandwidth; pct_floor = floor / time in %",
                "vs_library: time of the bare library call / time (issue 12's goal for a kernel: >= 1.5); "
                "vs_sparsegpt: time of SparseGPT's fp32 addmm / time",
                "auto: backend='auto' (picks: what it ran); torch: the library call plus the mirror that makes H "
                "exactly symmetric",
                "rel_diff: max |H - H_sparsegpt| / max |H_sparsegpt| after one call from H = 0; asym: max |H - H^T| "
                "/ max |H_sparsegpt| after it"],
               __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
