"""The weight gradient of a linear layer restricted to a mask: ``(dYᵀ X) ⊙ M``, skipping the
work no masked entry needs.

``grad_output`` is ``[..., out]``, ``input`` is ``[..., in]`` (the same leading dims, flattened to
``T`` tokens), ``mask`` is ``[out, in]``. Entries outside the mask are exactly 0. The reference
computes only the rows of ``W`` that hold a masked entry; the Triton kernel skips every output
tile without one (it still pays for a whole tile where a tile holds any masked entry: an
element-wise mask gives tensor cores nothing to skip inside a tile).
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import _checks
from .._backend import lazy
from .._library import Op
from .bitmask import BitMask, pack_mask, rows_first, unpack_mask


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def masked_weight_grad_torch(dy: torch.Tensor, x: torch.Tensor, bits: torch.Tensor, row_order: torch.Tensor,
                             masked_rows: int, out: torch.Tensor) -> None:
    """Reference: ``dYᵀ X`` in the inputs' dtype on the rows that hold a masked entry
    (``row_order[:masked_rows]``), masked; zeros elsewhere."""
    keep = unpack_mask(BitMask(bits, out.shape))
    out.zero_()
    if masked_rows:
        rows = row_order[:masked_rows].long()
        part = dy.index_select(1, rows).t() @ x
        out[rows] = torch.where(keep[rows], part, torch.zeros((), dtype=part.dtype, device=part.device)).to(out.dtype)


def _run(impl, dy, x, bits, row_order, masked_rows, out):
    """The operands' shapes and layouts as the kernels index them (``row_order``'s values, on
    the device, are the caller's: a permutation of the rows, those holding a mask entry first)."""
    op = "masked_weight_grad"
    _checks.operand(op, "grad_output", dy, DTYPES, (None, None))
    tokens, rows = dy.shape
    _checks.operand(op, "input", x, (dy.dtype,), (tokens, None), dy.device)
    cols = x.shape[1]
    _checks.operand(op, "bits", bits, (torch.uint8,), ((rows * cols + 7) // 8,), dy.device)
    _checks.operand(op, "row_order", row_order, (torch.int32,), (rows,), dy.device)
    if isinstance(masked_rows, bool) or not 0 <= masked_rows <= rows:
        raise ValueError(f"{op}: masked_rows must be in [0, {rows}], got {masked_rows!r}")
    _checks.operand(op, "out", out, DTYPES, (rows, cols), dy.device)
    return impl(dy, x, bits, row_order, masked_rows, out)


# auto on CUDA: cuBLAS on the gathered rows until the Triton kernel measures faster. Its tiles
# were never tuned (no split-K, gathered dY loads, the mask read in the epilogue), and the
# exact ascent that ran it was slower than dense on the H200 (GPT-2 small 8k: 102.7 against
# 75.0 ms, gpu-results/h200-2026-12-04).
MASKED_WEIGHT_GRAD = Op(
    "masked_weight_grad(Tensor grad_output, Tensor input, Tensor bits, Tensor row_order, int masked_rows, "
    "Tensor(a!) out, str backend) -> ()",
    {"torch": masked_weight_grad_torch,
     "triton": lazy("ssam_kernels.triton_ops.masked_weight_grad", "masked_weight_grad_triton")},
    fake=lambda *args: None, adapt=_run, auto_order={"cuda": ("torch", "triton")})


@register_flop_formula(torch.ops.ssam_kernels.masked_weight_grad)
def _flops(dy_shape, x_shape, bits_shape, order_shape, masked_rows, *args, **kwargs) -> int:
    """The useful FLOPs: ``dW[R] = dY[:, R]ᵀ X`` over the rows ``R`` that hold a masked entry
    (what the reference computes and the cost model of ``ssam.budget`` counts)."""
    return 2 * dy_shape[0] * masked_rows * x_shape[1]


def check_weight_mask(name: str, mask, shape: tuple[int, ...], device: torch.device) -> None:
    """``mask`` is a bool tensor or BitMask of ``shape`` on ``device``."""
    mshape, mdevice = _checks.mask_facts(name, mask)
    if tuple(mshape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mshape)}, expected {tuple(shape)}")
    if mdevice != device:
        raise ValueError(f"{name} is on {mdevice}, expected {device}")


def masked_weight_grad(grad_output: torch.Tensor, input: torch.Tensor, mask, *,
                       out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                       backend: str = "auto") -> torch.Tensor:
    """``(grad_outputᵀ @ input) ⊙ mask`` over the flattened leading dims, as ``[out, in]``.

    Args:
        grad_output: ``[..., out]`` fp16/bf16/fp32.
        input: ``[..., in]``, same dtype, device and leading dims as ``grad_output``.
        mask: ``[out, in]`` bool tensor or :class:`~ssam_kernels.BitMask`.
        out_dtype: dtype of the result (default: the inputs'); a float32 result of fp16/bf16
            inputs is rounded once from the fp32 accumulator (Triton) or from the
            low-precision product (reference).
        out: a contiguous ``[out, in]`` tensor to write the result into (every entry is
            written); its dtype is the result's (``out_dtype`` must then be None or equal).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
    """
    for name, t in (("grad_output", grad_output), ("input", input)):
        if not isinstance(t, torch.Tensor) or t.dtype not in DTYPES:
            raise TypeError(f"{name} must be a float16/bfloat16/float32 tensor, got {_checks._kind(t)}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have at least 1 dim, got a 0-dim tensor")
    if input.dtype != grad_output.dtype or input.device != grad_output.device:
        raise ValueError(
            f"input is {input.dtype} on {input.device}, grad_output is {grad_output.dtype} on {grad_output.device}; "
            "they must match"
        )
    if input.shape[:-1] != grad_output.shape[:-1]:
        raise ValueError(
            f"input {tuple(input.shape)} and grad_output {tuple(grad_output.shape)} must share their leading dims"
        )
    out_features, in_features = grad_output.shape[-1], input.shape[-1]
    check_weight_mask("mask", mask, (out_features, in_features), input.device)
    if out_dtype is not None and out_dtype not in DTYPES:
        raise TypeError(f"out_dtype must be one of {DTYPES}, got {out_dtype}")
    if out is None:
        out = torch.empty((out_features, in_features), dtype=out_dtype or input.dtype, device=input.device)
    else:
        if not isinstance(out, torch.Tensor) or out.dtype not in DTYPES:
            raise TypeError(f"out must be a float16/bfloat16/float32 tensor, got {_checks._kind(out)}")
        if tuple(out.shape) != (out_features, in_features) or out.device != input.device or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous [{out_features}, {in_features}] tensor on {input.device}, "
                f"got {tuple(out.shape)} on {out.device}"
            )
        if out_dtype is not None and out_dtype != out.dtype:
            raise ValueError(f"out_dtype={out_dtype} but out is {out.dtype}")
        for name, t in (("grad_output", grad_output), ("input", input)):  # (out is zeroed first)
            if not torch.compiler.is_compiling() and _checks.overlapping_pair([out, t]) is not None:
                raise ValueError(f"out shares memory with {name}; give a separate tensor")
    tokens = math.prod(input.shape[:-1])  # (not reshape(-1, ...): a layer may have 0 features)
    dy = grad_output.reshape(tokens, out_features).contiguous()
    x = input.reshape(tokens, in_features).contiguous()
    bits = mask.bits if isinstance(mask, BitMask) else pack_mask(mask).bits
    order, masked = rows_first(mask)
    MASKED_WEIGHT_GRAD(dy, x, bits, order, masked, out, backend=backend)
    return out
