"""Triton kernels of a SAM step over a :class:`~ssam_kernels.SAMStepPlan`: the gradient norm with
the scale written on the device, the masked perturbation with its compact backup, the restore,
and the restore fused with torch's SGD update. One launch each per weight dtype (one for most
models), whatever the number of tensors.

Each program takes one block of ``BLOCK`` elements of one tensor, in the tensor's memory order.
The plan's tables (built once per mask) give each block its tensor, its first element and the
backup slot of its first kept element, so no program counts bits for another, nothing is carried
from block to block, and blocks without a kept element are not launched for the norm and the
perturbation. Inside a block, bit ``i`` of the mask is element ``i``: byte popcounts and one
exclusive scan over the block's bytes give each kept element its slot. The mask bytes and the
data are read as ``[BLOCK // 8, 8]``: one mask byte per row, rows contiguous, so whole 16-byte
vectors move wherever a row holds a kept element (and only there).

The norm's programs write their partial sums, then count themselves on an atomic counter; the
last one sums the partials in a fixed order (deterministic), writes ``1 / (sqrt(sum) + eps)``
(0 and a skip flag where the sum is not finite: then the perturbation leaves the weights
alone and a device counter of skipped steps goes up), and resets the counter: no host sync,
nothing for the host to compute, and a CUDA graph can replay it.

The update math is in fp32 (float64 for float64 weights) without FMA contraction, as in the
reference: ``scale = inv * rho`` then ``w + scale * g``, each rounded.
"""

from __future__ import annotations

import functools
import operator

import torch
import triton
import triton.language as tl

from .multi_tensor import as_f64, f64_bits

BLOCK = 2048  # elements per program (1024 for float64): 8 per thread in 8 warps, no spill (compile tier)
FINAL_BLOCK = 1024  # partial sums the last norm program adds per step of its loop


@triton.jit
def _popcount8(x):
    """Set bits of each int32 in 0..255."""
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


@triton.jit
def _block_place(blocks, blk_tensor, blk_start, numel, BLOCK: tl.constexpr):
    """(table row, tensor, first element, elements in this block) of the running program."""
    c = tl.load(blocks + tl.program_id(0))
    t = tl.load(blk_tensor + c)
    start = tl.multiple_of(tl.load(blk_start + c), BLOCK)
    left = tl.minimum(tl.load(numel + t) - start, BLOCK).to(tl.int32)
    return c, t, start, left


