"""``grad_norm`` over a model's gradient list, per backend, beside ``torch._foreach_norm``.

The op reads every gradient once; GB/s is that over the time, as a fraction of the copy
bandwidth measured in the same run.

    python -m ssam_bench.bench_grad_norm            # ResNet-50 and ViT-B gradient lists
    python -m ssam_bench.bench_grad_norm --quick    # the ResNet-18 list (on a CPU: printed, labelled CPU)
"""

from __future__ import annotations

import sys

import torch

import ssam_kernels as sk
from ssam_bench.bench_perturb import PARAM_LISTS
from ssam_bench.common import native_backends
from ssam_bench.opbench import Case, dtype_name, op_main

LISTS = ["resnet50", "vit-b"]
QUICK = ["resnet18"]


def _case(name: str, device, dtype, gen) -> Case:
    grads = [torch.randn(s, device=device, dtype=dtype, generator=gen) for s in PARAM_LISTS[name]()]
    impls = {b: (lambda b=b: sk.grad_norm(grads, backend=b))
             for b in native_backends(device, lambda b: sk.grad_norm(grads[:1], backend=b))}
    impls["foreach"] = lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    numel = sum(g.numel() for g in grads)
    return Case("grad_norm", f"{name} {numel / 1e6:.1f}M {dtype_name(dtype)}", impls,
                nbytes=numel * grads[0].element_size())


def cases(device, dtype, quick) -> list[Case]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [_case(name, device, dtype, gen) for name in (QUICK if quick else LISTS)]


def main(argv=None) -> int:
    return op_main("grad_norm", "grad_norm over a gradient list", cases, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
