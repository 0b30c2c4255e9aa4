"""Triton global top-k mask by radix select: no sort, no concatenation of the scores.

Scores become order-preserving 32-bit keys (NaN ranks as -inf and -0 as +0, as in the
reference). Four passes of an 8-bit histogram over the keys that still match the prefix chosen
so far find the key ``T`` of the k-th largest score, on the device (no host sync, and no
host-to-device copy once the chunk and address tables are cached). Each pass derives the
digits chosen so far from the previous passes' 256-bin histograms itself, so no launch sits
between passes. The last histogram pass also keeps every chunk's histogram, whose bin of T's
last digit counts the chunk's ties; one cumulative sum over chunks then gives each chunk the
ties before it, and a write pass keeps ``key > T`` or "a tie among the first ``need`` ties in
index order": exactly k entries. Seven launches (a memset, four histogram passes, the
cumulative sum, the write) and five reads of the scores per call.
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
def _selected(hist, k, PASSES: tl.constexpr, BINS: tl.constexpr, RADIX_BITS: tl.constexpr):
    """After PASSES digits: the key prefix of the k-th largest key (digits chosen from the
    global histograms ``hist[0 .. PASSES - 1]``, highest first), and how many keys with that
    prefix are still to keep. Every program derives it alike from 1 KB per pass."""
    prefix = tl.zeros([], dtype=tl.int64)
    need = tl.zeros([], dtype=tl.int64) + k
    b = tl.arange(0, BINS)
    for q in tl.static_range(PASSES):
        h = tl.load(hist + q * BINS + b).to(tl.int64)
        total = tl.sum(h, axis=0)
        below_incl = tl.cumsum(h, axis=0)
        at_or_above = total - below_incl + h  # matching keys with digit >= d
        d = tl.sum((at_or_above >= need).to(tl.int32), axis=0) - 1
        above = total - tl.sum(tl.where(b == d, below_incl, 0), axis=0)
        prefix = prefix | (d.to(tl.int64) << (32 - RADIX_BITS * (q + 1)))
        need = need - above
    return prefix.to(tl.uint32), need


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
def _histogram_kernel(chunk_tensor, chunk_start, numel, x_ptrs, x_ref, hist, chunk_hist, k,
                      PASS: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                      BINS: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Pass PASS: histogram of digit PASS of the keys that match the prefix of the digits
    before it, added into hist[PASS]. The last pass also keeps each chunk's own histogram:
    its bin of the last digit is the chunk's count of keys equal to the threshold."""
    c, t, start, left = this_chunk(chunk_tensor, chunk_start, numel, CHUNK)
    x = tensor_ptr(x_ptrs, t, x_ref, start, ALIGNED)
    prefix, need = _selected(hist, k, PASS, BINS, RADIX_BITS)
    shift = 32 - RADIX_BITS * (PASS + 1)
    if left == CHUNK:
        acc = _histogram_chunk(x, left, prefix, shift, PASS == 0, True, CHUNK, BLOCK, BINS)
    else:
        acc = _histogram_chunk(x, left, prefix, shift, PASS == 0, False, CHUNK, BLOCK, BINS)
    b = tl.arange(0, 2 * BINS)
    # relaxed, and only bins this chunk counts (most are empty past the first pass): the later
    # passes read hist in later launches, which the launch boundary orders
    tl.atomic_add(hist + PASS * BINS + b, acc, mask=(b < BINS) & (acc != 0), sem="relaxed")
    if PASS == 32 // RADIX_BITS - 1:
        tl.store(chunk_hist + c.to(tl.int64) * BINS + b, acc, mask=b < BINS)


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
def _write_kernel(chunk_tensor, chunk_start, numel, x_ptrs, x_ref, out_ptrs, out_ref, hist, ties_through, k,
                  ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr,
                  RADIX_BITS: tl.constexpr):
    """keep = key > threshold, or a tie among the first ``need`` ties in index order;
    ``ties_through[c, d]``: keys of the last digit d (under the full prefix) in chunks <= c."""
    c, t, start, left = this_chunk(chunk_tensor, chunk_start, numel, CHUNK)
    x = tensor_ptr(x_ptrs, t, x_ref, start, ALIGNED)
    out = tensor_ptr(out_ptrs, t, out_ref, start, ALIGNED)
    threshold, need = _selected(hist, k, 32 // RADIX_BITS, BINS, RADIX_BITS)
    last_digit = (threshold & (BINS - 1)).to(tl.int64)
    seen = tl.load(ties_through + (c.to(tl.int64) - 1) * BINS + last_digit, mask=c > 0, other=0).to(tl.int64)
    if left == CHUNK:
        _write_chunk(x, out, left, threshold, need, seen, True, CHUNK, BLOCK)
    else:
        _write_chunk(x, out, left, threshold, need, seen, False, CHUNK, BLOCK)


# The histograms count in int32 (atomics, a cumulative sum): more scores than this in one call
# would wrap a bin's count. Larger lists take the reference (int64 counts).
MAX_TOTAL = 2**31 - 1


def topk_mask_triton(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Host launcher: same contract as ``topk_mask_torch`` (inputs checked by the caller)."""
    device = scores[0].device
    dtypes = {s.dtype for s in scores}
    total = sum(s.numel() for s in scores)
    if len(dtypes) != 1 or dtypes.pop() not in (torch.float32, torch.float16, torch.bfloat16) or \
            any(s.device != device for s in scores) or k in (0, total) or total > MAX_TOTAL:
        return topk_mask_torch(scores, k)
    xs = [s.contiguous() for s in scores]
    table = chunk_table([x.numel() for x in xs], device)
    grid = (table.num_chunks,)
    x_addr = address_table(xs, device)
    vectors = aligned(*xs)
    passes = 32 // RADIX_BITS
    hist = torch.zeros(passes, BINS, dtype=torch.int32, device=device)
    chunk_hist = torch.empty(table.num_chunks, BINS, dtype=torch.int32, device=device)
    for p in range(passes):
        _histogram_kernel[grid](table.chunk_tensor, table.chunk_start, table.numel, x_addr, xs[0], hist, chunk_hist,
                                k, PASS=p, ALIGNED=vectors, CHUNK=CHUNK, BLOCK=BLOCK, BINS=BINS, RADIX_BITS=RADIX_BITS)
    ties_through = torch.cumsum(chunk_hist, 0, dtype=torch.int32)  # (at most MAX_TOTAL elements)
    outs = [torch.empty(x.shape, dtype=torch.int8, device=device) for x in xs]
    vectors = vectors and aligned(*outs)  # (fresh outputs: aligned under torch's allocators, not under every one)
    _write_kernel[grid](table.chunk_tensor, table.chunk_start, table.numel, x_addr, xs[0],
                        address_table(outs, device), outs[0], hist, ties_through, k,
                        ALIGNED=vectors, CHUNK=CHUNK, BLOCK=BLOCK, BINS=BINS, RADIX_BITS=RADIX_BITS,
                        num_warps=2)  # 16 one-byte outputs per thread: 16-byte stores
    return [o.view(torch.bool) for o in outs]
