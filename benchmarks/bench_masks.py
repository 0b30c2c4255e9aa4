"""Mask-update cost: SSAM-F's Fisher mask on 128 samples and SSAM-D's drop/grow update, ours
against the official code's algorithms. Target: at least 20x faster.

* Fisher, official: one sample at a time (batch size 1): forward, ``loss.backward()``,
  ``fisher += grad ** 2`` per parameter, ``model.zero_grad()``; then ``torch.topk`` over the
  concatenated scores and a float mask scattered back. The samples are already stacked on
  the device: the official DataLoader (batch size 1, 4 workers) is left out, which only
  flatters the official side.
* Fisher, ours: ``SSAMF.update_mask(model, data)``: per-sample gradients by chunks of
  samples (for Linear / Conv / BatchNorm models, one batched pass with per-layer per-sample
  weight gradients; else ``torch.func.vmap``: see :mod:`ssam.fisher`), then
  ``ssam_kernels.topk_mask`` (no concatenation, bit-packed mask).
* Fisher scores alone, by way of taking the per-sample gradients (``empirical_fisher(...,
  method=...)``: the per-layer one where it takes the model, and ``vmap``), against the
  official mask (whose top-k is a few ms of it): which way ``auto`` should try first.
* SSAM-D, official: drop scores ``(|grad| + 1e-7) * mask`` and random growth scores
  ``(u + 1e-7) * (1 - mask)`` moved to the CPU, concatenated, two ``torch.topk`` and
  scatters there, the float masks copied back per parameter.
* SSAM-D, ours: ``SSAMD.update_mask(epoch)`` at the same death rate (0.5) and sparsity (50%).

Ours: the median of several runs, interleaved, after a warm-up. The official algorithms: one run
each, after a warm-up of their own (the Fisher loop on 2 samples, the SSAM-D update once: the
first use of their shapes' cuDNN/cuBLAS setup stays out of their time) and after ours warmed the
device (8-60x slower on the H200: one run's noise does not change the ratio, and repeating them
took most of a GPU slot on GPT-2).

Models: the step benchmark's (synthetic inputs). Without a GPU only the tiny models run, and
the figures are labelled CPU.

    python -m ssam_bench.bench_masks             # the real models (GPU)
    python -m ssam_bench.bench_masks --quick     # the tiny models
"""

from __future__ import annotations

import argparse
import sys

import torch

import ssam
from ssam_bench.bench_step import QUICK_WORKLOADS, WORKLOADS, Workload
from ssam_bench.common import interleaved_medians, report, standalone_main, with_progress

SPARSITY = 0.5
DEATH_RATE = 0.5
FISHER_METHODS = ("layerwise", "vmap")  # timed alone too (the official column: its whole mask)
NUM_SAMPLES = 128
TARGET = 20.0
# the GPT-2 stack has one model; one token count is enough here
MODELS = ["resnet18_cifar", "wrn28_10", "resnet50", "vit_s16", "gpt2_small_2k"]


def official_fisher_mask(model, params, xs, ys, loss_fn, sparsity: float) -> list[torch.Tensor]:
    """The official SSAM-F mask: a batch-size-1 loop, then top-k over the concatenation."""
    fisher = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for i in range(xs.shape[0]):
            loss = loss_fn(model(xs[i : i + 1]), ys[i : i + 1])
            loss.backward()
            for f, p in zip(fisher, params):
                f += torch.square(p.grad).data
            model.zero_grad()
    flat = torch.cat([f.flatten() for f in fisher])
    keep = int(flat.numel() * (1 - sparsity))
    values, index = torch.topk(flat, keep)
    mask = torch.zeros_like(flat)
    mask.scatter_(0, index, torch.ones_like(values))
    return _split(mask, params)


@torch.no_grad()
def official_ssamd_update(params, masks: list[torch.Tensor], death_rate: float, sparsity: float) -> list[torch.Tensor]:
    """The official SSAM-D update (drop by |grad|, grow at random) with its host-side top-k."""
    death = torch.cat([((p.grad.abs() + 1e-7) * m).cpu().flatten() for p, m in zip(params, masks)])
    growth = torch.cat([((torch.rand_like(p) + 1e-7) * (1 - m)).cpu().flatten() for p, m in zip(params, masks)])
    live = int((1 - sparsity) * death.numel())
    survive = live - int(death_rate * live)
    d_values, d_index = torch.topk(death, survive)
    death_mask = torch.zeros_like(death)
    death_mask.scatter_(0, d_index, torch.ones_like(d_values))
    g_values, g_index = torch.topk(growth, live - survive)
    growth_mask = torch.zeros_like(growth)
    growth_mask.scatter_(0, g_index, torch.ones_like(g_values))
    return [m.to(p) for m, p in zip(_split(death_mask + growth_mask, params), params)]


