"""Build and install ssam-kernels: the backend ``ssam_kernels`` and the frontend ``ssam``.

The compiled extension ``ssam_kernels._C`` is optional. It is built from ``csrc/*.cpp`` (C++
CPU ops, CppExtension) plus ``csrc/cuda/*`` when torch has CUDA and a CUDA toolkit is found
(CUDAExtension; ``TORCH_CUDA_ARCH_LIST`` is respected, default "8.0;9.0+PTX"), beside it
``ssam_kernels._host`` from ``csrc/host/*.cpp`` (a small CPython module for the planned step's
per-step host work). Environment:

* ``SSAM_BUILD_EXT=0``: never build it; ``=1``: fail the install unless the whole extension
  builds (its CUDA part too, where torch has CUDA); unset: try, fall back to the C++ CPU ops if
  the CUDA part fails, and to the pure-Python package if those fail too, with a warning.
* ``CUDA_HOME``: the CUDA toolkit root, where it is not found by itself (see ``cuda_home``).

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already
installed: in pip's isolated build environment there is no torch, and the build stops with a
message saying so (``SSAM_BUILD_EXT=0`` installs without the extension instead).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_EXT = os.environ.get("SSAM_BUILD_EXT", "").strip()
if BUILD_EXT not in ("", "0", "1"):
    sys.exit(f"SSAM_BUILD_EXT must be 0, 1 or unset, got {BUILD_EXT!r}")

# relative to the project root, as setuptools wants them
CPU_SOURCES = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT))
CUDA_SOURCES = sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT) + glob.glob("csrc/cuda/*.cpp", root_dir=ROOT))
HOST_SOURCES = sorted(glob.glob("csrc/host/*.cpp", root_dir=ROOT))
# no FMA contraction: the kernels must round exactly as the references do
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--fmad=false"]
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # Ampere and Hopper cubins, plus PTX that newer GPUs JIT


def _warn(message: str) -> None:
    print(f"ssam-kernels setup: {message}", file=sys.stderr)


def _has_runtime_header(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _nvcc_top() -> str | None:
    """The toolkit root nvcc itself reports (``TOP=`` of a dry run): right even where the
    ``nvcc`` on the PATH is a wrapper script, whose location says nothing about the toolkit."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def cuda_home() -> tuple[str | None, list[str]]:
    """(CUDA toolkit root holding ``include/cuda_runtime.h`` or None, the places looked at).

    ``CUDA_HOME``/``CUDA_PATH`` win when set; then the folder above the ``bin/`` of the ``nvcc``
    on the PATH (torch's own guess, wrong for a wrapper script), the root that nvcc reports,
    and ``/usr/local/cuda``.
    """
    looked = []
    for name in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(name)
        if home:
            if _has_runtime_header(home):
                return home, looked + [home]
            looked.append(f"{name}={home}")
    nvcc = shutil.which("nvcc")
    beside_nvcc = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    for home in (beside_nvcc, _nvcc_top(), "/usr/local/cuda"):
        if home and home not in looked:
            looked.append(home)
            if _has_runtime_header(home):
                return home, looked
    return None, looked


def _extensions(with_cuda: bool) -> list:
    """Fresh Extensions: ``ssam_kernels._C`` (C++ CPU ops, plus the CUDA ops if ``with_cuda``)
    and ``ssam_kernels._host`` (a CPython module: the planned step's per-step host work)."""
    from torch.utils import cpp_extension

    host = cpp_extension.CppExtension("ssam_kernels._host", HOST_SOURCES, extra_compile_args=list(CXX_FLAGS))
    if not with_cuda:
        return [cpp_extension.CppExtension("ssam_kernels._C", CPU_SOURCES, include_dirs=[os.path.join(ROOT, "csrc")],
                                           extra_compile_args=list(CXX_FLAGS)), host]
    return [cpp_extension.CUDAExtension("ssam_kernels._C", CPU_SOURCES + CUDA_SOURCES,
                                        include_dirs=[os.path.join(ROOT, "csrc")],
                                        define_macros=[("SSAM_WITH_CUDA", "1")],
                                        extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)}), host]


