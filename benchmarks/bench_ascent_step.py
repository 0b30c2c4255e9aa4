"""Ascent-pass and whole-step time of SSAM per ``ascent_backward`` mode, relative to an SGD step
measured in the same process, beside the counted and the paper's FLOP ratios.

Models (synthetic inputs; timing only): a ViT-S/16-style model (224x224, batch 64) and a
GPT-2-small-style MLP stack (12 residual blocks LayerNorm-Linear(768, 3072)-GELU-Linear(3072,
768), 8 x 1024 tokens), both under bf16 autocast on a GPU. SSAM is SSAM-D's optimizer with a
fixed 2:4 mask (``2:4:out`` for ``implicit``, whose sparse GEMM needs groups along the output
dim) and ``norm="masked"``; SGD has momentum. Each step is ``zero_grad(); step(closure)``, so
the optimizer runs the ascent pass in its mode. FLOPs are counted with ``FlopCounterMode``
(a cuSPARSELt product counts as half the dense one). The paper's column is
``1 + 0.3 + 0.7 (1 - s)`` at s = 0.5, i.e. 1.65x, and 2x for SAM.

    python benchmarks/bench_ascent_step.py            # on a GPU
    python benchmarks/bench_ascent_step.py --quick    # tiny models (on a CPU: printed, labelled CPU)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ssam_bench.common import interleaved_medians, report

import ssam
from ssam_kernels import ASCENT_MODES
from ssam.models.vit import ViT

PAPER = {"sgd": 1.0, "sam": 2.0, "ssam": 1.0 + 0.3 + 0.7 * 0.5}


class MLPStack(nn.Module):
    """GPT-2-small-style MLP blocks (pre-norm, residual)."""

    def __init__(self, dim: int, hidden: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) for _ in range(depth)
        )

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def workload(name: str, quick: bool, device):
    """(model factory, inputs, loss function)."""
    gen = torch.Generator(device=device).manual_seed(0)
    if name == "vit":
        if quick:
            build, x = (lambda: ViT(32, 8, 64, 2, 2, 10)), torch.randn(8, 3, 32, 32, device=device, generator=gen)
        else:
            build, x = (lambda: ViT(224, 16, 384, 12, 6, 1000)), torch.randn(64, 3, 224, 224, device=device, generator=gen)
        y = torch.randint(0, 10, (x.shape[0],), device=device, generator=gen)
        return build, x, lambda out: F.cross_entropy(out.float(), y)
    dim, hidden, depth, tokens = (64, 256, 2, 256) if quick else (768, 3072, 12, 8192)
    seq = min(tokens, 1024)
    x = torch.randn(tokens // seq, seq, dim, device=device, generator=gen)
    return (lambda: MLPStack(dim, hidden, depth)), x, lambda out: out.float().square().mean()


def contenders(build, x, loss_fn, device):
    """name -> (model, optimizer, mode)."""
    out = {}
    for name in ("sgd", "sam") + tuple(f"ssam {m}" for m in ASCENT_MODES):
        torch.manual_seed(0)
        model = build().to(device)
        base = dict(lr=0.01, momentum=0.9)
        if name == "sgd":
            opt = torch.optim.SGD(model.parameters(), **base)
        elif name == "sam":
            opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **base)
        else:
            mode = name.split()[1]
            opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=None, drop_rate=0.0, T_end=1,
                             structure="2:4:out" if mode == "implicit" else "2:4", norm="masked",
                             ascent_backward=mode, seed=0, **base)
        out[name] = (model, opt)
    return out


def step_fn(model, opt, x, loss_fn, device, autocast: bool):
    def closure():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(x))
        loss.backward()
        return loss

    def step():
        opt.zero_grad(set_to_none=True)
        if isinstance(opt, ssam.SAM):
            opt.step(closure)
        else:
            closure()
            opt.step()

    def ascent():
        opt.zero_grad(set_to_none=True)
        with opt.ascent() if isinstance(opt, ssam.SAM) else torch.enable_grad():
            closure()

    return step, ascent


def _cslt_flops(*args, out_shape=None, **kwargs) -> int:
    dense_b = args[1]  # [k, n] (shape, as FlopCounterMode passes shapes)
    return out_shape[0] * out_shape[1] * dense_b[0]  # half of 2 m n k


def counted_flops(fn) -> int:
    mapping = {torch.ops.aten._cslt_sparse_mm: _cslt_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def bench(name: str, quick: bool, device, reps: int) -> list[dict]:
    build, x, loss_fn = workload(name, quick, device)
    autocast = device.type == "cuda"
    fns, asc, flops = {}, {}, {}
    peaks = {}
    for cname, (model, opt) in contenders(build, x, loss_fn, device).items():
        step, ascent = step_fn(model, opt, x, loss_fn, device, autocast)
        fns[cname], asc[cname + " ascent"] = step, ascent
        flops[cname] = counted_flops(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            peaks[cname] = torch.cuda.max_memory_allocated(device) / 2**30
    times = interleaved_medians({**fns, **asc}, device, warmup=3, reps=reps)
    sgd = times["sgd"]
    rows = []
    for cname in fns:
        kind = "ssam" if cname.startswith("ssam") else cname
        rows.append(dict(model=name, optimizer=cname, step_ms=times[cname] * 1e3, step_vs_sgd=times[cname] / sgd,
                         ascent_ms=times[cname + " ascent"] * 1e3, ascent_vs_sgd=times[cname + " ascent"] / sgd,
                         counted_flops_vs_sgd=flops[cname] / flops["sgd"], paper_flops_vs_sgd=PAPER[kind],
                         peak_gib=peaks.get(cname)))
    return rows


COLUMNS = [("model", "model", ""), ("optimizer", "optimizer", ""), ("step_ms", "step ms", ".2f"),
           ("step_vs_sgd", "step / SGD", ".3f"), ("ascent_ms", "ascent pass ms", ".2f"),
           ("ascent_vs_sgd", "ascent / SGD step", ".3f"), ("counted_flops_vs_sgd", "counted FLOPs / SGD", ".3f"),
           ("paper_flops_vs_sgd", "paper FLOPs / SGD", ".2f"), ("peak_gib", "peak GiB (GPU)", ".2f")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, few repetitions")
    p.add_argument("--models", nargs="+", choices=("vit", "mlp_stack"), default=["vit", "mlp_stack"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    reps = 5 if args.quick else 20
    rows = [r for m in args.models for r in bench(m, args.quick, device, reps)]
    report("ascent_step", "SSAM step time per ascent_backward mode, relative to SGD", rows, COLUMNS, device, args.out,
           note=" (synthetic inputs" + (", bf16 autocast)" if device.type == "cuda" else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
