"""Backend selection: which implementation of an op runs for a given call.

Every op has a plain-PyTorch ``torch`` implementation (the reference). Faster backends
(``triton`` kernels, the compiled extension ``ext``) sit beside it in the op's table
(:class:`OpBackends`, held by the op's dispatcher kernels: see :mod:`ssam_kernels._library`).
``auto`` picks the first backend, in :data:`AUTO_ORDER` for the tensors' device type (or the
op's own order), whose runtime is importable. ``SSAM_BACKEND`` names a preferred backend for every
call that passes ``backend="auto"``: used for each op it implements on that device, the others
fall back to the ``auto`` order. An explicit ``backend=`` is strict: it runs or raises.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

BACKENDS = ("auto", "torch", "triton", "ext")
ENV_VAR = "SSAM_BACKEND"

# Preference of `auto`, per device type; device types not listed use the reference.
# cuda: Triton first; where the CUDA extension beats it is for GPU benchmark data to decide (on
#   the H200 the extension's list ops ran the ResNet-18 perturbation cycle faster, 1.971 against
#   2.838 ms, benchmarks/results/nvidia-h200/perturb.md, but both far from bandwidth before the
#   planned step; the order waits for a measurement of the kernels as they are now).
# cpu: the C++ kernels beat the reference on every op they implement, measured on the CI kind
#   of machine (2 x86-64 cores, torch 2.13 CPU): grad_norm + perturb_ + restore_ of ResNet-18
#   88 ms vs 397 ms and ViT-B 659 vs 1424 ms (benchmarks/bench_perturb.py --device cpu);
#   grad_norm of 11M 5.8 vs 17.7 ms, compress_24 of 4096x4096 fp16 62 vs 198 ms,
#   decompress_24 7.7 vs 68 ms, nm_mask 2:4 of 4096x4096 266 vs 279 ms.
AUTO_ORDER = {
    "cuda": ("triton", "ext", "torch"),
    "cpu": ("ext", "torch"),
}


def on_device(device: torch.device):
    """A context that makes ``device`` the current CUDA device where it is not (nothing
    otherwise). Triton launches on the current device and its current stream, whatever device
    the tensors are on: without this, tensors on ``cuda:1`` while ``cuda:0`` is current would be
    read through another device's addresses. (torch's own ops and the extension's guard
    themselves.)"""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


def eager_when_traced(fn):
    """``fn``, run eagerly where torch.compile traces a call to it (its graph breaks there): for
    work no op schema can declare or trace (kernels that write through address tables, which a
    graph would drop as ops without effects; cuSPARSELt's searches and padded sizes). The check
    costs 0.4 us a call in eager mode; the disabled twin is made on the first traced call (making
    it imports torch._dynamo: 1.3 s at import time otherwise)."""
    twin: list = []

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():  # (spelled so: Dynamo folds this call, not an alias)
            if not twin:
                twin.append(torch.compiler.disable(fn))
            return twin[0](*args, **kwargs)
        return fn(*args, **kwargs)
    return run


class BackendUnavailableError(ValueError):
    """A backend was requested with ``backend=`` that cannot run this op here (``SSAM_BACKEND``
    only states a preference: ``auto`` falls back where it cannot run)."""


@functools.lru_cache(maxsize=None)
def triton_version() -> str | None:
    """Version of the importable Triton, or None. Looked up without importing triton."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:  # a source checkout without metadata still counts as present
        return "unknown"


@functools.lru_cache(maxsize=None)
def extension_error() -> str | None:
    """None when ``ssam_kernels._C`` loads, else why it does not (never raises).

    The library registers its ops with ``TORCH_LIBRARY`` and need not be a Python module, so
    it is loaded with ``torch.ops.load_library`` (as torchao does), not imported.
    """
    try:
        spec = importlib.util.find_spec("ssam_kernels._C")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if spec is None or not spec.origin:
        return "ssam_kernels._C was not built (see SSAM_BUILD_EXT in the README)"
    try:
        torch.ops.load_library(spec.origin)
        importlib.import_module("ssam_kernels.ext_ops")  # launchers + fake implementations
    except Exception as exc:  # ABI mismatch, missing CUDA libraries...
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_interpreting() -> bool:
    """Whether Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1``, read at each call)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _has_cpu_bf16(values) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.dtype == torch.bfloat16 and v.device.type == "cpu":
                return True
        elif isinstance(v, (list, tuple)) and _has_cpu_bf16(v):
            return True
    return False


def lazy(module: str, name: str) -> Callable:
    """``module.name``, imported on first call (so importing an op never imports Triton)."""
    triton_kernel = module.startswith("ssam_kernels.triton_ops")

    def call(*args, **kwargs):
        # numpy, which the interpreter computes in, has no bfloat16: refuse, do not compute garbage.
        # The environment itself, not triton_interpreting(): the compile tier's sweep patches
        # that to record GPU launches of CPU tensors, which it compiles and never runs.
        interpreted = os.environ.get("TRITON_INTERPRET", "") == "1"
        if triton_kernel and interpreted and _has_cpu_bf16(list(args) + list(kwargs.values())):
            raise BackendUnavailableError(
                f"{name}: Triton's CPU interpreter (TRITON_INTERPRET=1) cannot run bfloat16 tensors; "
                "use backend='torch' or 'ext' on CPU, or a GPU"
            )
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def extension_has_kernel(op: str, device_type: str) -> bool:
    """Whether the loaded extension registered a kernel of ``ssam::op`` for the device type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    try:
        return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"ssam::{op}", key)
    except RuntimeError:  # no such op
        return False


