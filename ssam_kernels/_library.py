"""``torch.ops.ssam_kernels``: the ops this package defines from Python, so that the
dispatcher, ``FlopCounterMode`` and ``torch.compile`` see them as ops rather than as opaque
Python calls (a Triton launch is invisible to all three).

Defined with ``torch.library.Library`` (a schema, one kernel per dispatch key, a ``Meta``
kernel for fake tensors) rather than ``torch.library.custom_op``: the call costs about 2.5 us
instead of about 20 us on the host, which matters for ops called once per layer per step.
The compiled extension's C++ ops live in their own namespace, ``torch.ops.ssam``.
"""

from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "ssam_kernels"
LIB = torch.library.Library(NAMESPACE, "DEF")


def define(schema: str, kernel: Callable, fake: Callable) -> torch._ops.OpOverloadPacket:
    """Define ``ssam_kernels::<schema>`` with ``kernel`` for CPU and CUDA tensors and ``fake``
    for meta / fake tensors; returns ``torch.ops.ssam_kernels.<name>``."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    for key in ("CPU", "CUDA"):
        LIB.impl(name, kernel, key)
    LIB.impl(name, fake, "Meta")
    return getattr(getattr(torch.ops, NAMESPACE), name)
