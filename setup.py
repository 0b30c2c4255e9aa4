"""Build and install ssam-kernels: the backend ``ssam_kernels`` and the frontend ``ssam``.

The compiled extension ``ssam_kernels._C`` is optional. It is built from ``csrc/*.cpp`` (C++
CPU ops, CppExtension) plus ``csrc/cuda/*.cu`` when torch has CUDA and nvcc is found
(CUDAExtension; ``TORCH_CUDA_ARCH_LIST`` is respected, default "8.0;9.0"). Environment:

* ``SSAM_BUILD_EXT=0``: never build it; ``=1``: fail the install if it cannot be built;
  unset: try, and on any failure warn and install the pure-Python package.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already
installed instead of fetching another one.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_EXT = os.environ.get("SSAM_BUILD_EXT", "").strip()
if BUILD_EXT not in ("", "0", "1"):
    sys.exit(f"SSAM_BUILD_EXT must be 0, 1 or unset, got {BUILD_EXT!r}")


def _warn(message: str) -> None:
    print(f"ssam-kernels setup: {message}", file=sys.stderr)


def _extension_setup() -> dict:
    """``ext_modules``/``cmdclass`` for ``ssam_kernels._C``, or {} where it is not built."""
    if BUILD_EXT == "0":
        return {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if not cpp:
        if BUILD_EXT == "1":
            sys.exit("SSAM_BUILD_EXT=1 but csrc/ has no C++ sources")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch missing or broken: install the pure-Python package
        if BUILD_EXT == "1":
            raise
        _warn(f"not building ssam_kernels._C ({exc})")
        return {}
    cu = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    sources = cpp + (cu + sorted(glob.glob("csrc/cuda/*.cpp")) if with_cuda else [])
    ext = kind(
        "ssam_kernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("SSAM_WITH_CUDA", "1")] if with_cuda else [],
        # no FMA contraction: the kernels must round exactly as the references do
        extra_compile_args={"cxx": ["-O3", "-ffp-contract=off"], "nvcc": ["-O3", "--fmad=false"]}
        if with_cuda else ["-O3", "-ffp-contract=off"],
    )

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
                return
            except Exception as exc:
                if BUILD_EXT == "1":
                    raise
                if not with_cuda:
                    _warn(f"building ssam_kernels._C failed, installing without it: {exc}")
                    return
                _warn(f"building the CUDA part of ssam_kernels._C failed ({exc}); retrying with the C++ CPU ops only")
            ext.sources = list(cpp)
            ext.define_macros = []
            ext.extra_compile_args = ["-O3", "-ffp-contract=off"]
            try:
                super().run()
            except Exception as exc:
                _warn(f"building ssam_kernels._C failed, installing without it: {exc}")

    BuildExt = BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExt}}


setup(
    name="ssam-kernels",
    version="0.1.0",
    description="Fast Sparse SAM (sharpness-aware minimization with sparse perturbation) for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["ssam_kernels", "ssam_kernels.ops", "ssam_kernels.triton_ops", "ssam", "ssam.models", "ssam_bench"],
    # the benchmark suite (the ssam-bench command) is the benchmarks/ folder, installed as ssam_bench
    package_dir={"ssam_kernels": "ssam_kernels", "ssam": "python/ssam", "ssam_bench": "benchmarks"},
    install_requires=[
        "torch>=2.11",
        "ninja",
        "pybind11",
        "nvidia-ml-py",
        "tqdm",
        "scikit-learn",
        "matplotlib",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "triton>=3.6"],
    },
    entry_points={"console_scripts": ["ssam-train=ssam.train:main", "ssam-bench=ssam_bench.cli:main"]},
    **_extension_setup(),
)
