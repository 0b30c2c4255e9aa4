"""Mask structures: which patterns of perturbed weights a mask may take.

* ``"unstructured"``: any entries (the paper): global top-k over all parameters.
* ``"N:M"`` (e.g. ``"2:4"``): exactly N kept in every M consecutive elements along a weight's
  GEMM reduction dimension, i.e. the last dim of ``p.reshape(p.shape[0], -1)`` (``in`` of a
  Linear weight, ``in*kh*kw`` of a Conv weight). 1-D parameters (biases, norm weights) are one
  row. Where the reduction dim is not a multiple of M, the trailing group of ``r < M`` elements
  keeps ``min(N, r)``, so every full group keeps exactly N and density stays close to N/M.
* ``"N:M:out"`` (e.g. ``"2:4:out"``): the same along the *output* dim (the first dim of
  ``p.reshape(p.shape[0], -1)``): groups of M consecutive output features per column. This is
  the layout whose ``(W ⊙ M)ᵀ`` a sparse tensor core takes in ``ascent_backward="implicit"``.
* ``"tensor"``: whole tensors, chosen by their mean score, greedily in descending order,
  skipping a tensor that would overshoot the budget of kept entries.
* ``"budget"`` (SSAM-F; SSAM-D given ``ascent_costs=``): whole rows (output features / channels) at or above a depth, chosen so
  that the exact ascent pass costs at most the paper's FLOPs column (see :mod:`ssam.budget`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

import ssam_kernels

KINDS = ("unstructured", "nm", "tensor", "budget")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(?::\s*(in|out)\s*)?$")


@dataclass(frozen=True)
class Structure:
    """A parsed mask structure (:func:`parse_structure` of ``"unstructured"``, ``"N:M"``,
    ``"N:M:out"``, ``"tensor"`` or ``"budget"``): ``kind``, and for N:M its ``n``, ``m`` and the
    dim the groups run ``along``."""

    kind: str  # "unstructured" | "nm" | "tensor" | "budget"
    n: int = 0
    m: int = 0
    along: str = "in"  # nm: the dim the groups run along, "in" (reduction) or "out"

    def __post_init__(self):  # (made by hand too: ssam.Structure is public)
        if self.kind not in KINDS:
            raise ValueError(f"structure kind must be one of {', '.join(map(repr, KINDS))}, got {self.kind!r}")
        if self.kind != "nm":
            if (self.n, self.m, self.along) != (0, 0, "in"):
                raise ValueError(f"structure {self.kind!r} takes no n, m or along (those are N:M's), got "
                                 f"n={self.n!r}, m={self.m!r}, along={self.along!r}")
            return
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (self.n, self.m)) or not 1 <= self.n < self.m:
            raise ValueError(f"structure N:M needs ints 1 <= n < m, got n={self.n!r}, m={self.m!r}")
        if self.along not in ("in", "out"):
            raise ValueError(f"structure N:M's along must be 'in' or 'out', got {self.along!r}")

    @property
    def density(self) -> float | None:
        """Kept fraction implied by the structure (N/M), or None where the sparsity sets it."""
        return self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        if self.kind != "nm":
            return self.kind
        return f"{self.n}:{self.m}" + (":out" if self.along == "out" else "")


def parse_structure(structure) -> Structure:
    """``"unstructured"``, ``"tensor"``, ``"budget"``, or ``"N:M"`` / ``"N:M:out"`` with ``1 <= N < M``."""
    if isinstance(structure, Structure):
        return structure
    if not isinstance(structure, str):
        raise TypeError(f"structure must be a string or an ssam.Structure, got {type(structure).__name__}")
    if structure in ("unstructured", "tensor", "budget"):
        return Structure(structure)
    match = _NM.match(structure)
    if not match:
        raise ValueError(
            f"structure must be 'unstructured', 'tensor', 'budget', 'N:M' such as '2:4', or 'N:M:out', got {structure!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:  # (nm_mask's own check, naming the structure string)
        raise ValueError(f"structure {structure!r}: N:M needs 1 <= N < M")
    return Structure("nm", n, m, match.group(3) or "in")


def resolve_sparsity(sparsity, structure: Structure) -> float:
    """The sparsity to use: validated to [0, 1); for N:M, implied (None) or equal to 1 - N/M."""
    if structure.kind == "nm":
        implied = 1.0 - structure.density
        if sparsity is not None:
            _check_sparsity(sparsity)
            if abs(sparsity - implied) > 1e-9:
                raise ValueError(
                    f"structure {structure} implies sparsity {implied:g}, but sparsity={sparsity} was given; "
                    "pass sparsity=None (or the implied value) with an N:M structure"
                )
        return implied
    if sparsity is None:
        raise ValueError(f"sparsity is required with structure {structure!r}")
    _check_sparsity(sparsity)
    return float(sparsity)


def _check_sparsity(sparsity) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a real number, got {type(sparsity).__name__}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def reduction_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed ``[rows, reduction]``: ``[out, -1]`` for >= 2-D tensors, one row for 1-D."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def nm_select(scores: list[torch.Tensor], structure: Structure, magnitude: bool = True) -> list[torch.Tensor]:
    """Per-tensor N:M masks of the largest scores (|scores| unless ``magnitude=False``) along
    each tensor's reduction dimension (``structure.along == "in"``) or output dimension."""
    out = []
    for s in scores:
        if s.numel() == 0:  # nothing to keep (and no rows to view)
            out.append(torch.zeros(s.shape, dtype=torch.bool, device=s.device))
            continue
        rows = reduction_rows(s)
        if structure.along == "out" and s.dim() >= 2:
            mask = ssam_kernels.nm_mask(rows.t().contiguous(), structure.n, structure.m, magnitude=magnitude).t()
        else:
            mask = ssam_kernels.nm_mask(rows, structure.n, structure.m, magnitude=magnitude)
        out.append(mask.reshape(s.shape))
    return out


def tensor_select(order: list[int], sizes: list[int], budget: int, chosen: set[int] | None = None) -> set[int]:
    """Greedy: walk ``order`` and take each tensor whose size still fits in ``budget``."""
    chosen = set() if chosen is None else set(chosen)
    used = sum(sizes[i] for i in chosen)
    for i in order:
        if i not in chosen and used + sizes[i] <= budget:
            chosen.add(i)
            used += sizes[i]
    return chosen


def select_mask(scores: list[torch.Tensor], structure: Structure, keep: int) -> list[torch.Tensor]:
    """Masks keeping the highest scores under ``structure``; ``keep`` is the unstructured/tensor
    budget (ignored for N:M, whose count is set by the shapes)."""
    if structure.kind == "unstructured":
        return ssam_kernels.topk_mask(scores, k=keep)
    if structure.kind == "nm":
        return nm_select(scores, structure)
    if structure.kind == "budget":
        raise ValueError("structure 'budget' needs the model's costs: see ssam.budget.budget_select")
    means = torch.stack([s.float().mean() if s.numel() else s.new_tensor(float("-inf")) for s in scores])
    means = means.nan_to_num(nan=float("-inf"))  # a NaN score ranks lowest (a descending sort puts NaN first)
    order = torch.argsort(means.cpu(), descending=True, stable=True).tolist()
    return whole_tensor_masks(scores, tensor_select(order, [s.numel() for s in scores], keep))


def whole_tensor_masks(like: list[torch.Tensor], chosen: set[int]) -> list[torch.Tensor]:
    """All-True masks for the tensors in ``chosen``, all-False for the others."""
    return [torch.full(t.shape, i in chosen, dtype=torch.bool, device=t.device) for i, t in enumerate(like)]
