"""Global top-k mask over a list of score tensors vs ``torch.topk`` on their concatenation.

``ours`` is ``ssam_kernels.topk_mask`` with ``backend="auto"`` (Triton radix select on a GPU:
no sort, no concatenation, exact count). ``torch.topk`` is timed as the issue's baseline:
concatenate, ``topk``, scatter the kept indices into a flat bool mask. Scores are spread over
a ResNet-50-like list of tensors scaled to the requested total.

    python -m ssam_bench.bench_topk_mask             # 100M scores, densities 0.5 and 0.01
    python -m ssam_bench.bench_topk_mask --quick     # 1M scores (on a CPU: printed, labelled CPU)
"""

from __future__ import annotations

import sys

import torch

from ssam_bench.common import interleaved_medians, own_table_main

import ssam_kernels as sk
from ssam_bench.bench_perturb import PARAM_LISTS


def score_list(total: int, device) -> list[torch.Tensor]:
    shapes = PARAM_LISTS["resnet50"]()
    sizes = [torch.Size(s).numel() for s in shapes]
    scale = total / sum(sizes)
    counts = [int(n * scale) for n in sizes]
    counts[max(range(len(counts)), key=counts.__getitem__)] += total - sum(counts)
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.rand(c, device=device, generator=gen) for c in counts]


def bench(total: int, density: float, device, reps: int) -> list[dict]:
    scores = score_list(total, device)
    k = sk.keep_count(total, density)

    def ours():
        return sk.topk_mask(scores, k=k)

    def torch_topk():
        flat = torch.cat([s.reshape(-1) for s in scores])
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
        mask[torch.topk(flat, k, sorted=False).indices] = True
        return mask

    times = interleaved_medians({"ours": ours, "torch.topk": torch_topk}, device, warmup=2, reps=reps)
    kept = sum(int(m.sum()) for m in ours())
    return [dict(scores=total, tensors=len(scores), density=density, k=k, impl=name,
                 backend=sk.backend_info(device)["ops"]["topk_mask"]["auto"] if name == "ours" else "torch",
                 median_ms=t * 1e3, speedup_vs_topk=times["torch.topk"] / t,
                 exact_count=(kept == k) if name == "ours" else None)
            for name, t in times.items()]


COLUMNS = [("scores", "scores", ",d"), ("tensors", "tensors", "d"), ("density", "density", ".2f"), ("impl", "impl", ""),
           ("backend", "backend", ""), ("median_ms", "median ms", ".2f"), ("speedup_vs_topk", "x torch.topk", ".1f"),
           ("exact_count", "exact k", "")]


def add_arguments(p) -> None:
    p.add_argument("--scores", type=int, default=None, help="total number of scores (default 100M; --quick 1M)")


def run(args, device) -> tuple[list[dict], dict, str]:
    total = args.scores or (10**6 if args.quick else 10**8)
    reps = 3 if args.quick else 20
    return [r for d in (0.5, 0.01) for r in bench(total, d, device, reps)], {}, ""


TITLE = "Global top-k mask"


def main(argv=None) -> int:
    return own_table_main("topk_mask", __doc__, TITLE, COLUMNS, add_arguments, run, argv,
                          quick_help="1M scores, few repetitions")


if __name__ == "__main__":
    sys.exit(main())
