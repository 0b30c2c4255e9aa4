"""Triton fused masked perturbation with a compact backup, and the exact restore.

One launch per (weight dtype, grad dtype, masked or not, 16-byte aligned or not) group of
tensors. A masked chunk finds where its values go in the tensor's compact backup from a prior
count of set bits per chunk (one small launch over the packed bits, then one that turns the
counts into offsets by a prefix sum within each tensor); inside
the chunk, an in-block prefix sum of the bits gives each kept element its slot. Weights and
gradients move in whole 16-byte vectors, skipping the vectors without a kept element: the
weight's vector is written back whole (kept elements changed), which the memory system would
read-modify-write anyway for a partial write. Each compact backup starts on 16 bytes.
Unmasked tensors are backed up whole. Non-contiguous tensors go through the reference path.
The update is computed in fp32, or in float64 for float64 weights, without FMA contraction
(``scale * g`` is rounded before the add, as in the reference, so the results are equal bit for
bit); a number scale reaches the kernel as its float64 bits, so a float64 update reads it
unrounded.

Per call, the host copies nothing to the device once the tables of a list are cached (see
``multi_tensor``), and the chunk offsets are recomputed on the device from the current bits.
Sizing the compact backup needs each mask's set-bit count on the host: one sync per
``BitMask``, which caches it; a bool mask is packed anew, so it costs one sync per call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.bitmask import bits_of
from ..ops.perturb import PerturbBackup, math_dtype, perturb_torch, restore_torch
from .._host_loops import data_ptrs
from .multi_tensor import (CHUNK, ChunkTable, address_table, aligned_at, as_f64, block_bits, block_offsets,
                           block_slots, chunk_table, contiguous, contiguous_split, dtypes, f64_bits, group_by,
                           load_block, operands_at, present, size_table, store_block, take, tensor_ptr, this_chunk)

BLOCK = 1024


@triton.jit
def _count_bits_kernel(chunk_tensor, chunk_start, numel, bits_ptrs, counts, bits_ref,
                       ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
    """counts[c] = set bits of chunk c's mask (bits past the tensor's end ignored)."""
    c, t, start, left = this_chunk(chunk_tensor, chunk_start, numel, CHUNK)
    bits = tensor_ptr(bits_ptrs, t, bits_ref, start // 8, ALIGNED)
    b = tl.arange(0, CHUNK // 8)
    if left == CHUNK:
        byte = tl.load(bits + b).to(tl.int32)
    else:
        inside = tl.minimum(tl.maximum(left - b * 8, 0), 8)  # bits of byte b inside the tensor
        byte = tl.load(bits + b, mask=inside > 0, other=0).to(tl.int32) & ((1 << inside) - 1)
    byte = byte - ((byte >> 1) & 0x55)  # population count of each byte
    byte = (byte & 0x33) + ((byte >> 2) & 0x33)
    byte = (byte + (byte >> 4)) & 0x0F
    tl.store(counts + c, tl.sum(byte, axis=0).to(tl.int64))


@triton.jit
def _move_chunk(w, g, bits, backup, room, scale, left, PERTURB: tl.constexpr, HAS_MASK: tl.constexpr,
                FULL: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # PERTURB: the math is in scale's dtype (float64 for float64 weights, else fp32). Masked:
    # ``used`` slots of the chunk's backup are taken by the blocks before. (The restore + SGD
    # kernel moves its backup pointer and room instead: each form is the one its kernel compiles
    # without a spill on sm_80 and sm_90 under triton 3.6 and 3.9; the other spilled 4 B.)
    used = 0
    for j in range(0, CHUNK, BLOCK):
        offs = block_offsets(j, BLOCK)
        valid = offs < left
        if HAS_MASK:
            bit = block_bits(bits, j, offs, left, FULL, BLOCK)
            keep, slot, row_any, count = block_slots(bit)
            keep = keep & (used + slot < room)  # a backup too small for its mask: left alone past its end
            # whole rows where any element is kept (vector accesses), single elements in a tail
            if FULL:
                rows = row_any[:, None]
            else:
                rows = row_any[:, None] & valid
            old = tl.load(w + offs, mask=rows)
            if PERTURB:
                tl.store(backup + used + slot, old, mask=keep)
                grad = tl.load(g + offs, mask=rows, other=0.0).to(scale.dtype)
                new = tl.where(keep, (old.to(scale.dtype) + scale * grad).to(old.dtype), old)
            else:
                new = tl.where(keep, tl.load(backup + used + slot, mask=keep), old)
            tl.store(w + offs, new, mask=rows)
            used += count
        else:
            if PERTURB:
                old = load_block(w + offs, valid, FULL)
                store_block(backup + offs, old, valid, FULL)
                grad = load_block(g + offs, valid, FULL).to(scale.dtype)
                store_block(w + offs, (old.to(scale.dtype) + scale * grad).to(old.dtype), valid, FULL)
            else:
                store_block(w + offs, load_block(backup + offs, valid, FULL), valid, FULL)


@triton.jit
def backup_source(bits_ptrs, backup_ptrs, backup_numel, chunk_offset, c, t, start, w, w_ref, bits_ref,
                  HAS_MASK: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
    """(mask bits of the chunk, backup pointer, room) of chunk ``c`` of tensor ``t``. Masked: the
    compact backup at this chunk's first slot (its offset), and how many slots the backup has
    from there (at most CHUNK, int32): no slot past the backup's end is touched, since a caller of
    the raw op may size it wrong, which no check sees without reading the mask's count back.
    Unmasked: the whole-tensor backup at the chunk's start (``bits`` is a placeholder; its size
    was checked on the host)."""
    if HAS_MASK:
        bits = tensor_ptr(bits_ptrs, t, bits_ref, start // 8, ALIGNED)
        base = tl.load(chunk_offset + c)
        backup = tensor_ptr(backup_ptrs, t, w_ref, base, False)
        room = tl.minimum(tl.maximum(tl.load(backup_numel + t) - base, 0), CHUNK).to(tl.int32)
    else:
        bits = w
        backup = tensor_ptr(backup_ptrs, t, w_ref, start, ALIGNED)
        room = CHUNK
    return bits, backup, room


@triton.jit(do_not_specialize=["scale_bits"])  # one compile whatever the scale's value
def _move_kernel(chunk_tensor, chunk_start, numel, w_ptrs, g_ptrs, bits_ptrs, backup_ptrs, backup_numel, chunk_offset,
                 scale_ptr, scale_bits, w_ref, g_ref, bits_ref,
                 PERTURB: tl.constexpr, HAS_MASK: tl.constexpr, SCALE_IS_PTR: tl.constexpr, FP64: tl.constexpr,
                 ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """PERTURB: w[m] -> backup, w[m] += scale * g[m], in float64 where FP64 (float64 weights),
    else in fp32. Else (restore): backup -> w[m]."""
    c, t, start, left = this_chunk(chunk_tensor, chunk_start, numel, CHUNK)
    w = tensor_ptr(w_ptrs, t, w_ref, start, ALIGNED)
    g = w
    scale = 0.0
    if PERTURB:
        g = tensor_ptr(g_ptrs, t, g_ref, start, ALIGNED)
        if SCALE_IS_PTR:
            scale = tl.load(scale_ptr)  # the host made it the math dtype
        elif FP64:
            scale = as_f64(scale_bits)
        else:
            scale = as_f64(scale_bits).to(tl.float32)
    bits, backup, room = backup_source(bits_ptrs, backup_ptrs, backup_numel, chunk_offset, c, t, start, w, w_ref,
                                       bits_ref, HAS_MASK, ALIGNED, CHUNK)
    if left == CHUNK:
        _move_chunk(w, g, bits, backup, room, scale, left, PERTURB, HAS_MASK, True, CHUNK, BLOCK)
    else:
        _move_chunk(w, g, bits, backup, room, scale, left, PERTURB, HAS_MASK, False, CHUNK, BLOCK)


@triton.jit
def _offsets_kernel(numel, first_chunk, counts, CHUNK: tl.constexpr, TILE: tl.constexpr):
    """In place, per chunk: counts[c] (set bits of chunk c) -> set bits of its tensor before chunk
    c. One program per tensor, its chunks TILE at a time (a carry between tiles)."""
    t = tl.program_id(0)
    n = tl.cdiv(tl.load(numel + t), CHUNK)
    row = counts + tl.load(first_chunk + t)
    carry = n * 0  # int64, as the counts
    for s in range(0, n, TILE):
        i = s + tl.arange(0, TILE)
        inside = i < n
        x = tl.load(row + i, mask=inside, other=0)
        tl.store(row + i, carry + tl.cumsum(x, axis=0) - x, mask=inside)
        carry += tl.sum(x, axis=0)


OFFSETS_TILE = 2048  # chunks per step of a tensor's scan: GPT-2's 50257 x 768 embedding in 3


def chunk_offsets(table: ChunkTable, bits: list[torch.Tensor], device, bits_ptrs, tile: int = OFFSETS_TILE
                  ) -> torch.Tensor:
    """Per chunk: set bits of its tensor before the chunk (exclusive, within the tensor), in two
    launches. ``bits_ptrs``: the bits' addresses; ``tile``: chunks per step of the scan."""
    counts = torch.empty(table.num_chunks, dtype=torch.int64, device=device)
    _count_bits_kernel[(table.num_chunks,)](table.chunk_tensor, table.chunk_start, table.numel,
                                           address_table(bits, device, bits_ptrs), counts, bits[0],
                                           ALIGNED=all(aligned_at(bits_ptrs)), CHUNK=CHUNK,
                                           num_warps=2)  # 16 mask bytes per thread
    _offsets_kernel[(len(bits),)](table.numel, table.first_chunk, counts, CHUNK=CHUNK, TILE=tile, num_warps=4)
    return counts