def _split(flat: torch.Tensor, params) -> list[torch.Tensor]:
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].reshape(p.shape))
        start += p.numel()
    return out


def bench_model(name: str, workload: Workload, device, reps: int, num_samples: int) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    torch.manual_seed(0)
    model = workload.build().to(device)
    params = list(model.parameters())
    xs, ys = workload.inputs(num_samples, gen, device)
    base = dict(lr=0.01, momentum=0.9)
    ours_f = ssam.SSAMF(params, torch.optim.SGD, rho=0.05, sparsity=SPARSITY, num_samples=num_samples, update_freq=1,
                        fisher_chunk_size=workload.fisher_chunk, seed=0, **base)
    ours_d = ssam.SSAMD(params, torch.optim.SGD, rho=0.05, sparsity=SPARSITY, drop_rate=DEATH_RATE, T_end=10, seed=0,
                        **base)
    float_masks = [m.float() for m in ours_d.masks()]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen)
    grads = [p.grad for p in params]

    def restore_grads():  # the official Fisher loop zeroes them; the SSAM-D update reads them
        for p, g in zip(params, grads):
            p.grad = g

    def fisher_official():
        official_fisher_mask(model, params, xs, ys, workload.loss, SPARSITY)
        restore_grads()

    fns = {
        "fisher ours": lambda: ours_f.update_mask(model, [(xs, ys)], loss_fn=workload.loss),
        "ssam-d ours": lambda: ours_d.update_mask(0),
    }
    officials = {
        "fisher official": fisher_official,
        "ssam-d official": lambda: official_ssamd_update(params, float_masks, DEATH_RATE, SPARSITY),
    }
    updates = [("fisher", f"SSAM-F Fisher mask, {num_samples} samples"), ("ssam-d", "SSAM-D drop/grow")]
    for method in FISHER_METHODS:  # the Fisher scores alone, each way of taking per-sample gradients
        def scores(method=method):
            ssam.empirical_fisher(model, params, [(xs, ys)], num_samples, workload.loss,
                                  chunk_size=workload.fisher_chunk, method=method)
        try:
            scores()
        except ValueError:  # this way cannot take the model (the per-layer one: LayerNorm, tied weights...)
            continue
        fns[f"scores {method} ours"] = scores
        updates.append((f"scores {method}", f"Fisher scores alone, {method}"))
    times = interleaved_medians(fns, device, warmup=1, reps=reps)
    # the official ones warmed as ours are, outside their time: the Fisher loop on 2 samples (its
    # batch-size-1 shapes' cuDNN/cuBLAS first-use setup), the SSAM-D update once
    official_fisher_mask(model, params, xs[:2], ys[:2], workload.loss, SPARSITY)
    restore_grads()
    officials["ssam-d official"]()
    times.update(interleaved_medians(officials, device, warmup=0, reps=1))
    for update, _ in updates[2:]:  # against the official Fisher mask (its top-k included)
        times[f"{update} official"] = times["fisher official"]
    numel = sum(p.numel() for p in params)
    rows = []
    for update, what in updates:
        official, ours = times[f"{update} official"], times[f"{update} ours"]
        rows.append(dict(model=name, params_m=numel / 1e6, update=what, official_ms=official * 1e3, ours_ms=ours * 1e3,
                         speedup=official / ours, meets_target=official / ours >= TARGET))
    return rows


COLUMNS = [("model", "model", ""), ("params_m", "params (M)", ".1f"), ("update", "mask update", ""),
           ("official_ms", "official ms", ".1f"), ("ours_ms", "ours ms", ".1f"), ("speedup", "x official", ".1f"),
           ("meets_target", f"≥ {TARGET:.0f}x", "")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mask-models", nargs="+", choices=list(WORKLOADS) + list(QUICK_WORKLOADS), default=None,
                   help=f"models (default: {' '.join(MODELS)}; without a GPU or with --quick: the tiny ones)")


def run(args, device, progress_factory=None) -> list[dict]:
    tiny = args.quick or device.type != "cuda"
    names = args.mask_models or (list(QUICK_WORKLOADS) if tiny else MODELS)
    rows = []
    for name in with_progress(names, progress_factory, "masks"):
        workload = WORKLOADS.get(name) or QUICK_WORKLOADS[name]
        rows += bench_model(name, workload, device, 3 if tiny else 5, NUM_SAMPLES)
    return rows


def write(rows, device, out) -> dict:
    return report("masks", "Mask-update cost: ours vs the official algorithms", rows, COLUMNS, device, out, merge_on="model",
                  meta_extra=dict(sparsity=SPARSITY, death_rate=DEATH_RATE, num_samples=NUM_SAMPLES, target=TARGET),
                  note=" (synthetic inputs, fp32)")


def main(argv=None) -> int:
    return standalone_main(__doc__, add_arguments, run, write, argv, quick_help="the tiny models, few repetitions")


if __name__ == "__main__":
    sys.exit(main())
