"""Triton fused masked perturbation with a compact backup, and the exact restore.

One launch per (weight dtype, grad dtype, masked or not) group of tensors. A masked chunk
finds where its values go in the tensor's compact backup from a prior count of set bits per
chunk (one small launch over the packed bits, then a prefix sum); inside the chunk, an
in-block prefix sum of the bits gives each kept element its slot. Unmasked tensors are backed
up whole. Non-contiguous tensors go through the reference path.

Per call, the host copies nothing to the device once the tables of a list are cached (see
``multi_tensor``), and the chunk offsets are recomputed on the device from the current bits.
Sizing the compact backup needs each mask's set-bit count on the host: one sync per
``BitMask``, which caches it; a bool mask is packed anew, so it costs one sync per call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.bitmask import as_bitmask
from ..ops.perturb import PerturbBackup, perturb_torch, restore_torch
from .multi_tensor import CHUNK, ChunkTable, address_table, chunk_table, group_by, tensor_ptr, this_chunk

BLOCK = 1024


@triton.jit
def _count_bits_kernel(chunk_tensor, chunk_start, numel, bits_ptrs, counts, bits_ref,
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c, t, start, n = this_chunk(chunk_tensor, chunk_start, numel)
    bits = tensor_ptr(bits_ptrs, t, bits_ref)
    total = tl.zeros([BLOCK], dtype=tl.int32)
    for j in range(0, CHUNK, BLOCK):
        offs = start + j + tl.arange(0, BLOCK)
        valid = offs < n
        byte = tl.load(bits + offs // 8, mask=valid, other=0).to(tl.int32)
        total += (byte >> (offs % 8)) & 1
    tl.store(counts + c, tl.sum(total, axis=0).to(tl.int64))


@triton.jit
def mask_slots(bits, offs, valid, base):
    """For a block of a masked tensor: which elements are kept, the slot of each in the compact
    backup (``base`` + kept elements before it in the block), and ``base`` for the next block."""
    byte = tl.load(bits + offs // 8, mask=valid, other=0).to(tl.int32)
    bit = (byte >> (offs % 8)) & 1
    return bit != 0, base + tl.cumsum(bit, axis=0) - bit, base + tl.sum(bit, axis=0)


@triton.jit
def _move_kernel(chunk_tensor, chunk_start, numel, w_ptrs, g_ptrs, bits_ptrs, backup_ptrs, chunk_offset,
                 scale_ptr, scale_value, w_ref, g_ref, bits_ref,
                 PERTURB: tl.constexpr, HAS_MASK: tl.constexpr, SCALE_IS_PTR: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """PERTURB: w[m] -> backup, w[m] += scale * g[m]. Else (restore): backup -> w[m]."""
    c, t, start, n = this_chunk(chunk_tensor, chunk_start, numel)
    w = tensor_ptr(w_ptrs, t, w_ref)
    backup = tensor_ptr(backup_ptrs, t, w_ref)
    if PERTURB:
        g = tensor_ptr(g_ptrs, t, g_ref)
        if SCALE_IS_PTR:
            scale = tl.load(scale_ptr).to(tl.float32)
        else:
            scale = scale_value
    if HAS_MASK:
        bits = tensor_ptr(bits_ptrs, t, bits_ref)
        base = tl.load(chunk_offset + c)
    for j in range(0, CHUNK, BLOCK):
        offs = start + j + tl.arange(0, BLOCK)
        valid = offs < n
        if HAS_MASK:
            keep, slot, base = mask_slots(bits, offs, valid, base)
        else:
            keep = valid
            slot = offs
        if PERTURB:
            old = tl.load(w + offs, mask=keep)
            tl.store(backup + slot, old, mask=keep)
            grad = tl.load(g + offs, mask=keep, other=0.0).to(tl.float32)
            tl.store(w + offs, (old.to(tl.float32) + scale * grad).to(old.dtype), mask=keep)
        else:
            tl.store(w + offs, tl.load(backup + slot, mask=keep), mask=keep)


def chunk_offsets(table: ChunkTable, bits: list[torch.Tensor], device) -> torch.Tensor:
    """Per chunk: set bits of its tensor before the chunk (exclusive, within the tensor)."""
    counts = torch.empty(table.num_chunks, dtype=torch.int64, device=device)
    _count_bits_kernel[(table.num_chunks,)](table.chunk_tensor, table.chunk_start, table.numel,
                                           address_table(bits, device), counts, bits[0], CHUNK=CHUNK, BLOCK=BLOCK)
    before = torch.cumsum(counts, 0) - counts
    return before - before[table.chunk_first]


def _launch(perturb: bool, ws, gs, masks, backups, scale) -> None:
    """One group: every ``ws[i]`` contiguous, same dtypes; ``masks`` all None or all BitMask."""
    device = ws[0].device
    numels = [w.numel() for w in ws]
    table = chunk_table(numels, device)
    if table.num_chunks == 0:
        return
    has_mask = masks[0] is not None
    bits = [m.bits for m in masks] if has_mask else []
    offsets = chunk_offsets(table, bits, device) if has_mask else table.numel
    if isinstance(scale, torch.Tensor) and scale.device.type == "cpu" and device.type != "cpu":
        scale = float(scale)  # read on the host (no device sync) rather than copied to the device
    scale_is_ptr = isinstance(scale, torch.Tensor)
    scale_arg = scale.to(device=device, dtype=torch.float32).reshape(1) if scale_is_ptr else table.numel
    scale_value = 0.0 if (scale_is_ptr or scale is None) else float(scale)
    w_addr = address_table(ws, device)
    _move_kernel[(table.num_chunks,)](
        table.chunk_tensor, table.chunk_start, table.numel, w_addr,
        address_table(gs, device) if perturb else w_addr,
        address_table(bits, device) if has_mask else w_addr,
        address_table(backups, device), offsets, scale_arg, scale_value,
        ws[0], gs[0] if perturb else ws[0], bits[0] if has_mask else ws[0],
        PERTURB=perturb, HAS_MASK=has_mask, SCALE_IS_PTR=scale_is_ptr, CHUNK=CHUNK, BLOCK=BLOCK,
    )


def perturb_triton(params, grads, masks, scale) -> PerturbBackup:
    """Host launcher: same contract as ``perturb_torch`` (inputs checked by the caller)."""
    masks = [as_bitmask(m) for m in masks]
    values: list = [None] * len(params)
    fast = [i for i, w in enumerate(params) if w.is_contiguous()]
    slow = [i for i, w in enumerate(params) if not w.is_contiguous()]
    keys = [(params[i].dtype, grads[i].dtype, masks[i] is not None) for i in fast]
    for (_, _, has_mask), idx in group_by(keys, fast).items():
        ws = [params[i] for i in idx]
        gs = [grads[i].contiguous() for i in idx]
        ms = [masks[i] for i in idx]
        if has_mask:
            counts = [m.count_int() for m in ms]
            flat = torch.empty(sum(counts), dtype=ws[0].dtype, device=ws[0].device)
            backups = list(torch.split(flat, counts))
        else:
            backups = [torch.empty_like(w) for w in ws]
        _launch(True, ws, gs, ms if has_mask else [None] * len(ws), backups, scale)
        for i, b in zip(idx, backups):
            values[i] = b
    if slow:
        ref = perturb_torch([params[i] for i in slow], [grads[i] for i in slow], [masks[i] for i in slow], scale)
        for i, v in zip(slow, ref.values):
            values[i] = v
    return PerturbBackup(values, masks)


def restore_triton(params, backup: PerturbBackup) -> None:
    masks = [as_bitmask(m) for m in backup.masks]
    fast = [i for i, w in enumerate(params) if w.is_contiguous() and backup.values[i].is_contiguous()]
    slow = sorted(set(range(len(params))) - set(fast))
    keys = [(params[i].dtype, masks[i] is not None) for i in fast]
    for (_, has_mask), idx in group_by(keys, fast).items():
        ws = [params[i] for i in idx]
        _launch(False, ws, ws, [masks[i] for i in idx], [backup.values[i] for i in idx], None)
    if slow:
        restore_torch([params[i] for i in slow], PerturbBackup([backup.values[i] for i in slow], [masks[i] for i in slow]))
