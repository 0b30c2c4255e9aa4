"""MVUE 2:4 sparsification: an unbiased 2:4-sparse estimate of a tensor.

In every group of 4 consecutive elements of the last dim, two are kept: element ``i`` with
inclusion probability ``p_i = min(1, c |x_i|)`` where ``c`` makes ``sum p = 2`` (at most one
element of a group can reach 1: if ``2|x_max| > S``, it gets 1 and the others ``|x_i| / (S -
|x_max|)``). A kept value is ``x_i / p_i``, so ``E[out] = x``; these inclusion probabilities
minimise the variance among unbiased 2:4 estimators. The pair is drawn by systematic sampling:
with ``u`` uniform in [0, 1), the elements whose cumulative-probability interval holds ``u``
and ``u + 1`` are kept, which draws exactly two, each with probability ``p_i`` (the second
draw compared as ``C_{i-1} - 1 <= u < C_i - 1``, exact where ``u + 1`` would round; ``u`` is
clamped into [0, 1), NaN read as 0; where the running sums' rounding lets one element take both
draws, the next most probable is kept too). A group with fewer than two nonzeros keeps them
unchanged (``p = 1``) and zeros elsewhere. Magnitudes whose sum overflows fp32 are scaled by 1/4
first (exact for normal values; ``p`` does not depend on scale). A group holding an inf or NaN
keeps its first non-finite element alone (still 2:4, and the overflow reaches whatever reads it:
a GradScaler's check).
"""

from __future__ import annotations

import torch

from .. import _checks
from .._backend import lazy
from .._library import Op


def _ordered_sum(a: torch.Tensor) -> torch.Tensor:
    """``((a0 + a1) + a2) + a3``: the order the kernels use too, so results match bit for bit."""
    return ((a[..., 0] + a[..., 1]) + a[..., 2]) + a[..., 3]


def _positive_or_one(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0, t, torch.ones_like(t))


U_MAX = 1.0 - 2.0**-24  # the largest fp32 below 1


def inclusion_probabilities(a: torch.Tensor) -> torch.Tensor:
    """``p`` for magnitudes ``a`` of shape ``[..., 4]`` (fp32), as in the module docstring."""
    a = torch.where(torch.isinf(_ordered_sum(a)).unsqueeze(-1), a * 0.25, a)  # (an overflowing sum)
    total = _ordered_sum(a).unsqueeze(-1)
    top = a.amax(-1, keepdim=True)
    first_top = torch.where(a == top, torch.arange(4, device=a.device), 4).amin(-1, keepdim=True)
    is_top = torch.arange(4, device=a.device) == first_top
    # the others' sum directly, not total - top (which cancels): keeps every p_i <= 1 exactly
    rest = _ordered_sum(torch.where(is_top, torch.zeros_like(a), a)).unsqueeze(-1)
    # divide by the sum only where it is positive (1 elsewhere, a result ``where`` discards):
    # exact for subnormal sums too, and the same math the kernels do
    p_free = torch.where(total > 0, 2 * a / _positive_or_one(total), torch.zeros_like(a))
    p_cap = torch.where(rest > 0, a / _positive_or_one(rest), torch.zeros_like(a))
    p_cap = torch.where(is_top, torch.ones_like(a), p_cap)
    return torch.where(2 * top > total, p_cap, p_free)


