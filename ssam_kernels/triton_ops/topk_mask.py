"""Triton global top-k mask by radix select: no sort, no concatenation of the scores.

Scores become order-preserving 32-bit keys (NaN ranks as -inf and -0 as +0, as in the
reference). Four passes of an 8-bit histogram over the keys that still match the prefix chosen
so far find the key ``T`` of the k-th largest score, on the device (no host sync, and no
host-to-device copy once the chunk and address tables are cached). A counting
pass then gives each chunk the number of ``key == T`` before it, and a last pass writes
``key > T`` or "tie among the first ``need`` ties in index order": exactly k entries.
All score tensors must share one dtype (fp32/fp16/bf16); other inputs use the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.topk_mask import topk_mask_torch
from .multi_tensor import CHUNK, address_table, chunk_table, tensor_ptr, this_chunk

BLOCK = 1024
RADIX_BITS = 8
BINS = 1 << RADIX_BITS


@triton.jit
def _keys(x, offs, valid):
    v = tl.load(x + offs, mask=valid, other=0.0).to(tl.float32)
    v = tl.where(v == 0.0, 0.0, v)  # -0 ranks as +0
    v = tl.where(v != v, float("-inf"), v)  # NaN ranks as -inf
    bits = v.to(tl.int32, bitcast=True)
    flipped = bits ^ ((bits >> 31) | (-2147483648))  # negative: ~bits; positive: sign bit set
    return flipped.to(tl.uint32, bitcast=True)


@triton.jit
def _histogram_kernel(chunk_tensor, chunk_start, numel, x_ptrs, x_ref, sel, hist, shift,
                      FIRST: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr):
    c, t, start, n = this_chunk(chunk_tensor, chunk_start, numel)
    x = tensor_ptr(x_ptrs, t, x_ref)
    prefix = tl.load(sel).to(tl.uint32)
    acc = tl.zeros([2 * BINS], dtype=tl.int32)
    for j in range(0, CHUNK, BLOCK):
        offs = start + j + tl.arange(0, BLOCK)
        valid = offs < n
        key = _keys(x, offs, valid)
        if FIRST:
            match = valid
        else:  # the bits above this digit equal the prefix chosen so far
            match = valid & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
        digit = ((key >> shift) & (BINS - 1)).to(tl.int32)
        acc += tl.histogram(tl.where(match, digit, BINS), 2 * BINS)  # bin BINS: not counted
    b = tl.arange(0, 2 * BINS)
    tl.atomic_add(hist + b, acc, mask=b < BINS)


@triton.jit
def _choose_digit_kernel(hist, sel, shift, BINS: tl.constexpr):
    """sel = [prefix, need]: pick the digit holding the need-th largest, update both."""
    h = tl.load(hist + tl.arange(0, BINS)).to(tl.int64)
    need = tl.load(sel + 1)
    total = tl.sum(h, axis=0)
    below_incl = tl.cumsum(h, axis=0)
    at_or_above = total - below_incl + h  # matching keys with digit >= d
    d = tl.sum((at_or_above >= need).to(tl.int32), axis=0) - 1
    above = total - tl.sum(tl.where(tl.arange(0, BINS) == d, below_incl, 0), axis=0)
    tl.store(sel, tl.load(sel) | (d.to(tl.int64) << shift))
    tl.store(sel + 1, need - above)


@triton.jit
def _ties_kernel(chunk_tensor, chunk_start, numel, x_ptrs, x_ref, sel, counts,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c, t, start, n = this_chunk(chunk_tensor, chunk_start, numel)
    x = tensor_ptr(x_ptrs, t, x_ref)
    threshold = tl.load(sel).to(tl.uint32)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for j in range(0, CHUNK, BLOCK):
        offs = start + j + tl.arange(0, BLOCK)
        valid = offs < n
        acc += (valid & (_keys(x, offs, valid) == threshold)).to(tl.int32)
    tl.store(counts + c, tl.sum(acc, axis=0).to(tl.int64))


@triton.jit
def _write_kernel(chunk_tensor, chunk_start, numel, x_ptrs, x_ref, out_ptrs, out_ref, sel, ties_before,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c, t, start, n = this_chunk(chunk_tensor, chunk_start, numel)
    x = tensor_ptr(x_ptrs, t, x_ref)
    out = tensor_ptr(out_ptrs, t, out_ref)
    threshold = tl.load(sel).to(tl.uint32)
    need = tl.load(sel + 1)
    seen = tl.load(ties_before + c)
    for j in range(0, CHUNK, BLOCK):
        offs = start + j + tl.arange(0, BLOCK)
        valid = offs < n
        key = _keys(x, offs, valid)
        tie = (valid & (key == threshold)).to(tl.int64)
        rank = seen + tl.cumsum(tie, axis=0) - tie
        keep = (key > threshold) | ((tie != 0) & (rank < need))
        tl.store(out + offs, keep.to(tl.int8), mask=valid)
        seen += tl.sum(tie, axis=0)


def topk_mask_triton(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Host launcher: same contract as ``topk_mask_torch`` (inputs checked by the caller)."""
    device = scores[0].device
    dtypes = {s.dtype for s in scores}
    total = sum(s.numel() for s in scores)
    if len(dtypes) != 1 or dtypes.pop() not in (torch.float32, torch.float16, torch.bfloat16) or \
            any(s.device != device for s in scores) or k in (0, total):
        return topk_mask_torch(scores, k)
    xs = [s.contiguous() for s in scores]
    table = chunk_table([x.numel() for x in xs], device)
    grid = (table.num_chunks,)
    x_addr = address_table(xs, device)
    sel = torch.zeros(2, dtype=torch.int64, device=device)  # [prefix, need]: filled, not copied
    sel[1:].fill_(k)
    hist = torch.zeros(32 // RADIX_BITS, BINS, dtype=torch.int32, device=device)
    for p, shift in enumerate(range(32 - RADIX_BITS, -1, -RADIX_BITS)):
        _histogram_kernel[grid](table.chunk_tensor, table.chunk_start, table.numel, x_addr, xs[0], sel, hist[p],
                                shift, FIRST=p == 0, CHUNK=CHUNK, BLOCK=BLOCK, BINS=BINS)
        _choose_digit_kernel[(1,)](hist[p], sel, shift, BINS=BINS)
    counts = torch.empty(table.num_chunks, dtype=torch.int64, device=device)
    _ties_kernel[grid](table.chunk_tensor, table.chunk_start, table.numel, x_addr, xs[0], sel, counts,
                       CHUNK=CHUNK, BLOCK=BLOCK)
    outs = [torch.empty(x.shape, dtype=torch.int8, device=device) for x in xs]
    _write_kernel[grid](table.chunk_tensor, table.chunk_start, table.numel, x_addr, xs[0],
                        address_table(outs, device), outs[0], sel, torch.cumsum(counts, 0) - counts,
                        CHUNK=CHUNK, BLOCK=BLOCK)
    return [o.view(torch.bool) for o in outs]
