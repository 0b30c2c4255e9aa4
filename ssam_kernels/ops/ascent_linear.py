"""Linear layers whose backward computes the *ascent* gradient of Sparse SAM more cheaply.

The forward is ``F.linear``'s (autocast honoured). Only the backward differs, by ``mode``:

* ``"exact"``: ``dW = (dYᵀ X) ⊙ M``, skipping the rows without a masked entry: where those
  holding one are a contiguous range (or nearly: ``SPAN_SLACK``), one product on a view of
  ``dY`` zero-padded around it, else :func:`masked_weight_grad`; ``dX = dY W`` (only when something below needs it);
  ``db = (Σ dY) ⊙ m_b``. Equals dense autograd's gradient times the mask.
* ``"implicit"``: the input gradient flows through the masked weight, ``dX = dY (W ⊙ M)``;
  where ``M`` is 2:4 along the output dim, ``(W ⊙ M)ᵀ`` is the 2:4 operand of a sparse GEMM,
  compressed in the backward once per weight version (``W`` changes every step; further calls
  in a step, e.g. micro-batches, reuse it). ``dW`` dense.
* ``"mvue"``: ``dW ≈ MVUE24(dYᵀ) X`` (2:4 along the tokens) on a sparse GEMM; ``dX`` exact.
* ``"mvue_dx"``: as ``"mvue"``, and also ``dX ≈ MVUE24(dY) W`` (2:4 along the output dim).

MVUE estimates are unbiased (see :func:`~ssam_kernels.mvue24`); a dimension that is not a
multiple of 4 is zero-padded for the draw. The sparse GEMMs go through
:func:`~ssam_kernels.sparse_gemm.sparse_mm_24`, which runs dense where cuSPARSELt cannot or
is slower. The gradients returned are in the parameters' dtypes.
"""

from __future__ import annotations

import contextlib

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _checks
from .._backend import BACKENDS
from ..sparse_gemm import GEMMS, sparse_mm_24
from .bitmask import BitMask, computed_rows, row_span, rows_first
from .masked_weight_grad import MASKED_WEIGHT_GRAD, check_weight_mask, masked_weight_grad
from .mvue24 import MVUE24, mvue24

MODES = ("exact", "implicit", "mvue", "mvue_dx")


@dataclass(frozen=True)
class AscentConfig:
    """How one linear layer's ascent backward runs (see the module docstring)."""

    mode: str
    mask: torch.Tensor | BitMask | None = None  # the weight's mask: exact and implicit
    bias_mask: torch.Tensor | BitMask | None = None  # exact: None leaves the bias gradient dense
    generator: torch.Generator | None = None  # mvue: seeds of the draws
    gemm: str = "auto"
    backend: str = "auto"  # of masked_weight_grad and mvue24
    masked: bool = True  # exact: mask the gradients (False: only rows outside the span computed are zero)


def _bool(mask) -> torch.Tensor:
    return mask.to_bool() if isinstance(mask, BitMask) else mask


