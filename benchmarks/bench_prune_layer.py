"""Benchmark of one whole layer: ``prune_layer`` with the joint method (each kernel backend) against SparseGPT, at
Llama-2-70B layer shapes on a GPU (small shapes on the CPU); also joint without its default exchanges (``swaps=0``),
so the exchanges' cost is a ratio in the same process.

What a user pruning a 70B model waits for is this per-layer time (times 560 linears) and this peak memory. Per
shape and sparsity (50% unstructured, 2:4): SparseGPT (its own column loop, torch), and joint at B=128 with
backend torch / native (cuda or cpp) / triton. Reported: seconds per layer (after one warm-up call on a
corner of the layer, which compiles the kernels), peak device memory above the inputs, the layer loss and its ratio to SparseGPT's (same H), and the time
ratio against SparseGPT in the same process.

Floor (per layer): the inverse-Cholesky setup, shared with SparseGPT (two Cholesky factorisations, cols^3 / 3 flops
each; the triangular inverse, cols^3 / 3 useful; the product L^-T L^-1, 2 cols^3 as a GEMM), plus the trailing
updates (rows cols^2 flops summed over the blocks), plus the masked solves (see bench_masked_solve.py). At 8192 x
28672 that is about 1.7 s of fp32 arithmetic at the measured peak, almost all of it the setup.

The Hessian is built from correlated random activations (per-column scales and a low-rank shared component, as in
real LLM inputs) so that the masks and losses are not those of an identity Hessian.
Usage: python benchmarks/bench_prune_layer.py [--quick] [--device cpu|cuda] [--out DIR].
"""
from __future__ import annotations

import time

import torch

from _timing import bench_main, measure_peaks, sync, try_run


def layer_problem(rows: int, cols: int, device: torch.device, gen: torch.Generator):
    n = min(4096, 2 * cols)
    scale = torch.exp(0.7 * torch.randn(cols, generator=gen))
    shared = torch.randn(n, 16, generator=gen) @ torch.randn(16, cols, generator=gen) * 0.3
    X = ((torch.randn(n, cols, generator=gen) + shared) * scale).to(device)
    H = (2.0 / n) * (X.T @ X)
    W = (0.02 * torch.randn(rows, cols, generator=gen)).to(device=device, dtype=torch.bfloat16)
    return W, H.float()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def run(device: torch.device, quick: bool, report=None) -> tuple[list[dict], dict]:
    from pyprune import PruneConfig, prune_layer

    device = torch.device(device)
    gpu = device.type == "cuda"
    native = "cuda" if gpu else "cpp"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
        kernels = ["joint/" + native, "joint/" + native + "/swaps0", "joint/triton"]
        # 70B q/o_proj with the torch reference as well; 70B down_proj (the widest input) with the kernels only
        plan = [((2048, 2048), ["sparsegpt/torch", "joint/torch"] + kernels)] if quick else [
            ((8192, 8192), ["sparsegpt/torch", "joint/torch"] + kernels),
            ((8192, 28672), ["sparsegpt/torch"] + kernels)]
    else:
        plan = [((128, 256) if quick else (512, 1024), ["sparsegpt/torch", "joint/torch", "joint/" + native,
                                                         "joint/" + native + "/swaps0"])]
    peaks = measure_peaks(device, quick)
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for (rows, cols), variants in plan:
        W, H = layer_problem(rows, cols, device, gen)
        for sp in ("0.5", "2:4"):
            base_t = base_loss = None
            for variant in variants:
                method, backend, *extra = variant.split("/")
                swaps = int(extra[0][5:]) if extra else None          # "swaps<k>"; none: the config's default
                cfg = PruneConfig(method=method, sparsity=sp, block_size=128, backend=backend, swaps=swaps)
                if extra and cfg.swaps == PruneConfig(method=method, sparsity=sp, backend=backend).swaps:
                    continue                                          # the default already: nothing to compare
                tag = dict(rows=rows, cols=cols, sparsity=sp, method=method, backend=backend, swaps=cfg.swaps)
                w = min(cols, 1024)  # warm-up on a corner: compiles kernels, creates handles
                _, err = try_run(lambda: prune_layer(W[: min(rows, 256), :w], H[:w, :w].contiguous(), cfg))
                if err:
                    rows_out.append(dict(tag, error=err))
                    continue
                if gpu:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                res, t = timed(lambda: prune_layer(W, H, cfg), device)
                peak = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 30 if gpu else None
                if method == "sparsegpt":
                    base_t, base_loss = t, res.loss
                rows_out.append(dict(tag, s=t, vs_sparsegpt=base_t / t if base_t else None, loss=res.loss,
                                     loss_vs_sparsegpt=res.loss / base_loss if base_loss else None,
                                     sparsity_got=res.sparsity, peak_gib=peak))
                del res
                if report is not None:
                    report(rows_out, peaks)
        del W, H
        if gpu:
            torch.cuda.empty_cache()
    return rows_out, peaks


def main():
    bench_main("bench_prune_layer", run,
               ["rows", "cols", "sparsity", "method", "backend", "swaps", "s", "vs_sparsegpt", "loss",
                "loss_vs_sparsegpt", "sparsity_got", "peak_gib", "error"],
               ["s: one prune_layer call (bf16 weight, fp32 H, B=128), after a warm-up on a corner",
                "swaps: exchanges per row of a block (PruneConfig.swaps; the joint default is 16, the swaps0 row "
                "shows their cost)",
                "vs_sparsegpt: SparseGPT's time / this time, same process; loss_vs_sparsegpt: layer loss ratio on "
                "the same H (below 1: the joint update loses less)",
                "peak_gib: peak device memory allocated during the call above what was allocated before (W and H)"],
               __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
