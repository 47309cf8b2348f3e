#!/usr/bin/env bash
# One command for a CUDA machine with torch, triton and nvcc installed (no network, no .venv of this repo needed):
#   1. build pyprune with its CUDA kernels (PYPRUNE_CUDA=1),
#   2. run the GPU tests (pytest tests/ops -k "cuda or triton or native"),
#   3. run the three kernel benchmarks at full size (Llama-2-70B shapes),
# writing logs and results under ${OUT:-benchmarks/results} and printing a short summary at the end. A failing step
# is reported and the suite goes on; the exit code is 1 if any step failed. Everything is budgeted to finish
# inside 10 minutes (SUITE_SECONDS, default 580).
# Usage: bash benchmarks/gpu_suite.sh     PYTHON=/path/to/python3 to choose the interpreter, QUICK=1 for small shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RESULTS="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export PYPRUNE_CUDA=1 PYPRUNE_CUDA_ARCHS="${PYPRUNE_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
QUICK_FLAG=()
[[ "${QUICK:-0}" == 1 ]] && QUICK_FLAG=(--quick)
BUDGET="${SUITE_SECONDS:-580}"
SUMMARY=()
FAILED=0

# step NAME LIMIT_SECONDS COMMAND...: run with a timeout (capped by what is left of the budget), log to
# $RESULTS/NAME.log, show the log's tail, record the outcome.
step() {
  local name=$1 limit=$2 rc=0 t0=$SECONDS
  shift 2
  local left=$((BUDGET - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    SUMMARY+=("$(printf '%-20s SKIPPED (time budget spent)' "$name")")
    FAILED=1
    return 0
  fi
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1 || rc=$?
  tail -n 30 "$RESULTS/$name.log"
  local what=ok
  ((rc == 124)) && what="TIMEOUT after ${limit}s"
  ((rc != 0 && rc != 124)) && what="FAILED (exit $rc)"
  SUMMARY+=("$(printf '%-20s %-24s %4ds  log: %s' "$name" "$what" $((SECONDS - t0)) "$RESULTS/$name.log")")
  ((rc == 0)) || FAILED=1
  return 0
}

echo "python: $(command -v "$PY")  CUDA_HOME=$CUDA_HOME  results: $RESULTS"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" || true
nvcc --version | tail -n 1 || true

# 1. Build. An editable install maps pyprune.triton_kernels (needed by backend="triton"); if pip cannot install
#    here, build in place instead (the C++/CUDA ops still work from the checkout).
step build 240 "$PY" -m pip install --no-build-isolation --no-deps --no-input -e .
if ! "$PY" -c "import pyprune._C" 2>/dev/null; then
  step build_inplace 240 "$PY" setup.py build_ext --inplace
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
step check_cuda_ops 60 "$PY" -c "
import torch, pyprune.ops
from pyprune.ops._backend import native_has
missing = [op for op in ('nm_select', 'masked_solve', 'hessian_update') if not native_has(op, torch.device('cuda'))]
assert not missing, f'pyprune._C has no CUDA kernel for {missing}'
print('CUDA kernels registered for nm_select, masked_solve, hessian_update')"

# 2. GPU tests (the native-op tests run on cpu and cuda; Triton tests run compiled, not interpreted).
step tests 180 "$PY" -m pytest -q -rfE -p no:cacheprovider tests/ops -k "cuda or triton or native"

# 3. Benchmarks at full size.
step bench_hessian 150 "$PY" benchmarks/bench_hessian.py --device cuda ${QUICK_FLAG[@]+"${QUICK_FLAG[@]}"} --out "$RESULTS"
step bench_masked_solve 130 "$PY" benchmarks/bench_masked_solve.py --device cuda ${QUICK_FLAG[@]+"${QUICK_FLAG[@]}"} --out "$RESULTS"
step bench_nm_select 90 "$PY" benchmarks/bench_nm_select.py --device cuda ${QUICK_FLAG[@]+"${QUICK_FLAG[@]}"} --out "$RESULTS"

# 4. Several GPUs only: distributed solve scaling, 1 vs all GPUs (NCCL, one rank per GPU).
NGPU=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
if ((NGPU >= 2)); then
  step distributed_scaling 150 "$PY" benchmarks/distributed_scaling.py --device cuda --ranks "1,$NGPU" --layers 8 --size 4096 --threads 2 --out "$RESULTS"
fi

# Summary: the outcome of every step, then the goal metrics of the native CUDA kernels.
"$PY" - "$RESULTS" <<'EOF' || true
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
lines = ["| op | shape | backend | time | metric | value | goal |", "|---|---|---|---|---|---|---|"]
def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text())["rows"] if p.exists() else []
for r in load("bench_hessian"):
    if r.get("method") in ("cuda", "triton", "torch_bf16") and "ms" in r:
        lines.append(f"| hessian | cols={r['cols']} k={r['tokens']} | {r['method']} | {r['ms']:.3g} ms | "
                     f"x SparseGPT | {r['vs_sparsegpt']:.3g} | >= 1.8 |")
for r in load("bench_masked_solve"):
    if r.get("backend") in ("cuda", "triton") and "ms" in r:
        lines.append(f"| masked_solve | rows={r['rows']} B={r['B']} {r['mask']} | {r['backend']} | {r['ms']:.3g} ms "
                     f"| x torch | {r['vs_torch'] or 0:.3g} | >= 5 |")
for r in load("bench_nm_select"):
    if r.get("backend") in ("cuda", "triton") and "us" in r:
        lines.append(f"| nm_select | rows={r['rows']} B={r['B']} {r['nm']} {r['mode']} | {r['backend']} | "
                     f"{r['us']:.3g} us | % of copy bw | {r['pct_floor']:.3g} | >= 70 |")
errors = [f"{n}: {r.get('method') or r.get('backend')}: {r['error']}" for n in ("bench_hessian", "bench_masked_solve",
          "bench_nm_select") for r in load(n) if r.get("error")]
text = "\n".join(lines + ([""] + ["errors:"] + sorted(set(errors)) if errors else []))
(out / "gpu_summary.md").write_text(text + "\n")
print("\n" + text)
EOF

echo
echo "== summary ($((SECONDS))s in all; results in $RESULTS)"
printf '%s\n' "${SUMMARY[@]}"
if ((FAILED)); then
  echo "SOME STEPS FAILED: see the logs above"
  exit 1
fi
echo "all steps passed"