def systematic_pick(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Keep element i where ``[C_{i-1}, C_i)`` holds ``u`` or ``u + 1``: ``C`` is the running
    sum of ``p`` (added left to right), with ``C_{-1} = 0`` and ``C_3`` pinned to 2 so both
    draws always land (``u`` in [0, 1)). The second test is ``C_{i-1} - 1 <= u < C_i - 1``:
    exact for the ``C`` in [1, 2] it can pass on, where ``u + 1`` rounds (to 2.0 for the
    largest ``u``, which then landed nowhere)."""
    c0 = p[..., 0]
    c1 = c0 + p[..., 1]
    c2 = c1 + p[..., 2]
    lower = torch.stack([torch.zeros_like(c0), c0, c1, c2], -1)
    upper = torch.stack([c0, c1, c2, torch.full_like(c0, 2.0)], -1)
    u = u.unsqueeze(-1)
    return ((lower <= u) & (u < upper)) | ((lower - 1 <= u) & (u < upper - 1))


def second_where_one(keep: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``keep`` with, in a group where the draws kept one element though two have ``p > 0``,
    the most probable other one (its first) kept too. The running sums round: where an element
    has ``p = 1`` (a capped top) its interval can come out an ulp longer than 1 and take both
    draws, for ``u`` within an ulp of one end (about 1 group in 10**7)."""
    short = (keep.sum(-1, keepdim=True) < 2) & ((p > 0).sum(-1, keepdim=True) >= 2)
    q = torch.where(keep | (p <= 0), -1.0, p)
    best = q.amax(-1, keepdim=True)
    position = torch.arange(4, device=p.device)
    first_best = position == torch.where(q == best, position, 4).amin(-1, keepdim=True)
    return keep | (short & first_best)


def mvue24_torch(x: torch.Tensor, uniforms: torch.Tensor | None, seed: int | None) -> torch.Tensor:
    """Reference. Without ``uniforms``, draws them from ``torch.Generator().manual_seed(seed)``."""
    groups = x.reshape(-1, 4).to(torch.float32)
    if uniforms is None:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        uniforms = torch.rand(groups.shape[0], generator=gen, device=x.device)
    p = inclusion_probabilities(groups.abs())
    u = torch.nan_to_num(uniforms.reshape(-1).to(torch.float32), nan=0.0).clamp(0.0, U_MAX)
    keep = systematic_pick(p, u) & (p > 0)
    keep = second_where_one(keep, p)
    out = torch.where(keep, groups / torch.where(keep, p, torch.ones_like(p)), torch.zeros_like(groups))
    # a group holding an inf or NaN: its first non-finite element alone
    position = torch.arange(4, device=x.device)
    bad = ~torch.isfinite(groups)
    first_bad = position == torch.where(bad, position, 4).amin(-1, keepdim=True)
    out = torch.where(bad.any(-1, keepdim=True), torch.where(first_bad, groups, torch.zeros_like(groups)), out)
    return out.to(x.dtype).reshape(x.shape)


# the schema's int is signed 64-bit: a seed in [2**63, 2**64) travels as its negative twin
# (the same generator state: torch seeds with the value mod 2**64) and comes back as given
def _run(impl, x, uniforms, seed):
    op = "mvue24"
    _checks.operand(op, "x", x, _checks.FLOAT_DTYPES[:3], (None,) * x.dim() if isinstance(x, torch.Tensor) else ())
    if x.dim() == 0 or x.shape[-1] % 4:
        raise ValueError(f"{op}: x's last dim must be a multiple of 4, got shape {list(x.shape)}")
    if (seed is None) == (uniforms is None):
        raise ValueError(f"{op}: give exactly one of seed or uniforms")
    if uniforms is not None:
        _checks.operand(op, "uniforms", uniforms, _checks.FLOAT_DTYPES, (*x.shape[:-1], x.shape[-1] // 4), x.device)
    return impl(x, uniforms, None if seed is None else seed % 2**64)


MVUE24 = Op("mvue24(Tensor x, Tensor? uniforms, int? seed, str backend) -> Tensor",
            {"torch": mvue24_torch, "triton": lazy("ssam_kernels.triton_ops.mvue24", "mvue24_triton")},
            fake=lambda x, uniforms, seed: torch.empty_like(x), adapt=_run)


def mvue24(x: torch.Tensor, seed: int | None = None, *, uniforms: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    """Unbiased 2:4-sparse estimate of ``x`` along its last dim (a multiple of 4).

    The randomness is one uniform per group: give ``seed`` (reproducible; each backend draws
    its own stream from it) or ``uniforms`` (shape ``x.shape[:-1] + (x.shape[-1] // 4,)``, in
    [0, 1), values outside clamped into it, NaN read as 0: then every backend returns the same
    result). Returns
    a tensor like ``x`` with at most two nonzeros per group (exactly two where the group has two
    or more nonzeros, all finite); a group holding an inf or NaN keeps its first non-finite
    element alone.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _checks.FLOAT_DTYPES[:3]:
        raise TypeError(f"x must be a float16/bfloat16/float32 tensor, got {_checks._kind(x)}")
    if x.dim() == 0 or x.shape[-1] % 4:
        raise ValueError(f"x's last dim must be a multiple of 4, got shape {tuple(x.shape)}")
    if (seed is None) == (uniforms is None):
        raise ValueError("give exactly one of seed or uniforms")
    groups_shape = x.shape[:-1] + (x.shape[-1] // 4,)
    if uniforms is None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed must be in [-2**63, 2**64), as torch.Generator.manual_seed takes, got {seed}")
        seed = seed - 2**64 if seed >= 2**63 else seed
    else:
        if not isinstance(uniforms, torch.Tensor) or not uniforms.is_floating_point():
            raise TypeError(f"uniforms must be a floating tensor, got {_checks._kind(uniforms)}")
        if uniforms.shape != groups_shape or uniforms.device != x.device:
            raise ValueError(
                f"uniforms must have shape {tuple(groups_shape)} on {x.device}, "
                f"got {tuple(uniforms.shape)} on {uniforms.device}"
            )
        uniforms = uniforms.contiguous()
    return MVUE24(x.contiguous(), uniforms, seed, backend=backend)