def is_24_along_out(mask) -> bool:
    """Whether every group of 4 consecutive rows (output features) of ``mask`` holds at most
    two set entries in each column: then ``(W ⊙ M)ᵀ`` is 2:4 along its last dim. Cached on
    a BitMask (immutable by contract)."""
    if isinstance(mask, BitMask):
        return mask.memo("_24_along_out", lambda: is_24_along_out(mask.to_bool()))
    rows = mask.shape[0]
    return rows % 4 == 0 and bool((mask.reshape(rows // 4, 4, mask.shape[1]).sum(1) <= 2).all())


def _masked_row_index(mask) -> torch.Tensor:
    """int64 indices of the rows of ``mask`` holding a set entry (cached on a BitMask)."""
    def index():
        order, count = rows_first(mask)
        return order[:count].long()
    return mask.memo("_masked_row_index", index) if isinstance(mask, BitMask) else index()


def _draw_seed(generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else "cpu"  # a CUDA generator draws on its device
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device))


def mvue_last_dim(a: torch.Tensor, generator: torch.Generator | None, backend: str = "auto") -> torch.Tensor:
    """MVUE 2:4 of a 2-D ``a`` along its last dim, zero-padded to a multiple of 4 (the padding
    stays zero, so ``out[:, :a.shape[1]]`` is the estimate of ``a``)."""
    pad = (-a.shape[1]) % 4
    if pad:
        a = F.pad(a, (0, pad))
    return mvue24(a.contiguous(), seed=_draw_seed(generator), backend=backend)


def _pad_rows(b: torch.Tensor, rows: int) -> torch.Tensor:
    return F.pad(b, (0, 0, 0, rows - b.shape[0])) if rows > b.shape[0] else b


def pad_rows(part: torch.Tensor, first: int, rows: int) -> torch.Tensor:
    """``part`` (rows ``[first, first + len(part))`` of a ``rows``-row tensor) in a tensor of
    ``rows`` rows, zeros elsewhere: one ``constant_pad_nd``, no zero-fill then scatter."""
    pad = [0, 0] * (part.dim() - 1) + [first, rows - first - part.shape[0]]
    return F.pad(part, pad)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_operands(ctx, x, weight, bias):
    """Record the operands' dtypes on ``ctx`` (gradients go back in them, not in the autocast
    dtype) and return the operands autocast's own linear / convolution would run: all in the
    autocast dtype where autocast is on, with a context that turns autocast off for the product
    (nothing to turn off otherwise: ``torch.autocast`` costs microseconds of Python to enter)."""
    ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else weight.dtype)
    cast = _autocast_dtype(x.device.type)
    if cast is None:
        return x, weight, bias, contextlib.nullcontext()
    bias = bias.to(cast) if bias is not None else None
    return x.to(cast), weight.to(cast), bias, torch.autocast(x.device.type, enabled=False)


class AscentLinearFunction(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with the ascent backward of ``config.mode``."""

    @staticmethod
    def forward(ctx, x, weight, bias, config: AscentConfig):
        # implicit: W ⊙ M's compressed form is reused while this weight is unchanged
        ctx.source = (weight, weight._version) if config.mode == "implicit" else None
        x, weight, bias, autocast_off = autocast_operands(ctx, x, weight, bias)
        with autocast_off:
            out = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        cfg = ctx.config
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dtypes = ctx.dtypes
        out_f, in_f = w.shape
        tokens = math.prod(x.shape[:-1])  # (not reshape(-1, ...): a layer may have 0 features)
        dy2 = dy.reshape(tokens, out_f).to(w.dtype)
        x2 = x.reshape(tokens, in_f)
        dx = dw = db = None
        if cfg.mode == "exact":
            first, end, count = row_span(cfg.mask) if need_w else (0, 0, 0)
            if need_w and computed_rows(first, end, count) and (count < out_f or not cfg.masked):
                # a range of rows (or all of them, unmasked): a plain product on a view of dY
                # (cuBLAS reads it with its leading dimension), no gather, one pad
                part = dy2.narrow(1, first, end - first).t() @ x2
                if cfg.masked:
                    part = torch.where(_bool(cfg.mask).narrow(0, first, end - first), part, 0)
                dw = pad_rows(part, first, out_f)
            elif need_w and not cfg.masked and MASKED_WEIGHT_GRAD.resolve(cfg.backend, w.device) == "torch":
                # scattered rows, unmasked, on cuBLAS: gather, one product, scatter (the op's
                # reference would also unpack the mask and mask the rows)
                rows = _masked_row_index(cfg.mask)
                dw = x2.new_zeros(out_f, in_f, dtype=dtypes[1])
                dw.index_copy_(0, rows, (dy2.index_select(1, rows).t() @ x2).to(dtypes[1]))
            elif need_w:
                dw = masked_weight_grad(dy2, x2, cfg.mask, out_dtype=dtypes[1], backend=cfg.backend)
            if need_x:
                dx = dy2 @ w
        elif cfg.mode == "implicit":
            if need_w:
                dw = dy2.t() @ x2
            if need_x:
                wm = w * _bool(cfg.mask).to(w.dtype)
                if is_24_along_out(cfg.mask):  # (W ⊙ M)ᵀ is the 2:4 operand, kept compressed for the next call
                    dx = sparse_mm_24(wm.t().contiguous(), dy2.t(), gemm=cfg.gemm, check=False,
                                      keep=(*ctx.source, cfg.mask)).t()
                else:
                    dx = dy2 @ wm
        else:
            if need_w:  # MVUE along the tokens: the contraction dim of dYᵀ X
                est = mvue_last_dim(dy2.t(), cfg.generator, cfg.backend)
                # a weight gradient in its weight's layout (cuSPARSELt may write the product transposed)
                dw = sparse_mm_24(est, _pad_rows(x2, est.shape[1]), gemm=cfg.gemm, check=False).contiguous()
            if need_x:
                if cfg.mode == "mvue_dx":  # MVUE along the output dim: the contraction dim of dY W
                    est = mvue_last_dim(dy2, cfg.generator, cfg.backend)
                    dx = sparse_mm_24(est, _pad_rows(w, est.shape[1]), gemm=cfg.gemm, check=False)
                else:
                    dx = dy2 @ w
        if need_b:
            db = dy2.sum(0)
            if cfg.mode == "exact" and cfg.bias_mask is not None and cfg.masked:
                db = db * _bool(cfg.bias_mask).to(db.dtype)
        return (
            None if dx is None else dx.reshape(*dy.shape[:-1], in_f).to(dtypes[0]),
            None if dw is None else dw.to(dtypes[1]),
            None if db is None else db.to(dtypes[2]),
            None,
        )


def _check_config(weight: torch.Tensor, bias, config: AscentConfig) -> None:
    if not isinstance(config, AscentConfig):
        raise TypeError(f"config must be an AscentConfig, got {type(config).__name__}")
    if config.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {config.mode!r}")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"ascent_linear: mode {config.mode!r} takes float16/bfloat16/float32 layers; this layer's "
                        f"weight (shape {tuple(weight.shape)}) is {weight.dtype}")
    if config.gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {config.gemm!r}")
    if config.generator is not None and not isinstance(config.generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(config.generator).__name__}")
    if config.mode in ("exact", "implicit"):
        if config.mask is None:
            raise ValueError(f"mode {config.mode!r} needs the weight's mask")
        check_weight_mask("mask", config.mask, tuple(weight.shape), weight.device)
    if config.bias_mask is not None:
        if bias is None:
            raise ValueError("bias_mask given for a layer without bias")
        check_weight_mask("bias_mask", config.bias_mask, tuple(bias.shape), bias.device)
    # the backend of the kernel the mode's backward runs, checked now (not first in backward())
    if not isinstance(config.backend, str) or config.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {config.backend!r}")
    if config.mode == "exact":
        MASKED_WEIGHT_GRAD.resolve(config.backend, weight.device)
    elif config.mode in ("mvue", "mvue_dx"):
        MVUE24.resolve(config.backend, weight.device)


def check_operands(x, weight: torch.Tensor, bias, op: str) -> None:
    """What ``F.linear`` / ``F.conv*`` would refuse with a RuntimeError (or the dispatcher with a
    NotImplementedError), as a TypeError/ValueError naming the argument: sparse layouts, a bias
    that is not ``[out]``, operands of two dtypes outside autocast, or on two devices."""
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()):
        raise TypeError(f"{op}: bias must be None or a floating tensor, got "
                        f"{f'a {bias.dtype} tensor' if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.layout != torch.strided:
            raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got {t.layout}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},) for weight {tuple(weight.shape)}, "
                             f"got {tuple(bias.shape)}")
    operands = [t for t in (x, weight, bias) if t is not None]
    if any(t.device != weight.device for t in operands):
        raise ValueError(f"{op}: x, weight and bias must be on one device, got "
                         f"{', '.join(str(t.device) for t in operands)}")
    if _autocast_dtype(weight.device.type) is None and any(t.dtype != weight.dtype for t in operands):
        raise ValueError(f"{op}: x, weight and bias must share a dtype outside autocast, got "
                         f"{', '.join(str(t.dtype) for t in operands)}")


def ascent_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, *,
                  mask=None, bias_mask=None, generator: torch.Generator | None = None, gemm: str = "auto",
                  backend: str = "auto") -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose backward is the ascent backward of ``mode``.

    Args:
        mode: ``"exact"``, ``"implicit"``, ``"mvue"`` or ``"mvue_dx"`` (module docstring).
        mask: ``[out, in]`` bool tensor or BitMask, the weight's perturbation mask (needed by
            ``"exact"`` and ``"implicit"``).
        bias_mask: the bias's mask (``"exact"``; None: the bias gradient stays dense).
        generator: draws the MVUE seeds (None: torch's global generator).
        gemm: ``"auto"``, ``"dense"`` or ``"cusparselt"``, for the 2:4 GEMMs.
        backend: ``ssam_kernels`` backend of the masked weight gradient and the MVUE draw.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"weight must be a 2-D floating tensor, got {_checks._kind(weight)}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be [..., {weight.shape[1]}] to match weight {tuple(weight.shape)}")
    check_operands(x, weight, bias, "ascent_linear")
    config = AscentConfig(mode, mask, bias_mask, generator, gemm, backend)
    _check_config(weight, bias, config)
    return AscentLinearFunction.apply(x, weight, bias, config)
