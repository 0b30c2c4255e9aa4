"""2:4 compression into the layout CUTLASS sparse tensor-core GEMMs read, and back.

For a ``[rows, cols]`` fp16/bf16 matrix with at most 2 nonzeros in every group of 4 along a row:

* ``values`` ``[rows, cols // 2]``: the two kept values of each group, in column order.
* ``meta`` ``[rows, cols // 16]`` int16: 2 bits per kept value (its index in the group), 4 groups
  per element (group ``j`` in bits ``4j..4j+3``, first index in the low 2 bits), then the
  elements permuted into CUTLASS's interleaved column-major order (see ``_meta_offsets``).

Groups with fewer than two nonzeros still name two positions (the kept zero comes along), by
a fixed rule that keeps the indices increasing; with this rule the output equals
``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``.
The layout needs ``rows % 32 == 0`` and ``cols % 32 == 0`` (one int16 of metadata per 16
columns, interleaved in column pairs); PyTorch's CUTLASS GEMMs further need ``cols % 64 == 0``.
"""

from __future__ import annotations

import torch

from .. import _checks
from .._backend import BackendUnavailableError, lazy
from .._library import Op

DTYPES = (torch.float16, torch.bfloat16)
ROW_ALIGN = 32
COL_ALIGN = 32
META_COLS_PER_ELEMENT = 16  # dense columns described by one int16 of metadata

# Nonzero pattern of a group (bit i set: element i nonzero) -> the two positions stored.
# Two nonzeros: exactly those. A lone nonzero at 0 or 1 is paired with position 2; a lone
# nonzero at 2 or 3, or an empty group, stores (2, 3). More than two: not 2:4 (-1).
_PAIRS = {
    0b0000: (2, 3), 0b0001: (0, 2), 0b0010: (1, 2), 0b0100: (2, 3), 0b1000: (2, 3),
    0b0011: (0, 1), 0b0101: (0, 2), 0b0110: (1, 2), 0b1001: (0, 3), 0b1010: (1, 3), 0b1100: (2, 3),
}
_PAIR_TABLE = torch.tensor([_PAIRS.get(p, (-1, -1)) for p in range(16)], dtype=torch.int64)


