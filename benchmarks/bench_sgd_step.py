"""``restore_sgd_step_`` (restore ``w`` from the compact backup fused with SGD's momentum
update), per backend, beside the unfused ``restore_`` + ``torch.optim.SGD(fused=True)``, torch's
fastest SGD (its own fused kernel).

Minimal traffic: read ``w``, ``g``, the momentum buffer, the mask bits and the kept backup
values; write ``w`` and the buffer. Mask density 0.5, momentum 0.9, weight decay 5e-4.

    python -m ssam_bench.bench_sgd_step            # ResNet-50 and ViT-B parameter lists
    python -m ssam_bench.bench_sgd_step --quick    # the ResNet-18 list
"""

from __future__ import annotations

import sys

import torch

import ssam_kernels as sk
from ssam_bench.bench_perturb import PARAM_LISTS
from ssam_bench.common import baseline_sgd, native_backends
from ssam_bench.opbench import Case, dtype_name, op_main

LISTS = ["resnet50", "vit-b"]
QUICK = ["resnet18"]
HYPER = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)


def _case(name: str, device, dtype, gen) -> Case:
    shapes = PARAM_LISTS[name]()
    params = [torch.randn(s, device=device, dtype=dtype, generator=gen) for s in shapes]
    grads = [torch.randn(s, device=device, dtype=dtype, generator=gen) for s in shapes]
    bufs = [torch.zeros_like(p) for p in params]
    masks = [sk.pack_mask(torch.rand(s, device=device, generator=gen) < 0.5) for s in shapes]
    backup = sk.perturb_(params, grads, masks, 1e-3)

    def fused(backend):
        return lambda: sk.restore_sgd_step_(params, grads, bufs, backup, backend=backend, **HYPER)

    for p, g in zip(params, grads):
        p.grad = g
    sgd = baseline_sgd(params, **HYPER)  # (its own momentum buffers, made at its first step)

    def unfused():
        sk.restore_(params, backup)
        sgd.step()

    impls = {b: fused(b) for b in native_backends(
        device, lambda b: sk.restore_sgd_step_(params[:1], grads[:1], bufs[:1], _first(backup), backend=b, **HYPER))}
    impls["restore_ + SGD(fused=True)"] = unfused
    numel = sum(p.numel() for p in params)
    size = params[0].element_size()
    kept = sum(m.count_int() for m in masks)
    nbytes = 5 * numel * size + sum(m.bits.numel() for m in masks) + kept * size
    return Case("restore_sgd_step_", f"{name} {numel / 1e6:.1f}M {dtype_name(dtype)}", impls, nbytes=nbytes)


def cases(device, dtype, quick) -> list[Case]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [_case(name, device, dtype, gen) for name in (QUICK if quick else LISTS)]


def _first(backup: sk.PerturbBackup) -> sk.PerturbBackup:
    return sk.PerturbBackup(backup.values[:1], backup.masks[:1])


def main(argv=None) -> int:
    return op_main("sgd_step", "restore_sgd_step_: fused restore + SGD", cases, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
