"""Triton gradient norm: one launch per dtype (and masking) over every tensor, each writing
partial sums of squares per chunk into one buffer (fp32, or float64 where any tensor of the
call is float64), then one sum of the partials and its square root. Masked: squares of ``t``
where the bit is set, reading only the 16-byte vectors that hold a set bit.
No host sync; no host-to-device copy once the tables are cached (see ``multi_tensor``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.bitmask import bits_of
from ..ops.grad_norm import accumulation_dtype
from .._host_loops import data_ptrs
from .multi_tensor import (CHUNK, address_table, aligned_at, block_bits, block_offsets, chunk_table, contiguous,
                           dtypes, group_by, load_block, present, take, tensor_ptr, this_chunk)

BLOCK = 1024


@triton.jit
def _sum_squares_chunk(x, bits, left, HAS_MASK: tl.constexpr, FP64: tl.constexpr, FULL: tl.constexpr,
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    if FP64:
        acc = tl.zeros([BLOCK // 8, 8], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK // 8, 8], dtype=tl.float32)
    for j in range(0, CHUNK, BLOCK):
        offs = block_offsets(j, BLOCK)
        valid = offs < left
        if HAS_MASK:
            bit = block_bits(bits, j, offs, left, FULL, BLOCK)
            if FULL:  # only the vectors holding a kept element are read
                rows = tl.max(bit, axis=1)[:, None] != 0
            else:
                rows = bit != 0
            v = tl.load(x + offs, mask=rows, other=0.0).to(acc.dtype)
            v = tl.where(bit != 0, v, 0.0)
        else:
            v = load_block(x + offs, valid, FULL).to(acc.dtype)
        acc += v * v
    return tl.sum(tl.sum(acc, axis=1), axis=0)


@triton.jit
def _sum_squares_kernel(
    chunk_tensor, chunk_start, numel, x_ptrs, bits_ptrs, partial, x_ref, bits_ref,
    HAS_MASK: tl.constexpr, FP64: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """partial[c]: chunk c's sum of squares, in float64 where FP64, else in fp32."""
    c, t, start, left = this_chunk(chunk_tensor, chunk_start, numel, CHUNK)
    x = tensor_ptr(x_ptrs, t, x_ref, start, ALIGNED)
    bits = x
    if HAS_MASK:
        bits = tensor_ptr(bits_ptrs, t, bits_ref, start // 8, ALIGNED)
    if left == CHUNK:
        total = _sum_squares_chunk(x, bits, left, HAS_MASK, FP64, True, CHUNK, BLOCK)
    else:
        total = _sum_squares_chunk(x, bits, left, HAS_MASK, FP64, False, CHUNK, BLOCK)
    tl.store(partial + c, total)


def grad_norm_triton(tensors: list[torch.Tensor], masks: list) -> torch.Tensor:
    """Host launcher: same contract as ``grad_norm_torch`` (masks checked by the caller)."""
    device = tensors[0].device
    dtype = accumulation_dtype(tensors)
    xs = contiguous(list(tensors))
    bits = bits_of(masks)
    x_ptrs, bits_ptrs = data_ptrs(xs), data_ptrs(bits)
    # one launch per dtype and masking (all on one device: the op sends lists that span devices
    # to the reference); tensors off 16 bytes go to a launch without vectors. Every launch writes
    # its partials into one buffer, so the norm is one sum and one square root after them.
    keys = list(zip(dtypes(xs), present(bits), aligned_at(x_ptrs, bits_ptrs)))
    launches = []
    for (_, masked, is_aligned), idx in group_by(keys).items():
        group = take(xs, idx)
        table = chunk_table(list(map(torch.Tensor.numel, group)), device)
        if table.num_chunks:
            launches.append((table, masked, is_aligned, idx, group))
    partial = torch.empty(sum(launch[0].num_chunks for launch in launches), dtype=dtype, device=device)
    at = 0
    for table, masked, is_aligned, idx, group in launches:
        group_bits = take(bits, idx) if masked else []
        out = partial if len(launches) == 1 else partial[at:at + table.num_chunks]
        at += table.num_chunks
        _sum_squares_kernel[(table.num_chunks,)](
            table.chunk_tensor, table.chunk_start, table.numel, address_table(group, device, take(x_ptrs, idx)),
            address_table(group_bits, device, take(bits_ptrs, idx)) if masked else table.numel, out, group[0],
            group_bits[0] if masked else group[0],
            HAS_MASK=masked, FP64=dtype == torch.float64, ALIGNED=is_aligned, CHUNK=CHUNK,
            BLOCK=BLOCK,
            enable_fp_fusion=True,  # acc + x * x in one rounding (named: triton 3.10 turns the default off)
        )
    return partial.sum().sqrt()  # (no partials, every tensor empty: 0)
