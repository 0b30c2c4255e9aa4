"""Global top-k mask over a list of score tensors, with an exact count.

Rank order: larger score first; ties keep the lower index in the concatenation of the
flattened tensors (list order, then row-major); NaN ranks as -inf (tied with it, by index).
Exactly ``k`` entries are kept.
"""

from __future__ import annotations

import functools
import math

import torch

from .. import _checks
from .._backend import lazy
from .._library import Op


def topk_mask_torch(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Reference: threshold at the k-th largest value, then admit ties by index."""
    device = scores[0].device
    dtype = functools.reduce(torch.promote_types, [s.dtype for s in scores])
    flat = torch.cat([s.reshape(-1).to(device=device, dtype=dtype) for s in scores])
    total = flat.numel()
    if k == 0:
        keep = torch.zeros(total, dtype=torch.bool, device=device)
    elif k == total:
        keep = torch.ones(total, dtype=torch.bool, device=device)
    else:
        flat = torch.where(torch.isnan(flat), torch.full_like(flat, float("-inf")), flat)
        threshold = torch.kthvalue(flat, total - k + 1).values
        above = flat > threshold
        tied = flat == threshold
        room = k - above.sum()
        keep = above | (tied & (torch.cumsum(tied, 0) <= room))
    out, start = [], 0
    for s in scores:
        # a tensor of its own per score tensor (views of one buffer would alias each other)
        out.append(keep[start : start + s.numel()].reshape(s.shape).to(s.device, copy=True))
        start += s.numel()
    return out


TOPK_MASK = Op("topk_mask(Tensor[] scores, int k, str backend) -> Tensor[]",
               {"torch": topk_mask_torch, "triton": lazy("ssam_kernels.triton_ops.topk_mask", "topk_mask_triton")},
               fake=lambda scores, k: [torch.empty_like(s, dtype=torch.bool) for s in scores])


def keep_count(total: int, density: float) -> int:
    """``int(density * total)``: the official code's count of kept entries (``total`` an int
    >= 0, ``density`` in [0, 1])."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be an int >= 0, got {total!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    return int(density * total)


def topk_mask(scores, density: float | None = None, *, k: int | None = None, backend: str = "auto") -> list[torch.Tensor]:
    """Bool masks (one per score tensor) keeping the ``k`` largest scores over the whole list.

    Give either ``density`` in [0, 1] (then ``k = int(density * total)``, as the official code
    does) or ``k`` directly. Scores are ranked as given (not by magnitude); see the module
    docstring for ties and NaN. Masks come back on each score tensor's device. ``backend``:
    ``"auto"``, ``"torch"`` or ``"triton"``.
    """
    scores = _checks.tensor_list("scores", scores)
    total = sum(s.numel() for s in scores)
    if (density is None) == (k is None):
        raise ValueError("give exactly one of density or k")
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or math.isnan(density):
            raise TypeError(f"density must be a real number, got {density!r}")
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density}")
        k = keep_count(total, density)
    elif isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    elif not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}] (the number of scores), got {k}")
    if _checks.spans_devices(scores):  # the reference ranks across devices
        return TOPK_MASK.across_devices(backend, scores[0].device)(scores, k)
    return TOPK_MASK(scores, k, backend=backend)
