"""Gradient norm over a list of tensors: ``||concat(t_i * m_i)||_2`` with fp32 accumulation, or
float64 accumulation where any tensor is float64."""

from __future__ import annotations

import torch

from .. import _checks
from .._backend import lazy
from .._library import Op
from .bitmask import check_mask_args, mask_args


def accumulation_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """float64 where any tensor is float64 (fp32 sums would round a float64 gradient's norm to
    fp32 precision), else fp32: the dtype of the sums and of the result."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def grad_norm_torch(tensors: list[torch.Tensor], masks: list) -> torch.Tensor:
    """Reference: per-tensor sums of squares in the accumulation dtype (torch's sum is cascaded,
    so accurate over millions of elements; vector_norm on CPU is not), summed on the first
    tensor's device."""
    device = tensors[0].device
    dtype = accumulation_dtype(tensors)
    parts = []
    for t, m in zip(tensors, masks):
        values = t if m is None else t[_checks.as_bool(m, like=t)]
        parts.append(values.to(dtype).square().sum().to(device))
    return torch.stack(parts).sum().sqrt()


def _run(impl, tensors, masks):
    # the implementations read the bits as given (bits_of): a direct torch.ops call's are checked
    check_mask_args(masks, tensors)
    if _checks.spans_devices(tensors):  # (a direct call: the kernels launch on one device)
        return grad_norm_torch(tensors, masks)
    return impl(tensors, masks)


def _fake(tensors, masks):
    return tensors[0].new_empty((), dtype=accumulation_dtype(tensors))


GRAD_NORM = Op("grad_norm(Tensor[] tensors, Tensor?[] masks, str backend) -> Tensor",
               {"torch": grad_norm_torch,
                "triton": lazy("ssam_kernels.triton_ops.grad_norm", "grad_norm_triton"),
                "ext": lazy("ssam_kernels.ext_ops", "grad_norm_ext")},
               fake=_fake, adapt=_run)


def _norm(tensors, masks, backend: str) -> torch.Tensor:
    if _checks.spans_devices(tensors):  # the reference reduces each tensor on its own device
        return GRAD_NORM.across_devices(backend, tensors[0].device)(tensors, masks)
    return GRAD_NORM(tensors, mask_args(masks), backend=backend)


class _GradNormFunction(torch.autograd.Function):
    """The norm where a tensor requires a gradient: ``d||v|| / dv = v / ||v||`` on the masked
    entries (0 elsewhere, and everywhere at ``v = 0``, as ``torch.linalg.vector_norm``)."""

    @staticmethod
    def forward(ctx, masks, backend, *tensors):
        norm = _norm(list(tensors), masks, backend)
        ctx.masks = masks
        ctx.save_for_backward(norm, *tensors)
        return norm

    @staticmethod
    def backward(ctx, grad):
        norm, *tensors = ctx.saved_tensors
        scale = torch.where(norm > 0, grad / norm, torch.zeros_like(norm))
        grads = []
        for t, m, needed in zip(tensors, ctx.masks, ctx.needs_input_grad[2:]):
            if not needed:
                grads.append(None)
                continue
            g = t.to(scale.dtype) * scale.to(t.device)
            if m is not None:
                g = torch.where(_checks.as_bool(m, like=t), g, torch.zeros((), dtype=g.dtype, device=g.device))
            grads.append(g.to(t.dtype))
        return (None, None, *grads)


def grad_norm(tensors, masks=None, *, backend: str = "auto") -> torch.Tensor:
    """L2 norm over all elements of ``tensors`` (of ``t * m`` where ``masks`` are given).

    Args:
        tensors: non-empty list of floating-point tensors (any shapes; empty tensors add 0).
        masks: None, or one entry per tensor: a bool tensor or :class:`~ssam_kernels.BitMask`
            shaped like it, or None for "all elements".
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"ext"``.

    Returns:
        0-dim tensor on the device of ``tensors[0]``: float64 where any tensor is float64, and
        then every tensor's squares are summed in float64; else float32, with fp32 accumulation
        whatever the input dtype. Tensors on other devices are reduced there and their partial
        norms moved. Differentiable where a tensor requires a gradient (grad mode on).
    """
    tensors = _checks.tensor_list("tensors", tensors)
    masks = _checks.mask_list(masks, tensors, "tensors")
    if torch.is_grad_enabled() and _checks.any_requires_grad(tensors):  # (an optimizer's call: grad mode off)
        return _GradNormFunction.apply(masks, backend, *tensors)
    return _norm(tensors, masks, backend)
