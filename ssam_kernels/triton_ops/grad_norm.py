"""Triton gradient norm: one launch per dtype over every tensor (fp32 partial sums of squares
per chunk), then one reduction of the partials. Masked: squares of ``t`` where the bit is set.
No host sync; no host-to-device copy once the tables are cached (see ``multi_tensor``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.bitmask import as_bitmask
from .multi_tensor import CHUNK, address_table, chunk_table, group_by, tensor_ptr, this_chunk

BLOCK = 1024


@triton.jit
def _sum_squares_kernel(
    chunk_tensor, chunk_start, numel, x_ptrs, bits_ptrs, partial, x_ref, bits_ref,
    HAS_MASK: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    c, t, start, n = this_chunk(chunk_tensor, chunk_start, numel)
    x = tensor_ptr(x_ptrs, t, x_ref)
    if HAS_MASK:
        bits = tensor_ptr(bits_ptrs, t, bits_ref)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, CHUNK, BLOCK):
        offs = start + j + tl.arange(0, BLOCK)
        valid = offs < n
        v = tl.load(x + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_MASK:
            byte = tl.load(bits + offs // 8, mask=valid, other=0).to(tl.int32)
            v = tl.where(((byte >> (offs % 8)) & 1) != 0, v, 0.0)
        acc += v * v
    tl.store(partial + c, tl.sum(acc, axis=0))


def grad_norm_triton(tensors: list[torch.Tensor], masks: list) -> torch.Tensor:
    """Host launcher: same contract as ``grad_norm_torch`` (masks checked by the caller)."""
    device = tensors[0].device
    partials = []
    masked = any(m is not None for m in masks)
    for (dtype, dev), idx in group_by([(t.dtype, t.device) for t in tensors]).items():
        xs = [tensors[i].contiguous() for i in idx]
        bits = [_bits(masks[i], tensors[i]) for i in idx] if masked else []
        table = chunk_table([x.numel() for x in xs], dev)
        if table.num_chunks == 0:
            continue
        out = torch.empty(table.num_chunks, dtype=torch.float32, device=dev)
        _sum_squares_kernel[(table.num_chunks,)](
            table.chunk_tensor, table.chunk_start, table.numel, address_table(xs, dev),
            address_table(bits, dev) if masked else table.numel, out, xs[0], bits[0] if masked else xs[0],
            HAS_MASK=masked, CHUNK=CHUNK, BLOCK=BLOCK,
        )
        partials.append(out.sum().to(device))
    if not partials:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(partials).sum().sqrt()


def _bits(mask, like: torch.Tensor) -> torch.Tensor:
    """Packed bits of a mask entry (None: all set)."""
    if mask is None:
        return torch.full(((like.numel() + 7) // 8,), 0xFF, dtype=torch.uint8, device=like.device)
    return as_bitmask(mask).bits
