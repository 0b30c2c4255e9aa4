"""The descent step fused with the exact restore: put back the values ``perturb_`` overwrote,
then apply ``torch.optim.SGD``'s update (momentum, dampening, weight decay, nesterov,
maximize) with the gradient taken at ``w + e``: one pass over the weights instead of two."""

from __future__ import annotations

import math

import torch

from .. import _checks
from .._backend import lazy
from .._host_loops import c_fit, check_list_operands, unexplained_misfit
from .._library import Op
from .bitmask import mask_args
from .perturb import PerturbBackup, check_writable, check_backup, restore_torch


def sgd_update_torch(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """``torch.optim.SGD``'s single-tensor update, op for op (bitwise equal on the same device)."""
    out = []
    for w, g, buf in zip(params, grads, momentum_buffers):
        d = -g if maximize else g
        if weight_decay != 0:
            d = d.add(w, alpha=weight_decay)
        if momentum != 0:
            if buf is None:
                buf = d.detach().clone()
            else:
                buf.mul_(momentum).add_(d, alpha=1 - dampening)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        w.add_(d, alpha=-lr)
        out.append(buf)
    return out


def restore_sgd_step_torch(params, grads, buffers, backup, hyper, fresh) -> None:
    """Reference. With momentum, ``buffers[i]`` is the buffer, updated in place, or (where
    ``fresh[i]``) a new one the caller allocated, which gets the step's direction."""
    restore_torch(params, backup)
    if hyper["momentum"] == 0:
        sgd_update_torch(params, grads, [None] * len(params), **hyper)
        return
    made = sgd_update_torch(params, grads, [None if new else b for b, new in zip(buffers, fresh)], **hyper)
    for b, m, new in zip(buffers, made, fresh):
        if new:
            b.copy_(m)


def _run(impl, params, grads, buffers, fresh, values, masks, lr, momentum, dampening, weight_decay, nesterov,
         maximize):
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 maximize=maximize)
    shaped = {"grads": grads}
    if momentum != 0 or buffers or fresh:
        if len(fresh) != len(params):
            raise ValueError(f"restore_sgd_step_: fresh has {len(fresh)} entries but params has {len(params)}")
        shaped["momentum_buffers"] = buffers
    check_list_operands("restore_sgd_step_", params, shaped, values, masks)
    impl(params, grads, list(buffers), PerturbBackup(values, masks), hyper, list(fresh))


# The buffers come from the caller, new ones allocated there (``fresh``): the op returns nothing
# (what torch.compile's functionalization of a mutating op takes). Without momentum both
# lists are empty. Checked as perturb_'s operands are (see PERTURB).
RESTORE_SGD_STEP = Op(
    "restore_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, bool[] fresh, "
    "Tensor[] values, Tensor?[] masks, float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
    "bool maximize, str backend) -> ()",
    {"torch": restore_sgd_step_torch, "triton": lazy("ssam_kernels.triton_ops.sgd_step", "restore_sgd_step_triton")},
    fake=lambda *args: None, adapt=_run)


def _real(name: str, value, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (value >= low and (torch.compiler.is_compiling() or math.isfinite(value))):  # (no isfinite on a SymFloat)
        raise ValueError(f"{name} must be a finite number >= {low}, got {value}")
    return float(value)


def restore_sgd_step_(params, grads, momentum_buffers, backup: PerturbBackup, *, lr: float, momentum: float = 0.0,
                      dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                      maximize: bool = False, backend: str = "auto") -> list[torch.Tensor | None]:
    """``restore_(params, backup)`` then one SGD step of every param with its grad.

    ``momentum_buffers`` has one entry per param: its buffer (updated in place) or None (a new
    one is made from the step's direction, as torch's SGD does on its first step). Returns the
    buffers (None where ``momentum == 0``). The Triton kernel computes in fp32 (in float64 for
    float64 params) and rounds once; the reference follows torch's SGD op for op.

    Args:
        params: the tensors ``perturb_`` perturbed (written in place, under ``torch.no_grad()``).
        grads: one gradient per param, shaped like it (the descent pass's).
        momentum_buffers: one entry per param, a tensor shaped like it on its device or None.
        backup: the :class:`PerturbBackup` that ``perturb_`` returned for ``params``.
        lr, momentum, dampening, weight_decay: finite numbers >= 0, as ``torch.optim.SGD``.
        nesterov: bool; needs ``momentum > 0`` and ``dampening == 0``.
        maximize: bool; step up the gradient.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
    """
    params = _checks.tensor_list("params", params)
    grads = _checks.tensor_list("grads", grads)
    _checks.same_shapes("grads", grads, "params", params)
    if not isinstance(momentum_buffers, (list, tuple)) or len(momentum_buffers) != len(params):
        raise ValueError("momentum_buffers must be a list with one entry (a tensor or None) per param")
    momentum_buffers = list(momentum_buffers)
    fit = c_fit("tensors_misfit", momentum_buffers, False, params, True)
    if not fit:
        for i, (b, w) in enumerate(zip(momentum_buffers, params)):
            if b is not None and (not isinstance(b, torch.Tensor) or b.shape != w.shape or b.device != w.device):
                raise ValueError(f"momentum_buffers[{i}] must be None or a tensor shaped like params[{i}] on its "
                                 "device")
        if fit is False:
            raise unexplained_misfit("momentum_buffers")
    for name, flag in (("nesterov", nesterov), ("maximize", maximize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    hyper = dict(lr=_real("lr", lr), momentum=_real("momentum", momentum), dampening=_real("dampening", dampening),
                 weight_decay=_real("weight_decay", weight_decay), nesterov=nesterov, maximize=maximize)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov needs momentum > 0 and dampening == 0 (as torch.optim.SGD)")
    check_backup(params, backup)
    check_writable(params)
    _checks.disjoint_lists([("params", params), ("momentum_buffers", momentum_buffers)])
    if hyper["momentum"] == 0:
        buffers, fresh = [], []
    else:  # torch's SGD keeps a buffer in its grad's dtype and layout (a clone of the direction)
        fresh = [b is None for b in momentum_buffers]
        buffers = [torch.empty_like(g) if b is None else b for b, g in zip(momentum_buffers, grads)]
    if _checks.spans_devices(params):
        RESTORE_SGD_STEP.across_devices(backend, params[0].device)(params, grads, buffers, backup, hyper, fresh)
    else:
        RESTORE_SGD_STEP(params, grads, buffers, fresh, backup.values, mask_args(backup.masks), hyper["lr"],
                         hyper["momentum"], hyper["dampening"], hyper["weight_decay"], hyper["nesterov"],
                         hyper["maximize"], backend=backend)
    return buffers if buffers else [None] * len(params)