class BuildExt(build_ext):
    """Builds ``ssam_kernels._C`` with torch's BuildExtension, chosen when the command runs (so
    ``setup.py`` itself imports no torch): CUDA ops where torch has CUDA and a toolkit is found,
    else, or if the CUDA part fails, the C++ CPU ops alone from a fresh Extension and a fresh
    compiler; warns and installs without the extension if that fails too (unless
    ``SSAM_BUILD_EXT=1``)."""

    def run(self):
        try:
            import torch
        except Exception as exc:
            sys.exit(
                f"ssam-kernels setup: torch is not importable in the build environment ({exc}). Install torch "
                "first, then this package with `pip install --no-build-isolation ...` (pip's build isolation "
                "hides the installed torch), or set SSAM_BUILD_EXT=0 to install without the compiled extension."
            )
        with_cuda = False
        if torch.version.cuda is not None and CUDA_SOURCES:
            home, looked = cuda_home()
            if home is None:
                message = (f"torch {torch.__version__} has CUDA {torch.version.cuda}, but no CUDA toolkit with "
                           f"include/cuda_runtime.h was found (looked in: {', '.join(looked) or 'nothing'}); "
                           "set CUDA_HOME to the toolkit's root to build the CUDA ops")
                if BUILD_EXT == "1":
                    sys.exit(f"ssam-kernels setup: {message}")
                _warn(message + "; building the C++ CPU ops only")
            else:
                skipped = [name for name in looked if name.startswith(("CUDA_HOME=", "CUDA_PATH="))]
                if skipped:
                    _warn(f"{', '.join(skipped)} has no include/cuda_runtime.h; building against the toolkit in {home}")
                os.environ["CUDA_HOME"] = home  # before torch's cpp_extension guesses it on import
                os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
                with_cuda = True
        from torch.utils import cpp_extension

        if with_cuda:
            cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # in case it was imported before
        try:
            self._build(cpp_extension, with_cuda)
            return
        except Exception as exc:
            if BUILD_EXT == "1":
                raise
            if not with_cuda:
                _warn(f"building ssam_kernels._C failed, installing without it: {exc}")
                return
            _warn(f"building the CUDA part of ssam_kernels._C failed ({exc}); retrying with the C++ CPU ops only")
        try:
            self._build(cpp_extension, with_cuda=False)
        except Exception as exc:
            _warn(f"building ssam_kernels._C failed, installing without it: {exc}")

    def _build(self, cpp_extension, with_cuda: bool) -> None:
        """One build attempt with a new torch BuildExtension command on a new Extension."""
        self.extensions = _extensions(with_cuda)
        self.distribution.ext_modules = self.extensions
        cmd = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)(self.distribution)
        for name in ("build_lib", "build_temp", "inplace", "debug", "force", "parallel", "plat_name"):
            setattr(cmd, name, getattr(self, name))
        cmd.ensure_finalized()
        cmd.extensions = self.extensions
        cmd.run()


def _extension_setup() -> dict:
    """``ext_modules``/``cmdclass`` for ``ssam_kernels._C``, or {} where it is not built. The
    Extension given here is a placeholder with the sources (so an sdist carries them); the
    command replaces it with torch's at build time."""
    if BUILD_EXT == "0":
        return {}
    if not CPU_SOURCES:
        if BUILD_EXT == "1":
            sys.exit("SSAM_BUILD_EXT=1 but csrc/ has no C++ sources")
        return {}
    from setuptools import Extension

    return {"ext_modules": [Extension("ssam_kernels._C", CPU_SOURCES + CUDA_SOURCES),
                            Extension("ssam_kernels._host", HOST_SOURCES)],
            "cmdclass": {"build_ext": BuildExt}}


def check_setuptools() -> None:
    """pip builds a wheel through setuptools' bdist_wheel, built in from setuptools 70.1 (the
    ``wheel`` package before). With ``--no-build-isolation`` pip does not install
    pyproject.toml's build requirements, so an older setuptools fails with "invalid command
    'bdist_wheel'": say what to do instead."""
    import setuptools

    if not {"bdist_wheel", "editable_wheel"} & set(sys.argv[1:]):  # (sdist, egg_info: no wheel)
        return
    version = tuple(int(v) for v in re.findall(r"\d+", setuptools.__version__)[:2])
    if version < (70, 1):
        try:
            import wheel  # noqa: F401
        except ImportError:
            sys.exit(f"ssam-kernels: building needs setuptools >= 70.1 (this is {setuptools.__version__}) or the "
                     "wheel package: python3 -m pip install -U setuptools")


# setuptools runs this file as __main__ (pip, build_meta); tests import it for its helpers
if __name__ == "__main__":
    check_setuptools()
    setup(
        name="ssam-kernels",
        version="0.1.0",
        description="Sparse SAM (sharpness-aware minimization with a sparse perturbation) for PyTorch: "
                    "GPU kernels, optimizers and benchmarks",
        long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=["ssam_kernels", "ssam_kernels.ops", "ssam_kernels.triton_ops", "ssam", "ssam.models", "ssam_bench"],
        # the benchmark suite (the ssam-bench command) is the benchmarks/ folder, installed as ssam_bench
        package_dir={"ssam_kernels": "ssam_kernels", "ssam": "python/ssam", "ssam_bench": "benchmarks"},
        install_requires=[
            "torch>=2.11",
            "ninja",  # (the extension's builds after this install: pip install -e . again)
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
