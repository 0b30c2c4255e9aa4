"""N:M mask selection: keep the top-N |scores| (or raw scores) in every M consecutive elements
of the last dim.

A trailing group shorter than M (last dim not a multiple of M) keeps its top ``min(N, r)``
of ``r`` elements. Ties keep the lower index; NaN scores rank below every number.
"""

from __future__ import annotations

import torch

from .. import _checks
from .._backend import lazy
from .._library import Op


def _nan_lowest(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)


def nm_mask_torch(scores: torch.Tensor, n: int, m: int, magnitude: bool) -> torch.Tensor:
    """Reference: sort every group (stable, so ties keep the lower index) and keep the first n."""
    ranks = scores.abs() if magnitude else scores
    shape = ranks.shape
    last = shape[-1]
    if ranks.numel() == 0:
        return torch.zeros(shape, dtype=torch.bool, device=scores.device)
    rows = _nan_lowest(ranks.reshape(-1, last))
    pad = (-last) % m
    if pad:  # padding ranks below everything, and after real elements on ties
        rows = torch.cat([rows, rows.new_full((rows.shape[0], pad), float("-inf"))], dim=1)
    groups = rows.view(rows.shape[0], -1, m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return keep.view(rows.shape[0], -1)[:, :last].reshape(shape).contiguous()


NM_MASK = Op("nm_mask(Tensor scores, int n, int m, bool magnitude, str backend) -> Tensor",
             {"torch": nm_mask_torch,
              "triton": lazy("ssam_kernels.triton_ops.nm_mask", "nm_mask_triton"),
              "ext": lazy("ssam_kernels.ext_ops", "nm_mask_ext")},
             fake=lambda scores, n, m, magnitude: torch.empty_like(scores, dtype=torch.bool))


def check_nm(n, m) -> tuple[int, int]:
    """Validated ``(n, m)``: integers with ``1 <= n < m``."""
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs 1 <= n < m, got n={n}, m={m}")
    return n, m


def nm_mask(scores: torch.Tensor, n: int, m: int, *, magnitude: bool = True, backend: str = "auto") -> torch.Tensor:
    """Bool mask keeping the ``n`` largest ``|scores|`` in every ``m`` consecutive elements of
    the last dimension (see the module docstring for short trailing groups, ties and NaN).

    ``scores`` is a floating tensor of at least one dimension; the result has its shape.
    ``magnitude=False`` ranks the scores as given instead of by ``|scores|``. ``backend``:
    ``"auto"``, ``"torch"``, ``"triton"`` or ``"ext"``.
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a tensor, got {type(scores).__name__}")
    if scores.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension")
    n, m = check_nm(n, m)
    if not isinstance(magnitude, bool):
        raise TypeError(f"magnitude must be a bool, got {type(magnitude).__name__}")
    last = scores.shape[-1]
    if m > last > 0:  # each row one short group: the mask of M = the row's length (not a row padded to M)
        if n >= last:
            return torch.ones_like(scores, dtype=torch.bool, memory_format=torch.contiguous_format)
        m = last
    return NM_MASK(scores, n, m, magnitude, backend=backend)