@triton.jit
def _typed(addr, ref, offset, ALIGNED: tl.constexpr):
    """``addr`` (an int64 address) as a pointer to ``ref``'s element type, plus ``offset``."""
    p = addr.to(ref.dtype) + offset
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _block_offsets(BLOCK: tl.constexpr):
    return tl.arange(0, BLOCK // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]


@triton.jit
def _block_bytes(bits, left, FULL: tl.constexpr, BLOCK: tl.constexpr):
    """The block's mask bytes as int32 ``[BLOCK // 8]`` (``bits``: its first byte); bits past
    the tensor's end read as 0."""
    rows = tl.arange(0, BLOCK // 8)
    if FULL:
        byte = tl.load(bits + rows).to(tl.int32)
    else:
        inside = tl.minimum(tl.maximum(left - rows * 8, 0), 8)  # bits of byte r inside the tensor
        byte = tl.load(bits + rows, mask=inside > 0, other=0).to(tl.int32) & ((1 << inside) - 1)
    return byte


@triton.jit
def _slots(byte):
    """For mask bytes ``[R]``: which elements ``[R, 8]`` are kept, each kept element's slot
    among the block's kept elements (in order), and which rows hold any."""
    col = tl.arange(0, 8)[None, :]
    keep = ((byte[:, None] >> col) & 1) != 0
    count = _popcount8(byte)
    before = tl.cumsum(count, axis=0) - count
    slot = before[:, None] + _popcount8(byte[:, None] & ((1 << col) - 1))
    return keep, slot, count > 0


@triton.jit
def _load(p, valid, FULL: tl.constexpr):
    if FULL:
        return tl.load(p)
    else:
        return tl.load(p, mask=valid, other=0)


@triton.jit
def _store(p, value, valid, FULL: tl.constexpr):
    if FULL:
        tl.store(p, value)
    else:
        tl.store(p, value, mask=valid)


# --- the norm -------------------------------------------------------------------------------

@triton.jit
def _sum_squares(g, bits, left, MASKED: tl.constexpr, ACC: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    offs = _block_offsets(BLOCK)
    valid = offs < left
    if MASKED:
        byte = _block_bytes(bits, left, FULL, BLOCK)
        keep = ((byte[:, None] >> tl.arange(0, 8)[None, :]) & 1) != 0
        rows = (byte != 0)[:, None]  # whole rows (vectors) where any element is kept
        if not FULL:
            rows = rows & valid
        v = tl.where(keep, tl.load(g + offs, mask=rows, other=0.0).to(ACC), 0.0)
    else:
        v = _load(g + offs, valid, FULL).to(ACC)
    return tl.sum(tl.sum(v * v, axis=1), axis=0)


@triton.jit(do_not_specialize=["first", "programs", "eps_bits"])
def _norm_kernel(blocks, blk_tensor, blk_start, numel, g_ptrs, bits_ptrs, partial, counter, inv, flags,
                 first, programs, eps_bits, g_ref, bits_ref,
                 MASKED: tl.constexpr, FP64: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                 FINAL_BLOCK: tl.constexpr):
    """partial[first + pid]: the block's sum of squares of the gradient (masked where MASKED
    and the tensor has a mask; 0 where it has no gradient). The last of ``programs`` programs
    (over every launch of the step) writes ``inv`` and the skip flags."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    c, t, start, left = _block_place(blocks, blk_tensor, blk_start, numel, BLOCK)
    g_addr = tl.load(g_ptrs + t)
    b_addr = tl.load(bits_ptrs + t)
    total = tl.zeros([], dtype=ACC)
    if g_addr != 0:
        g = _typed(g_addr, g_ref, start, ALIGNED)
        if MASKED and b_addr != 0:
            bits = _typed(b_addr, bits_ref, start // 8, ALIGNED)
            if left == BLOCK:
                total = _sum_squares(g, bits, left, True, ACC, True, BLOCK)
            else:
                total = _sum_squares(g, bits, left, True, ACC, False, BLOCK)
        else:
            if left == BLOCK:
                total = _sum_squares(g, g, left, False, ACC, True, BLOCK)
            else:
                total = _sum_squares(g, g, left, False, ACC, False, BLOCK)
    tl.store(partial + first + tl.program_id(0), total)
    done = tl.atomic_add(counter, 1, sem="acq_rel")  # releases the partial, acquires the others'
    if done == programs - 1:
        _finish_norm(partial, counter, inv, flags, programs, eps_bits, ACC, FINAL_BLOCK)


@triton.jit
def _finish_norm(partial, counter, inv, flags, programs, eps_bits, ACC: tl.constexpr, FINAL_BLOCK: tl.constexpr):
    acc = tl.zeros([FINAL_BLOCK], dtype=ACC)
    for i in range(0, programs, FINAL_BLOCK):  # a fixed order: the same sum whichever program is last
        k = i + tl.arange(0, FINAL_BLOCK)
        acc += tl.load(partial + k, mask=k < programs, other=0.0, cache_modifier=".cg")
    total = tl.sum(acc, axis=0)
    finite = (total - total) == 0  # NaN for inf and NaN
    eps = as_f64(eps_bits).to(ACC)
    if ACC == tl.float64:  # float64's sqrt and division round correctly as they are
        scale = 1.0 / (tl.sqrt(total) + eps)
    else:  # fp32's default ones are approximate: the correctly rounded ones, as torch's
        scale = tl.div_rn(tl.full([], 1.0, ACC), tl.sqrt_rn(total) + eps)
    tl.store(inv, tl.where(finite, scale, 0.0))
    skipped = tl.where(finite, 0, 1).to(tl.int64)
    tl.store(flags, skipped)
    tl.store(flags + 1, tl.load(flags + 1) + skipped)
    tl.atomic_xchg(counter, 0)  # ready for the next step (and for a graph replay)


# --- the perturbation, the restore, the restore + SGD ----------------------------------------

@triton.jit
def _perturb_block(w, g, bits, backup, left, scale, move, MASKED: tl.constexpr, HAS_GRAD: tl.constexpr,
                   FULL: tl.constexpr, BLOCK: tl.constexpr):
    offs = _block_offsets(BLOCK)
    valid = offs < left
    if MASKED:
        keep, slot, row_any = _slots(_block_bytes(bits, left, FULL, BLOCK))
        rows = row_any[:, None]  # whole rows (vectors) where any element is kept
        if not FULL:
            rows = rows & valid
        old = tl.load(w + offs, mask=rows)
        tl.store(backup + slot, old, mask=keep)
        if HAS_GRAD:
            grad = tl.load(g + offs, mask=rows, other=0.0).to(scale.dtype)
            new = tl.where(keep & move, (old.to(scale.dtype) + scale * grad).to(old.dtype), old)
            tl.store(w + offs, new, mask=rows)
    else:
        old = _load(w + offs, valid, FULL)
        _store(backup + offs, old, valid, FULL)
        if HAS_GRAD:
            grad = _load(g + offs, valid, FULL).to(scale.dtype)
            new = tl.where(move, (old.to(scale.dtype) + scale * grad).to(old.dtype), old)
            _store(w + offs, new, valid, FULL)


@triton.jit
def _perturb_kernel(blocks, blk_tensor, blk_start, blk_base, numel, w_ptrs, g_ptrs, bits_ptrs, backup, inv, flags,
                    tensor_rho, w_ref, g_ref, bits_ref, FP64: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK: tl.constexpr):
    """w[m] -> backup, w[m] += (inv * rho) * g[m] (in float64 where FP64, else fp32), unless the
    norm set the skip flag; a tensor without a gradient is backed up and left alone."""
    MATH: tl.constexpr = tl.float64 if FP64 else tl.float32
    c, t, start, left = _block_place(blocks, blk_tensor, blk_start, numel, BLOCK)
    w = _typed(tl.load(w_ptrs + t), w_ref, start, ALIGNED)
    dst = backup + tl.load(blk_base + c)
    # rho / (norm + eps) as torch computes it, reciprocal(norm + eps) * rho, in the norm's dtype
    scale = (tl.load(inv) * tl.load(tensor_rho + t).to(inv.dtype.element_ty)).to(MATH)
    move = tl.load(flags) == 0
    g_addr = tl.load(g_ptrs + t)
    b_addr = tl.load(bits_ptrs + t)
    g = _typed(tl.where(g_addr != 0, g_addr, tl.load(w_ptrs + t)), g_ref, start, ALIGNED)
    if b_addr != 0:
        bits = _typed(b_addr, bits_ref, start // 8, ALIGNED)
        if g_addr != 0:
            if left == BLOCK:
                _perturb_block(w, g, bits, dst, left, scale, move, True, True, True, BLOCK)
            else:
                _perturb_block(w, g, bits, dst, left, scale, move, True, True, False, BLOCK)
        else:
            if left == BLOCK:
                _perturb_block(w, g, bits, dst, left, scale, move, True, False, True, BLOCK)
            else:
                _perturb_block(w, g, bits, dst, left, scale, move, True, False, False, BLOCK)
    else:
        dst = tl.multiple_of(dst, 16) if ALIGNED else dst
        if g_addr != 0:
            if left == BLOCK:
                _perturb_block(w, g, w, dst, left, scale, move, False, True, True, BLOCK)
            else:
                _perturb_block(w, g, w, dst, left, scale, move, False, True, False, BLOCK)
        else:
            if left == BLOCK:
                _perturb_block(w, g, w, dst, left, scale, move, False, False, True, BLOCK)
            else:
                _perturb_block(w, g, w, dst, left, scale, move, False, False, False, BLOCK)


@triton.jit
def _restored(w, bits, backup, offs, valid, left, MASKED: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    """The block's weights as they were before the perturbation."""
    if MASKED:
        keep, slot, row_any = _slots(_block_bytes(bits, left, FULL, BLOCK))
        current = _load(w + offs, valid, FULL)
        return tl.where(keep, tl.load(backup + slot, mask=keep), current)
    else:
        return _load(backup + offs, valid, FULL)


@triton.jit
def _restore_block(w, bits, backup, left, MASKED: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    offs = _block_offsets(BLOCK)
    valid = offs < left
    if MASKED:
        keep, slot, row_any = _slots(_block_bytes(bits, left, FULL, BLOCK))
        tl.store(w + offs, tl.load(backup + slot, mask=keep), mask=keep)
    else:
        _store(w + offs, _load(backup + offs, valid, FULL), valid, FULL)


@triton.jit
def _restore_kernel(blocks, blk_tensor, blk_start, blk_base, numel, w_ptrs, bits_ptrs, backup, w_ref, bits_ref,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """w[m] = backup: the weights bit for bit as before the perturbation."""
    c, t, start, left = _block_place(blocks, blk_tensor, blk_start, numel, BLOCK)
    w = _typed(tl.load(w_ptrs + t), w_ref, start, ALIGNED)
    dst = backup + tl.load(blk_base + c)
    b_addr = tl.load(bits_ptrs + t)
    if b_addr != 0:
        bits = _typed(b_addr, bits_ref, start // 8, ALIGNED)
        if left == BLOCK:
            _restore_block(w, bits, dst, left, True, True, BLOCK)
        else:
            _restore_block(w, bits, dst, left, True, False, BLOCK)
    else:
        dst = tl.multiple_of(dst, 16) if ALIGNED else dst
        if left == BLOCK:
            _restore_block(w, w, dst, left, False, True, BLOCK)
        else:
            _restore_block(w, w, dst, left, False, False, BLOCK)


@triton.jit
def _sgd_block(w, g, buf, bits, backup, left, lr, momentum, dampening, weight_decay, nesterov, maximize, fresh,
               MASKED: tl.constexpr, HAS_GRAD: tl.constexpr, MOMENTUM: tl.constexpr, FULL: tl.constexpr,
               BLOCK: tl.constexpr):
    offs = _block_offsets(BLOCK)
    valid = offs < left
    weight = _restored(w, bits, backup, offs, valid, left, MASKED, FULL, BLOCK)
    if HAS_GRAD:
        x = weight.to(lr.dtype)
        d = _load(g + offs, valid, FULL).to(lr.dtype)
        d = tl.where(maximize, -d, d)
        d = tl.where(weight_decay != 0, d + weight_decay * x, d)
        if MOMENTUM:
            if momentum != 0:  # a group without momentum has no buffer
                if fresh:  # torch's SGD: the first buffer is the direction itself
                    b = d
                else:
                    b = _load(buf + offs, valid, FULL).to(lr.dtype) * momentum + (1 - dampening) * d
                _store(buf + offs, b.to(buf.dtype.element_ty), valid, FULL)
                d = tl.where(nesterov, d + momentum * b, b)
        _store(w + offs, (x - lr * d).to(w.dtype.element_ty), valid, FULL)
    else:  # no gradient: torch's SGD skips the tensor; put the weights back only
        _store(w + offs, weight, valid, FULL)


@triton.jit
def _sgd_dispatch(w, g, buf, bits, dst, left, lr, momentum, dampening, weight_decay, nesterov, maximize, fresh,
                  has_grad, MASKED: tl.constexpr, MOMENTUM: tl.constexpr, BLOCK: tl.constexpr):
    if has_grad:
        if left == BLOCK:
            _sgd_block(w, g, buf, bits, dst, left, lr, momentum, dampening, weight_decay, nesterov, maximize, fresh,
                       MASKED, True, MOMENTUM, True, BLOCK)
        else:
            _sgd_block(w, g, buf, bits, dst, left, lr, momentum, dampening, weight_decay, nesterov, maximize, fresh,
                       MASKED, True, MOMENTUM, False, BLOCK)
    else:
        if left == BLOCK:
            _sgd_block(w, g, buf, bits, dst, left, lr, momentum, dampening, weight_decay, nesterov, maximize, fresh,
                       MASKED, False, MOMENTUM, True, BLOCK)
        else:
            _sgd_block(w, g, buf, bits, dst, left, lr, momentum, dampening, weight_decay, nesterov, maximize, fresh,
                       MASKED, False, MOMENTUM, False, BLOCK)


@triton.jit
def _restore_sgd_kernel(blocks, blk_tensor, blk_start, blk_base, numel, w_ptrs, g_ptrs, buf_ptrs, bits_ptrs, backup,
                        tensor_group, hyper, fresh_buffers, w_ref, g_ref, buf_ref, bits_ref,
                        MOMENTUM: tl.constexpr, FP64: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """The weights restored, then torch.optim.SGD's update with the current
    gradient (none: restored only) and the group's hyper-parameters, ``hyper[group]`` =
    (lr, momentum, dampening, weight_decay, nesterov, maximize) as float64. A tensor whose
    ``fresh_buffers`` flag is set starts its momentum buffer from the direction."""
    MATH: tl.constexpr = tl.float64 if FP64 else tl.float32
    c, t, start, left = _block_place(blocks, blk_tensor, blk_start, numel, BLOCK)
    w_addr = tl.load(w_ptrs + t)
    w = _typed(w_addr, w_ref, start, ALIGNED)
    h = hyper + tl.load(tensor_group + t) * 6
    lr, momentum = tl.load(h).to(MATH), tl.load(h + 1).to(MATH)
    dampening, weight_decay = tl.load(h + 2).to(MATH), tl.load(h + 3).to(MATH)
    nesterov, maximize = tl.load(h + 4) != 0, tl.load(h + 5) != 0
    g_addr = tl.load(g_ptrs + t)
    g = _typed(tl.where(g_addr != 0, g_addr, w_addr), g_ref, start, ALIGNED)
    buf = w
    fresh = False
    if MOMENTUM:
        buf_addr = tl.load(buf_ptrs + t)
        buf = _typed(tl.where(buf_addr != 0, buf_addr, w_addr), buf_ref, start, ALIGNED)
        fresh = tl.load(fresh_buffers + t) != 0
    dst = backup + tl.load(blk_base + c)
    b_addr = tl.load(bits_ptrs + t)
    if b_addr != 0:
        bits = _typed(b_addr, bits_ref, start // 8, ALIGNED)
        _sgd_dispatch(w, g, buf, bits, dst, left, lr, momentum, dampening, weight_decay, nesterov, maximize, fresh,
                      g_addr != 0, True, MOMENTUM, BLOCK)
    else:
        dst = tl.multiple_of(dst, 16) if ALIGNED else dst
        _sgd_dispatch(w, g, buf, w, dst, left, lr, momentum, dampening, weight_decay, nesterov, maximize, fresh,
                      g_addr != 0, False, MOMENTUM, BLOCK)


# --- host side ------------------------------------------------------------------------------

_POPCOUNT = {}


def _block_counts(bits: torch.Tensor, numel: int, block: int) -> torch.Tensor:
    """Set bits of each ``block``-element block of a packed mask (int64, on the mask's device)."""
    key = (bits.device.type, bits.device.index)
    if key not in _POPCOUNT:
        _POPCOUNT[key] = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int64, device=bits.device)
    per_block = block // 8
    blocks = -(-numel // block)
    padded = torch.zeros(blocks * per_block, dtype=torch.uint8, device=bits.device)
    padded[: bits.numel()] = bits
    return _POPCOUNT[key][padded.long()].view(blocks, per_block).sum(1)


def _aligned_length(n: int, dtype: torch.dtype) -> int:
    step = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return -(-n // step) * step


class _Part:
    """The tensors of one weight dtype: their tables (made once) and flat backup."""

    def __init__(self, plan, index: list[int], masks: list):
        params = [plan.params[i] for i in index]
        device = plan.device
        self.index = index
        self.dtype = params[0].dtype
        self.ref = params[0]
        self.block = block = BLOCK // 2 if self.dtype == torch.float64 else BLOCK
        numels = [p.numel() for p in params]
        bits = [None if m is None else m.bits for m in masks]
        self.bits = [b for b in bits if b is not None]  # kept alive: the kernels read their addresses
        self.bits_ref = self.bits[0] if self.bits else torch.zeros(16, dtype=torch.uint8, device=device)
        counts = [None if b is None else _block_counts(b, n, block).cpu().tolist() for b, n in zip(bits, numels)]
        blk_tensor, blk_start, blk_base, kept_blocks = [], [], [], []
        offset = 0
        for t, (n, c) in enumerate(zip(numels, counts)):
            before = 0
            for b in range(-(-n // block)):
                if c is None or c[b]:
                    kept_blocks.append(len(blk_tensor))
                blk_tensor.append(t)
                blk_start.append(b * block)
                blk_base.append(offset + (b * block if c is None else before))
                before += 0 if c is None else c[b]
            offset += _aligned_length(n if c is None else before, self.dtype)
        self.backup = torch.empty(offset, dtype=self.dtype, device=device)
        self.blocks = len(blk_tensor)
        self.kept_blocks = len(kept_blocks)
        self.norm_blocks = self.kept_blocks if plan.masked_norm else self.blocks
        self.aligned = all(p.data_ptr() % 16 == 0 for p in params) and all(b.data_ptr() % 16 == 0 for b in self.bits)
        # one int64 copy: blk_start | blk_base | numel | w_ptrs | bits_ptrs | rows of int32 pairs
        i64 = [blk_start, blk_base, numels, [p.data_ptr() for p in params], [0 if b is None else b.data_ptr() for b in bits]]
        i32 = [blk_tensor, kept_blocks, list(range(self.blocks)), [plan.groups[i] for i in index]]
        host, views = _pack_tables(i64, i32)
        table = host.to(device)
        (self.blk_start, self.blk_base, self.numel, self.w_ptrs, self.bits_ptrs,
         self.blk_tensor, self.kept, self.all, self.tensor_group) = (v(table) for v in views)
        self.norm_rows = self.kept if plan.masked_norm else self.all
        self.buf_ptrs = torch.zeros(len(index), dtype=torch.int64, device=device)  # none until made
        self.fresh = [True] * len(index)  # momentum buffer not started yet (torch's SGD: buf = d)
        self.any_fresh = True
        self.spare: dict[int, torch.Tensor] = {}  # buffers made ahead for tensors not stepped yet


def _pack_tables(i64: list[list[int]], i32: list[list[int]]):
    """One host int64 tensor holding the lists (each section 16-byte aligned), and per list a
    function giving its view in a copy of that tensor."""
    at, sections = 0, []
    for values in i64:
        sections.append((at, len(values), torch.int64))
        at += -(-len(values) // 2) * 2
    for values in i32:
        sections.append((at, len(values), torch.int32))
        at += -(-len(values) // 4) * 2
    host = torch.zeros(max(at, 2), dtype=torch.int64)
    for (start, n, dtype), values in zip(sections, i64 + i32):
        if n:
            host[start:].view(dtype)[:n] = torch.tensor(values, dtype=dtype)
    return host, [lambda buf, s=s, n=n, d=d: buf[s:].view(d)[:n] for s, n, d in sections]


class TritonStep:
    """The Triton kernels of a :class:`~ssam_kernels.SAMStepPlan` (one part per weight dtype)."""

    def __init__(self, plan, memory_masks):
        from .multi_tensor import _CACHE

        self.plan = plan
        self.cache = _CACHE
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(plan.params):
            by_dtype.setdefault(p.dtype, []).append(i)
        self.parts = [_Part(plan, idx, [memory_masks[i] for i in idx]) for idx in by_dtype.values()]
        self.norm_programs = sum(part.norm_blocks for part in self.parts)
        self.partial = torch.empty(max(self.norm_programs, 1), dtype=plan.norm_dtype, device=plan.device)
        self.counter = torch.zeros(1, dtype=torch.int32, device=plan.device)
        self.eps_bits = f64_bits(plan.eps)
        self.device, self.place = _place(plan.device)
        self.memo: dict[str, tuple] = {}

    def _table(self, kind: str, key: tuple, make=None, dtype=torch.int64) -> torch.Tensor:
        """The device table of ``key`` (``make()`` its values; default the key itself), from the
        shared content-keyed cache; the last one of each kind is remembered here, so a step whose
        tables did not change makes no cache lookup (on CUDA: for the same stream)."""
        stream = _stream_id(self.device)
        last = self.memo.get(kind)
        if last is not None and last[0] == key and last[1] == stream:
            return last[2]
        table = self.cache.get((kind, key) + self.place, self.device,
                               lambda: (torch.tensor(key if make is None else make(), dtype=dtype), lambda buf: buf))
        self.memo[kind] = (key, stream, table)
        return table

    def _grad_tables(self, grads: tuple[int, ...], kind: str) -> list[tuple[torch.Tensor, bool]]:
        """Per part: the device table of its gradients' addresses, and whether all start on 16
        bytes (remembered with the last addresses of each kind: one check per change)."""
        last = self.memo.get(kind + "+")
        if last is not None and last[0] == grads:
            keys = last[1]
        else:
            keys = [(grads, _aligned16(grads))] if len(self.parts) == 1 else [
                (mine, _aligned16(mine)) for mine in (tuple(grads[i] for i in part.index) for part in self.parts)]
            self.memo[kind + "+"] = (grads, keys)
        return [(self._table(f"{kind}{n}", key), aligned) for n, (key, aligned) in enumerate(keys)]

    def perturb(self, grads, rho) -> None:
        plan = self.plan
        tables = self._grad_tables(grads, "ascent")
        rho_tables = self._rho_tables(rho)
        if self.norm_programs == 0:  # no gradient entry counts: the norm is 0
            plan.inv.fill_(1.0 / (0.0 + plan.eps) if plan.eps else 0.0)
            plan.flags[0].zero_()
        first = 0
        for part, (g_ptrs, g_aligned) in zip(self.parts, tables):
            if part.norm_blocks:
                _norm_kernel[(part.norm_blocks,)](
                    part.norm_rows, part.blk_tensor, part.blk_start, part.numel, g_ptrs, part.bits_ptrs,
                    self.partial, self.counter, plan.inv, plan.flags, first, self.norm_programs, self.eps_bits,
                    part.ref, part.bits_ref, MASKED=plan.masked_norm, FP64=plan.norm_dtype == torch.float64,
                    ALIGNED=part.aligned and g_aligned, BLOCK=part.block, FINAL_BLOCK=FINAL_BLOCK, num_warps=8)
            first += part.norm_blocks
        for part, (g_ptrs, g_aligned), tensor_rho in zip(self.parts, tables, rho_tables):
            if part.kept_blocks:
                _perturb_kernel[(part.kept_blocks,)](
                    part.kept, part.blk_tensor, part.blk_start, part.blk_base, part.numel, part.w_ptrs, g_ptrs,
                    part.bits_ptrs, part.backup, plan.inv, plan.flags, tensor_rho, part.ref, part.ref,
                    part.bits_ref, FP64=part.dtype == torch.float64,
                    ALIGNED=part.aligned and g_aligned, BLOCK=part.block, num_warps=8, enable_fp_fusion=False)

    def _rho_tables(self, rho: tuple[float, ...]) -> list[torch.Tensor]:
        """Per part, each tensor's rho (float64, on the device): views of one table."""
        plan = self.plan
        table = self._table("rho", rho, lambda: [rho[plan.groups[i]] for part in self.parts for i in part.index],
                            torch.float64)
        last = self.memo.get("rho+")
        if last is not None and last[0] is table:
            return last[1]
        views, at = [], 0
        for part in self.parts:
            views.append(table[at: at + len(part.index)])
            at += len(part.index)
        self.memo["rho+"] = (table, views)
        return views

    def restore(self) -> None:
        for part in self.parts:
            if part.kept_blocks:
                _restore_kernel[(part.kept_blocks,)](
                    part.kept, part.blk_tensor, part.blk_start, part.blk_base, part.numel, part.w_ptrs, part.bits_ptrs,
                    part.backup, part.ref, part.bits_ref, ALIGNED=part.aligned, BLOCK=part.block, num_warps=8)

    def restore_sgd(self, grads, sgd) -> list[int]:
        plan = self.plan
        tables = self._grad_tables(grads, "descent")
        hyper = self._table("hyper", sgd, lambda: [v for h in sgd for v in h.values()], torch.float64)
        momentum = any(h.momentum != 0 for h in sgd)
        made = []
        for part, (g_ptrs, g_aligned) in zip(self.parts, tables):
            fresh = self._fresh_flags(part, grads, sgd) if momentum else part.numel
            _restore_sgd_kernel[(part.blocks,)](
                part.all, part.blk_tensor, part.blk_start, part.blk_base, part.numel, part.w_ptrs, g_ptrs, part.buf_ptrs,
                part.bits_ptrs, part.backup, part.tensor_group, hyper, fresh, part.ref, part.ref, part.ref,
                part.bits_ref, MOMENTUM=momentum, FP64=part.dtype == torch.float64,
                ALIGNED=part.aligned and g_aligned, BLOCK=part.block, num_warps=8, enable_fp_fusion=False)
            if momentum:
                made += self._started(part, grads, sgd)
        return made

    # --- momentum buffers: made on a tensor's first step, as torch's SGD does ------------------

    def _fresh_flags(self, part: _Part, grads, sgd) -> torch.Tensor:
        plan = self.plan
        if not part.any_fresh:
            return self._table(f"fresh{id(part)}", (0,) * len(part.index), dtype=torch.int8)
        missing = [t for t, i in enumerate(part.index) if plan.buffers[i] is None and t not in part.spare
                   and sgd[plan.groups[i]].momentum != 0]
        if missing:  # one allocation for every tensor still without a buffer
            params = [plan.params[part.index[t]] for t in missing]
            flat = torch.zeros(sum(_aligned_length(p.numel(), p.dtype) for p in params), dtype=part.dtype,
                               device=plan.device)
            at = 0
            for t, p in zip(missing, params):
                part.spare[t] = flat.as_strided(p.shape, p.stride(), at)
                at += _aligned_length(p.numel(), p.dtype)
            self._buffer_table(part)
        return self._table(f"fresh{id(part)}", tuple(int(f) for f in part.fresh), dtype=torch.int8)

    def _buffer_table(self, part: _Part) -> None:
        plan = self.plan
        ptrs = []
        for t, i in enumerate(part.index):
            buf = plan.buffers[i] if plan.buffers[i] is not None else part.spare.get(t)
            ptrs.append(0 if buf is None else buf.data_ptr())
        part.buf_ptrs = torch.tensor(ptrs, dtype=torch.int64).to(plan.device)
        part.aligned = part.aligned and all(a % 16 == 0 for a in ptrs)

    def _started(self, part: _Part, grads, sgd) -> list[int]:
        """Mark the tensors whose buffer this step started; hand their buffers to the plan."""
        plan = self.plan
        made = []
        if not part.any_fresh:
            return made
        for t, i in enumerate(part.index):
            if part.fresh[t] and grads[i] != 0 and sgd[plan.groups[i]].momentum != 0:
                part.fresh[t] = False
                if plan.buffers[i] is None:
                    plan.buffers[i] = part.spare.pop(t)
                made.append(i)
        part.any_fresh = any(part.fresh)
        return made

    def buffers_changed(self) -> None:
        for part in self.parts:
            part.spare.clear()
            part.fresh = [self.plan.buffers[i] is None for i in part.index]
            part.any_fresh = any(part.fresh)
            self._buffer_table(part)


def _aligned16(addresses: tuple[int, ...]) -> bool:
    return functools.reduce(operator.or_, addresses, 0) % 16 == 0


def _place(device: torch.device):
    from .multi_tensor import _place as place

    return place(device)


def _stream_id(device: torch.device) -> int:
    """The current stream of ``device`` (CUDA; 0 elsewhere), cheaply."""
    if device.type != "cuda":
        return 0
    return torch._C._cuda_getCurrentRawStream(device.index)
