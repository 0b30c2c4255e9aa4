"""Triton masked weight gradient (contract: ``ssam_kernels.ops.masked_weight_grad``).

One program per ``[BLOCK_O, BLOCK_I]`` tile of ``dW``: it reads the tile's mask bits straight
from the packed mask, writes zeros and stops where none is set, and otherwise runs the GEMM
over the tokens with an fp32 accumulator and writes the tile masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.bitmask import BitMask, pack_mask


@triton.jit
def _masked_wgrad_kernel(dy, x, bits, out, T, OUT, IN,
                         BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
                         PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    inside = (rows[:, None] < OUT) & (cols[None, :] < IN)
    flat = rows[:, None].to(tl.int64) * IN + cols[None, :]
    byte = tl.load(bits + flat // 8, mask=inside, other=0).to(tl.int32)
    keep = ((byte >> (flat % 8).to(tl.int32)) & 1) != 0
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    if tl.max(tl.max(keep.to(tl.int32), axis=1), axis=0) > 0:
        for t0 in range(0, T, BLOCK_T):
            tok = t0 + tl.arange(0, BLOCK_T)
            a = tl.load(dy + tok[None, :].to(tl.int64) * OUT + rows[:, None],
                        mask=(tok[None, :] < T) & (rows[:, None] < OUT), other=0.0)  # dYᵀ tile
            b = tl.load(x + tok[:, None].to(tl.int64) * IN + cols[None, :],
                        mask=(tok[:, None] < T) & (cols[None, :] < IN), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(out + flat, tl.where(keep, acc, 0.0).to(out.dtype.element_ty), mask=inside)


def _config(device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_O, BLOCK_I, BLOCK_T, num_warps): small tiles for the interpreter's speed."""
    if device.type == "cuda":
        return 128, 128, 32, 8
    return 32, 32, 16, 4


def masked_weight_grad_triton(dy: torch.Tensor, x: torch.Tensor, mask, out: torch.Tensor) -> torch.Tensor:
    bits = (mask if isinstance(mask, BitMask) else pack_mask(mask)).bits
    T, OUT = dy.shape
    IN = x.shape[1]
    if out.numel() == 0:
        return out
    if T == 0:
        return out.zero_()
    # fp32 inputs: TF32 only where torch's own matmuls may use it
    precision = "tf32" if (x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    bo, bi, bt, warps = _config(x.device)
    _masked_wgrad_kernel[(triton.cdiv(OUT, bo), triton.cdiv(IN, bi))](
        dy, x, bits, out, T, OUT, IN, BLOCK_O=bo, BLOCK_I=bi, BLOCK_T=bt, PRECISION=precision, num_warps=warps,
    )
    return out