def _launch(perturb: bool, ops: dict, scale, is_aligned: bool) -> None:
    """One group. ``ops``: per operand (``w``, ``g``, ``bits``, ``backup``) its tensors and
    their addresses, ``(tensors, ptrs)`` (:func:`operands_at`); every ``w`` contiguous, same
    dtypes; no ``bits`` where the group is unmasked. ``is_aligned``: every operand the kernel
    reads in vectors starts on 16 bytes."""
    (ws, w_ptrs), (gs, g_ptrs), (bits, bits_ptrs), (backups, backup_ptrs) = (
        ops["w"], ops["g"], ops["bits"], ops["backup"])
    device = ws[0].device
    table = chunk_table(list(map(torch.Tensor.numel, ws)), device)
    if table.num_chunks == 0:
        return
    has_mask = bool(bits)
    offsets = chunk_offsets(table, bits, device, bits_ptrs) if has_mask else table.numel
    if isinstance(scale, torch.Tensor) and scale.device.type == "cpu" and device.type != "cpu":
        scale = float(scale)  # read on the host (no device sync) rather than copied to the device
    scale_is_ptr = isinstance(scale, torch.Tensor)
    dtype = math_dtype(ws[0].dtype)
    scale_arg = scale.to(device=device, dtype=dtype).reshape(1) if scale_is_ptr else table.numel
    scale_bits = f64_bits(0.0 if (scale_is_ptr or scale is None) else scale)
    w_addr = address_table(ws, device, w_ptrs)
    _move_kernel[(table.num_chunks,)](
        table.chunk_tensor, table.chunk_start, table.numel, w_addr,
        address_table(gs, device, g_ptrs) if perturb else w_addr,
        address_table(bits, device, bits_ptrs) if has_mask else w_addr,
        address_table(backups, device, backup_ptrs), size_table(backups, device) if has_mask else table.numel,
        offsets, scale_arg, scale_bits,
        ws[0], gs[0] if perturb else ws[0], bits[0] if has_mask else ws[0],
        PERTURB=perturb, HAS_MASK=has_mask, SCALE_IS_PTR=scale_is_ptr, FP64=dtype == torch.float64,
        ALIGNED=is_aligned,
        # float64 weights in half blocks: a whole block spilled 4 B on sm_90 (masked restore, off
        # 16 bytes) once the backup's bound was added
        CHUNK=CHUNK, BLOCK=BLOCK // 2 if ws[0].dtype == torch.float64 else BLOCK,
        enable_fp_fusion=False,  # round scale * g before the add, as the reference and the ext do
    )


