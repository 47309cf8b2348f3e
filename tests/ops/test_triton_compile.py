"""The Triton exchange engine and masked solve compiled for a Hopper GPU (sm_90) on this machine, no GPU needed: the
interpreter that runs the other Triton tests accepts code the compiler rejects (a loop-carried value changing type,
a tile that needs more shared memory than an SM has), so every tile shape class is compiled here, in a fresh
interpreter without TRITON_INTERPRET, with Triton's bundled ptxas."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# H100/H200: the most shared memory one block may use (227 KB)
SM90_SHARED_MAX = 232448

SCRIPT = r"""
import json, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from pyprune.triton_kernels.refine_solve import _refine_solve_kernel, _launch_options
from pyprune.triton_kernels.masked_solve import _masked_solve_kernel

sig = {"G": "*fp32", "U_B": "*fp32", "W": "*bf16", "M": "*u8", "E": "*fp32", "L": "*fp32", "S": "*i32", "MO": "*u8",
       "NS": "*i32", "ROWS": "*i32", "B": "i32", "stride_w": "i32", "stride_m": "i32", "rounds": "i32", "m": "i32",
       "tol": "fp32", "BP": "constexpr", "BC": "constexpr", "BK": "constexpr", "CH": "constexpr"}
ptxas = get_ptxas(90)
ptxas = getattr(ptxas, "path", None) or ptxas[0]
out = []
for B, BC, BK in json.loads(sys.argv[1]):
    consts, opts = _launch_options(B, BC, BK)
    k = triton.compile(ASTSource(fn=_refine_solve_kernel, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    info = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"], capture_output=True,
                          text=True).stderr
    spill = [l for l in info.splitlines() if "spill stores" in l]
    out.append(dict(B=B, BC=BC, BK=BK, shared=k.metadata.shared,
                    spill_stores=int(spill[0].split("bytes spill stores")[0].split(",")[-1]) if spill else None))
# the masked solve, which shares the compaction and the sweep (triton_kernels/_common.py)
msig = {"G": "*fp32", "U": "*fp32", "W": "*bf16", "M": "*u8", "E": "*fp32", "L": "*fp32", "S": "*i32", "ROWS": "*i32",
        "B": "i32", "stride_w": "i32", "stride_m": "i32", "BP": "constexpr", "BC": "constexpr", "CH": "constexpr"}
k = triton.compile(ASTSource(fn=_masked_solve_kernel, signature=msig, constexprs=dict(BP=128, BC=64, CH=32)),
                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
out.append(dict(kernel="masked_solve", BC=64, shared=k.metadata.shared))
print(json.dumps(out))
"""


def test_solve_kernels_compile_for_sm90():
    # the tile classes: the 64 x 64 tiles of a 50% or 2:4 block of 128, the smallest, a square 128 one, the
    # rank-one path of c > 128 (B = 256) and the widest kept side
    cases = [(128, 64, 64), (8, 16, 16), (128, 128, 128), (256, 256, 64), (256, 16, 256)]
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], capture_output=True, text=True, env=env,
                          cwd=root, timeout=600)
    if proc.returncode and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("Triton's bundled ptxas is missing")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in got:
        assert r["shared"] <= SM90_SHARED_MAX, f"{r}: more shared memory than an sm_90 block may use"
    assert got[-1]["kernel"] == "masked_solve"
    main = next(r for r in got if (r.get("BC"), r.get("BK")) == (64, 64))
    assert main["spill_stores"] == 0, f"the 64 x 64 tiles spill: {main}"
