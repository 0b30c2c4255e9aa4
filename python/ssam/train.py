"""``ssam-train``: train a small conv net on scikit-learn's bundled digits with SGD, SAM, SSAM-F
or SSAM-D, using the official code's training-loop calling convention. No download."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import ssam_kernels
from ssam_kernels import ASCENT_MODES

from .batchnorm import frozen_batchnorm_stats
from .budget import measure_costs
from .models import DigitsMLP, DigitsNet
from .sam import SAM
from .ssamd import SSAMD
from .ssamf import SSAMF
from .structure import parse_structure

OPTIMIZERS = ("sgd", "sam", "ssamf", "ssamd")
MODELS = {"convnet": DigitsNet, "mlp": DigitsMLP}


def load_digits(seed: int, test_fraction: float = 0.2):
    """Digits as ``(train, test)`` TensorDatasets of 1x8x8 images in [0, 1], split by ``seed``."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return torch.utils.data.TensorDataset(x[train], y[train]), torch.utils.data.TensorDataset(x[test], y[test])


def build_optimizer(args, model: torch.nn.Module, sample: torch.Tensor | None = None) -> torch.optim.Optimizer:
    """The optimizer ``args`` name. ``sample``: one input, needed by SSAM-D's budget structure
    (its FLOPs are measured on it)."""
    base = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    params = model.parameters()
    if args.opt == "sgd":
        return torch.optim.SGD(params, **base)
    if args.opt == "sam":
        return SAM(params, torch.optim.SGD, rho=args.rho, ascent_fraction=args.ascent_fraction, **base)
    sparsity = args.sparsity
    if sparsity is None and parse_structure(args.structure).kind != "nm":
        sparsity = 0.5
    if args.opt == "ssamf":
        return SSAMF(params, torch.optim.SGD, rho=args.rho, sparsity=sparsity, num_samples=args.num_samples,
                     update_freq=args.update_freq, structure=args.structure, norm=args.norm, seed=args.seed,
                     ascent_backward=args.ascent_backward, ascent_fraction=args.ascent_fraction, **base)
    costs = None
    if parse_structure(args.structure).kind == "budget":
        if sample is None:
            raise ValueError("SSAM-D's budget structure needs a sample input to measure the model's FLOPs")
        costs = measure_costs(model, list(model.parameters()), sample)
    return SSAMD(params, torch.optim.SGD, rho=args.rho, sparsity=sparsity, drop_rate=args.drop_rate,
                 update_freq=args.update_freq, T_end=args.epochs, structure=args.structure, norm=args.norm,
                 seed=args.seed, ascent_backward=args.ascent_backward, ascent_fraction=args.ascent_fraction,
                 ascent_costs=costs, **base)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data, device) -> float:
    model.eval()
    x, y = data.tensors
    pred = model(x.to(device)).argmax(dim=1)
    model.train()
    return (pred == y.to(device)).float().mean().item()


