"""Build checks of the extension on machines without a GPU (CI): the torch-free CUDA kernels
compile with plain nvcc for sm_80 and sm_90 (plus PTX) with no stack frame or spill, the tensor
glue compiles warning-free (-Werror) against the installed torch's headers plus the CUDA runtime
headers, and setup.py finds the CUDA toolkit where nvcc is a wrapper script. Nothing runs on a
GPU here; the cuda tier runs the kernels. CI also builds and loads the whole extension against a
CUDA torch wheel (.ci/cuda_ext.sh)."""

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension as cpp_extension

pytestmark = pytest.mark.cpu

ROOT = os.path.join(os.path.dirname(__file__), "..")
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
# torch >= 2.14's headers require C++20 (torch builds extensions with it); older ones accept it
CXX_STD = "-std=c++20"


def _setup_module():
    spec = importlib.util.spec_from_file_location("ssam_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


@needs_nvcc
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))))
def test_kernels_compile_for_sm80_and_sm90_without_stack_or_spills(source, tmp_path):
    cmd = [NVCC, CXX_STD, "-O3", "--fmad=false", "-Xptxas", "-v",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-gencode", "arch=compute_90,code=compute_90",
           "-I", os.path.join(ROOT, "csrc"), "-c", source, "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr.lower(), out.stderr
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", out.stderr)
    assert len(frames) == len(entries) > 0, out.stderr
    assert {arch for _, arch in entries} == {"80", "90"}
    heavy = [(name, arch, f) for (name, arch), f in zip(entries, frames) if f != ("0", "0", "0")]
    assert not heavy, f"kernels with a stack frame or spills (local memory): {heavy}"


def _cuda_include() -> str:
    home, looked = _setup_module().cuda_home()
    if home is None:
        pytest.skip(f"CUDA runtime headers not found (looked in {looked})")
    return os.path.join(home, "include")


@needs_nvcc
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))))
def test_glue_compiles_without_warnings_against_torch_headers(source, tmp_path):
    # a real compile (-O2 -c), not -fsyntax-only: GCC finds dangling pointers to temporaries
    # only while optimising; torch's and CUDA's own headers are system headers here
    system = cpp_extension.include_paths() + [_cuda_include(), sysconfig.get_paths()["include"]]
    cmd = ["g++", CXX_STD, "-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", *[f"-isystem{i}" for i in system],
           f"-I{os.path.join(ROOT, 'csrc')}", "-c", source, "-o", str(tmp_path / "glue.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _fake_toolkit(tmp_path, monkeypatch):
    """A toolkit at an odd place, reachable only through a wrapper script named nvcc that
    reports the real root the way nvcc's dry run does."""
    root = tmp_path / "toolkit"
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    nvcc = wrappers / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ TOP={root}/bin/..' >&2\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrappers}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    return root


def test_setup_finds_the_toolkit_behind_a_wrapper_nvcc(tmp_path, monkeypatch):
    root = _fake_toolkit(tmp_path, monkeypatch)
    home, looked = _setup_module().cuda_home()
    assert home == str(root)
    assert looked[0] == str(tmp_path)  # torch's guess (the wrapper's grandparent) came first and failed


def test_setup_cuda_home_env_wins_and_a_wrong_one_is_reported(tmp_path, monkeypatch):
    root = _fake_toolkit(tmp_path, monkeypatch)
    setup = _setup_module()
    monkeypatch.setenv("CUDA_HOME", str(root))
    assert setup.cuda_home() == (str(root), [str(root)])
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    home, looked = setup.cuda_home()
    assert home == str(root)
    assert looked[0] == f"CUDA_HOME={tmp_path / 'nowhere'}"


# the fp32 kernels that load and store tensor elements (mangled names): perturb, restore, and the
# planned perturb, restore and restore + SGD
_STORING_FP32_KERNELS = ("MoveIffLb1EE", "MoveIffLb0EE", "plan_perturb_kernelIffE", "plan_restore_kernelIfE",
                         "plan_restore_sgd_kernelIfE")


def _loads_before_a_store(body: str) -> int:
    """The most fp32 element loads the PTX ``body`` issues in a row before a store (a store
    ends a run; branches and labels do not)."""
    run = most = 0
    for line in body.splitlines():
        line = re.sub(r"^\s*(@!?%p\d+\s+)?", "", line)
        if re.match(r"ld(\.global)?\.f32\s", line):
            run += 1
        elif re.match(r"st(\.global)?\.", line):
            most, run = max(most, run), 0
    return most


@needs_nvcc
def test_storing_kernels_keep_a_batch_of_loads_in_flight(tmp_path):
    """The tensors' addresses come from tables, so the compiler must assume a store may alias the
    next load: element by element, a thread waited for one load at a time (load, store, load,
    store...), latency-bound far below the memory bandwidth. Each storing kernel loads a batch
    of 8 fp32 elements (16 loads where it reads two tensors) before it stores any."""
    ptx = tmp_path / "kernels.ptx"
    cmd = [NVCC, CXX_STD, "-O3", "--fmad=false", "-arch=sm_90", "-I", os.path.join(ROOT, "csrc"), "-ptx",
           os.path.join(ROOT, "csrc", "cuda", "kernels.cu"), "-o", str(ptx)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    bodies = dict(re.findall(r"\.entry\s+(\w+)\((.*?)\n\}", ptx.read_text(), re.S))
    for kernel in _STORING_FP32_KERNELS:
        found = [body for name, body in bodies.items() if kernel in name]
        assert len(found) == 1, (kernel, len(found))
        assert _loads_before_a_store(found[0]) >= 8, kernel
