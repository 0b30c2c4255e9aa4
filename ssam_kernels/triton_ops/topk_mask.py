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
from .multi_tensor import CHUNK, address_table, aligned, chunk_table, load_block, store_block, tensor_ptr, this_chunk

BLOCK = 1024
RADIX_BITS = 8
BINS = 1 << RADIX_BITS


@triton.jit
def _keys(x, offs, valid, FULL: tl.constexpr):
    v = load_block(x + offs, valid, FULL).to(tl.float32)
    v = tl.where(v == 0.0, 0.0, v)  # -0 ranks as +0
    v = tl.where(v != v, float("-inf"), v)  # NaN ranks as -inf
    bits = v.to(tl.int32, bitcast=True)
    flipped = bits ^ ((bits >> 31) | (-2147483648))  # negative: ~bits; positive: sign bit set
    return flipped.to(tl.uint32, bitcast=True)


@triton.jit
def _histogram_chunk(x, left, prefix, shift, FIRST: tl.constexpr, FULL: tl.constexpr, CHUNK: tl.constexpr,
                     BLOCK: tl.constexpr, BINS: tl.constexpr):
    acc = tl.zeros([2 * BINS], dtype=tl.int32)
    for j in range(0, CHUNK, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        valid = offs < left
        key = _keys(x, offs, valid, FULL)
        if FIRST:
            match = valid
        else:  # the bits above this digit equal the prefix chosen so far
            match = valid & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
        digit = ((key >> shift) & (BINS - 1)).to(tl.int32)
        acc += tl.histogram(tl.where(match, digit, BINS), 2 * BINS)  # bin BINS: not counted
    return acc


@triton.jit
def _histogram_kernel(chunk_tensor, chunk_start, numel, x_ptrs, x_ref, sel, hist, shift,
                      FIRST: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                      BINS: tl.constexpr):
    c, t, start, left = this_chunk(chunk_tensor, chunk_start, numel, CHUNK)
    x = tensor_ptr(x_ptrs, t, x_ref, start, ALIGNED)
    prefix = tl.load(sel).to(tl.uint32)
    if left == CHUNK:
        acc = _histogram_chunk(x, left, prefix, shift, FIRST, True, CHUNK, BLOCK, BINS)
    else:
        acc = _histogram_chunk(x, left, prefix, shift, FIRST, False, CHUNK, BLOCK, BINS)
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
def _ties_chunk(x, left, threshold, FULL: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for j in range(0, CHUNK, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        valid = offs < left
        acc += (valid & (_keys(x, offs, valid, FULL) == threshold)).to(tl.int32)
    return tl.sum(acc, axis=0)


@triton.jit
def _ties_kernel(chunk_tensor, chunk_start, numel, x_ptrs, x_ref, sel, counts,
                 ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c, t, start, left = this_chunk(chunk_tensor, chunk_start, numel, CHUNK)
    x = tensor_ptr(x_ptrs, t, x_ref, start, ALIGNED)
    threshold = tl.load(sel).to(tl.uint32)
    if left == CHUNK:
        ties = _ties_chunk(x, left, threshold, True, CHUNK, BLOCK)
    else:
        ties = _ties_chunk(x, left, threshold, False, CHUNK, BLOCK)
    tl.store(counts + c, ties.to(tl.int64))


@triton.jit
def _write_chunk(x, out, left, threshold, need, seen, FULL: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr):
    for j in range(0, CHUNK, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        valid = offs < left
        key = _keys(x, offs, valid, FULL)
        tie = (valid & (key == threshold)).to(tl.int32)
        rank = seen + tl.cumsum(tie, axis=0) - tie
        keep = (key > threshold) | ((tie != 0) & (rank < need))
        store_block(out + offs, keep.to(tl.int8), valid, FULL)
        seen += tl.sum(tie, axis=0)


@triton.jit
def _write_kernel(chunk_tensor, chunk_start, numel, x_ptrs, x_ref, out_ptrs, out_ref, sel, ties_before,
                  ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c, t, start, left = this_chunk(chunk_tensor, chunk_start, numel, CHUNK)
    x = tensor_ptr(x_ptrs, t, x_ref, start, ALIGNED)
    out = tensor_ptr(out_ptrs, t, out_ref, start, ALIGNED)
    threshold = tl.load(sel).to(tl.uint32)
    need = tl.load(sel + 1)
    seen = tl.load(ties_before + c)
    if left == CHUNK:
        _write_chunk(x, out, left, threshold, need, seen, True, CHUNK, BLOCK)
    else:
        _write_chunk(x, out, left, threshold, need, seen, False, CHUNK, BLOCK)


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
    vectors = aligned(*xs)  # (the outputs are fresh allocations: aligned)
    sel = torch.zeros(2, dtype=torch.int64, device=device)  # [prefix, need]: filled, not copied
    sel[1:].fill_(k)
    hist = torch.zeros(32 // RADIX_BITS, BINS, dtype=torch.int32, device=device)
    for p, shift in enumerate(range(32 - RADIX_BITS, -1, -RADIX_BITS)):
        _histogram_kernel[grid](table.chunk_tensor, table.chunk_start, table.numel, x_addr, xs[0], sel, hist[p],
                                shift, FIRST=p == 0, ALIGNED=vectors, CHUNK=CHUNK, BLOCK=BLOCK, BINS=BINS)
        _choose_digit_kernel[(1,)](hist[p], sel, shift, BINS=BINS)
    counts = torch.empty(table.num_chunks, dtype=torch.int64, device=device)
    _ties_kernel[grid](table.chunk_tensor, table.chunk_start, table.numel, x_addr, xs[0], sel, counts,
                       ALIGNED=vectors, CHUNK=CHUNK, BLOCK=BLOCK)
    outs = [torch.empty(x.shape, dtype=torch.int8, device=device) for x in xs]
    _write_kernel[grid](table.chunk_tensor, table.chunk_start, table.numel, x_addr, xs[0],
                        address_table(outs, device), outs[0], sel, torch.cumsum(counts, 0) - counts,
                        ALIGNED=vectors, CHUNK=CHUNK, BLOCK=BLOCK)
    return [o.view(torch.bool) for o in outs]
