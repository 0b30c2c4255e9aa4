"""What the compute-aware ``"budget"`` mask gives up for its FLOPs: device-independent
figures (no timing).

1. Per model and sparsity, from one empirical Fisher, for the unstructured top-k mask (the
   paper's), the whole-tensor mask, the 2:4 mask (at 50%) and SSAM-F's budget mask: the
   Fisher mass each keeps as a fraction of the top-k's; the cosine between its perturbation
   ``g ⊙ m / ||g ⊙ m||`` and the top-k's for the gradient ``g`` of a batch; its density; and
   an SSAM step's FLOPs relative to SGD with the exact ascent backward, estimated by the cost
   model (which ``tests/test_budget.py`` checks against torch's FLOP counter, and
   ``ssam-bench step`` counts), beside the paper's column. At 95% and 99% the ascent pass
   runs on half the batch (``ascent_fraction=0.5``): the column is below the cost of a
   full-batch ascent forward there.
2. Test accuracy of ``ssam-train`` on digits (the conv net): SGD, SAM (also with the ascent on
   a part of the batch), SSAM-F and SSAM-D unstructured and budget with the exact backward, mean
   and standard deviation over seeds, beside one step's FLOPs relative to SGD's counted by
   torch on the same net and batch.

Inputs of part 1 are synthetic (``ssam-bench step``'s image workloads; GPT-2 small with a
1024-word readout and cross-entropy on random next tokens, since the step benchmark's squared
output puts nearly all the Fisher in the final LayerNorm), so the Fisher is that of an
untrained model on random data: the figures compare structures, not trained networks.

    python -m ssam_bench.bench_budget [--out benchmarks/results]
    python -m ssam_bench.bench_budget --quick          # ResNet-18 only, 1 seed, 2 epochs
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ssam_bench.bench_step import WORKLOADS, Workload, counted_flops
from ssam_bench.common import report

from ssam import SAM, SSAMF
from ssam.budget import ascent_budget, budget_select, measure_costs, paper_flops
from ssam.fisher import empirical_fisher
from ssam.models import gpt2_small_stack
from ssam.structure import Structure, parse_structure, select_mask
from ssam.train import MODELS as TRAIN_MODELS
from ssam.train import build_optimizer, load_digits, parse_args, train
from ssam_kernels import keep_count

# (sparsity, ascent_fraction): at 95-99% the paper's column is below the cost of a full-batch
# ascent forward, so those rows run the ascent pass on half the batch
SETTINGS = ((0.5, 1.0), (0.8, 1.0), (0.9, 1.0), (0.95, 0.5), (0.99, 0.5))
VOCAB, TOKENS = 1024, 128


def _gpt_lm() -> nn.Module:
    return nn.Sequential(gpt2_small_stack(), nn.Linear(768, VOCAB, bias=False))


def _next_tokens(batch, gen, device):
    x = torch.randn(batch, TOKENS, 768, generator=gen, device=device)
    return x, torch.randint(0, VOCAB, (batch, TOKENS), generator=gen, device=device)


def _lm_loss(out, y):
    return F.cross_entropy(out.float().flatten(0, 1), y.flatten())


MODELS = {"resnet18_cifar": WORKLOADS["resnet18_cifar"], "vit_s16": WORKLOADS["vit_s16"],
          "gpt2_small_lm": Workload(_gpt_lm, 1, _next_tokens, _lm_loss, count_batch=1, fisher_chunk=4,
                                    description=f"GPT-2 small blocks + {VOCAB}-word readout, {TOKENS} tokens")}


def structure_rows(name: str, workload, samples: int) -> list[dict]:
    torch.manual_seed(0)
    model = workload.build()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    xs, ys = workload.inputs(samples, gen, torch.device("cpu"))
    fisher = empirical_fisher(model, params, [(xs, ys)], samples, workload.loss, chunk_size=workload.fisher_chunk)
    costs = measure_costs(model, params, xs[:1])
    x, y = workload.inputs(workload.count_batch, gen, torch.device("cpu"))
    grads = torch.autograd.grad(workload.loss(model(x), y), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    total = sum(p.numel() for p in params)

    def mass(masks):
        return sum(float((f * m).sum()) for f, m in zip(fisher, masks))

    def norm(masks):
        return sum(float((g * g * m).sum()) for g, m in zip(grads, masks)) ** 0.5

    rows = []
    for s, fraction in SETTINGS:
        keep = keep_count(total, 1.0 - s)
        top = select_mask(fisher, Structure("unstructured"), keep)
        structures = {"unstructured (top-k)": top, "tensor": select_mask(fisher, Structure("tensor"), keep)}
        if s == 0.5:
            structures["2:4"] = select_mask(fisher, parse_structure("2:4"), keep)
        # the ascent pass on a fraction f of the batch: its per-sample budget is 1/f as large
        structures["budget"] = budget_select(fisher, costs, keep, ascent_budget(costs, s, fraction)).masks
        for structure, masks in structures.items():
            both = sum(float((g * g * (a & b)).sum()) for g, a, b in zip(grads, top, masks))
            rows.append(dict(model=name, sparsity=f"{s:.0%}", ascent_fraction=fraction, structure=structure,
                             fisher_mass_vs_topk=mass(masks) / mass(top),
                             cosine_vs_topk=both / (norm(top) * norm(masks)) if norm(masks) else 0.0,
                             density=sum(int(m.sum()) for m in masks) / total,
                             step_flops_vs_sgd=1.0 + fraction * costs.ascent(masks) / costs.sgd,
                             paper_flops_vs_sgd=paper_flops(s),
                             setup=f"Fisher of {samples} synthetic samples, gradient of a batch of {workload.count_batch}"))
    return rows


BUDGET = ["--structure", "budget", "--norm", "masked", "--ascent-backward", "exact"]
ACCURACY_RUNS = {  # label -> ssam-train arguments
    "SGD": ["--opt", "sgd"],
    "SAM": ["--opt", "sam"],
    "SAM, ascent on 50% of the batch": ["--opt", "sam", "--ascent-fraction", "0.5"],
    "SAM, ascent on 25% of the batch": ["--opt", "sam", "--ascent-fraction", "0.25"],
    "SSAM-F 50% unstructured": ["--opt", "ssamf", "--sparsity", "0.5"],
    "SSAM-F 50% budget, exact": ["--opt", "ssamf", "--sparsity", "0.5", *BUDGET],
    "SSAM-F 90% unstructured": ["--opt", "ssamf", "--sparsity", "0.9"],
    "SSAM-F 90% budget, exact": ["--opt", "ssamf", "--sparsity", "0.9", *BUDGET],
    "SSAM-F 99% budget, exact, ascent on 50%": ["--opt", "ssamf", "--sparsity", "0.99", *BUDGET, "--ascent-fraction", "0.5"],
    "SSAM-D 90% unstructured": ["--opt", "ssamd", "--sparsity", "0.9"],
    "SSAM-D 90% budget, exact": ["--opt", "ssamd", "--sparsity", "0.9", *BUDGET],
}


def step_flops(extra: list[str]) -> float:
    """One ssam-train step (batch 64) counted by torch's FlopCounterMode, relative to SGD's,
    after the mask update (SSAM-F's Fisher is not part of the step)."""
    args = parse_args(extra + ["--quiet", "--device", "cpu"])
    train_set, _ = load_digits(0)
    x, y = train_set.tensors[0][:args.batch_size], train_set.tensors[1][:args.batch_size]
    torch.manual_seed(0)
    model = TRAIN_MODELS[args.model]()
    opt = build_optimizer(args, model, x[:1])
    if isinstance(opt, SSAMF):
        opt.update_mask(model, train_set)

    def closure():
        xb, yb = opt.batch(x, y) if isinstance(opt, SAM) else (x, y)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    def step():
        opt.zero_grad(set_to_none=True)
        if isinstance(opt, SAM):
            opt.step(closure)
        else:
            closure()

    return counted_flops(step) / counted_flops(closure)


def accuracy_rows(epochs: int, seeds: list[int]) -> list[dict]:
    rows = []
    for label, extra in ACCURACY_RUNS.items():
        accs = [train(parse_args(extra + ["--epochs", str(epochs), "--seed", str(seed), "--quiet", "--device", "cpu"]))
                ["test_accuracy"] for seed in seeds]
        rows.append(dict(run=label, accuracy=statistics.mean(accs), std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         seeds=len(accs), step_flops_vs_sgd=step_flops(extra),
                         setup=f"ssam-train (digits conv net), {epochs} epochs, 359 test digits"))
    return rows


STRUCTURE_COLUMNS = [("model", "model", ""), ("sparsity", "sparsity", ""), ("ascent_fraction", "ascent fraction", ".2f"),
                     ("structure", "structure", ""),
                     ("fisher_mass_vs_topk", "Fisher mass / top-k's", ".3f"),
                     ("cosine_vs_topk", "cosine to top-k's perturbation", ".3f"), ("density", "density", ".4f"),
                     ("step_flops_vs_sgd", "step FLOPs / SGD (exact backward)", ".3f"), ("paper_flops_vs_sgd", "paper", ".2f"),
                     ("setup", "setup", "")]
ACCURACY_COLUMNS = [("run", "run", ""), ("accuracy", "test accuracy", ".4f"), ("std", "std", ".4f"),
                    ("seeds", "seeds", "d"), ("step_flops_vs_sgd", "step FLOPs / SGD (counted)", ".3f"),
                    ("setup", "setup", "")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=16, help="Fisher samples per model (default 16)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the accuracy runs")
    p.add_argument("--seeds", type=int, default=3, help="accuracy runs per configuration (seeds 0..n-1)")
    p.add_argument("--quick", action="store_true", help="ResNet-18 only, 4 samples, 1 seed, 2 epochs")
    p.add_argument("--out", default=None, help="write JSON + Markdown here (these figures are device-independent)")
    args = p.parse_args(argv)
    models = {"resnet18_cifar": MODELS["resnet18_cifar"]} if args.quick else MODELS
    samples, epochs, seeds = (4, 2, 1) if args.quick else (args.samples, args.epochs, args.seeds)
    rows = []
    for name, workload in models.items():
        rows += structure_rows(name, workload, samples)
    report("budget", "Mask structures against the unstructured top-k (Fisher mass, perturbation, FLOPs)", rows, STRUCTURE_COLUMNS,
           torch.device("cpu"), args.out)
    report("budget_accuracy", "Digits accuracy with the budget mask", accuracy_rows(epochs, list(range(seeds))),
           ACCURACY_COLUMNS, torch.device("cpu"), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
