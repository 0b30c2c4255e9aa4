"""Triton restore + SGD step, fused: per element, the weight is the backed-up original where
the mask is set (else the current value), then ``torch.optim.SGD``'s update runs in fp32 (in
float64 for float64 weights, the hyper-parameters passed as their float64 bits; a fused
multiply-add exactly where torch's SGD has one, its ``add(..., alpha=a)``, and no contraction
elsewhere, so fp32 and float64 steps equal torch's) and the weight and momentum buffer are
written once. One
launch per (dtype, masked, has-buffer) group; non-contiguous tensors, and gradients or momentum
buffers of another dtype than their weight (torch promotes there), use the reference."""

from __future__ import annotations

from itertools import repeat

import torch
import triton
import triton.language as tl

from ..ops.perturb import PerturbBackup
from ..ops.sgd_step import restore_sgd_step_torch
from ..ops.bitmask import bits_of
from .._host_loops import data_ptrs
from .multi_tensor import (CHUNK, address_table, aligned_at, as_f64, block_bits, block_offsets, block_slots,
                           chunk_table, contiguous, contiguous_split, dtypes, f64_bits, group_by, load_block,
                           operands_at, present, size_table, store_block, take, tensor_ptr, this_chunk)
from .perturb import backup_source, chunk_offsets

SGD_BLOCK = 512


