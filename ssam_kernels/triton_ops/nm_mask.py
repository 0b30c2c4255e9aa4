"""Triton N:M selection: every element's rank in its group is the number of group members
that beat it (larger, or equal at a lower index); it is kept when that rank is below N. A
``[groups, M, M]`` comparison per block, so M is small (<= 32); the trailing short group of a
row is padded with -inf, which loses every tie to a real element."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_M = 32
# One program compares G groups' [MP, MP] pairs: G * MP * MP = COMPARISONS values live at once
# (64 per thread at 4 warps), so a larger M takes fewer groups per program: M=32 no longer
# spills (it spilled 5-7 KB per thread at a fixed G=64), and M=4 moves whole 16-byte rows.
# From M=16 up, half as many: fp16 scores in rows of one group spilled 4 B on sm_80 (triton 3.6)
# at 8192 (G=32 for M=16), none at 4096.
COMPARISONS = 8192


def groups_per_program(mp: int) -> int:
    return max(1, (COMPARISONS if mp < 16 else COMPARISONS // 2) // (mp * mp))


@triton.jit
def _nm_select_kernel(x, out, rows, cols, groups_per_row, N: tl.constexpr, M: tl.constexpr,
                      MP: tl.constexpr, MAGNITUDE: tl.constexpr, G: tl.constexpr):
    gid = tl.program_id(0) * G + tl.arange(0, G)  # [G] global group ids
    row = gid // groups_per_row
    col = (gid % groups_per_row)[:, None] * M + tl.arange(0, MP)[None, :]  # [G, MP]
    valid = (row[:, None] < rows) & (tl.arange(0, MP)[None, :] < M) & (col < cols)
    offs = row[:, None].to(tl.int64) * cols + col
    v = tl.load(x + offs, mask=valid, other=0.0)
    if MAGNITUDE:
        v = tl.abs(v)
    v = tl.where(valid & (v == v), v, float("-inf"))  # NaN and padding rank lowest
    j = tl.arange(0, MP)
    a = v[:, :, None]  # the element being ranked (index i)
    b = v[:, None, :]  # a competitor (index k)
    beats = (b > a) | ((b == a) & (j[None, None, :] < j[None, :, None]))
    rank = tl.sum(beats.to(tl.int32), axis=2)
    tl.store(out + offs, (rank < N).to(tl.int8), mask=valid)


# The kernel numbers groups in int32 (cheap divisions): a call whose programs would number
# more groups than this takes the reference.
MAX_GROUPS = 2**31


def nm_mask_triton(scores: torch.Tensor, n: int, m: int, magnitude: bool) -> torch.Tensor:
    """Host launcher: same contract as ``nm_mask_torch`` (inputs checked by the caller)."""
    shape = scores.shape
    cols = shape[-1]
    groups_per_row = (cols + m - 1) // m
    total = scores.numel() // max(cols, 1) * groups_per_row
    mp = triton.next_power_of_2(m)
    g = groups_per_program(mp)
    if m > MAX_M or triton.cdiv(total, g) * g > MAX_GROUPS:
        from ..ops.nm_mask import nm_mask_torch

        return nm_mask_torch(scores, n, m, magnitude)
    x = scores.contiguous().reshape(-1, cols) if scores.numel() else scores.reshape(0, max(cols, 1))
    rows = x.shape[0]
    out = torch.empty(shape, dtype=torch.int8, device=scores.device)
    if total:
        _nm_select_kernel[(triton.cdiv(total, g),)](
            x, out, rows, cols, groups_per_row, N=n, M=m, MP=mp, MAGNITUDE=magnitude, G=g,
        )
    return out.view(torch.bool)
