"""Triton MVUE 2:4 sparsification (same contract as ``ssam_kernels.ops.mvue24``): one pass,
one read and one write of ``x``; the per-group uniform comes from ``tl.rand(seed, group)``
(Philox) or from a given tensor."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUPS_PER_PROGRAM = 256
FLT_MAX = tl.constexpr(3.4028234663852886e38)
U_MAX = tl.constexpr(0.99999994039535522)  # 1 - 2**-24, the largest fp32 below 1


@triton.jit
def _column(t, e, k: tl.constexpr):
    """Column k of a [G, 4] tensor (exact: one value plus zeros)."""
    return tl.sum(tl.where(e[None, :] == k, t, 0.0), axis=1)


@triton.jit
def _mvue24_groups(v, u):
    """MVUE of each row of ``v`` ([G, 4] fp32) with the row's uniform ``u`` ([G])."""
    e = tl.arange(0, 4)
    a = tl.abs(v)
    # sums added left to right, as the reference does, so the two agree bit for bit
    total = ((_column(a, e, 0) + _column(a, e, 1)) + _column(a, e, 2)) + _column(a, e, 3)
    a = tl.where((total > FLT_MAX)[:, None], a * 0.25, a)  # a sum that overflows: p is scale-free
    total = ((_column(a, e, 0) + _column(a, e, 1)) + _column(a, e, 2)) + _column(a, e, 3)
    top = tl.max(a, axis=1)
    first_top = tl.min(tl.where(a == top[:, None], e[None, :], 4), axis=1)
    others = tl.where(e[None, :] == first_top[:, None], 0.0, a)
    rest = ((_column(others, e, 0) + _column(others, e, 1)) + _column(others, e, 2)) + _column(others, e, 3)
    # the where-guarded divisor (not a clamp to a tiny literal, which some triton versions type
    # as fp64) keeps the math in fp32 and divides subnormal sums exactly, as the reference does;
    # div_rn: correctly rounded, as torch divides (a GPU's fp32 `/` is an approximate division)
    p_free = tl.where(total[:, None] > 0, tl.div_rn(2 * a, tl.where(total > 0, total, 1.0)[:, None]), 0.0)
    p_cap = tl.where(rest[:, None] > 0, tl.div_rn(a, tl.where(rest > 0, rest, 1.0)[:, None]), 0.0)
    p_cap = tl.where(e[None, :] == first_top[:, None], 1.0, p_cap)
    p = tl.where((2 * top > total)[:, None], p_cap, p_free)
    c0 = _column(p, e, 0)
    c1 = c0 + _column(p, e, 1)
    c2 = c1 + _column(p, e, 2)
    lower = tl.where(e[None, :] == 0, 0.0, tl.where(e[None, :] == 1, c0[:, None],
                                                    tl.where(e[None, :] == 2, c1[:, None], c2[:, None])))
    upper = tl.where(e[None, :] == 0, c0[:, None], tl.where(e[None, :] == 1, c1[:, None],
                                                            tl.where(e[None, :] == 2, c2[:, None], 2.0)))
    uu = tl.minimum(tl.maximum(tl.where(u != u, 0.0, u), 0.0), U_MAX)[:, None]  # (NaN: 0, as the reference)
    # the second draw as lower - 1 <= u < upper - 1: exact where u + 1 would round
    keep = (((lower <= uu) & (uu < upper)) | ((lower - 1 <= uu) & (uu < upper - 1))) & (p > 0)
    # one kept where two have p > 0 (rounding let one element take both draws): the most
    # probable other one too, as the reference's second_where_one
    short = (tl.sum(keep.to(tl.int32), axis=1) < 2) & (tl.sum((p > 0).to(tl.int32), axis=1) >= 2)
    q = tl.where(keep | (p <= 0), -1.0, p)
    best = tl.max(q, axis=1)
    first_best = tl.min(tl.where(q == best[:, None], e[None, :], 4), axis=1)
    keep = keep | (short[:, None] & (e[None, :] == first_best[:, None]))
    out = tl.where(keep, tl.div_rn(v, tl.where(keep, p, 1.0)), 0.0)
    # a group holding an inf or NaN: its first non-finite element alone
    bad = (v != v) | (tl.abs(v) > FLT_MAX)
    first_bad = tl.min(tl.where(bad, e[None, :], 4), axis=1)
    return tl.where((first_bad < 4)[:, None], tl.where(e[None, :] == first_bad[:, None], v, 0.0), out)


# the seed is a new draw on every call (ascent_linear's backward): not specialized, or one call in
# 16 (a seed divisible by 16) would compile a second variant at some random step
@triton.jit(do_not_specialize=["seed"])
def _mvue24_kernel(x, out, uniforms, seed, groups, numel, HAS_UNIFORMS: tl.constexpr, G: tl.constexpr):
    gid = tl.program_id(0) * G + tl.arange(0, G)  # [G]
    if HAS_UNIFORMS:
        u = tl.load(uniforms + gid, mask=gid < groups, other=0.0).to(tl.float32)
    else:
        u = tl.rand(seed, gid)
    # the G groups are 4 * G contiguous values, loaded and stored flat: 16-byte vectors, and
    # no per-element bounds except in the last program
    first = tl.program_id(0).to(tl.int64) * G * 4
    flat = first + tl.arange(0, G * 4)
    if first + G * 4 <= numel:
        v = tl.reshape(tl.load(x + flat), [G, 4]).to(tl.float32)
        tl.store(out + flat, tl.reshape(_mvue24_groups(v, u), [G * 4]).to(out.dtype.element_ty))
    else:
        v = tl.reshape(tl.load(x + flat, mask=flat < numel, other=0.0), [G, 4]).to(tl.float32)
        tl.store(out + flat, tl.reshape(_mvue24_groups(v, u), [G * 4]).to(out.dtype.element_ty), mask=flat < numel)


# The kernel numbers groups (its Philox counters, the uniforms' offsets) in int32: a call whose
# programs would number more groups than this takes the reference, which draws its own
# stream from the seed.
MAX_GROUPS = 2**31


def mvue24_triton(x: torch.Tensor, uniforms: torch.Tensor | None, seed: int | None) -> torch.Tensor:
    groups = x.numel() // 4
    if triton.cdiv(groups, GROUPS_PER_PROGRAM) * GROUPS_PER_PROGRAM > MAX_GROUPS:
        from ..ops.mvue24 import mvue24_torch

        return mvue24_torch(x, uniforms, seed)
    out = torch.empty_like(x)
    if groups:
        _mvue24_kernel[(triton.cdiv(groups, GROUPS_PER_PROGRAM),)](
            x, out, uniforms if uniforms is not None else x, seed if seed is not None else 0, groups, groups * 4,
            HAS_UNIFORMS=uniforms is not None, G=GROUPS_PER_PROGRAM,
            # fp32: 4 values (one 16-byte vector) a thread; at 4 warps, 8 of them spilled under
            # triton 3.6. 16-bit: 8 a thread, one vector, no spill at 4 warps
            num_warps=8 if x.element_size() == 4 else 4,
            enable_fp_fusion=False,  # bit for bit the reference's roundings, whatever triton's default
        )
    return out