@triton.jit
def _restore_sgd_chunk(w, g, buf, bits, backup, room, left, lr, momentum, undamped, weight_decay,
                       HAS_MASK: tl.constexpr, MOMENTUM: tl.constexpr, NEW_BUFFER: tl.constexpr,
                       NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                       FULL: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # the math is in the hyper-parameters' dtype: float64 for float64 weights, else fp32. Masked:
    # ``backup`` and ``room`` move past the slots each block takes (see perturb's _move_chunk)
    for j in range(0, CHUNK, BLOCK):
        offs = block_offsets(j, BLOCK)
        valid = offs < left
        if HAS_MASK:
            bit = block_bits(bits, j, offs, left, FULL, BLOCK)
            keep, slot, row_any, count = block_slots(bit)
            keep = keep & (slot < room)  # never read past the backup (see backup_source)
            current = load_block(w + offs, valid, FULL)
            weight = tl.where(keep, tl.load(backup + slot, mask=keep), current).to(lr.dtype)
            backup += count
            room -= count
        else:
            weight = load_block(backup + offs, valid, FULL).to(lr.dtype)
        d = load_block(g + offs, valid, FULL).to(lr.dtype)
        if MAXIMIZE:
            d = -d
        # torch's SGD op for op: each add(..., alpha=a) one fused multiply-add, every other op
        # rounded (the kernel is compiled without contraction)
        if WEIGHT_DECAY:
            d = tl.fma(weight, weight_decay, d)
        if MOMENTUM:
            if NEW_BUFFER:
                b = d
            else:
                b = tl.fma(d, undamped, load_block(buf + offs, valid, FULL).to(lr.dtype) * momentum)
            store_block(buf + offs, b.to(buf.dtype.element_ty), valid, FULL)
            if NESTEROV:
                d = tl.fma(b, momentum, d)
            else:
                d = b
        store_block(w + offs, tl.fma(d, -lr, weight).to(w.dtype.element_ty), valid, FULL)


# one compile whatever the hyper-parameters' values
@triton.jit(do_not_specialize=["lr_bits", "momentum_bits", "dampening_bits", "weight_decay_bits"])
def _restore_sgd_kernel(chunk_tensor, chunk_start, numel, w_ptrs, g_ptrs, buf_ptrs, bits_ptrs, backup_ptrs,
                        backup_numel, chunk_offset, w_ref, g_ref, buf_ref, bits_ref, lr_bits, momentum_bits,
                        dampening_bits, weight_decay_bits, HAS_MASK: tl.constexpr, MOMENTUM: tl.constexpr,
                        NEW_BUFFER: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                        WEIGHT_DECAY: tl.constexpr, FP64: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK: tl.constexpr):
    """The hyper-parameters come as float64 bits (``f64_bits``); the math is in float64 where
    FP64 (float64 weights), else in fp32."""
    lr, momentum = as_f64(lr_bits), as_f64(momentum_bits)
    undamped, weight_decay = 1 - as_f64(dampening_bits), as_f64(weight_decay_bits)  # torch's alpha=1 - dampening
    if not FP64:
        lr, momentum = lr.to(tl.float32), momentum.to(tl.float32)
        undamped, weight_decay = undamped.to(tl.float32), weight_decay.to(tl.float32)
    c, t, start, left = this_chunk(chunk_tensor, chunk_start, numel, CHUNK)
    w = tensor_ptr(w_ptrs, t, w_ref, start, ALIGNED)
    g = tensor_ptr(g_ptrs, t, g_ref, start, ALIGNED)
    buf = w
    if MOMENTUM:
        buf = tensor_ptr(buf_ptrs, t, buf_ref, start, ALIGNED)
    bits, backup, room = backup_source(bits_ptrs, backup_ptrs, backup_numel, chunk_offset, c, t, start, w, w_ref,
                                       bits_ref, HAS_MASK, ALIGNED, CHUNK)
    if left == CHUNK:
        _restore_sgd_chunk(w, g, buf, bits, backup, room, left, lr, momentum, undamped, weight_decay,
                           HAS_MASK, MOMENTUM, NEW_BUFFER, NESTEROV, MAXIMIZE, WEIGHT_DECAY, True, CHUNK, BLOCK)
    else:
        _restore_sgd_chunk(w, g, buf, bits, backup, room, left, lr, momentum, undamped, weight_decay,
                           HAS_MASK, MOMENTUM, NEW_BUFFER, NESTEROV, MAXIMIZE, WEIGHT_DECAY, False, CHUNK, BLOCK)


def restore_sgd_step_triton(params, grads, buffers, backup: PerturbBackup, hyper, fresh) -> None:
    """Host launcher: same contract as ``restore_sgd_step_torch``."""
    mask_bits = bits_of(backup.masks)
    use_momentum = hyper["momentum"] != 0
    fast, slow = contiguous_split(len(params), params, backup.values, *([buffers] if use_momentum else []))
    ws = take(params, fast)
    tensors = {"w": ws, "g": contiguous(take(grads, fast)), "buf": take(buffers, fast) if use_momentum else ws,
               "bits": take(mask_bits, fast), "backup": take(backup.values, fast)}
    ptrs = {name: data_ptrs(ts) for name, ts in tensors.items()}
    # one launch per dtypes, masking and buffer state; tensors off 16 bytes go to a launch
    # without vectors (a masked backup is read one slot at a time: its address does not decide them)
    vector_ptrs = [b or v for b, v in zip(ptrs["bits"], ptrs["backup"])]
    # (the buffers' dtype too: a launch reads every buffer as its first one's type)
    keys = list(zip(dtypes(ws), dtypes(tensors["g"]), dtypes(tensors["buf"]), present(tensors["bits"]),
                    take(fresh, fast) if use_momentum else repeat(False),
                    aligned_at(ptrs["w"], ptrs["g"], ptrs["buf"], vector_ptrs)))
    for (w_dtype, g_dtype, buf_dtype, has_mask, new_buffer, is_aligned), idx in group_by(keys).items():
        if g_dtype != w_dtype or (use_momentum and buf_dtype != w_dtype):
            # torch promotes (an fp64 gradient makes an fp32 weight's step fp64) and rounds the
            # buffer's product to its dtype; the kernel does one dtype's math: the reference's way
            slow = slow + [fast[i] for i in idx]
            continue
        ops = operands_at(tensors, ptrs, idx, has_mask)
        (ws, w_ptrs), (gs, g_ptrs), (bufs, buf_ptrs), (bits, bits_ptrs), (values, value_ptrs) = ops.values()
        device = ws[0].device
        table = chunk_table(list(map(torch.Tensor.numel, ws)), device)
        if table.num_chunks == 0:
            continue
        offsets = chunk_offsets(table, bits, device, bits_ptrs) if has_mask else table.numel
        w_addr = address_table(ws, device, w_ptrs)
        fp64 = ws[0].dtype == torch.float64
        _restore_sgd_kernel[(table.num_chunks,)](
            table.chunk_tensor, table.chunk_start, table.numel, w_addr, address_table(gs, device, g_ptrs),
            address_table(bufs, device, buf_ptrs), address_table(bits, device, bits_ptrs) if has_mask else w_addr,
            address_table(values, device, value_ptrs), size_table(values, device) if has_mask else table.numel,
            offsets,
            ws[0], gs[0], bufs[0], bits[0] if has_mask else ws[0],
            f64_bits(hyper["lr"]), f64_bits(hyper["momentum"]), f64_bits(hyper["dampening"]),
            f64_bits(hyper["weight_decay"]),
            HAS_MASK=has_mask, MOMENTUM=use_momentum, NEW_BUFFER=new_buffer, NESTEROV=hyper["nesterov"],
            MAXIMIZE=hyper["maximize"], WEIGHT_DECAY=hyper["weight_decay"] != 0, FP64=ws[0].dtype == torch.float64,
            ALIGNED=is_aligned, CHUNK=CHUNK,
            # 8 elements per thread in 2 warps (1 in fp64, in 8 warps): the widest vectors
            # without a spill on sm_80 and sm_90 under triton 3.6 and 3.9 (the compile tier found
            # 4 B spilled at 1024 elements in 4 warps, and fp64 spills at 2 or 4 per thread
            # once FMAs were off). In fp64, sm_80's ptxas aims at 32 registers on its own and
            # spilled 8 B (maximize + momentum + weight decay); a 64-register budget leaves it
            # 20-55 without a spill
            BLOCK=SGD_BLOCK // 2 if fp64 else SGD_BLOCK, num_warps=8 if fp64 else 2,
            **({"maxnreg": 64} if fp64 else {}),
            # no FMA contraction: the explicit fused multiply-adds are torch's own
            enable_fp_fusion=False,
        )
    if slow:
        sub = PerturbBackup([backup.values[i] for i in slow], [mask_bits[i] for i in slow])
        restore_sgd_step_torch([params[i] for i in slow], [grads[i] for i in slow],
                               [buffers[i] for i in slow] if use_momentum else [], sub, hyper,
                               [fresh[i] for i in slow] if use_momentum else [])
