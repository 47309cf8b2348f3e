"""benchmarks/bench_refine_solve_phases.py: the engine's header compiled with its phase timers computes what the op
computes (the script checks losses and exchanges against ops.refine_solve and exits otherwise), and its table
accounts for every cycle of the engine, once per phase."""
import os
import shutil
import subprocess
import sys

import pytest

from pyprune.ops.refine_solve import cpu_engine_supported

from .util import ROOT, load_benchmark

pytestmark = pytest.mark.skipif(not (cpu_engine_supported() and shutil.which(os.environ.get("CXX", "g++"))),
                                reason="needs the built CPU engine (AVX2 and FMA) and g++")


def test_quick_run_matches_the_op_and_accounts_for_every_cycle(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_refine_solve_phases.py"),
                          "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    import json
    rows = json.loads((tmp_path / "bench_refine_solve_phases.json").read_text())["rows"]
    bench = load_benchmark("bench_refine_solve_phases")
    for sp in ("0.5", "2:4"):
        mine = [r for r in rows if r["sparsity"] == sp]
        phases = [r for r in mine if r["phase"] != "engine (best pass)"]
        assert [r["phase"] for r in phases] == [name for _, name, _ in bench.PHASES]
        assert sum(r["share"] for r in phases) == pytest.approx(1.0, abs=1e-9)
        assert all(0 <= r["share"] < 1 for r in phases)
        assert sum(r["share"] > 0 for r in phases) >= len(phases) - 1  # every phase ran (the offsets may round to 0)
        fma = [r["fma_per_cycle"] for r in phases if r["fma_per_cycle"] is not None]
        assert len(fma) == 8 and all(0 < f < 64 for f in fma)  # 16 lanes x 4 ports would be absurd
        total = [r for r in mine if r["phase"] == "engine (best pass)"]
        assert len(total) == 1 and total[0]["seconds"] > 0 and total[0]["exchanges_per_row"] > 0


def test_the_timers_are_compiled_out_of_the_op():
    """The op's build never defines PP_RS_PHASE_TIMERS: the markers are no-ops there."""
    src = open(os.path.join(ROOT, "csrc", "kernels", "refine_solve.cuh")).read()
    assert "#if defined(PP_RS_PHASE_TIMERS) && !defined(__CUDACC__)" in src
    for path in ("setup.py", os.path.join("csrc", "cpu", "refine_solve.cpp"), os.path.join("csrc", "bindings.cpp")):
        assert "PP_RS_PHASE_TIMERS" not in open(os.path.join(ROOT, path)).read()
