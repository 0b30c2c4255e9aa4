"""The optimizer-side work of one SSAM step: gradient norm + masked perturbation + restore.

For realistic parameter lists (1M MLP, ResNet-18, ResNet-50 25M, ViT-B 87M, a 355M GPT-2
medium list) at mask density 0.5, one cycle ``grad_norm -> perturb_ -> restore_`` is timed for:

* ``ours``: ``ssam_kernels`` with ``backend="auto"`` (Triton on a GPU) and a bit-packed mask;
* ``torch``, ``triton``, ``ext``: the same ops on each backend that runs here;
* ``plan triton``, ``plan ext``: the same cycle as the optimizers run it, over an
  ``ssam_kernels.SAMStepPlan`` (norm + perturbation in 2 launches, restore in 1);
* ``foreach``: ``torch._foreach_*`` with float masks (a good hand-written PyTorch baseline);
* ``official``: the official code's per-parameter loop (``e = g * scale * mask``, ``p += e``,
  ``p -= e``, float mask and float ``e`` per parameter).

Effective bandwidth counts the bytes the cycle must move (see ``required_bytes``: the weights'
writes at kept entries count the 32-byte sectors they touch, as the memory moves them; rows
measured before 2026-12-07 counted the entries alone, up to half those bytes) and is
reported as a fraction of the device's copy bandwidth measured in the same run. Each cycle is
timed from an empty L2 (a 256 MiB read before it, outside its time), host work included. The extra
optimizer memory per parameter (mask + backup) is reported beside the official 8 B (fp32).

    python -m ssam_bench.bench_perturb            # on a GPU: writes results/<device>/perturb.{json,md}
    python -m ssam_bench.bench_perturb --quick    # small lists; on a CPU it prints, labelled CPU
"""

from __future__ import annotations

import sys

import torch

from ssam_bench.common import copy_bandwidth, interleaved_medians, native_backends, own_table_main

import ssam_kernels as sk
from ssam.models import resnet18_cifar, resnet50, vit_base

DENSITY = 0.5


def _model_shapes(build) -> list[tuple[int, ...]]:
    with torch.device("meta"):
        return [tuple(p.shape) for p in build().parameters()]


def gpt2_medium_shapes(layers: int = 24, d: int = 1024, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


PARAM_LISTS = {
    "mlp-1M": lambda: [(1024, 512), (1024,), (512, 1024), (512,)],
    "resnet18": lambda: _model_shapes(resnet18_cifar),
    "resnet50": lambda: _model_shapes(resnet50),
    "vit-b": lambda: _model_shapes(vit_base),
    "gpt2-medium-355M": gpt2_medium_shapes,
}
QUICK = ["mlp-1M", "resnet18"]


SECTOR = 32  # bytes: the unit a GPU's memory system reads and writes (an L2 sector)


def written_sectors(masks: list[torch.Tensor], w_size: int) -> int:
    """The 32-byte sectors of the weights that hold a kept entry (each tensor starting on a
    sector, as the caching allocator places them): what writing the kept entries in place
    moves. A scattered mask at density 0.5 touches nearly every sector of fp32 weights (all but
    0.5^8 of them), so the entries alone would count half the bytes the writes move."""
    per = SECTOR // w_size
    total = 0
    for m in masks:
        flat = m.reshape(-1)
        flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per)])
        total += int(flat.view(-1, per).any(1).sum())
    return total


def required_bytes(numel: int, kept: int, w_size: int, g_size: int, sectors: int) -> int:
    """norm: read g. perturb: read w, g, bits; write the ``sectors`` of w holding kept entries
    (:func:`written_sectors`) and the compact backup. restore: read bits and the backup; write
    those sectors of w again."""
    bits = (numel + 7) // 8
    w_writes, backup = sectors * SECTOR, kept * w_size
    return numel * g_size + (numel * (w_size + g_size) + bits + w_writes + backup) + (bits + backup + w_writes)


