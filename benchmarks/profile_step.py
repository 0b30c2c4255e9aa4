"""Where a step's time goes: ``torch.profiler`` over a few steps of each contender of
``ssam-bench step`` (same models, inputs, optimizers and bf16 autocast on a GPU), printed as text:
per contender the wall time per step, the device (GPU) kernel time and kernel launches per step,
the kernels taking the most time and the host ops taking the most self time. For the
questions a step table cannot answer (why ``exact`` costs more than ``dense`` on WRN-28-10, where
a budget mask's time goes beyond its counted FLOPs).

    python -m ssam_bench.profile_step --models wrn28_10            # GPU: the default contenders
    python -m ssam_bench.profile_step --quick                      # tiny model, CPU-runnable
    python -m ssam_bench.profile_step --models resnet18_cifar --contenders sgd "ssam-f 50% exact"

Off a GPU the kernel columns are CPU ops (labelled so).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ssam_bench.bench_step import QUICK_WORKLOADS, WORKLOADS, Contender, build_optimizer, make_step

# the contenders that tell exact and budget apart from dense: SGD and SAM as references
DEFAULT_CONTENDERS = (Contender("sgd"), Contender("sam"), Contender("ssam-f", "0.5", "dense"),
                      Contender("ssam-f", "0.5", "exact"), Contender("ssam-f", "0.5", "exact", budget=True),
                      Contender("ssam-f", "0.9", "exact", budget=True))
BY_NAME = {c.name: c for c in DEFAULT_CONTENDERS}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_contender(workload, contender: Contender, device: torch.device, steps: int, top: int) -> list[str]:
    """The text block of one contender."""
    cuda = device.type == "cuda"
    layout = workload.layout(device)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(0)
    x, y = workload.inputs(workload.batch, gen, device)
    x = x.contiguous(memory_format=memory_format)
    torch.manual_seed(0)
    model = workload.build().to(device, memory_format=memory_format)
    opt = build_optimizer(contender, model, workload, device, 128 if cuda else 4)
    step = make_step(model, opt, x, y, workload.loss, autocast=cuda)
    for _ in range(3):  # warm: Triton compiles, sparse_mm_24 tunes, cuDNN picks its algorithms
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    wall = (time.perf_counter() - start) / steps * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    events = prof.key_averages()
    if cuda:
        # (GPU-side spans of user annotations, e.g. "Optimizer.step#SGD.step", are not kernels)
        kernels = [e for e in events if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)]
        device_us = lambda e: e.device_time_total  # noqa: E731
    else:  # no device: the leaf CPU ops stand in for kernels
        kernels = [e for e in events if e.self_cpu_time_total > 0 and e.key.startswith("aten::")]
        device_us = lambda e: e.self_cpu_time_total  # noqa: E731
    busy = sum(device_us(e) for e in kernels) / steps / 1e3
    launches = sum(e.count for e in kernels) / steps
    what = "GPU kernel" if cuda else "CPU op (no GPU here)"
    lines = [f"=== {contender.name}: wall {wall:.2f} ms/step, {what} time {busy:.2f} ms/step, "
             f"{launches:.0f} {'kernels' if cuda else 'aten ops'}/step"]
    for e in sorted(kernels, key=device_us, reverse=True)[:top]:
        lines.append(f"  {device_us(e) / steps / 1e3:9.3f} ms  x {e.count / steps:6.1f}  {e.key[:110]}")
    host = sorted((e for e in events if e.self_cpu_time_total > 0), key=lambda e: e.self_cpu_time_total, reverse=True)
    lines.append("  top host ops (self ms/step): " + ", ".join(
        f"{e.key} {e.self_cpu_time_total / steps / 1e3:.2f}" for e in host[:8]))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(WORKLOADS) + list(QUICK_WORKLOADS), default=None,
                   help="default: resnet18_cifar and wrn28_10 (--quick: tiny_convnet)")
    p.add_argument("--contenders", nargs="+", choices=list(BY_NAME), default=None,
                   help="default: all of them (SGD, SAM, SSAM-F 50%% dense / exact / exact budget, 90%% exact budget)")
    p.add_argument("--steps", type=int, default=5, help="steps profiled per contender (after 3 warm-up steps)")
    p.add_argument("--top", type=int, default=15, help="kernels listed per contender")
    p.add_argument("--quick", action="store_true", help="the tiny convnet, 2 steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.steps < 1 or args.top < 1:
        p.error("--steps and --top must be >= 1")
    device = torch.device(args.device)
    names = args.models or (["tiny_convnet"] if args.quick else ["resnet18_cifar", "wrn28_10"])
    specs = [BY_NAME[n] for n in args.contenders] if args.contenders else list(DEFAULT_CONTENDERS)
    steps = 2 if args.quick else args.steps
    for name in names:
        workload = QUICK_WORKLOADS.get(name) or WORKLOADS[name]
        print(f"# {name}, batch {workload.batch}, {device}" + (" (CPU run: not GPU figures)" if device.type != "cuda"
                                                                else ", bf16 autocast"), flush=True)
        for c in specs:
            print("\n".join(profile_contender(workload, c, device, steps, args.top)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
