"""Build pyprune. The compiled extension ``pyprune._C`` holds the C++ CPU ops (always) and the CUDA kernels (only
when torch is a CUDA build and nvcc/CUDA_HOME are found). Install with ``pip install --no-build-isolation -e .``:
torch is deliberately not a build requirement (build isolation would pull a multi-GB CUDA torch), and a build that
cannot import torch stops with that fix instead of installing without pyprune._C (PYPRUNE_PURE_PYTHON=1 does that on
purpose)."""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        # No torch in this build: an isolated build (plain `pip install .`) or torch not installed yet. Installing
        # without pyprune._C would run every op's torch reference, 20-40x slower for the joint method, with nothing
        # saying so at install time: refuse, naming the fix. An sdist needs no torch; PYPRUNE_PURE_PYTHON=1 asks
        # for the package without the compiled ops on purpose.
        if os.environ.get("PYPRUNE_PURE_PYTHON") == "1" or "sdist" in sys.argv:
            return [], {}
        raise RuntimeError(
            "pyprune builds its compiled ops (pyprune._C) against the torch it will run with, and torch is not "
            "importable in this build. Install torch first, then build without pip's build isolation: "
            "pip install torch && pip install --no-build-isolation <pyprune source or sdist> (the README's "
            "`make install` does both). PYPRUNE_PURE_PYTHON=1 installs without the compiled ops: every op then runs "
            "its plain torch reference, much slower.")
    cpu_sources = _rel("csrc/bindings.cpp") + _rel("csrc/cpu/*.cpp")
    if not cpu_sources:
        return [], {}
    include_dirs = [os.path.join(HERE, "csrc")]
    # No -std flag: torch's BuildExtension adds the C++ standard its own headers were compiled with (C++20 since
    # torch 2.10). Forcing -std=c++17 built, but on torch 2.11 + CUDA every TORCH_CHECK message that formatted a
    # number segfaulted (measured on an H200: the inline c10::str helpers then differ between torch and pyprune._C).
    cxx_flags = ["-O3", "-g0"]
    cuda_home = cpp_extension.CUDA_HOME or (os.environ.get("CUDA_HOME") if torch.version.cuda else None)
    want_cuda = os.environ.get("PYPRUNE_CUDA", "auto")
    use_cuda = want_cuda != "0" and torch.version.cuda is not None and cuda_home is not None
    if want_cuda == "1" and not use_cuda:
        raise RuntimeError("PYPRUNE_CUDA=1 but torch is not a CUDA build or CUDA_HOME/nvcc was not found")
    if use_cuda:
        archs = os.environ.get("PYPRUNE_CUDA_ARCHS", "90")
        nvcc_flags = ["-O3", "--use_fast_math"] + [
            f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs.split(",")]
        ext = cpp_extension.CUDAExtension(
            "pyprune._C", cpu_sources + _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp"),
            include_dirs=include_dirs, define_macros=[("PYPRUNE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
    else:
        ext = cpp_extension.CppExtension("pyprune._C", cpu_sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="pyprune",
    version="0.1.0",
    description="One-shot LLM pruning with the joint multi-weight OBS update (Zhao et al., EMNLP Findings 2024)",
    python_requires=">=3.10",
    packages=["pyprune", "pyprune.reference", "pyprune.ops", "pyprune.algorithms", "pyprune.models",
              "pyprune.triton_kernels", "pyprune.integrations", "pyprune.docs"],
    package_dir={"pyprune.triton_kernels": "triton_kernels", "pyprune.docs": "docs"},
    # The texts the defaults read (pyprune/shared, with their licences: see its README.md) and the maths the code
    # refers to (docs/ALGORITHM.md, installed as pyprune/docs/ALGORITHM.md). MANIFEST.in puts the same in the sdist.
    package_data={"pyprune": ["shared/README.md", "shared/data/*/*.txt"], "pyprune.docs": ["*.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch", "numpy", "tqdm", "safetensors", "transformers"],
    extras_require={"triton": ["triton"], "gguf": ["gguf", "accelerate"]},
    entry_points={"console_scripts": ["pyprune = pyprune.cli:main"]},
)
