"""Triton 2:4 compression into the CUTLASS layout and back (same contract as the reference in
``ssam_kernels.ops.compress_24``). One program per ``[32, 16]`` tile: 32 rows (one block of the
metadata row shuffle) by 16 columns (one int16 of metadata per row)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.compress_24 import _PAIR_TABLE, compress_24_torch

ROWS = 32
COLS = 16


@triton.jit
def _meta_offset(r, c, rows):
    """Flat position of logical int16 metadata element [r, c] in CUTLASS's layout."""
    r = (r // 32) * 32 + (r % 8) * 4 + (r % 32) // 8
    shift = ((r % 2 == 0) & (c % 2 == 1)).to(tl.int32) - ((r % 2 == 1) & (c % 2 == 0)).to(tl.int32)
    r = r + shift
    c = c - shift
    return (c // 2).to(tl.int64) * rows * 2 + r * 2 + c % 2


@triton.jit
def _compress_kernel(x, values, meta, bad, pair0, pair1, rows, cols, R: tl.constexpr):
    pr = tl.program_id(0)
    pc = tl.program_id(1)
    r = pr * R + tl.arange(0, R)  # [R]
    g = tl.arange(0, 4)  # group within the 16 columns
    e = tl.arange(0, 4)  # element within the group
    col = pc * 16 + g[:, None] * 4 + e[None, :]  # [4, 4]
    offs = r[:, None, None].to(tl.int64) * cols + col[None, :, :]  # [R, 4, 4]
    v = tl.load(x + offs)
    pattern = tl.sum((v != 0).to(tl.int32) << e[None, None, :], axis=2)  # [R, 4]
    i0 = tl.load(pair0 + pattern)
    i1 = tl.load(pair1 + pattern)
    tl.store(bad + pr * tl.num_programs(1) + pc, tl.max(tl.max((i0 < 0).to(tl.int32), axis=1), axis=0))
    v0 = tl.sum(tl.where(e[None, None, :] == i0[:, :, None], v, 0.0), axis=2)
    v1 = tl.sum(tl.where(e[None, None, :] == i1[:, :, None], v, 0.0), axis=2)
    out = r[:, None].to(tl.int64) * (cols // 2) + pc * 8 + g[None, :] * 2  # [R, 4]
    tl.store(values + out, v0.to(values.dtype.element_ty))
    tl.store(values + out + 1, v1.to(values.dtype.element_ty))
    nibble = (i0 | (i1 << 2)) & 0xF
    word = tl.sum(nibble << (4 * g[None, :]), axis=1)  # [R] in [0, 2**16)
    tl.store(meta + _meta_offset(r, pc, rows), word.to(tl.int16))


@triton.jit
def _decompress_kernel(values, meta, dense, rows, cols, R: tl.constexpr):
    pr = tl.program_id(0)
    pc = tl.program_id(1)
    r = pr * R + tl.arange(0, R)
    g = tl.arange(0, 4)
    e = tl.arange(0, 4)
    word = tl.load(meta + _meta_offset(r, pc, rows)).to(tl.int32) & 0xFFFF  # [R]
    nibble = (word[:, None] >> (4 * g[None, :])) & 0xF  # [R, 4]
    i0 = nibble & 0b11
    i1 = nibble >> 2
    src = r[:, None].to(tl.int64) * (cols // 2) + pc * 8 + g[None, :] * 2
    v0 = tl.load(values + src)
    v1 = tl.load(values + src + 1)
    sel = e[None, None, :]
    out = tl.where(sel == i0[:, :, None], v0[:, :, None], tl.where(sel == i1[:, :, None], v1[:, :, None], 0.0))
    offs = r[:, None, None].to(tl.int64) * cols + pc * 16 + g[None, :, None] * 4 + sel
    tl.store(dense + offs, out.to(dense.dtype.element_ty))


def _pair_columns(device):
    table = _PAIR_TABLE.to(device=device, dtype=torch.int32)
    return table[:, 0].contiguous(), table[:, 1].contiguous()


def compress_24_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    values = torch.empty(rows, cols // 2, dtype=x.dtype, device=x.device)
    meta = torch.empty(rows, cols // 16, dtype=torch.int16, device=x.device)
    if x.numel() == 0:
        return values, meta
    grid = (rows // ROWS, cols // COLS)
    bad = torch.empty(grid, dtype=torch.int32, device=x.device)
    p0, p1 = _pair_columns(x.device)
    _compress_kernel[grid](x, values, meta, bad, p0, p1, rows, cols, R=ROWS)
    if bool(bad.any()):
        compress_24_torch(x)  # raises the reference's ValueError, naming the first bad group
    return values, meta


def decompress_24_triton(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    rows, half = values.shape
    dense = torch.empty(rows, half * 2, dtype=values.dtype, device=values.device)
    if dense.numel():
        _decompress_kernel[(rows // ROWS, half * 2 // COLS)](values, meta, dense, rows, half * 2, R=ROWS)
    return dense
