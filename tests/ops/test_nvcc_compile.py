"""Compile checks for the CUDA sources on machines without a GPU (skipped where nvcc is absent).

Every csrc/cuda/*.cu is compiled for sm_90 with the flags the CUDA extension build uses (torch adds the
__CUDA_NO_HALF*__ defines; setup.py adds --use_fast_math). The torch glue csrc/cuda/ops_cuda.cpp is syntax-checked
with the host compiler against the installed torch headers; a CPU-only torch wheel lacks one generated header of
c10/cuda, which is stubbed for the check.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr", "--use_fast_math"]


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_include() -> Path | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home) / "include"
    return None


NVCC = _nvcc()


def test_there_are_cuda_sources():
    assert CU_FILES, "no csrc/cuda/*.cu files"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(source, tmp_path):
    cmd = [NVCC, "-arch=sm_90", "-c", "-O3", "-std=c++20", "-I", str(ROOT / "csrc"), *TORCH_NVCC_FLAGS,
           "-Xptxas", "-warn-spills", str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{proc.stderr[-4000:]}"
    assert "warning" not in proc.stderr.lower(), f"nvcc warnings on {source.name}:\n{proc.stderr[-4000:]}"
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None,
                    reason="needs g++ and the CUDA runtime headers")
def test_cuda_glue_syntax(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    incs = [str(tmp_path)] if not torch.version.cuda else []
    incs += include_paths() + [str(_cuda_include()), str(ROOT / "csrc"), sysconfig.get_paths()["include"]]
    for glue in sorted((ROOT / "csrc" / "cuda").glob("*.cpp")):
        cmd = ["g++", "-std=c++20", "-fsyntax-only", "-w", "-DPYPRUNE_WITH_CUDA"] + [f"-I{i}" for i in incs]
        proc = subprocess.run(cmd + [str(glue)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{glue.name} does not compile:\n{proc.stderr[-4000:]}"
