"""Timing, peak measurement and result writing shared by the benchmark scripts (not part of the package).

GPU times are CUDA-event medians after warm-up; CPU times are time.perf_counter medians. Peaks are measured in the
same process: a large matrix product (bf16 and fp32 without TF32 on a GPU, fp32 on the CPU) and a large device copy
(bytes read + written).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and the C++ ops (0: torch's default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device: torch.device, *, warmup: int = 2, iters: int = 10, max_seconds: float = 5.0) -> float:
    """Median seconds per call of fn(). Stops early (after at least 2 timed calls) once max_seconds are spent."""
    device = torch.device(device)
    t_start = time.perf_counter()
    for _ in range(warmup):
        fn()
        sync(device)
        if time.perf_counter() - t_start > max_seconds:
            break
    times = []
    t_start = time.perf_counter()
    for i in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() - t_start > max_seconds:
            break
    return statistics.median(times)


def measure_peaks(device: torch.device, quick: bool) -> dict:
    """Measured matmul TFLOP/s (bf16 and fp32 on a GPU, fp32 and bf16 on the CPU) and copy bandwidth in GB/s."""
    device = torch.device(device)
    out = {}
    if device.type == "cuda":
        n = 4096 if quick else 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        out["mm_bf16_tflops"] = 2 * n ** 3 / bench(lambda: a @ b, device, warmup=3, iters=10) / 1e12
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        a, b = a.float(), b.float()
        out["mm_fp32_tflops"] = 2 * n ** 3 / bench(lambda: a @ b, device, warmup=2, iters=5) / 1e12
        torch.backends.cuda.matmul.allow_tf32 = old
        del a, b
        numel = (1 << 26) if quick else (1 << 28)  # 256 MiB or 1 GiB of fp32
    else:
        n = 512 if quick else 1024
        a, b = torch.randn(n, n), torch.randn(n, n)
        out["mm_fp32_tflops"] = 2 * n ** 3 / bench(lambda: a @ b, device, warmup=2, iters=10) / 1e12
        a16, b16 = a.bfloat16(), b.bfloat16()
        out["mm_bf16_tflops"] = 2 * n ** 3 / bench(lambda: a16 @ b16, device, warmup=1, iters=5) / 1e12
        numel = (1 << 24) if quick else (1 << 26)  # 64 MiB or 256 MiB
    x = torch.empty(numel, device=device)
    x.fill_(1.0)
    y = torch.empty_like(x)
    out["copy_gbps"] = 2 * x.numel() * 4 / bench(lambda: y.copy_(x), device, warmup=2, iters=10) / 1e9
    return out


def try_run(fn):
    """(result, None) or (None, 'ExceptionType: message') when fn raises (an unavailable backend, say)."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001  (a benchmark reports every failure and goes on)
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def environment(device: torch.device) -> dict:
    device = torch.device(device)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    if hasattr(os, "getloadavg"):
        env["loadavg_1min"] = round(os.getloadavg()[0], 2)  # other processes distort CPU timings
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def out_dir(arg: str | None) -> Path:
    d = Path(arg or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    d.mkdir(parents=True, exist_ok=True)
    return d


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return lines


def write_results(name: str, out: Path, meta: dict, rows: list[dict], columns: list[str], notes: list[str]) -> Path:
    """Write <name>.json (everything) and <name>.md (a table of `columns`, then notes)."""
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    lines = [f"# {name}", "", "Environment: " + ", ".join(f"{k}={v}" for k, v in meta.get("env", {}).items()), ""]
    if "peaks" in meta:
        lines += ["Measured peaks: " + ", ".join(f"{k}={fmt(v)}" for k, v in meta["peaks"].items()), ""]
    lines += markdown_table(rows, columns) + [""] + [f"- {n}" for n in notes]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_main(name: str, run, columns: list[str], notes: list[str], description: str) -> None:
    """The main() of every benchmark script: parse the common arguments, call ``run(device, quick, report)`` and
    write ``<name>.json`` / ``<name>.md``. ``run`` calls ``report(rows, peaks)`` as it goes, so a run stopped by a
    time limit (the GPU suite's steps have one) keeps what it measured."""
    args = parse_args(description)
    device = torch.device(args.device)
    out = out_dir(args.out)

    def report(rows: list[dict], peaks: dict) -> Path:
        meta = {"env": environment(device), "peaks": peaks, "quick": args.quick}
        return write_results(name, out, meta, rows, columns, notes)

    rows, peaks = run(device, args.quick, report)
    print(report(rows, peaks).read_text())