def _runtime_available(backend: str) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        return triton_version() is not None
    if backend == "ext":
        return extension_error() is None
    return False


@dataclass
class OpBackends:
    """The implementations of one op, keyed by backend name.

    ``devices`` maps a backend to the device types it runs on (None: any device).
    """

    name: str
    impls: dict[str, Callable] = field(default_factory=dict)
    devices: dict[str, frozenset[str] | None] = field(default_factory=dict)
    ext_op: str | None = None  # the ssam:: op whose kernels decide where ``ext`` runs (default: name)
    auto_order: dict[str, tuple[str, ...]] | None = None  # this op's own AUTO_ORDER entries, where it differs

    def register(self, backend: str, fn: Callable, devices: tuple[str, ...] | None = None) -> None:
        if backend not in BACKENDS[1:]:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS[1:]}")
        self.impls[backend] = fn
        self.devices[backend] = None if devices is None else frozenset(devices)

    def _usable(self, backend: str, device_type: str) -> bool:
        if backend not in self.impls or not _runtime_available(backend):
            return False
        devs = self.devices[backend]
        if devs is None and backend == "triton":  # GPUs, or CPU tensors under the interpreter
            return device_type == "cuda" or (device_type == "cpu" and triton_interpreting())
        if devs is None and backend == "ext":  # what the build registered (a CPU-only build has no CUDA kernels)
            return extension_has_kernel(self.ext_op or self.name, device_type)
        return devs is None or device_type in devs

    def resolve(self, backend: str, device: torch.device) -> str:
        """Name of the backend that runs this op for tensors on ``device``."""
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            env = os.environ.get(ENV_VAR, "").strip()
            if env and env != "auto":
                if env not in BACKENDS:
                    raise ValueError(f"{ENV_VAR}={env!r} is not one of {BACKENDS}")
                if self._usable(env, device.type):
                    return env
            order = (self.auto_order or {}).get(device.type) or AUTO_ORDER.get(device.type, ("torch",))
            for cand in order:
                if self._usable(cand, device.type):
                    return cand
            return "torch"
        if not self._usable(backend, device.type):
            raise BackendUnavailableError(self._why_unusable(backend, device.type))
        return backend

    def _why_unusable(self, backend: str, device_type: str) -> str:
        have = sorted(b for b in self.impls if self._usable(b, device_type))
        if backend not in self.impls:
            why = f"{self.name} has no {backend!r} implementation"
        elif not _runtime_available(backend):
            why = (
                "triton is not installed"
                if backend == "triton"
                else f"the compiled extension ssam_kernels._C did not load ({extension_error()})"
            )
        else:
            why = f"its {backend!r} implementation does not run on {device_type} tensors"
        return f"backend={backend!r} cannot run {self.name} here: {why}; usable here: {have}"

    def __call__(self, backend: str, device: torch.device) -> Callable:
        return self.impls[self.resolve(backend, device)]
