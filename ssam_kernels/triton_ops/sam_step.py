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

Where every weight, mask, backup and momentum buffer starts on 16 bytes (``ALIGNED``) they move
in 16-byte vectors; the gradients have their own flag (``G_ALIGNED``), so gradients that do not
(views into DDP's buckets with ``gradient_as_bucket_view``) cost only their own loads' vectors.

The update math is in fp32 (float64 for float64 weights) without FMA contraction, as in the
reference: ``scale = inv * rho`` then ``w + scale * g``, each rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.sam_step_tables import KernelStep
from .multi_tensor import as_f64, block_offsets, f64_bits, load_block, store_block

BLOCK = 2048  # elements per program (1024 for float64): 8 per thread in 8 warps, no spill (compile tier)
FINAL_BLOCK = 1024  # partial sums per load of the last norm program (four loads a step of its loop)
PARTIAL_MULTIPLE = 4 * FINAL_BLOCK  # the partials' length is padded to this (zeros): its loads need no mask


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


# --- the norm -------------------------------------------------------------------------------

@triton.jit
def _sum_squares(g, bits, left, MASKED: tl.constexpr, ACC: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    offs = block_offsets(0, BLOCK)
    valid = offs < left
    if MASKED:
        byte = _block_bytes(bits, left, FULL, BLOCK)
        keep = ((byte[:, None] >> tl.arange(0, 8)[None, :]) & 1) != 0
        rows = (byte != 0)[:, None]  # whole rows (vectors) where any element is kept
        if not FULL:
            rows = rows & valid
        v = tl.where(keep, tl.load(g + offs, mask=rows, other=0.0).to(ACC), 0.0)
    else:
        v = load_block(g + offs, valid, FULL).to(ACC)
    return tl.sum(tl.sum(v * v, axis=1), axis=0)


@triton.jit(do_not_specialize=["first", "programs", "eps_bits"])
def _norm_kernel(blocks, blk_tensor, blk_start, numel, g_ptrs, bits_ptrs, partial, counter, inv, flags,
                 first, programs, eps_bits, g_ref, bits_ref,
                 MASKED: tl.constexpr, FP64: tl.constexpr, ALIGNED: tl.constexpr, G_ALIGNED: tl.constexpr,
                 BLOCK: tl.constexpr, FINAL_BLOCK: tl.constexpr):
    """partial[first + pid]: the block's sum of squares of the gradient (masked where MASKED
    and the tensor has a mask; 0 where it has no gradient). The last of ``programs`` programs
    (over every launch of the step) writes ``inv`` and the skip flags."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    c, t, start, left = _block_place(blocks, blk_tensor, blk_start, numel, BLOCK)
    g_addr = tl.load(g_ptrs + t)
    b_addr = tl.load(bits_ptrs + t)
    total = tl.zeros([], dtype=ACC)
    if g_addr != 0:
        g = _typed(g_addr, g_ref, start, G_ALIGNED)
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
    # a fixed order: the same sum whichever program is last. This loop runs in one program,
    # over one partial per block (173k for GPT-2 medium's weights), each step waiting on its
    # loads: four 16-byte vectors a thread in flight per step, unmasked (the partials are zero
    # up to a multiple of PARTIAL_MULTIPLE: a mask on ``programs`` made every load scalar)
    for i in range(0, programs, 4 * FINAL_BLOCK):
        k = i + tl.arange(0, FINAL_BLOCK)
        a0 = tl.load(partial + k, cache_modifier=".cg")
        a1 = tl.load(partial + k + FINAL_BLOCK, cache_modifier=".cg")
        a2 = tl.load(partial + k + 2 * FINAL_BLOCK, cache_modifier=".cg")
        a3 = tl.load(partial + k + 3 * FINAL_BLOCK, cache_modifier=".cg")
        acc += (a0 + a1) + (a2 + a3)
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
    offs = block_offsets(0, BLOCK)
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
        old = load_block(w + offs, valid, FULL)
        store_block(backup + offs, old, valid, FULL)
        if HAS_GRAD:
            grad = load_block(g + offs, valid, FULL).to(scale.dtype)
            new = tl.where(move, (old.to(scale.dtype) + scale * grad).to(old.dtype), old)
            store_block(w + offs, new, valid, FULL)


@triton.jit
def _perturb_kernel(blocks, blk_tensor, blk_start, blk_base, numel, w_ptrs, g_ptrs, bits_ptrs, backup, inv, flags,
                    tensor_rho, w_ref, g_ref, bits_ref, FP64: tl.constexpr, ALIGNED: tl.constexpr,
                    G_ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
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
    g = _typed(tl.where(g_addr != 0, g_addr, tl.load(w_ptrs + t)), g_ref, start, G_ALIGNED)
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
        current = load_block(w + offs, valid, FULL)
        return tl.where(keep, tl.load(backup + slot, mask=keep), current)
    else:
        return load_block(backup + offs, valid, FULL)


@triton.jit
def _restore_block(w, bits, backup, left, MASKED: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    offs = block_offsets(0, BLOCK)
    valid = offs < left
    if MASKED:
        keep, slot, row_any = _slots(_block_bytes(bits, left, FULL, BLOCK))
        tl.store(w + offs, tl.load(backup + slot, mask=keep), mask=keep)
    else:
        store_block(w + offs, load_block(backup + offs, valid, FULL), valid, FULL)


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
def _sgd_block(w, g, buf, bits, backup, left, lr, momentum, undamped, weight_decay, nesterov, maximize, fresh,
               with_momentum, decay, MASKED: tl.constexpr, HAS_GRAD: tl.constexpr, MOMENTUM: tl.constexpr,
               FULL: tl.constexpr, BLOCK: tl.constexpr):
    offs = block_offsets(0, BLOCK)
    valid = offs < left
    weight = _restored(w, bits, backup, offs, valid, left, MASKED, FULL, BLOCK)
    if HAS_GRAD:
        x = weight.to(lr.dtype)
        d = load_block(g + offs, valid, FULL).to(lr.dtype)
        # torch's SGD op for op: its add(..., alpha=a) is one fused multiply-add, the rest rounds
        # each op (the kernel is compiled without contraction)
        d = tl.where(maximize, -d, d)
        d = tl.where(decay, tl.fma(x, weight_decay, d), d)
        if MOMENTUM:
            if with_momentum:  # a group without momentum has no buffer
                if fresh:  # torch's SGD: the first buffer is the direction itself
                    b = d
                else:
                    b = tl.fma(d, undamped, load_block(buf + offs, valid, FULL).to(lr.dtype) * momentum)
                store_block(buf + offs, b.to(buf.dtype.element_ty), valid, FULL)
                d = tl.where(nesterov, tl.fma(b, momentum, d), b)
        store_block(w + offs, tl.fma(d, -lr, x).to(w.dtype.element_ty), valid, FULL)
    else:  # no gradient: torch's SGD skips the tensor; put the weights back only
        store_block(w + offs, weight, valid, FULL)


@triton.jit
def _sgd_dispatch(w, g, buf, bits, dst, left, lr, momentum, undamped, weight_decay, nesterov, maximize, fresh,
                  with_momentum, decay, has_grad, MASKED: tl.constexpr, MOMENTUM: tl.constexpr, BLOCK: tl.constexpr):
    if has_grad:
        if left == BLOCK:
            _sgd_block(w, g, buf, bits, dst, left, lr, momentum, undamped, weight_decay, nesterov, maximize, fresh,
                       with_momentum, decay, MASKED, True, MOMENTUM, True, BLOCK)
        else:
            _sgd_block(w, g, buf, bits, dst, left, lr, momentum, undamped, weight_decay, nesterov, maximize, fresh,
                       with_momentum, decay, MASKED, True, MOMENTUM, False, BLOCK)
    else:
        if left == BLOCK:
            _sgd_block(w, g, buf, bits, dst, left, lr, momentum, undamped, weight_decay, nesterov, maximize, fresh,
                       with_momentum, decay, MASKED, False, MOMENTUM, True, BLOCK)
        else:
            _sgd_block(w, g, buf, bits, dst, left, lr, momentum, undamped, weight_decay, nesterov, maximize, fresh,
                       with_momentum, decay, MASKED, False, MOMENTUM, False, BLOCK)


@triton.jit
def _restore_sgd_kernel(blocks, blk_tensor, blk_start, blk_base, numel, w_ptrs, g_ptrs, buf_ptrs, bits_ptrs, backup,
                        tensor_group, hyper, fresh_buffers, w_ref, g_ref, buf_ref, bits_ref,
                        MOMENTUM: tl.constexpr, FP64: tl.constexpr, ALIGNED: tl.constexpr, G_ALIGNED: tl.constexpr,
                        BLOCK: tl.constexpr):
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
    undamped, weight_decay = (1 - tl.load(h + 2)).to(MATH), tl.load(h + 3).to(MATH)  # torch's alpha=1 - dampening
    nesterov, maximize = tl.load(h + 4) != 0, tl.load(h + 5) != 0
    # tested in float64, as torch's SGD does (a value that rounds to 0 in fp32 still counts)
    with_momentum, decay = tl.load(h + 1) != 0, tl.load(h + 3) != 0
    g_addr = tl.load(g_ptrs + t)
    g = _typed(tl.where(g_addr != 0, g_addr, w_addr), g_ref, start, G_ALIGNED)
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
        _sgd_dispatch(w, g, buf, bits, dst, left, lr, momentum, undamped, weight_decay, nesterov, maximize, fresh,
                      with_momentum, decay, g_addr != 0, True, MOMENTUM, BLOCK)
    else:
        dst = tl.multiple_of(dst, 16) if ALIGNED else dst
        _sgd_dispatch(w, g, buf, w, dst, left, lr, momentum, undamped, weight_decay, nesterov, maximize, fresh,
                      with_momentum, decay, g_addr != 0, False, MOMENTUM, BLOCK)


# --- host side ---------------------------------------------------------------------------

class TritonStep(KernelStep):
    """The Triton kernels of a :class:`~ssam_kernels.SAMStepPlan`."""

    partial_multiple = PARTIAL_MULTIPLE

    def block_size(self, dtype: torch.dtype) -> int:
        return BLOCK // 2 if dtype == torch.float64 else BLOCK

    def __init__(self, plan, memory_masks):
        super().__init__(plan, memory_masks)
        self.eps_bits = f64_bits(plan.eps)

    def launch_norm(self, part, g_ptrs, g_aligned, first) -> None:
        plan = self.plan
        # (float64 partials: half as many a load, the same 16 bytes a thread; 38 registers on
        # sm_90 where a whole FINAL_BLOCK took 42, for the whole kernel)
        final_block = FINAL_BLOCK // 2 if plan.norm_dtype == torch.float64 else FINAL_BLOCK
        _norm_kernel[(part.norm_blocks,)](
            part.norm_rows, part.blk_tensor, part.blk_start, part.numel, g_ptrs, part.bits_ptrs, self.partial,
            self.counter, plan.inv, plan.flags, first, self.norm_programs, self.eps_bits, part.ref, part.bits_ref,
            MASKED=plan.masked_norm, FP64=plan.norm_dtype == torch.float64, ALIGNED=part.aligned,
            G_ALIGNED=part.aligned and g_aligned, BLOCK=part.block, FINAL_BLOCK=final_block, num_warps=8,
            enable_fp_fusion=True)  # the squares fused into the sums, named: triton 3.10 turns the default off

    def launch_perturb(self, part, g_ptrs, g_aligned, tensor_rho) -> None:
        plan = self.plan
        _perturb_kernel[(part.kept_blocks,)](
            part.kept, part.blk_tensor, part.blk_start, part.blk_base, part.numel, part.w_ptrs, g_ptrs,
            part.bits_ptrs, part.backup, plan.inv, plan.flags, tensor_rho, part.ref, part.ref, part.bits_ref,
            FP64=part.dtype == torch.float64, ALIGNED=part.aligned, G_ALIGNED=part.aligned and g_aligned,
            BLOCK=part.block, num_warps=8, enable_fp_fusion=False)

    def launch_restore(self, part) -> None:
        _restore_kernel[(part.kept_blocks,)](
            part.kept, part.blk_tensor, part.blk_start, part.blk_base, part.numel, part.w_ptrs, part.bits_ptrs,
            part.backup, part.ref, part.bits_ref, ALIGNED=part.aligned, BLOCK=part.block, num_warps=8)

    def launch_restore_sgd(self, part, g_ptrs, g_aligned, hyper, fresh, momentum) -> None:
        _restore_sgd_kernel[(part.blocks,)](
            part.all, part.blk_tensor, part.blk_start, part.blk_base, part.numel, part.w_ptrs, g_ptrs, part.buf_ptrs,
            part.bits_ptrs, part.backup, part.tensor_group, hyper, fresh, part.ref, part.ref, part.ref, part.bits_ref,
            MOMENTUM=momentum, FP64=part.dtype == torch.float64, ALIGNED=part.aligned,
            G_ALIGNED=part.aligned and g_aligned, BLOCK=part.block, num_warps=8, enable_fp_fusion=False)
