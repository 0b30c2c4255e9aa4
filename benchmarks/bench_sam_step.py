"""The host side of a planned optimizer step (``ssam_kernels.SAMStepPlan``): what SAM and SSAM-F
with fused SGD cost the CPU per step when the GPU work is taken away, beside a
``torch._foreach_*`` SAM, on parameter lists of 62 tensors (ResNet-18's count) and 300.

Per step (``first_step()`` + ``second_step()``, gradients present, the plan made before timing;
the ``lr and rho new every step`` row changes both before each step, as a schedule does):

* ``host us``: median wall time of the step with every Triton launch recorded instead of run
  (the GPU choices taken on CPU tensors, as the compile tier does): the host work the step adds
  before any kernel runs, Triton's own launch path excluded;
* ``launches``: Triton kernel launches; ``ops``: dispatcher ops (a ``TorchDispatchMode``
  counter; the public ops and the torch ops they run inside, allocations and views included),
  and ``syncs`` among them (``_local_scalar_dense``, ``nonzero``, boolean indexing...);
* the ``list ops`` rows time what a frontend built on the public ops pays per step: the norm,
  ``perturb_`` and ``restore_sgd_step_`` (``ssam_kernels.grad_norm`` etc., each call checked and
  dispatched on its own, no plan), Triton launches recorded as above (their one sync is
  ``perturb_`` reading the scale, a CPU tensor here, on the host: a scale on the GPU is read there;
  their counts are the fewest of five steps, as a backup allocated at a new address costs a table
  copy that a GPU's caching allocator usually spares);
* the ``foreach`` rows time ``ssam_bench.bench_overhead.foreach_step`` (norm, scale, mask,
  perturb, restore, ``torch.optim.SGD(fused=True)``) on the same lists: on a CPU these run
  CPU kernels on 64-element tensors, a lower bound of their host work, not a GPU figure.

Targets (issue 22): ours at most 100 us for 62 tensors and 150 us for 300 on a 2-core CPU, 3
launches, no sync, op counts independent of the number of tensors.

    python -m ssam_bench.bench_sam_step            # 62 and 300 tensors
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ssam
from ssam_bench.bench_overhead import foreach_step
from ssam_bench.common import baseline_sgd, report, standalone_main

TENSORS = (62, 300)
NUMEL = 64  # elements per tensor: host work does not depend on it
SGD = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
TITLE = "Host time of an optimizer step (kernels not run)"
SYNCING = ("_local_scalar_dense", "nonzero", "item", "masked_select")


_CPU_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class _Ops(TorchDispatchMode):
    """The dispatcher ops a block runs, by name, in order: ``ssam_kernels``' own ops and the ops
    they run inside (a mode sees only the outermost op: ours are sent on to their CPU kernels
    with the mode still on, as the tensors here are on the CPU)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            name = "index (bool)"
        self.names.append(name)
        if func.namespace == "ssam_kernels":
            with self:
                return func.redispatch(_CPU_KERNEL, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _params(n: int, gen: torch.Generator) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(NUMEL, generator=gen)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(NUMEL, generator=gen)
    return params


def _optimizer(kind: str, params):
    if kind == "SAM":
        return ssam.SAM(params, torch.optim.SGD, rho=0.05, **SGD)
    opt = ssam.SSAMF(params, torch.optim.SGD, rho=0.05, sparsity=0.5, num_samples=1, update_freq=1, **SGD)
    gen = torch.Generator().manual_seed(1)
    opt._set_masks([torch.rand(p.shape, generator=gen) < 0.5 for p in params])  # as update_mask would
    opt.mask_updates += 1
    return opt


def _median_us(fn, reps: int) -> float:
    for _ in range(max(10, reps // 10)):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def ours_row(kind: str, n: int, reps: int, schedule: bool = False) -> dict:
    """The planned step of ``kind`` ("SAM" or "SSAM-F") over ``n`` tensors, Triton launches
    recorded (not run). ``schedule``: the learning rate and rho change before every step, as
    under a schedule."""
    from ssam_bench.compile_kernels import gpu_launch_choices, recording

    params = _params(n, torch.Generator().manual_seed(0))
    opt = _optimizer(kind, params)
    saved = os.environ.get("SSAM_BACKEND")
    os.environ["SSAM_BACKEND"] = "triton"
    launches: list = []
    try:
        with gpu_launch_choices(), recording(launches):
            count = [0]

            def step():
                if schedule:  # a new value each step, as a scheduler writes them
                    count[0] += 1
                    for group in opt.param_groups:
                        group["lr"] = SGD["lr"] / (1 + 1e-6 * count[0])
                        group["rho"] = 0.05 / (1 + 1e-6 * count[0])
                opt.first_step()
                opt.second_step()

            for _ in range(3):  # the plan, the momentum buffers and the steady tables are made here
                step()
            if opt._plan is None:
                raise RuntimeError(f"{kind}: the planned path did not apply")
            launches.clear()
            with _Ops() as ops:
                step()
            counted = len(launches)
            host = _median_us(step, reps)
    finally:
        if saved is None:
            del os.environ["SSAM_BACKEND"]
        else:
            os.environ["SSAM_BACKEND"] = saved
    syncs = [name for name in ops.names if name in SYNCING or name == "index (bool)"]
    impl = f"ours {kind}" + (", lr and rho new every step" if schedule else "")
    return dict(impl=impl, tensors=n, host_us=host, launches=counted, ops=len(ops.names), syncs=len(syncs))


def list_ops_row(kind: str, n: int, reps: int) -> dict:
    """Norm, ``perturb_`` and ``restore_sgd_step_`` through the public list ops over ``n``
    tensors (SSAM-F: a BitMask per tensor, as the optimizer keeps them), Triton launches
    recorded (not run)."""
    import ssam_kernels
    from ssam_bench.compile_kernels import gpu_launch_choices, recording
    from ssam_kernels.ops.bitmask import pack_mask

    params = _params(n, torch.Generator().manual_seed(0))
    grads = [p.grad for p in params]
    weights = [p.detach() for p in params]
    gen = torch.Generator().manual_seed(1)
    masks = None if kind == "SAM" else [pack_mask(torch.rand(NUMEL, generator=gen) < 0.5) for _ in params]
    buffers = [torch.zeros(NUMEL) for _ in params]
    launches: list = []

    def step():
        norm = ssam_kernels.grad_norm(grads, masks, backend="triton")
        backup = ssam_kernels.perturb_(weights, grads, masks, 0.05 / (norm + 1e-12), backend="triton")
        ssam_kernels.restore_sgd_step_(weights, grads, buffers, backup, backend="triton", **SGD)

    with gpu_launch_choices(), recording(launches):
        step()
        # the fewest over five steps: each step's backups are new CPU allocations, and one that
        # lands at a new address costs an address-table copy (3 ops) that a GPU's caching
        # allocator, handing the same blocks back, usually does not
        counts = []
        for _ in range(5):
            launches.clear()
            with _Ops() as counted_ops:
                step()
            counts.append((len(counted_ops.names), len(launches), counted_ops))
        _, counted, ops = min(counts, key=lambda c: c[:2])
        host = _median_us(step, reps)
    syncs = [name for name in ops.names if name in SYNCING or name == "index (bool)"]
    return dict(impl=f"list ops {kind}", tensors=n, host_us=host, launches=counted, ops=len(ops.names),
                syncs=len(syncs))


def foreach_row(n: int, reps: int) -> dict:
    params = _params(n, torch.Generator().manual_seed(0))
    masks = [torch.ones(NUMEL) for _ in params]
    base = baseline_sgd(params, **SGD)
    with _Ops() as ops:
        foreach_step(params, masks, base)
    host = _median_us(lambda: foreach_step(params, masks, base), reps)
    return dict(impl="foreach SAM (CPU kernels)", tensors=n, host_us=host, launches=None, ops=len(ops.names),
                syncs=sum(name in SYNCING for name in ops.names))


def run(args, device=None, progress_factory=None) -> list[dict]:
    # beside a GPU run (after ssam-bench overhead) the same CPU figure with fewer repetitions:
    # the device's time is short
    reps = 100 if getattr(args, "quick", False) else 200 if device is not None and device.type == "cuda" else 1000
    rows = []
    for n in TENSORS:
        rows += [ours_row("SAM", n, reps), ours_row("SSAM-F", n, reps), ours_row("SAM", n, reps, schedule=True),
                 list_ops_row("SAM", n, reps),
                 list_ops_row("SSAM-F", n, reps), foreach_row(n, reps)]
    return rows


COLUMNS = [("impl", "impl", ""), ("tensors", "tensors", "d"), ("host_us", "host us (median)", ".1f"),
           ("launches", "launches", "d"), ("ops", "dispatcher ops", "d"), ("syncs", "syncs", "d")]


def write(rows, device, out) -> dict:
    """Printed, labelled CPU; written beside a GPU run's results too (the host is a CPU)."""
    target = out
    if target is None and device is not None and device.type == "cuda":
        from ssam_bench.common import results_dir

        target = results_dir(device, None)
    cpu = torch.device("cpu")
    return report("sam_step", TITLE, rows, COLUMNS, cpu, target,
                  note=f" (host work only: {NUMEL}-element tensors, our Triton launches recorded instead of run)")


def add_arguments(p) -> None:
    pass


def main(argv=None) -> int:
    return standalone_main(__doc__, add_arguments, run, write, argv, quick_help="fewer repetitions")


if __name__ == "__main__":
    sys.exit(main())
