"""``torch.ops.ssam_kernels``: one dispatcher op per public op, whichever kernel runs it.

Each op (:class:`Op`) is defined once, with a schema whose last argument is ``str backend``
(``"auto"``, or the override the public function's ``backend=`` passes on), and registered
per device: its ``CPU`` and ``CUDA`` kernels choose among the implementations that run on that
device (the reference ``torch``, the ``triton`` kernels, the compiled extension's ``ext``
kernels, in :data:`~ssam_kernels._backend.AUTO_ORDER` or the op's own order), and a fake
implementation gives output metadata for fake tensors (``torch.compile``, ``opcheck``). So
the dispatcher, ``torch.compile`` and ``FlopCounterMode`` see one op, whatever kernel computes
it (a Triton launch or a Python call is invisible to all three), and a GEMM carries its FLOP
formula.

Defined with ``torch.library.Library`` (a schema, one kernel per dispatch key) rather than
``torch.library.custom_op``: the call costs about 2.5 us instead of about 20 us on the host,
which matters for ops called once per layer per step. The compiled extension's C++ ops live in
their own namespace, ``torch.ops.ssam``; the ``ext`` implementations call them.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from ._backend import ENV_VAR, BackendUnavailableError, OpBackends, extension_error, on_device, triton_version
from ._host_loops import bump_versions

NAMESPACE = "ssam_kernels"
LIB = torch.library.Library(NAMESPACE, "DEF")

# every backend table, by op name: the dispatcher ops, and the SAM step plan's kernel set
TABLES: dict[str, OpBackends] = {}
OPS: dict[str, "Op"] = {}  # the dispatcher ops, by name


class Op:
    """``torch.ops.ssam_kernels.<name>`` with its implementations per backend.

    Args:
        schema: the op's schema, ending in ``str backend``.
        impls: backend name -> implementation (``lazy`` ones import on first call).
        fake: the fake (meta) implementation, given the schema's arguments but ``backend``.
        adapt: ``adapt(impl, *args)`` calls an implementation with the schema's arguments
            (without ``backend``), converting them to what implementations take (bit masks
            back to :class:`~ssam_kernels.BitMask`, ...); default: ``impl(*args)``.
        devices: backend -> device types it runs on, where not the backend's default.
        auto_order: per device type, this op's ``auto`` preference where it is not
            ``AUTO_ORDER``'s.
        ext_op: the ``ssam::`` op whose kernels decide where ``ext`` runs (default: ``name``).
    """

    def __init__(self, schema: str, impls: dict[str, Callable], *, fake: Callable, adapt: Callable | None = None,
                 devices: dict[str, tuple[str, ...]] | None = None,
                 auto_order: dict[str, tuple[str, ...]] | None = None, ext_op: str | None = None):
        self.name = schema.split("(", 1)[0]
        self.backends = OpBackends(self.name, ext_op=ext_op, auto_order=auto_order)
        for backend, fn in impls.items():
            self.backends.register(backend, fn, (devices or {}).get(backend))
        self._adapt = adapt or (lambda impl, *args: impl(*args))
        LIB.define(schema)
        # the device decides which kernels may run; other devices get the reference
        for key, device in (("CPU", "cpu"), ("CUDA", "cuda"), ("MPS", "mps"), ("XPU", "xpu"),
                            ("PrivateUse1", "privateuseone")):
            LIB.impl(self.name, functools.partial(self._kernel, torch.device(device)), key)
        torch.library.register_fake(f"{NAMESPACE}::{self.name}", lambda *args: fake(*args[:-1]), lib=LIB)
        self.overload = getattr(getattr(torch.ops, NAMESPACE), self.name).default
        # the arguments the op writes (Tensor(a!) in the schema)
        self._mutated = [i for i, a in enumerate(self.overload._schema.arguments)
                         if a.alias_info is not None and a.alias_info.is_write]
        TABLES[self.name] = self.backends
        OPS[self.name] = self

    def _kernel(self, device: torch.device, *args):
        *args, backend = args
        impl = self.backends(backend, device)
        if device.type == "cuda":  # the tensors' device current while a kernel launches
            with on_device(_first_device(args)):
                out = self._adapt(impl, *args)
        else:
            out = self._adapt(impl, *args)
        for i in self._mutated:
            # a kernel writing through addresses (Triton, the extension) is invisible to autograd's
            # version counters: bump them as torch's in-place ops do, so a tensor saved for a
            # backward and modified here is caught, and caches keyed on versions see the change
            bump_versions(args[i] if isinstance(args[i], (list, tuple)) else [args[i]])
        return out

    def across_devices(self, backend: str, device: torch.device) -> Callable:
        """The reference implementation, for tensor lists that span devices: the dispatcher would
        run one device's kernels on all of them. An explicit other backend is refused."""
        if backend not in ("auto", "torch"):
            self.resolve(backend, device)  # a bad name still says so
            raise BackendUnavailableError(f"backend={backend!r} cannot run {self.name} on tensors that span several "
                                          "devices; only the reference ('torch') does")
        return self.backends.impls["torch"]

    def resolve(self, backend: str, device: torch.device) -> str:
        """The backend that runs this op for tensors on ``device`` (``backend`` checked)."""
        return self.backends.resolve(backend, device)

    def __call__(self, *args, backend: str = "auto"):
        """The op on checked arguments; ``backend`` is checked here, before any dispatch."""
        if not isinstance(backend, str):
            raise ValueError(f"backend must be a str, got {backend!r}")
        return self.overload(*args, backend)


def _first_device(args) -> torch.device:
    """The device of the first tensor among an op's arguments (in a list or not): the one the
    dispatcher chose this device type's kernel by (an op's tensors share one device)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, torch.Tensor):
                    return t.device
    return torch.device("cpu")


def backend_table(name: str, **kwargs) -> OpBackends:
    """A backend table that is not a dispatcher op (the SAM step plan picks a kernel set once
    per plan, not per call), listed by :func:`backend_info` beside the ops."""
    TABLES[name] = OpBackends(name, **kwargs)
    return TABLES[name]


def _device_arg(device) -> torch.device:
    """``device`` as a ``torch.device``, or a ``TypeError`` / ``ValueError`` naming it (torch's
    own parse raises a ``RuntimeError``, and reads an int as a CUDA index)."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must name a torch device (e.g. 'cpu', 'cuda', 'cuda:1'), got {device!r}") from exc


def auto_backend(op: str, device: str | torch.device = "cpu") -> str:
    """The backend ``backend="auto"`` runs op ``op`` with on ``device`` (what
    :func:`backend_info` reports for it, without building the whole report)."""
    if op not in TABLES:
        raise ValueError(f"op must be one of {sorted(TABLES)}, got {op!r}")
    return TABLES[op].resolve("auto", _device_arg(device))


def backend_info(device: str | torch.device = "cpu") -> dict:
    """What is installed and which backend each op runs with ``backend="auto"`` on ``device``."""
    device = _device_arg(device)
    return {
        "device": str(device),
        "env_override": os.environ.get(ENV_VAR) or None,
        "triton": triton_version(),
        "extension": extension_error() is None,
        "extension_error": extension_error(),
        "ops": {name: {"implemented": sorted(table.impls), "auto": auto_backend(name, device)}
                for name, table in sorted(TABLES.items())},
    }
