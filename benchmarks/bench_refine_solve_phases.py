"""Where the CPU exchange engine's time goes: one block of ``bench_refine_solve``, phase by phase.

The engine's header (``csrc/kernels/refine_solve.cuh``) is compiled here into a small standalone program with its
phase timers on (``PP_RS_PHASE_TIMERS``: the time-stamp counter read at the end of each phase; compiled out of the
op itself) and the same flags as the CPU op (AVX2 + FMA), then run on the first block of the layer problem of
``bench_refine_solve`` (B = 128, 16 exchanges at most, 50% per row and 2:4), eight rows at a time through
``refine_solve_rows8`` as the op runs them. Per phase: its share of the engine's cycles, and for the arithmetic
phases the vector FMAs issued per cycle (multiply-adds / 8 lanes / cycles; this CPU issues at most 2 per cycle), so
that a phase far below that is a target and one near it needs less arithmetic instead. The total is checked against
the op (``ops.refine_solve``) on the same block: the same losses and exchanges, to float32 rounding.

Usage: python benchmarks/bench_refine_solve_phases.py [--quick] [--out DIR]  (x86-64 with AVX2 and FMA, g++)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _timing and the other scripts, when imported from a test
from _timing import bench_main, measure_peaks  # noqa: E402
from bench_prune_layer import layer_problem  # noqa: E402
from bench_refine_solve import block_problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPS = 10  # timed passes over the block after one warm-up; the phase counts are summed over them

# (phase index of PP_RS_PHASE, name, multiply-adds per row as a function of c, K, B; None: data movement)
PHASES = [
    (13, "rows: masks to slots (rs_row_begin)", None),
    (0, "set-up: slot offsets", None),
    (1, "gather G[M, M]", None),
    (2, "Cholesky", lambda c, K, B: c ** 3 / 6),
    (3, "L^-1", lambda c, K, B: c ** 3 / 6),
    (4, "Ainv = X^T X, to the rows", lambda c, K, B: c ** 3 / 6),
    (5, "gather G[M, K]", None),
    (6, "Y = X G[M, K]", lambda c, K, B: c * c * K / 2),
    (7, "Schur complements s", lambda c, K, B: c * K),
    (8, "U (in-group entries), to the rows", None),
    (9, "lam, G[:, M] lam (before the exchanges)", lambda c, K, B: c * c + c * B),
    (10, "scoring and exchanges", None),
    (11, "final solve (fp64 residual)", lambda c, K, B: 2 * c * c + c * B),
    (12, "e = U_B[:, M] lambda", lambda c, K, B: c * B),
]

HARNESS = r"""
#include <x86intrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>
static unsigned long long g_last = 0, g_cyc[16] = {0};
inline void pp_rs_phase(int i) {
  const unsigned long long n = __rdtsc();
  if (i >= 0) g_cyc[i] += n - g_last;
  g_last = n;
}
#define PP_RS_PHASE_TIMERS 1
#define PP_RS_FMA 1
#pragma GCC target("avx2,fma")
#include "kernels/refine_solve.cuh"
using namespace pyprune;
template <class T> static std::vector<T> rd(const char* f, size_t n) {
  std::vector<T> v(n);
  FILE* p = std::fopen(f, "rb");
  if (!p || std::fread(v.data(), sizeof(T), n, p) != n) { std::fprintf(stderr, "cannot read %s\n", f); std::exit(2); }
  std::fclose(p);
  return v;
}
int main(int argc, char** argv) {
  const int rows = std::atoi(argv[1]), B = std::atoi(argv[2]), m = std::atoi(argv[3]), rounds = std::atoi(argv[4]);
  const int reps = std::atoi(argv[5]);
  const float tol = std::strtof(argv[6], nullptr);
  auto G = rd<float>("G.bin", (size_t)B * B), U = rd<float>("U.bin", (size_t)B * B);
  auto W = rd<float>("W.bin", (size_t)rows * B);
  auto M = rd<uint8_t>("M.bin", (size_t)rows * B);
  std::vector<float> e((size_t)rows * B), l(rows), ubt((size_t)B * B);
  std::vector<int32_t> st(rows), ns(rows);
  std::vector<uint8_t> mo((size_t)rows * B);
  for (int col = 0; col < B; ++col)
    for (int r = 0; r < B; ++r) ubt[(size_t)col * B + r] = r <= col ? U[(size_t)r * B + col] : 0.f;
  const size_t row_words = ((rs_host_words(B) + 15) / 16) * 16, soa_words = ((rs8_soa_words(B) + 15) / 16) * 16;
  std::unique_ptr<float[]> buf(new float[kRsLanes * row_words + soa_words + 16]);
  float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.get()) + 63) & ~uintptr_t(63));
  float* ws[kRsLanes];
  for (int x = 0; x < kRsLanes; ++x) ws[x] = base + x * row_words;
  std::vector<int64_t> order(rows);
  for (int r = 0; r < rows; ++r) order[r] = r;
  double best = 1e30;
  unsigned long long tsc = 0;
  for (int rep = 0; rep <= reps; ++rep) {
    if (rep == 1)
      for (auto& x : g_cyc) x = 0;
    const unsigned long long c0 = __rdtsc();
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r + kRsLanes <= rows; r += kRsLanes)
      refine_solve_rows8(G.data(), U.data(), W.data(), M.data(), order.data() + r, B, m, rounds, tol, ws,
                         base + kRsLanes * row_words, e.data(), l.data(), st.data(), mo.data(), ns.data(),
                         ubt.data());
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (rep >= 1) tsc += __rdtsc() - c0;
    if (rep >= 1 && dt < best) best = dt;
  }
  double loss = 0.0;
  long swaps = 0, bad = 0;
  for (int r = 0; r < rows; ++r) {
    loss += l[r];
    swaps += ns[r];
    bad += st[r] != 0;
  }
  std::printf("best_s %.9g\ntotal_cycles %llu\nloss %.9g\nswaps %ld\nbad %ld\n", best, tsc, loss, swaps, bad);
  for (int i = 0; i < 16; ++i) std::printf("phase %d %llu\n", i, g_cyc[i]);
  return 0;
}
"""


def build(workdir: Path) -> Path:
    src = workdir / "rs_phases.cpp"
    src.write_text(HARNESS)
    exe = workdir / "rs_phases"
    cxx = os.environ.get("CXX", "g++")
    subprocess.run([cxx, "-O3", "-g0", "-std=c++17", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)], check=True,
                   capture_output=True, text=True)
    return exe


def run(device: torch.device, quick: bool, report=None) -> tuple[list[dict], dict]:
    from pyprune import ops
    from pyprune.ops.refine_solve import cpu_engine_supported
    from pyprune.reference.swap import REL_TOL_LOW

    if device.type != "cpu":
        raise SystemExit("bench_refine_solve_phases times the CPU engine: run it with --device cpu")
    if not (cpu_engine_supported() and shutil.which(os.environ.get("CXX", "g++"))):
        raise SystemExit("bench_refine_solve_phases needs the built CPU engine (an x86-64 CPU with AVX2 and FMA) and "
                         "a C++ compiler (g++)")
    torch.set_num_threads(1)
    peaks = measure_peaks(device, quick)
    rows, cols, B, rounds = (256, 256, 128, 16) if quick else (1024, 1024, 128, 16)
    reps = 1 if quick else REPS
    W, H = layer_problem(rows, cols, device, torch.Generator().manual_seed(0))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        exe = build(work)
        for sp in ("0.5", "2:4"):
            G, U_B, W1, M0 = block_problem(rows, H, W, sp)
            counts = M0.sum(1)
            if not bool((counts == counts[0]).all()):
                raise SystemExit(f"{sp}: rows prune different counts; the harness runs sets of eight of one count")
            m = 4 if sp == "2:4" else 0
            for name, t in (("G", G), ("U", U_B), ("W", W1)):
                t.float().contiguous().numpy().tofile(work / f"{name}.bin")
            M0.to(torch.uint8).contiguous().numpy().tofile(work / "M.bin")
            res = subprocess.run([str(exe), str(rows), str(B), str(m), str(rounds), str(reps),
                                  repr(float(REL_TOL_LOW))],
                                 cwd=work, check=True, capture_output=True, text=True).stdout.split("\n")
            vals = dict(line.split(" ", 1) for line in res if " " in line and not line.startswith("phase"))
            cyc = {int(p.split()[1]): int(p.split()[2]) for p in res if p.startswith("phase")}
            # the op on the same block: the harness must compute what the op computes
            E, loss, final, made = ops.refine_solve(G, U_B, W1, M0, rounds, m=m, backend="cpp")
            op_loss, op_swaps = float(loss.double().sum()), int(made.sum())
            if (int(vals["bad"]) or not abs(float(vals["loss"]) - op_loss) <= 1e-5 * abs(op_loss)
                    or int(vals["swaps"]) != op_swaps):
                raise SystemExit(f"{sp}: the harness (loss {vals['loss']}, {vals['swaps']} exchanges) is not the op "
                                 f"(loss {op_loss}, {op_swaps} exchanges)")
            total = sum(cyc.values())
            c = int(counts[0])
            K = B - c
            for idx, name, fma in PHASES:
                f = fma(c, K, B) if fma else None
                out.append(dict(sparsity=sp, phase=name, share=cyc.get(idx, 0) / total,
                                mcycles_per_1k_rows=cyc.get(idx, 0) / reps / rows * 1024 / 1e6,
                                fma_per_cycle=(f * rows / 8 * reps / cyc[idx]) if f and cyc.get(idx)
                                else None))
            out.append(dict(sparsity=sp, phase="engine (best pass)", share=1.0,
                            mcycles_per_1k_rows=total / reps / rows * 1024 / 1e6,
                            seconds=float(vals["best_s"]), exchanges_per_row=op_swaps / rows,
                            cycles_per_s=int(vals["total_cycles"]) / reps / float(vals["best_s"])))
            if report:
                report(out, peaks)
    return out, peaks


def main():
    bench_main("bench_refine_solve_phases", run,
               ["sparsity", "phase", "share", "mcycles_per_1k_rows", "fma_per_cycle", "seconds", "exchanges_per_row",
                "cycles_per_s"],
               ["one block of bench_refine_solve's layer problem (1024 rows, B = 128, shrink 0), 16 exchanges at most; "
                "cycles: the time-stamp counter (cycles_per_s: its rate against the wall clock), summed over "
                f"{REPS} passes after a warm-up",
                "fma_per_cycle: the phase's multiply-adds / 8 lanes / its cycles (at most 2 on this kind of core); "
                "empty for data movement and for the exchanges (their count varies per row)",
                "engine (best pass): the fastest pass's wall-clock seconds; the harness's losses and exchanges equal "
                "the op's (ops.refine_solve, backend='cpp') on the same block, checked"],
               __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