def train(args) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train_set, test_set = load_digits(args.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    model = MODELS[args.model]().to(device)
    opt = build_optimizer(args, model, train_set.tensors[0][:1].to(device))
    step_times = []
    bar = tqdm(range(args.epochs), desc=args.opt, unit="epoch", disable=args.quiet)
    for epoch in bar:
        model.train()
        for batch_idx, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            updates = getattr(opt, "mask_updates", 0)

            def closure():
                sam = isinstance(opt, SAM)
                xb, yb = opt.batch(x, y) if sam else (x, y)  # the ascent pass: --ascent-fraction
                # BatchNorm's statistics move once a step, from the pass at w (the README's recipe)
                with frozen_batchnorm_stats(model, enabled=sam and opt.perturbed):
                    loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            opt.zero_grad()
            with opt.ascent() if isinstance(opt, SAM) else contextlib.nullcontext():
                loss = closure()
            if args.opt == "sgd":
                opt.step()
            else:  # the official training loop's call
                opt.step(closure, model=model, epoch=epoch, batch_idx=batch_idx, train_data=train_set)
            if device.type == "cuda":
                torch.cuda.synchronize()
            # steps that updated the mask (each epoch's first, with --update-freq 1) and the very
            # first step (warm-up) are not timed: the mean is the step alone
            if not (epoch == 0 and batch_idx == 0) and getattr(opt, "mask_updates", 0) == updates:
                step_times.append(time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return {
        "opt": args.opt,
        "test_accuracy": accuracy(model, test_set, device),
        "mean_step_ms": 1e3 * sum(step_times) / len(step_times) if step_times else None,
        "mask_density": opt.mask_density() if hasattr(opt, "mask_density") else (1.0 if args.opt == "sam" else None),
        "backend": None if args.opt == "sgd" else ssam_kernels.backend_info(device)["ops"]["perturb_"]["auto"],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ssam-train", description=__doc__)
    p.add_argument("--opt", choices=OPTIMIZERS, default="ssamf", help="optimizer (default: ssamf)")
    p.add_argument("--model", choices=tuple(MODELS), default="convnet",
                   help="convnet (default) or mlp (all-Linear: every --ascent-backward mode applies to every layer)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights NOT perturbed (default 0.5; implied by an N:M structure)")
    p.add_argument("--structure", default="unstructured", help="unstructured | N:M (e.g. 2:4) | N:M:out | tensor | budget (with --norm masked --ascent-backward exact)")
    p.add_argument("--norm", choices=("full", "masked"), default="full", help="perturbation norm (default: full)")
    p.add_argument("--ascent-backward", choices=ASCENT_MODES, default="dense",
                   help="SSAM-F/D: backward of the ascent pass (default: dense; exact needs --norm masked)")
    p.add_argument("--ascent-fraction", type=float, default=1.0,
                   help="SAM/SSAM-F/D: share of each batch whose gradient sets the perturbation (default: 1)")
    p.add_argument("--rho", type=float, default=0.05, help="perturbation radius (default: 0.05)")
    p.add_argument("--epochs", type=int, default=10, help="(default: 10)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--lr", type=float, default=0.05, help="(default: 0.05)")
    p.add_argument("--momentum", type=float, default=0.9, help="(default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="(default: 5e-4)")
    p.add_argument("--num-samples", type=int, default=128, help="SSAM-F: Fisher samples (default: 128)")
    p.add_argument("--update-freq", type=int, default=1, help="SSAM-F/D: mask update every N epochs (default: 1)")
    p.add_argument("--drop-rate", type=float, default=0.5, help="SSAM-D: initial drop rate (default: 0.5)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda where torch sees one, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch-size must be >= 1")
    if args.ascent_backward != "dense" and args.opt not in ("ssamf", "ssamd"):
        p.error("--ascent-backward applies to --opt ssamf or ssamd")
    if args.ascent_fraction != 1.0 and args.opt == "sgd":
        p.error("--ascent-fraction applies to --opt sam, ssamf or ssamd")
    sparse_only = [flag for flag, value, default in (("--structure", args.structure, "unstructured"),
                                                      ("--sparsity", args.sparsity, None), ("--norm", args.norm, "full"))
                   if value != default]
    if sparse_only and args.opt not in ("ssamf", "ssamd"):
        why = "sam perturbs every weight" if args.opt == "sam" else "sgd perturbs nothing"
        p.error(f"{', '.join(sparse_only)} applies to --opt ssamf or ssamd ({why})")
    # options of one optimizer given to another would be taken and ignored
    for flag, value, default, takers in (("--num-samples", args.num_samples, 128, ("ssamf",)),
                                         ("--drop-rate", args.drop_rate, 0.5, ("ssamd",)),
                                         ("--update-freq", args.update_freq, 1, ("ssamf", "ssamd")),
                                         ("--rho", args.rho, 0.05, ("sam", "ssamf", "ssamd"))):
        if value != default and args.opt not in takers:
            p.error(f"{flag} applies to --opt {' or '.join(takers)}, not {args.opt}")
    try:
        parse_structure(args.structure)
        parse_device(args.device)
    except (TypeError, ValueError) as exc:
        p.error(str(exc))
    return args


def parse_device(name: str) -> torch.device:
    """A ``--device`` value: cpu or cuda[:N], a CUDA device torch sees; else ValueError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = train(args)
    except (TypeError, ValueError) as exc:
        print(f"ssam-train: error: {exc}", file=sys.stderr)
        return 2
    if result["backend"] is None:
        print(f"optimizer      {result['opt']}")
    else:
        mode = f", ascent backward {args.ascent_backward}" if args.opt in ("ssamf", "ssamd") else ""
        print(f"optimizer      {result['opt']} (structure {args.structure}{mode}, ssam_kernels backend {result['backend']})")
    print(f"test accuracy  {100 * result['test_accuracy']:.2f}%")
    step_ms = result["mean_step_ms"]
    print(f"mean step time {'- (no step to time: the first, and those updating the mask, are not)' if step_ms is None else f'{step_ms:.2f} ms'}"
          f" ({args.device})")
    density = result["mask_density"]
    print(f"mask density   {'- (no perturbation)' if density is None else f'{density:.4f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
