"""Convolutions whose backward computes the exact *masked* ascent gradient, skipping the
weight-gradient rows (output channels) that hold no masked entry.

The forward is ``F.conv{1,2,3}d``'s (autocast honoured). The backward returns

* ``dW = (dense dW) ⊙ M``, computed only for the output channels ``R`` whose mask row holds a
  set entry: ``convolution_backward(dY[:, R], X, W[R])``, so its FLOPs are ``|R| / out`` of the
  dense weight gradient's. Where ``R`` is a contiguous range (what budget masks choose), or
  scattered over a span barely wider (``SPAN_SLACK``), the span is computed on views
  (``narrow``) and zero-padded around (one ``constant_pad_nd``); for wider scattered rows
  ``dY[:, R]`` is gathered (``W[R]`` is not: a weight gradient reads only its weight's shape and
  layout, which a view of W's first ``|R|`` channels has). Grouped convolutions (``groups > 1``)
  compute ``dW`` densely and mask it: slicing output channels would break the groups.
* ``dX`` and ``db = (Σ dY) ⊙ m_b`` as dense autograd computes them, in the same call
  (only where needed).

This is the convolution half of ``ascent_backward="exact"`` (the linear half is
:mod:`~ssam_kernels.ops.ascent_linear`): exact for a perturbation normalised over the masked
gradient only. Padding is given as integers: ``"valid"`` is 0 and a symmetric ``"same"`` is
``dilation * (k - 1) / 2`` (see :func:`conv_padding`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from .ascent_linear import autocast_operands, check_operands, pad_rows
from .bitmask import BitMask, computed_rows, masked_rows, row_span
from .masked_weight_grad import check_weight_mask

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tuple(name: str, value, dims: int, low: int) -> tuple[int, ...]:
    values = (value,) * dims if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(values, (tuple, list)) and len(values) == 1:  # one for every dim, as torch reads it
        values = tuple(values) * dims
    if (not isinstance(values, (tuple, list)) or len(values) != dims
            or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values)):
        raise ValueError(f"{name} must be an int >= {low}, or 1 or {dims} of them, got {value!r}")
    return tuple(values)


def conv_padding(padding, kernel_size: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...] | None:
    """Integer padding for ``padding`` (ints, ``"valid"`` or ``"same"``), or None for a
    ``"same"`` that torch pads asymmetrically (where some ``dilation * (k - 1)`` is odd)."""
    if padding == "valid":
        return (0,) * len(kernel_size)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return _tuple("padding", padding, len(kernel_size), 0)


def _masked(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


class AscentConvFunction(torch.autograd.Function):
    """``F.conv{d}d(x, weight, bias, stride, padding, dilation, groups)`` with the exact masked
    ascent backward (module docstring). ``padding`` is a tuple of ints.

    ``masked=False`` (what ``sparse_ascent``'s exact mode runs): the weight gradient of the
    rows holding a masked entry is left unmasked inside those rows, and the bias gradient
    unmasked: the optimizer's masked norm and perturbation read only masked entries, so the
    masking would be work for nothing."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, bias_mask, stride, padding, dilation, groups, masked=True):
        x, weight, bias, autocast_off = autocast_operands(ctx, x, weight, bias)
        with autocast_off:
            out = CONVS[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight)
        ctx.masks = (mask, bias_mask)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.masked = masked
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        mask, bias_mask = ctx.masks
        stride, padding, dilation, groups = ctx.geometry
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        common = (list(stride), list(padding), list(dilation), False, [0] * len(stride), groups)
        dy = dy.to(w.dtype)
        out_channels = w.shape[0]
        first, end, count = row_span(mask) if need_w and groups == 1 else (0, out_channels, out_channels)
        # every output channel's dW needed (or grouped): one call, as dense autograd makes
        dense_w = need_w and count == out_channels
        dx = dw = db = None
        if need_x or dense_w or need_b:
            dx, dw, db = torch.ops.aten.convolution_backward(dy, x, w, [out_channels] if need_b else None, *common,
                                                             [need_x, dense_w, need_b])
        if dense_w:
            if ctx.masked:
                dw = _masked(dw, _checks.as_bool(mask))
        elif need_w and count == 0:
            dw = torch.zeros_like(w)
        elif need_w and computed_rows(first, end, count):  # a range of channels: views in, one call, one pad
            span = end - first
            part = torch.ops.aten.convolution_backward(dy.narrow(1, first, span), x, w.narrow(0, first, span), None,
                                                       *common, [False, True, False])[1]
            if ctx.masked:
                part = _masked(part, _checks.as_bool(mask).narrow(0, first, span))
            dw = pad_rows(part, first, out_channels)
        elif need_w:  # scattered channels: dY's gathered
            rows = mask.rows_with_bits() if isinstance(mask, BitMask) else masked_rows(mask)
            dw = torch.zeros_like(w)
            # a weight gradient alone reads only the weight's shape and layout (cuDNN, oneDNN and
            # the native kernels alike): any |R| channels of W, as a view, stand for W[R]
            part = torch.ops.aten.convolution_backward(dy.index_select(1, rows), x, w.narrow(0, 0, rows.numel()), None,
                                                       *common, [False, True, False])[1]
            dw[rows] = _masked(part, _checks.as_bool(mask)[rows]) if ctx.masked else part
        if need_b and bias_mask is not None and ctx.masked:
            db = db * _checks.as_bool(bias_mask).to(db.dtype)
        dtypes = ctx.dtypes
        return (None if dx is None else dx.to(dtypes[0]), None if dw is None else dw.to(dtypes[1]),
                None if db is None else db.to(dtypes[2]), None, None, None, None, None, None, None)


def check_conv_args(x, weight, bias, mask, bias_mask, stride, padding, dilation, groups):
    """Checked ``(stride, padding, dilation, groups)`` as tuples / int; padding as ints
    (ValueError for an asymmetric ``"same"``, which :func:`conv_padding` cannot express)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (3, 4, 5) or not weight.is_floating_point():
        raise TypeError(f"weight must be a 3-D, 4-D or 5-D floating tensor (a Conv1d/2d/3d weight), got {_checks._kind(weight)}")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"ascent_conv: the exact mode takes float16/bfloat16/float32 layers; this layer's weight "
                        f"(shape {tuple(weight.shape)}) is {weight.dtype}")
    dims = weight.dim() - 2
    if not isinstance(x, torch.Tensor) or x.dim() != dims + 2:
        raise ValueError(f"x must be a batched {dims + 2}-D tensor [N, C, ...] for a {dims}-D convolution, "
                         f"got {_checks._kind(x)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(f"x has {x.shape[1]} channels; weight {tuple(weight.shape)} with groups={groups} takes "
                         f"{weight.shape[1] * groups}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must be None or a [{weight.shape[0]}] tensor, got {_checks._kind(bias)}")
    check_operands(x, weight, bias, "ascent_conv")
    if mask is None:
        raise ValueError("mask is required: the weight's perturbation mask")
    check_weight_mask("mask", mask, tuple(weight.shape), weight.device)
    if bias_mask is not None:
        if bias is None:
            raise ValueError("bias_mask given for a convolution without bias")
        check_weight_mask("bias_mask", bias_mask, tuple(bias.shape), bias.device)
    stride = _tuple("stride", stride, dims, 1)
    dilation = _tuple("dilation", dilation, dims, 1)
    if padding == "same" and any(s != 1 for s in stride):
        raise ValueError("padding='same' needs stride 1 (as in torch)")
    if isinstance(padding, str) and padding not in ("same", "valid"):
        raise ValueError(f"padding must be ints, 'valid' or 'same', got {padding!r}")
    ints = conv_padding(padding, tuple(weight.shape[2:]), dilation)
    if ints is None:
        raise ValueError(f"padding='same' with kernel {tuple(weight.shape[2:])} and dilation {dilation} pads "
                         "asymmetrically; pad the input yourself and pass padding=0")
    return stride, ints, dilation, groups


def ascent_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask, *, bias_mask=None,
                stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)`` whose backward
    yields ``dW ⊙ mask`` (and ``db ⊙ bias_mask``), computing the weight gradient only for the
    output channels that hold a masked entry (module docstring).

    Args:
        x: ``[N, C_in, *spatial]``.
        weight: ``[C_out, C_in / groups, *kernel]``.
        mask: the weight's perturbation mask, a bool tensor or BitMask shaped like ``weight``.
        bias_mask: the bias's mask (None: the bias gradient stays dense).
        stride, padding, dilation, groups: as in ``F.conv2d``; ``padding`` may be ints,
            ``"valid"`` or a symmetric ``"same"``.
    """
    geometry = check_conv_args(x, weight, bias, mask, bias_mask, stride, padding, dilation, groups)
    return AscentConvFunction.apply(x, weight, bias, mask, bias_mask, *geometry)
