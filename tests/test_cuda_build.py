"""Compile checks of the CUDA sources on machines without a GPU (CI): the torch-free kernels
with plain nvcc for sm_80 and sm_90, and the tensor glue against the CPU torch headers plus
the CUDA runtime headers. Nothing runs; the cuda tier runs them on a GPU."""

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension as cpp_extension

pytestmark = pytest.mark.cpu

ROOT = os.path.join(os.path.dirname(__file__), "..")
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")


@needs_nvcc
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))))
def test_kernels_compile_for_sm80_and_sm90(source, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "--fmad=false", "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_90,code=sm_90", "-I", os.path.join(ROOT, "csrc"), "-c", source,
           "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr.lower(), out.stderr


def _cuda_include() -> str:
    """The CUDA toolkit's include directory (nvcc on the PATH may be a wrapper script)."""
    for home in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    pytest.skip("CUDA runtime headers not found")


@needs_nvcc
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))))
def test_glue_compiles_against_cpu_torch_headers(source):
    cuda_include = _cuda_include()
    includes = cpp_extension.include_paths() + [cuda_include, os.path.join(ROOT, "csrc"),
                                                sysconfig.get_paths()["include"]]
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", *[f"-I{i}" for i in includes], source]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