def bench_list(name: str, shapes, device, dtype, reps: int) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, dtype=dtype, generator=gen) for s in shapes]
    grads = [torch.randn(s, device=device, dtype=dtype, generator=gen) for s in shapes]
    bool_masks = [torch.rand(s, device=device, generator=gen) < DENSITY for s in shapes]
    bit_masks = [sk.pack_mask(m) for m in bool_masks]
    float_masks = [m.to(dtype) for m in bool_masks]
    rho = 0.05

    def ours(backend):
        def run():
            with torch.no_grad():
                norm = sk.grad_norm(grads, backend=backend)
                backup = sk.perturb_(params, grads, bit_masks, rho / (norm + 1e-7), backend=backend)
                sk.restore_(params, backup, backend=backend)
        return run

    def foreach():
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            e = torch._foreach_mul(grads, rho / (norm + 1e-7))
            torch._foreach_mul_(e, float_masks)
            torch._foreach_add_(params, e)
            torch._foreach_sub_(params, e)

    def official():
        with torch.no_grad():
            norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
            scale = rho / (norm + 1e-7)
            saved = []
            for p, g, m in zip(params, grads, float_masks):
                e_w = g * scale
                e_w.data = e_w.data * m
                p.add_(e_w)
                saved.append(e_w)
            for p, e_w in zip(params, saved):
                p.sub_(e_w)

    for p, g in zip(params, grads):
        p.grad = g  # the planned step reads .grad

    def planned(backend):
        plan = sk.SAMStepPlan(params, bit_masks, backend=backend)

        def run():
            plan.perturb([rho])
            plan.restore()
        return run

    fns = {"ours": ours("auto"), "torch": ours("torch"), "foreach": foreach, "official": official}
    for backend in native_backends(device, lambda b: sk.grad_norm(grads[:1], backend=b))[1:]:
        fns[backend] = ours(backend)  # every other backend that runs here, beside auto's choice
    for backend in ("triton", "ext"):  # the planned step (the optimizers' path), natively only
        if sk.ops.sam_step.plan_backend(backend, device) == backend and (backend != "triton" or device.type == "cuda"):
            fns[f"plan {backend}"] = planned(backend)
    # each cycle from an empty L2 (the small lists fit in it: a warm one would time L2, not
    # memory); host work included, as a step pays it (the official and foreach loops are host-bound)
    times = interleaved_medians(fns, device, warmup=3, reps=reps, cold=True)
    numel = sum(p.numel() for p in params)
    kept = sum(m.count_int() for m in bit_masks)
    size = params[0].element_size()
    nbytes = required_bytes(numel, kept, size, size, written_sectors(bool_masks, size))
    ours_mem = (sum(m.bits.numel() for m in bit_masks) + kept * size) / numel
    return [
        dict(params=name, numel=numel, tensors=len(shapes), dtype=str(dtype).split(".")[-1], impl=impl,
             backend=sk.backend_info(device)["ops"]["perturb_"]["auto"] if impl == "ours" else impl,
             median_ms=t * 1e3, gbps=nbytes / t / 1e9, speedup_vs_official=times["official"] / t,
             speedup_vs_foreach=times["foreach"] / t,
             extra_bytes_per_param=ours_mem if impl in ("ours", "torch", "triton", "ext") or impl.startswith("plan")
             else 2.0 * size)
        for impl, t in times.items()
    ]


COLUMNS = [
    ("params", "param list", ""), ("numel", "params", ",d"), ("tensors", "tensors", "d"), ("impl", "impl", ""),
    ("backend", "backend", ""), ("median_ms", "median ms", ".3f"), ("gbps", "GB/s", ".1f"),
    ("copy_fraction", "of copy BW", ".2f"), ("speedup_vs_official", "x official", ".1f"),
    ("speedup_vs_foreach", "x foreach", ".2f"), ("extra_bytes_per_param", "extra B/param", ".3f"),
]


def add_arguments(p) -> None:
    p.add_argument("--lists", nargs="+", choices=sorted(PARAM_LISTS))
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


def run(args, device) -> tuple[list[dict], dict, str]:
    """(rows, extra metadata, note) of one run."""
    dtype = getattr(torch, args.dtype)
    names = args.lists or (QUICK if args.quick else list(PARAM_LISTS))
    reps = 5 if args.quick else 30
    ceiling = copy_bandwidth(device, nbytes=(1 << 26) if args.quick else (1 << 30))
    rows = []
    for name in names:
        for row in bench_list(name, PARAM_LISTS[name](), device, dtype, reps):
            row["copy_fraction"] = row["gbps"] * 1e9 / ceiling
            row["weight_writes_counted"] = "32-byte sectors"  # (rows without it counted kept entries)
            row["timing"] = TIMING
            rows.append(row)
    return (rows, dict(copy_bandwidth_gbps=ceiling / 1e9, mask_density=DENSITY),
            f", copy bandwidth {ceiling / 1e9:.0f} GB/s measured in this run")


TITLE = "grad_norm + perturb_ + restore_ per step"
MERGE_ON = ("params", "dtype")  # a run of some lists keeps this device's rows of the others
TIMING = "cold L2, host included"


def comparable(row: dict) -> bool:
    """An earlier row measured as this run's are (rows before 2026-12-07 counted kept entries, not
    sectors; before 2026-12-08 they timed a warm L2): kept beside them in a merged table, else
    dropped."""
    return row.get("weight_writes_counted") == "32-byte sectors" and row.get("timing") == TIMING


def main(argv=None) -> int:
    return own_table_main("perturb", __doc__, TITLE, COLUMNS, add_arguments, run, argv,
                          quick_help=f"only {QUICK}, fewer repetitions", merge_on=MERGE_ON, comparable=comparable)


if __name__ == "__main__":
    sys.exit(main())
