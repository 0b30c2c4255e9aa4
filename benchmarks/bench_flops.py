"""Counted FLOPs of an SGD, SAM and SSAM step relative to SGD, beside the paper's FLOPs column.

``torch.utils.flop_counter.FlopCounterMode`` counts the matmul/conv/attention FLOPs a step
really issues (on CPU too; attention runs SDPA's math path so it is counted). The SSAM step
here is the reference one: its ascent backward is dense, as in the official code, so it
issues SAM's FLOPs at every sparsity. The "paper model" column applies the paper's
assumption (the ascent backward scales with the mask density) to our counted forward /
backward split: ``1 + F/(F+B) + (1 - s) * B/(F+B)``.

    python -m ssam_bench.bench_flops            # ResNet-18 (CIFAR, batch 128), small ViT (batch 128)
    python -m ssam_bench.bench_flops --quick    # batch 8, fewer sparsities (a smoke test; into a temporary folder)
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ssam_bench.common import RESULTS, markdown_table, run_metadata, write_results

import ssam
from ssam.models import resnet18_cifar, vit_tiny

# The paper's FLOPs column (Tables 1-3), relative to SGD.
PAPER = {"sgd": 1.0, "sam": 2.0}
PAPER_SSAM = {0.5: 1.65, 0.8: 1.44, 0.9: 1.36, 0.95: 1.33, 0.98: 1.31, 0.99: 1.30}

MODELS = {
    "resnet18_cifar": (resnet18_cifar, (3, 32, 32)),
    "vit_tiny": (vit_tiny, (3, 32, 32)),
}


def _count(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count_model(name: str, batch: int, sparsities: list[float]) -> list[dict]:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))

    def loss_backward():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def sgd_step(opt):
        def run():
            opt.zero_grad()
            loss_backward()
            opt.step()

        return run

    def sam_step(opt):
        def run():
            opt.zero_grad()
            loss_backward()
            opt.step(loss_backward)

        return run

    base = dict(lr=0.0)  # lr 0: every step sees the same weights, so counts are comparable
    forward = _count(lambda: F.cross_entropy(model(x), y))
    sgd = _count(sgd_step(torch.optim.SGD(model.parameters(), **base)))
    backward = sgd - forward
    rows = [dict(model=name, batch=batch, opt="sgd", sparsity=None, gflop=sgd / 1e9, ratio=1.0, paper=1.0,
                 paper_model=1.0)]
    sam = _count(sam_step(ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **base)))
    rows.append(dict(model=name, batch=batch, opt="sam", sparsity=0.0, gflop=sam / 1e9, ratio=sam / sgd,
                     paper=2.0, paper_model=2.0))
    for s in sparsities:
        opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=s, drop_rate=0.5, T_end=1, seed=0,
                         **base)
        flops = _count(sam_step(opt))
        rows.append(dict(model=name, batch=batch, opt="ssam (reference, dense ascent)", sparsity=s,
                         gflop=flops / 1e9, ratio=flops / sgd, paper=PAPER_SSAM.get(s),
                         paper_model=(sgd + forward + (1 - s) * backward) / sgd))
    for r in rows:
        r["forward_fraction"] = forward / sgd
    return rows


COLUMNS = [
    ("model", "model", ""), ("batch", "batch", "d"), ("opt", "optimizer", ""), ("sparsity", "sparsity", ".2f"),
    ("gflop", "counted GFLOP/step", ".1f"), ("ratio", "counted / SGD", ".3f"),
    ("paper", "paper FLOPs column", ".2f"), ("paper_model", "paper model, counted fwd/bwd split", ".3f"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 8 and sparsities 0.5, 0.99 only")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    p.add_argument("--out", default=None, help="directory for flops.json / flops.md (default: benchmarks/results/, "
                   "but a new temporary folder for --quick, whose smaller counts must not replace the committed ones)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="ssam-bench-flops-quick-") if args.quick else RESULTS
    batch = 8 if args.quick else 128
    sparsities = [0.5, 0.99] if args.quick else sorted(PAPER_SSAM)
    rows = [r for name in args.models for r in count_model(name, batch, sparsities)]
    meta = run_metadata(torch.device("cpu"))
    meta["note"] = "FLOP counts (device-independent), counted on CPU; no timing"
    table = markdown_table(rows, COLUMNS)
    md = (f"# Counted FLOPs per step relative to SGD\n\n{meta['note']}. torch {meta['torch']}, commit "
          f"{meta['commit']}, {meta['date']}.\n\n{table}\n")
    paths = write_results("flops", meta, rows, md, args.out)
    print(table)
    print(f"\nwrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