def _meta_offsets(rows: int, meta_cols: int, device: torch.device) -> torch.Tensor:
    """Flat position in the CUTLASS buffer of each logical int16 metadata element ``[r, c]``.

    CUTLASS's sparse GEMM reads int16 metadata as ``ColumnMajorInterleaved<2>`` after two
    shuffles: within each block of 32 rows, row ``r`` moves to row ``(r % 8) * 4 + (r % 32) // 8``
    of the block, and in every 2x2 block of the result the off-diagonal pair swaps.
    """
    r = torch.arange(rows, device=device)[:, None].expand(rows, meta_cols)
    c = torch.arange(meta_cols, device=device)[None, :].expand(rows, meta_cols)
    r = (r // 32) * 32 + (r % 8) * 4 + (r % 32) // 8
    to_lower_left = ((r % 2 == 0) & (c % 2 == 1)).long()
    to_upper_right = ((r % 2 == 1) & (c % 2 == 0)).long()
    shift = to_lower_left - to_upper_right
    r, c = r + shift, c - shift
    return ((c // 2) * rows * 2 + r * 2 + c % 2).reshape(-1)


def _to_int16_bits(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret values in [0, 2**16) as int16 bit patterns."""
    return torch.where(x >= 2**15, x - 2**16, x).to(torch.int16)


def compress_24_torch(x: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    groups = x.reshape(rows, cols // 4, 4)
    weights = torch.tensor([1, 2, 4, 8], device=x.device)
    pattern = ((groups != 0).long() * weights).sum(-1)
    pairs = _PAIR_TABLE.to(x.device)[pattern]  # [rows, cols // 4, 2]
    if check and (pairs < 0).any():
        bad = (pairs[..., 0] < 0).nonzero()[0].tolist()
        raise ValueError(f"x is not 2:4 sparse: row {bad[0]}, group {bad[1]} has more than 2 nonzeros")
    pairs = pairs.clamp(min=0)  # unchecked and not 2:4: any positions (the result is unspecified)
    values = groups.gather(-1, pairs).reshape(rows, cols // 2)
    nibbles = (pairs[..., 0] | (pairs[..., 1] << 2)).reshape(rows, cols // 16, 4)
    meta = (nibbles << torch.tensor([0, 4, 8, 12], device=x.device)).sum(-1)
    out = torch.empty(rows * (cols // 16), dtype=torch.int16, device=x.device)
    out[_meta_offsets(rows, cols // 16, x.device)] = _to_int16_bits(meta).reshape(-1)
    return values, out.view(rows, cols // 16)


def decompress_24_torch(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    rows, half = values.shape
    logical = meta.reshape(-1)[_meta_offsets(rows, meta.shape[1], meta.device)].to(torch.int64) & 0xFFFF
    shifts = torch.arange(0, 16, 2, device=meta.device)
    index = ((logical[:, None] >> shifts) & 0b11).reshape(rows, half // 2, 2)
    dense = torch.zeros(rows, half // 2, 4, dtype=values.dtype, device=values.device)
    kept = values.reshape(rows, half // 2, 2)
    # one scatter per kept value, in order: metadata naming one position twice keeps the second
    # value there on every device (one scatter of both would leave which one to the device)
    dense.scatter_(-1, index[..., :1], kept[..., :1])
    dense.scatter_(-1, index[..., 1:], kept[..., 1:])
    return dense.reshape(rows, half * 2)


def _compress_fake(x, check):
    rows, cols = x.shape
    return x.new_empty((rows, cols // 2)), x.new_empty((rows, cols // META_COLS_PER_ELEMENT), dtype=torch.int16)


def _aligned_shape(op: str, name: str, rows: int, cols: int) -> None:
    if rows % ROW_ALIGN or cols % COL_ALIGN:
        raise ValueError(f"{op}: {name} gives a dense shape [{rows}, {cols}]; the CUTLASS layout needs rows % "
                         f"{ROW_ALIGN} == 0 and cols % {COL_ALIGN} == 0")


def _compress(impl, x, check):
    _checks.operand("compress_24", "x", x, DTYPES, (None, None))
    _aligned_shape("compress_24", "x", *x.shape)
    return tuple(impl(x, check))


def _decompress(impl, values, meta):
    _checks.operand("decompress_24", "values", values, DTYPES, (None, None))
    rows, half = values.shape
    _aligned_shape("decompress_24", "values", rows, 2 * half)
    _checks.operand("decompress_24", "meta", meta, (torch.int16,), (rows, 2 * half // META_COLS_PER_ELEMENT),
                    values.device)
    return impl(values, meta)


COMPRESS_24 = Op("compress_24(Tensor x, bool check, str backend) -> (Tensor, Tensor)",
                 {"torch": compress_24_torch,
                  "triton": lazy("ssam_kernels.triton_ops.compress_24", "compress_24_triton"),
                  "ext": lazy("ssam_kernels.ext_ops", "compress_24_ext")},
                 fake=_compress_fake, adapt=_compress)
DECOMPRESS_24 = Op("decompress_24(Tensor values, Tensor meta, str backend) -> Tensor",
                   {"torch": decompress_24_torch,
                    "triton": lazy("ssam_kernels.triton_ops.compress_24", "decompress_24_triton"),
                    "ext": lazy("ssam_kernels.ext_ops", "decompress_24_ext")},
                   fake=lambda values, meta: values.new_empty((values.shape[0], values.shape[1] * 2)),
                   adapt=_decompress)


def _check_matrix(name: str, t, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {dtypes}, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def compress_24(x: torch.Tensor, *, check: bool = True, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4-sparse fp16/bf16 matrix to ``(values, meta)`` in the CUTLASS layout.

    ``x`` must be 2-D with ``rows % 32 == 0`` and ``cols % 32 == 0``, and hold at most two
    nonzeros in every group of four consecutive elements of a row. ``check=True`` verifies
    that and raises ``ValueError`` naming the first bad group; on a GPU this costs one host
    sync. ``check=False`` skips it (no sync, so the call can be captured in a CUDA graph): for
    inputs that are 2:4 by construction (``x * nm_mask(x, 2, 4)``, ``mvue24``); a group with
    more than two nonzeros then gets unspecified values and metadata, and every other group is
    compressed exactly. ``backend``: ``"auto"``, ``"torch"``, ``"triton"`` or ``"ext"``.
    """
    _check_matrix("x", x, DTYPES)
    if not isinstance(check, bool):
        raise TypeError(f"check must be a bool, got {type(check).__name__}")
    _aligned_shape("compress_24", "x", *x.shape)
    return COMPRESS_24(x.contiguous(), check, backend=backend)


def decompress_24(values: torch.Tensor, meta: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """The dense ``[rows, 2 * values.shape[1]]`` matrix that :func:`compress_24` compressed.

    ``values`` and ``meta`` are the pair :func:`compress_24` returned: ``values`` ``[rows,
    cols / 2]`` fp16/bf16, ``meta`` ``[rows, cols / 16]`` int16 in the CUTLASS layout, on one
    device. Metadata that no compression makes (both values of a group sent to one slot) puts
    the second value in that slot, on every backend. ``backend``: ``"auto"``, ``"torch"``,
    ``"triton"`` or ``"ext"``."""
    _check_matrix("values", values, DTYPES)
    _check_matrix("meta", meta, (torch.int16,))
    rows, half = values.shape
    _aligned_shape("decompress_24", "values", rows, 2 * half)
    expected = (rows, 2 * half // META_COLS_PER_ELEMENT)
    if tuple(meta.shape) != expected:
        raise ValueError(f"meta has shape {tuple(meta.shape)}; values of shape {tuple(values.shape)} needs {expected}")
    if meta.device != values.device:
        raise ValueError(f"meta is on {meta.device}, values on {values.device}")
    return DECOMPRESS_24(values.contiguous(), meta.contiguous(), backend=backend)


def compress_24_cusparselt(x: torch.Tensor) -> torch.Tensor:
    """Compress a 2:4-sparse fp16/bf16 CUDA matrix into cuSPARSELt's layout with torch's own
    ``torch._cslt_compress`` (values and metadata in one buffer, for ``torch._cslt_sparse_mm``).

    cuSPARSELt's layout is opaque and GPU-only; the CUTLASS layout (:func:`compress_24`) is the
    one this library reproduces and tests element by element.
    """
    _check_matrix("x", x, DTYPES)
    if x.device.type != "cuda":
        raise ValueError(f"cuSPARSELt runs on CUDA tensors only, x is on {x.device}")
    if not torch.backends.cusparselt.is_available():
        raise BackendUnavailableError("this torch build has no cuSPARSELt (torch.backends.cusparselt)")
    rows, cols = x.shape
    if rows % 16 or cols % 16:  # cuSPARSELt's fp16/bf16 alignment
        raise ValueError(f"x has shape {tuple(x.shape)}; cuSPARSELt needs rows and cols multiples of 16")
    return torch._cslt_compress(x.contiguous())
