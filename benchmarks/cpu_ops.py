"""The C++ CPU ops against the plain-torch references on this machine's CPU (pyprune.ops with backend="cpp" vs
backend="torch"), for the three ops: writes cpu_ops.json and cpu_ops.md into $OUT or benchmarks/results/.
Usage: python benchmarks/cpu_ops.py [--quick] [--out DIR]. The GPU benchmarks are the bench_*.py scripts.
"""
from __future__ import annotations

import json
import sys

import torch

from _timing import environment, markdown_table, measure_peaks, out_dir, parse_args

import bench_hessian
import bench_masked_solve
import bench_nm_select


def main():
    args = parse_args(__doc__.splitlines()[0])
    device = torch.device("cpu")
    out = out_dir(args.out)
    sections = []
    peaks = measure_peaks(device, args.quick)
    results = {"env": environment(device), "peaks": peaks, "quick": args.quick}
    for name, mod, cols in (
            ("hessian_update", bench_hessian,
             [c for c in bench_hessian.COLUMNS if c != "error"]),
            ("masked_solve", bench_masked_solve,
             ["rows", "B", "mask", "backend", "ms", "gflops", "floor_ms", "pct_floor", "vs_torch", "rel_diff"]),
            ("nm_select", bench_nm_select,
             ["rows", "B", "nm", "mode", "backend", "us", "gbps", "floor_us", "pct_floor", "vs_torch", "agree"])):
        rows, _ = mod.run(device, args.quick)
        results[name] = rows
        sections += [f"## {name}", ""] + markdown_table(rows, cols) + [""]
        print(f"{name}: done", file=sys.stderr)
    (out / "cpu_ops.json").write_text(json.dumps(results, indent=1, default=str))
    head = ["# C++ CPU ops vs the torch references (CPU)", "",
            "Environment: " + ", ".join(f"{k}={v}" for k, v in results["env"].items()), "",
            "Measured peaks: " + ", ".join(f"{k}={v:.4g}" for k, v in peaks.items()), "",
            "Ratios (vs_torch, vs_library, vs_sparsegpt) are baseline time / time, measured in the same process. The "
            "floor is the time at the measured peak (flops or bytes, see the bench_*.py docstrings).", ""]
    (out / "cpu_ops.md").write_text("\n".join(head + sections))
    print((out / "cpu_ops.md").read_text())


if __name__ == "__main__":
    main()
