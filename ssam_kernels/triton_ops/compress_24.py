"""Triton 2:4 compression into the CUTLASS layout and back (same contract as the reference in
``ssam_kernels.ops.compress_24``). One program per ``[32, 64]`` tile: 32 rows (one block of the
metadata row shuffle) by 4 int16 metadata columns of 16 dense columns each; each row of a
metadata column moves as 16 contiguous dense values and 8 contiguous kept values.
``check=False`` skips the 2:4 check and with it the host sync."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.compress_24 import _PAIR_TABLE, compress_24_torch

ROWS = 32  # one block of CUTLASS's metadata row shuffle
META_COLS = 4  # int16 metadata columns per program: 64 dense columns


@triton.jit
def _meta_offset(r, c, rows):
    """Flat position of logical int16 metadata element [r, c] in CUTLASS's layout."""
    r = (r // 32) * 32 + (r % 8) * 4 + (r % 32) // 8
    shift = ((r % 2 == 0) & (c % 2 == 1)).to(tl.int32) - ((r % 2 == 1) & (c % 2 == 0)).to(tl.int32)
    r = r + shift
    c = c - shift
    return (c // 2).to(tl.int64) * rows * 2 + r.to(tl.int64) * 2 + c % 2


@triton.jit
def _tile_index(cols, MC: tl.constexpr):
    """(row block, metadata-column block) of this program: the grid is one axis, row-major over
    the tiles, since a second grid axis stops at 65535 blocks (4M columns)."""
    per_row = tl.cdiv(cols // 16, MC)
    return tl.program_id(0) // per_row, tl.program_id(0) % per_row


@triton.jit
def _tile(cols, R: tl.constexpr, MC: tl.constexpr):
    """Rows [R] and metadata columns [MC] of this program's tile, and the tile's index pair."""
    i, j = _tile_index(cols, MC)
    return i * R + tl.arange(0, R), j * MC + tl.arange(0, MC), j


@triton.jit
def _compress_kernel(x, values, meta, bad, pair0, pair1, rows, cols, R: tl.constexpr, MC: tl.constexpr,
                     CHECK: tl.constexpr):
    """A [R, MC * 16] tile: per row and metadata column, 4 groups of 4 elements."""
    r, m, j = _tile(cols, R, MC)
    g = tl.arange(0, 4)  # group within the 16 columns of one metadata element
    e = tl.arange(0, 4)  # element within the group
    # loaded as [R, MC * 16] (16 contiguous values: 16-byte vectors), then seen as groups
    c = j * MC * 16 + tl.arange(0, MC * 16)
    flat = tl.load(x + r[:, None].to(tl.int64) * cols + c[None, :], mask=(c < cols)[None, :], other=0.0)
    v = tl.reshape(flat, [R, MC, 4, 4])
    pattern = tl.sum((v != 0).to(tl.int32) << e[None, None, None, :], axis=3)  # [R, MC, 4]
    i0 = tl.load(pair0 + pattern)
    i1 = tl.load(pair1 + pattern)
    if CHECK:
        tl.store(bad + tl.program_id(0),
                 tl.max(tl.max(tl.max(((i0 < 0) & (m < cols // 16)[None, :, None]).to(tl.int32), axis=2), axis=1),
                        axis=0))
    # the kept values, picked by their bits (an integer sum of one value and zeros: exact, a
    # kept -0.0 included, which a float sum would turn into +0.0)
    bits = v.to(tl.int16, bitcast=True)
    v0 = tl.sum(tl.where(e[None, None, None, :] == i0[:, :, :, None], bits, 0), axis=3)  # [R, MC, 4]
    v1 = tl.sum(tl.where(e[None, None, None, :] == i1[:, :, :, None], bits, 0), axis=3)
    v0 = v0.to(tl.int16).to(v.dtype, bitcast=True)
    v1 = v1.to(tl.int16).to(v.dtype, bitcast=True)
    # the two kept values of each group side by side: 8 contiguous values per (r, m)
    h = j * MC * 8 + tl.arange(0, MC * 8)
    kept = tl.reshape(tl.join(v0, v1), [R, MC * 8])  # per group its two values, in column order
    tl.store(values + r[:, None].to(tl.int64) * (cols // 2) + h[None, :], kept.to(values.dtype.element_ty),
             mask=(h < cols // 2)[None, :])
    nibble = (i0 | (i1 << 2)) & 0xF
    word = tl.sum(nibble << (4 * g[None, None, :]), axis=2)  # [R, MC] in [0, 2**16)
    tl.store(meta + _meta_offset(r[:, None], m[None, :], rows), word.to(tl.int16),
             mask=(m < cols // 16)[None, :])


@triton.jit
def _decompress_kernel(values, meta, dense, rows, cols, R: tl.constexpr, MC: tl.constexpr):
    r, m, j = _tile(cols, R, MC)
    g = tl.arange(0, 4)
    e = tl.arange(0, 4)
    word = tl.load(meta + _meta_offset(r[:, None], m[None, :], rows), mask=(m < cols // 16)[None, :],
                   other=0).to(tl.int32) & 0xFFFF  # [R, MC]
    nibble = (word[:, :, None] >> (4 * g[None, None, :])) & 0xF  # [R, MC, 4]
    i0 = nibble & 0b11
    i1 = nibble >> 2
    h = j * MC * 8 + tl.arange(0, MC * 8)
    kept = tl.load(values + r[:, None].to(tl.int64) * (cols // 2) + h[None, :], mask=(h < cols // 2)[None, :],
                   other=0.0)  # [R, MC * 8]: 16-byte vectors
    v0, v1 = tl.split(tl.reshape(kept, [R, MC, 4, 2]))  # [R, MC, 4] each
    sel = e[None, None, None, :]
    # i1 first: metadata naming one position twice keeps the second value there (as writes in order would)
    out = tl.where(sel == i1[:, :, :, None], v1[:, :, :, None],
                   tl.where(sel == i0[:, :, :, None], v0[:, :, :, None], 0.0))
    c = j * MC * 16 + tl.arange(0, MC * 16)
    tl.store(dense + r[:, None].to(tl.int64) * cols + c[None, :],
             tl.reshape(out, [R, MC * 16]).to(dense.dtype.element_ty), mask=(c < cols)[None, :])


_PAIRS_ON = {}


def _pair_columns(device):
    """The pattern -> positions table as two int32 columns on ``device`` (copied once per device)."""
    key = (device.type, device.index)
    if key not in _PAIRS_ON:
        table = _PAIR_TABLE.to(dtype=torch.int32)
        _PAIRS_ON[key] = (table[:, 0].contiguous().to(device), table[:, 1].contiguous().to(device))
    return _PAIRS_ON[key]


def compress_24_triton(x: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    values = torch.empty(rows, cols // 2, dtype=x.dtype, device=x.device)
    meta = torch.empty(rows, cols // 16, dtype=torch.int16, device=x.device)
    if x.numel() == 0:
        return values, meta
    grid = (rows // ROWS * triton.cdiv(cols // 16, META_COLS),)
    bad = torch.empty(grid, dtype=torch.int32, device=x.device) if check else values
    p0, p1 = _pair_columns(x.device)
    _compress_kernel[grid](x, values, meta, bad, p0, p1, rows, cols, R=ROWS, MC=META_COLS, CHECK=check)
    if check and bool(bad.any()):  # the one host sync, only when checking
        compress_24_torch(x)  # raises the reference's ValueError, naming the first bad group
    return values, meta


def decompress_24_triton(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    rows, half = values.shape
    dense = torch.empty(rows, half * 2, dtype=values.dtype, device=values.device)
    if dense.numel():
        grid = (rows // ROWS * triton.cdiv(half * 2 // 16, META_COLS),)
        _decompress_kernel[grid](values, meta, dense, rows, half * 2, R=ROWS, MC=META_COLS)
    return dense
