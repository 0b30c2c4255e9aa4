"""BatchNorm running statistics that change once per SAM step, not once per pass."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def frozen_batchnorm_stats(model: torch.nn.Module, enabled: bool = True):
    """BatchNorm layers of ``model`` in train mode keep normalising by batch statistics but
    stop updating (and reading) their running statistics and ``num_batches_tracked``; restored
    on exit. ``enabled=False`` changes nothing.

    A SAM step runs two forward passes in train mode, so BatchNorm would count each batch
    twice, once at the perturbed weights ``w + e``. Run the second pass inside this::

        def closure():
            with ssam.frozen_batchnorm_stats(model, enabled=opt.perturbed):
                loss = loss_fn(model(x), y)
            loss.backward()
            return loss

    The statistics then move exactly as in SGD training, from the pass at ``w``. Unlike
    setting ``momentum = 0`` (davda54/sam's recipe), this also leaves ``num_batches_tracked``
    alone and works with ``momentum=None`` (cumulative averages).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    changed = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats] \
        if enabled else []
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True
