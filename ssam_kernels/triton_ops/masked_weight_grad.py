"""Triton masked weight gradient (contract: ``ssam_kernels.ops.masked_weight_grad``).

One program per ``[BLOCK_O, BLOCK_I]`` tile of ``dW``: it reads the mask bytes that overlap the
tile straight from the packed mask, skips the GEMM where all are zero, and otherwise runs it
over the tokens with an fp32 accumulator; the tile is written through the per-element mask.

Where some rows (output features) hold no masked entry, the tiles' rows are gathered: tile
row-block ``b`` takes rows ``order[b * BLOCK_O : (b + 1) * BLOCK_O]`` of a permutation listing
the masked rows first, so the masked rows pack into ``ceil(rows / BLOCK_O)`` row-blocks
wherever they sit (``dW[R] = dY[:, R]ᵀ X``) and the row-blocks past them skip the GEMM and
write their zeros. Without gathering, scattered masked rows would make every row-block busy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuning import for_gpu


@triton.jit
def _tile_has_bits(bits, mask_bytes, rows, c0, OUT, IN, BLOCK_I: tl.constexpr):
    """Whether any mask byte overlapping the tile is non-zero: a conservative test (a byte at
    the tile's left or right edge may hold a neighbour's bits) that reads each byte once,
    instead of a bit per element; the exact per-element mask is applied on the store."""
    first = (rows.to(tl.int64) * IN + c0) // 8  # [BLOCK_O] first byte of each row's span
    nbytes = (tl.minimum(IN - c0, BLOCK_I) + 14) // 8  # bytes a span of that many bits can touch
    k = tl.arange(0, BLOCK_I // 4)  # >= BLOCK_I // 8 + 1 (a power of two)
    at = first[:, None] + k[None, :]
    inside = (rows[:, None] < OUT) & (k[None, :] < nbytes) & (at < mask_bytes)  # (the bound can overshoot by a byte)
    byte = tl.load(bits + at, mask=inside, other=0)
    return tl.max(tl.max(byte.to(tl.int32), axis=1), axis=0) != 0


@triton.jit
def _masked_wgrad_kernel(dy, x, bits, mask_bytes, out, row_order, masked_rows, T, OUT, IN,
                         BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
                         PRECISION: tl.constexpr, GATHER: tl.constexpr):
    # one grid axis, row-block-major (a second axis stops at 65535 blocks)
    col_blocks = tl.cdiv(IN, BLOCK_I)
    row_block = tl.program_id(0) // col_blocks
    col_block = tl.program_id(0) % col_blocks
    slots = row_block * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = col_block * BLOCK_I + tl.arange(0, BLOCK_I)
    if GATHER:  # slots past OUT load OUT: out of range, masked like the tail of a plain tile
        rows = tl.load(row_order + slots, mask=slots < OUT, other=OUT)
    else:
        rows = slots
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    busy = _tile_has_bits(bits, mask_bytes, rows, col_block * BLOCK_I, OUT, IN, BLOCK_I)
    if GATHER:  # the row-blocks past the masked rows: exact, where the byte test is conservative
        busy = busy & (row_block * BLOCK_O < masked_rows)
    if busy:
        for t0 in range(0, T, BLOCK_T):
            tok = t0 + tl.arange(0, BLOCK_T)
            a = tl.load(dy + tok[None, :].to(tl.int64) * OUT + rows[:, None],
                        mask=(tok[None, :] < T) & (rows[:, None] < OUT), other=0.0)  # dYᵀ tile
            b = tl.load(x + tok[:, None].to(tl.int64) * IN + cols[None, :],
                        mask=(tok[:, None] < T) & (cols[None, :] < IN), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    # the per-element mask is read only here, so it is not held in registers across the loop
    inside = (rows[:, None] < OUT) & (cols[None, :] < IN)
    flat = rows[:, None].to(tl.int64) * IN + cols[None, :]
    byte = tl.load(bits + flat // 8, mask=inside, other=0).to(tl.int32)
    keep = ((byte >> (flat % 8).to(tl.int32)) & 1) != 0
    tl.store(out + flat, tl.where(keep, acc, 0.0).to(out.dtype.element_ty), mask=inside)


# (BLOCK_O, BLOCK_I, BLOCK_T, num_warps) on a GPU, by operand kind. Chosen on the compile
# tier's report (benchmarks/results/compile.md): tensor-core tiles of 128x128 where each thread
# holds few enough accumulators to stay clear of spills on sm_80 and sm_90; the fp32 IEEE
# path runs on FMA units and keeps a smaller tile in registers. Not yet timed on a GPU.
GPU_CONFIGS = {
    "tensor_core": (128, 128, 32, 8),
    "tensor_core_unaligned": (128, 64, 32, 8),
    "tf32_unaligned": (64, 64, 32, 4),
    "fma": (64, 64, 16, 8),  # tl.dot needs K >= 16 (triton 3.6)
}
INTERPRETER_CONFIG = (32, 32, 16, 4)  # small tiles: the interpreter's time grows with the tile


def _config(gpu: bool, precision: str, dtype: torch.dtype, out_features: int, in_features: int):
    """(BLOCK_O, BLOCK_I, BLOCK_T, num_warps) for a launch."""
    if not gpu:
        return INTERPRETER_CONFIG
    if dtype == torch.float32 and precision == "ieee":
        return GPU_CONFIGS["fma"]
    # Triton knows a row stride is a multiple of 16 elements (vector loads) only when the
    # integer is; otherwise the loads are scalar and hold more registers: a smaller tile
    if out_features % 16 or in_features % 16:
        return GPU_CONFIGS["tf32_unaligned" if dtype == torch.float32 else "tensor_core_unaligned"]
    return GPU_CONFIGS["tensor_core"]


def torch_matmul_tf32() -> bool:
    """Whether torch's own fp32 CUDA matmuls may use TF32. Read from torch's precision API where
    this torch has it (``"none"`` inherits the global setting): reading the legacy
    ``allow_tf32`` flag raises once a program has set both APIs."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def masked_weight_grad_triton(dy: torch.Tensor, x: torch.Tensor, bits: torch.Tensor, row_order: torch.Tensor,
                               masked_rows: int, out: torch.Tensor) -> None:
    """Host launcher: same contract as ``masked_weight_grad_torch``."""
    T, OUT = dy.shape
    IN = x.shape[1]
    if out.numel() == 0:
        return
    if T == 0 or masked_rows == 0:
        out.zero_()
        return
    # fp32 inputs: TF32 only where torch's own matmuls may use it
    gpu = for_gpu(x)
    precision = "tf32" if (x.dtype == torch.float32 and gpu and torch_matmul_tf32()) else "ieee"
    bo, bi, bt, warps = _config(gpu, precision, x.dtype, OUT, IN)
    _masked_wgrad_kernel[(triton.cdiv(OUT, bo) * triton.cdiv(IN, bi),)](
        dy, x, bits, bits.numel(), out, row_order, masked_rows, T, OUT, IN, BLOCK_O=bo, BLOCK_I=bi, BLOCK_T=bt,
        PRECISION=precision, GATHER=masked_rows < OUT, num_warps=warps,
        enable_fp_fusion=True,  # (named: triton 3.10 turns the default off)
    )