def perturb_triton(params, grads, masks, scale, values) -> None:
    """Host launcher: same contract as ``perturb_torch`` (inputs checked by the caller)."""
    bits = bits_of(masks)
    fast, slow = contiguous_split(len(params), params, values)
    tensors = {"w": take(params, fast), "g": contiguous(take(grads, fast)), "bits": take(bits, fast),
               "backup": take(values, fast)}
    ptrs = {name: data_ptrs(ts) for name, ts in tensors.items()}
    # one launch per dtypes and masking; tensors off 16 bytes go to a launch without vectors
    # (a masked backup is written one slot at a time: its address does not decide them)
    vector_ptrs = [b or v for b, v in zip(ptrs["bits"], ptrs["backup"])]
    keys = list(zip(dtypes(tensors["w"]), dtypes(tensors["g"]), present(tensors["bits"]),
                    aligned_at(ptrs["w"], ptrs["g"], vector_ptrs)))
    for (_, _, has_mask, is_aligned), idx in group_by(keys).items():
        _launch(True, operands_at(tensors, ptrs, idx, has_mask), scale, is_aligned)
    if slow:
        perturb_torch([params[i] for i in slow], [grads[i] for i in slow], [bits[i] for i in slow], scale,
                      [values[i] for i in slow])


def restore_triton(params, backup: PerturbBackup) -> None:
    bits = bits_of(backup.masks)
    fast, slow = contiguous_split(len(params), params, backup.values)
    ws = take(params, fast)
    tensors = {"w": ws, "g": ws, "bits": take(bits, fast), "backup": take(backup.values, fast)}
    ptrs = {name: data_ptrs(ts) for name, ts in tensors.items()}
    vector_ptrs = [b or v for b, v in zip(ptrs["bits"], ptrs["backup"])]
    keys = list(zip(dtypes(ws), present(tensors["bits"]), aligned_at(ptrs["w"], vector_ptrs)))
    for (_, has_mask, is_aligned), idx in group_by(keys).items():
        _launch(False, operands_at(tensors, ptrs, idx, has_mask), None, is_aligned)
    if slow:
        restore_torch([params[i] for i in slow], PerturbBackup([backup.values[i] for i in slow], [bits[i] for i in slow]))
