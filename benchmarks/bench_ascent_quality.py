"""How close each approximate ascent mode's perturbation is to the exact one, and what it does
to accuracy: device-independent quality figures (no timing).

1. Cosine similarity between the perturbation ``e = rho g_mode ⊙ m / ||g_mode ⊙ m||`` of each
   mode and that of ``"exact"`` (which equals the dense masked gradient), over all parameters,
   on an all-Linear digits MLP mid-training (SGD for a few epochs), with an SSAM-F Fisher mask
   (structure ``2:4:out``, the one ``implicit`` can run sparse). MVUE modes: mean and standard
   deviation over draws.
2. Final test accuracy of short ``ssam-train --model mlp`` runs per mode: mean and standard
   deviation over seeds (the seed sets the split, the init and the data order).

    python -m ssam_bench.bench_ascent_quality [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from ssam_bench.common import report

import ssam
from ssam_kernels import ASCENT_MODES
from ssam.models import DigitsMLP
from ssam.train import load_digits, parse_args, train

MODES = ASCENT_MODES[1:]  # every mode but dense; "exact" is the reference


def trained_model(epochs: int, seed: int):
    torch.manual_seed(seed)
    train_set, _ = load_digits(seed)
    model = DigitsMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model, train_set


def perturbation(model, opt, x, y) -> torch.Tensor:
    """The flattened masked, normalised ascent direction of ``opt``'s mode."""
    model.zero_grad(set_to_none=True)
    with opt.ascent():
        F.cross_entropy(model(x), y).backward()
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)) * m for p, m in zip(model.parameters(), opt.masks())]
    flat = torch.cat([t.reshape(-1) for t in parts])
    return flat / flat.norm()


def cosine_rows(epochs: int, draws: int, seed: int) -> list[dict]:
    model, train_set = trained_model(epochs, seed)
    x, y = train_set.tensors[0][:256], train_set.tensors[1][:256]
    opts = {}
    for mode in MODES:
        opts[mode] = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=None, num_samples=128,
                                update_freq=1, structure="2:4:out", norm="masked", ascent_backward=mode, seed=seed, lr=0.05)
        opts[mode].update_mask(model, train_set)
    exact = perturbation(model, opts["exact"], x, y)
    rows = []
    for mode in MODES[1:]:
        n = draws if mode.startswith("mvue") else 1
        cos = [float(perturbation(model, opts[mode], x, y) @ exact) for _ in range(n)]
        rows.append(dict(measure="cosine(e_mode, e_exact)", mode=mode, value=statistics.mean(cos),
                         std=statistics.stdev(cos) if n > 1 else 0.0, draws=n,
                         setup=f"DigitsMLP after {epochs} SGD epochs, 256 samples, SSAM-F mask 2:4:out"))
    return rows


def accuracy_rows(epochs: int, seeds: list[int]) -> list[dict]:
    rows = []
    for mode in ("dense",) + MODES:
        accs = []
        for seed in seeds:
            args = parse_args(["--opt", "ssamf", "--model", "mlp", "--structure", "2:4:out", "--norm", "masked",
                               "--ascent-backward", mode, "--epochs", str(epochs), "--seed", str(seed), "--quiet",
                               "--device", "cpu"])
            accs.append(train(args)["test_accuracy"])
        rows.append(dict(measure="test accuracy", mode=mode, value=statistics.mean(accs),
                         std=statistics.stdev(accs) if len(accs) > 1 else 0.0, draws=len(accs),
                         setup=f"ssam-train --model mlp --structure 2:4:out --norm masked, {epochs} epochs, "
                               f"seeds {seeds[0]}..{seeds[-1]} (359 test digits)"))
    return rows


COLUMNS = [("measure", "measure", ""), ("mode", "ascent_backward", ""), ("value", "mean", ".4f"),
           ("std", "std", ".4f"), ("draws", "draws / runs", "d"), ("setup", "setup", "")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10, help="epochs of the accuracy runs (the cosine model gets half)")
    p.add_argument("--draws", type=int, default=20, help="MVUE draws for the cosine statistics")
    p.add_argument("--seeds", type=int, default=3, help="accuracy runs per mode (seeds 0..n-1)")
    p.add_argument("--out", default=None, help="write JSON + Markdown here (these figures are device-independent)")
    args = p.parse_args(argv)
    rows = cosine_rows(max(1, args.epochs // 2), args.draws, 0) + accuracy_rows(args.epochs, list(range(args.seeds)))
    report("ascent_quality", "Ascent modes: perturbation cosine to exact, and test accuracy", rows, COLUMNS,
           torch.device("cpu"), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
