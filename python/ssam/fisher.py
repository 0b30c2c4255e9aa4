"""Empirical Fisher: ``F = sum_i (grad_w loss(x_i, y_i))**2`` over single samples.

The official code loops with batch size 1; here each sample's gradient is computed with
``torch.func.vmap`` over a chunk of samples, the model seeing each sample as a batch of one
(so BatchNorm in train mode normalises each sample by its own statistics, as in the loop).
BatchNorm running statistics are left untouched, and ``.grad`` is not written.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def frozen_batchnorm_stats(model: torch.nn.Module):
    """BatchNorm layers in train mode keep normalising by batch statistics but stop updating
    (and stop reading) their running statistics; restored on exit."""
    changed = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def draw_samples(data, num_samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``num_samples`` ``(x, y)`` pairs, stacked.

    ``data`` is a map-style ``Dataset`` (samples drawn at random without replacement with
    ``generator``, like the official shuffled DataLoader) or an iterable of ``(x, y)`` batches
    (taken in order until enough samples are collected).
    """
    if isinstance(data, torch.utils.data.IterableDataset):
        raise TypeError("data is an IterableDataset; pass a map-style Dataset or an iterable of (x, y) batches (e.g. a DataLoader)")
    if isinstance(data, torch.utils.data.Dataset):
        n = len(data)
        if n == 0:
            raise ValueError("data is an empty Dataset")
        index = torch.randperm(n, generator=generator)[:num_samples].tolist()
        batch = torch.utils.data.default_collate([data[i] for i in index])
        return _as_pair(batch)
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(f"data must be a Dataset or an iterable of (x, y) batches, got {type(data).__name__}") from None
    xs, ys, have = [], [], 0
    for batch in iterator:
        x, y = _as_pair(batch)
        xs.append(x[: num_samples - have])
        ys.append(y[: num_samples - have])
        have += xs[-1].shape[0]
        if have >= num_samples:
            break
    if not have:
        raise ValueError("data yielded no samples")
    return torch.cat(xs), torch.cat(ys)


def _as_pair(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"each batch / sample must be an (x, y) pair, got {type(batch).__name__}")
    x, y = batch
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be tensors")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"a batch needs x and y with the same leading (batch) size, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


def empirical_fisher(
    model: torch.nn.Module,
    params: list[torch.Tensor],
    data,
    num_samples: int,
    loss_fn: Callable | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 32,
) -> list[torch.Tensor]:
    """Sum over up to ``num_samples`` samples of the squared per-sample gradient of
    ``loss_fn(model(x[None]), y[None])`` (cross-entropy by default) w.r.t. each of ``params``.

    ``params`` must be parameters of ``model``; the others are held constant. Returns fp32
    tensors shaped like ``params``.
    """
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    names_by_id = {id(p): name for name, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names_by_id]
    if missing:
        raise ValueError(f"optimizer parameters {missing} are not parameters of model")
    names = [names_by_id[id(p)] for p in params]
    device = params[0].device
    x_all, y_all = draw_samples(data, num_samples, generator if generator is not None else torch.Generator())
    x_all, y_all = x_all.to(device), y_all.to(device)

    constants = {n: t.detach() for n, t in model.named_parameters() if n not in set(names)}
    constants.update(dict(model.named_buffers()))

    def sample_loss(values, x, y):
        state = {**constants, **dict(zip(names, values))}
        out = functional_call(model, state, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
    values = tuple(p.detach() for p in params)
    fisher = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params]
    with frozen_batchnorm_stats(model):
        for start in range(0, x_all.shape[0], chunk_size):
            x, y = x_all[start : start + chunk_size], y_all[start : start + chunk_size]
            try:
                grads = per_sample(values, x, y)
            except (RuntimeError, NotImplementedError) as exc:
                warnings.warn(f"vmap over the model failed ({exc}); computing per-sample gradients in a loop", stacklevel=2)
                grads = _loop_grads(sample_loss, values, x, y)
            for f, g in zip(fisher, grads):
                f.add_(g.float().square().sum(dim=0))
    return fisher


def _loop_grads(sample_loss, values, x, y) -> list[torch.Tensor]:
    """Per-sample gradients one sample at a time (for models ``vmap`` cannot trace)."""
    rows = []
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in values]
        for i in range(x.shape[0]):
            rows.append(torch.autograd.grad(sample_loss(leaves, x[i], y[i]), leaves, allow_unused=True))
    return [
        torch.stack([r[j] if r[j] is not None else torch.zeros_like(values[j]) for r in rows])
        for j in range(len(values))
    ]
