"""Bit-packed masks: 1 bit per element instead of a bool byte or a float.

Layout: the mask is flattened in row-major order, bit ``i`` of the mask is bit ``i % 8``
(least significant first) of byte ``i // 8``; the last byte is zero-padded. Kernels read the
``bits`` tensor directly; :class:`BitMask` carries the logical shape beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._host_loops import c_fit

_BIT_WEIGHTS = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    key = (device.type, device.index)
    if key not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[key] = (2 ** torch.arange(8, dtype=torch.int32)).to(device)
    return _BIT_WEIGHTS[key]


def popcount_bytes(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each byte of a uint8 tensor (uint8): three passes of byte arithmetic, no
    int64 index tensor eight times the mask's size (as a lookup table would need)."""
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


def packed_nbytes(numel: int) -> int:
    """Bytes of the packed form of a mask with ``numel`` elements."""
    if isinstance(numel, bool) or not isinstance(numel, (int, torch.SymInt)) or (isinstance(numel, int) and numel < 0):
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")  # (a SymInt under torch.compile)
    return (numel + 7) // 8


def padding_cleared(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """``bits`` with the last byte's bits past ``numel`` cleared (a copy where there are any):
    counts must agree with the kernels, which read no bit past ``numel`` whatever it holds."""
    if numel % 8 == 0 or bits.numel() == 0:
        return bits
    cleared = bits.clone()
    cleared[-1:].bitwise_and_((1 << numel % 8) - 1)
    return cleared


@dataclass(frozen=True, eq=False)
class BitMask:
    """A boolean mask stored as packed bits (see the module docstring for the layout). Two
    BitMasks are equal only if they are the same object (kernels cache facts on a mask by
    identity); compare contents with ``torch.equal(a.bits, b.bits) and a.shape == b.shape``."""

    bits: torch.Tensor
    shape: torch.Size

    def __post_init__(self) -> None:
        if not isinstance(self.bits, torch.Tensor) or self.bits.dtype != torch.uint8:
            raise TypeError(f"BitMask.bits must be a uint8 tensor, got {_describe(self.bits)}")
        if self.bits.dim() != 1 or not self.bits.is_contiguous():
            raise ValueError("BitMask.bits must be a contiguous 1-D tensor")
        object.__setattr__(self, "shape", torch.Size(self.shape))
        if any(isinstance(d, int) and d < 0 for d in self.shape):
            raise ValueError(f"BitMask.shape must hold sizes >= 0, got {tuple(self.shape)}")
        if self.bits.numel() != packed_nbytes(self.numel):
            raise ValueError(
                f"BitMask.bits has {self.bits.numel()} bytes; a mask of shape {tuple(self.shape)} "
                f"needs {packed_nbytes(self.numel)}"
            )

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.bits.device

    def to_bool(self) -> torch.Tensor:
        return unpack_mask(self)

    def count(self) -> torch.Tensor:
        """Number of set bits, as a 0-dim int64 tensor on the mask's device (no host sync)."""
        return popcount_bytes(padding_cleared(self.bits, self.numel)).sum()

    def memo(self, key: str, compute):
        """``compute()``, computed once per mask and kept on it under ``key`` (a BitMask is
        immutable by contract: do not write to ``bits`` after creating it)."""
        if key not in self.__dict__:
            object.__setattr__(self, key, compute())
        return self.__dict__[key]

    def count_int(self) -> int:
        """Number of set bits as a Python int: one host sync, then cached."""
        count = self.__dict__.get("_count")  # (read directly: called per mask per step)
        return self.memo("_count", lambda: int(self.count())) if count is None else count

    def rows_with_bits(self) -> torch.Tensor:
        """:func:`masked_rows` of this mask, cached (one host sync the first time)."""
        return self.memo("_rows", lambda: masked_rows(self.to_bool()))

    def rows_first(self) -> tuple[torch.Tensor, int]:
        """:func:`rows_first` of this mask, cached (one host sync the first time)."""
        return self.memo("_rows_first", lambda: _order_rows(self.rows_with_bits(), self.shape[0]))


def row_span(mask) -> tuple[int, int, int]:
    """``(first, end, count)`` of the rows of a bool or bit mask (viewed ``[shape[0], -1]``)
    that hold a set entry: they are the contiguous range ``[first, end)`` exactly where
    ``end - first == count``; ``(0, 0, 0)`` where no row holds one. Cached on a BitMask; one
    host sync per call for a bool mask."""
    if isinstance(mask, BitMask):
        return mask.memo("_row_span", lambda: _span(mask.rows_with_bits()))
    return _span(masked_rows(mask))


# Scattered rows whose span holds at most 1/SPAN_SLACK more rows than they do are computed as
# the whole span (on views: no gather of the output gradient, no scatter of the result); wider
# spans are gathered.
SPAN_SLACK = 8


def computed_rows(first: int, end: int, count: int) -> tuple[int, int] | None:
    """The range of rows a row-sparse weight gradient computes for the rows holding a set
    entry (:func:`row_span`'s ``first, end, count``): the span where they fill it or nearly
    (``SPAN_SLACK``), else None (they are gathered)."""
    return (first, end) if (end - first) * SPAN_SLACK <= count * (SPAN_SLACK + 1) else None


def _span(rows: torch.Tensor) -> tuple[int, int, int]:
    if rows.numel() == 0:
        return 0, 0, 0
    first, last = rows[[0, -1]].tolist()
    return first, last + 1, rows.numel()


def masked_rows(mask: torch.Tensor) -> torch.Tensor:
    """Sorted int64 indices of the rows of a bool ``mask`` viewed ``[shape[0], -1]`` (output
    features of a Linear weight, output channels of a Conv weight) that hold a set entry:
    the rows whose weight gradient a masked gradient needs. One host sync."""
    if mask.dim() == 0:
        raise ValueError("masked_rows needs a mask with at least 1 dim")
    # (flatten, not reshape(rows, -1): a mask of 0 rows has no -1 to infer)
    return mask.flatten(1).any(1).nonzero().squeeze(1) if mask.dim() > 1 else mask.nonzero().squeeze(1)


def rows_first(mask) -> tuple[torch.Tensor, int]:
    """(int32 permutation of the rows of a bool or bit mask listing the rows that hold a set
    entry first, in order, then the others; how many hold one). Cached on a BitMask; one host
    sync per call for a bool mask."""
    if isinstance(mask, BitMask):
        return mask.rows_first()
    return _order_rows(masked_rows(mask), mask.shape[0])


def _order_rows(rows: torch.Tensor, total: int) -> tuple[torch.Tensor, int]:
    idle = torch.ones(total, dtype=torch.bool, device=rows.device)
    idle[rows] = False
    return torch.cat([rows, idle.nonzero().squeeze(1)]).to(torch.int32), rows.numel()


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor"
    return type(x).__name__


def pack_mask(mask: torch.Tensor) -> BitMask:
    """Pack a bool tensor into a :class:`BitMask`."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {_describe(mask)}")
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8).to(torch.int32)
    bits = (groups * _bit_weights(mask.device)).sum(dim=1).to(torch.uint8)
    return BitMask(bits.contiguous(), mask.shape)


def unpack_mask(mask: BitMask) -> torch.Tensor:
    """The bool tensor a :class:`BitMask` stands for."""
    if not isinstance(mask, BitMask):
        raise TypeError(f"mask must be a BitMask, got {_describe(mask)}")
    return unpack_bits(mask.bits, mask.shape)


def unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    """The bool tensor of ``shape`` that packed ``bits`` (checked to fit) stand for."""
    shape = torch.Size(shape)
    if shape.numel() == 0:
        return torch.zeros(shape, dtype=torch.bool, device=bits.device)
    expanded = (bits.to(torch.int32)[:, None] & _bit_weights(bits.device)) != 0
    return expanded.reshape(-1)[: shape.numel()].reshape(shape)


def as_bitmask(mask) -> BitMask | None:
    """A mask entry (None, bool tensor or BitMask) as None or a BitMask."""
    if mask is None or isinstance(mask, BitMask):
        return mask
    return pack_mask(mask)


def mask_args(masks) -> list[torch.Tensor | None]:
    """Mask entries (None, bool tensor or BitMask) as a dispatcher op takes them (``Tensor?[]``):
    a BitMask as its ``bits`` (uint8), the others as they are."""
    return [m.bits if isinstance(m, BitMask) else m for m in masks]


def bits_of(masks) -> list[torch.Tensor | None]:
    """Each mask entry as the packed bits a kernel reads: None for None, a BitMask's ``bits``,
    a bool tensor packed, and uint8 bits (a BitMask as a dispatcher op carries it, see
    :func:`mask_args`) as they are. The op checked the bits against its tensors
    (:func:`check_mask_args` or ``check_list_operands``)."""
    return [m if m is None else m.bits if isinstance(m, BitMask) else m if m.dtype == torch.uint8
            else pack_mask(m).bits for m in masks]


def check_mask_args(args, refs) -> None:
    """Inside an op, mask entries as :func:`mask_args` passes them: each uint8 entry must be the
    packed bits of a mask shaped like ``refs[i]``, as :class:`BitMask`'s constructor checks
    them (its errors), all at once in C where ``ssam_kernels._host`` is built (nanoseconds per
    mask); a direct ``torch.ops`` call with short bits would otherwise be read past their end."""
    args, refs = list(args), list(refs)
    if len(args) != len(refs):
        raise ValueError(f"masks has {len(args)} entries but the tensors it masks {len(refs)}")
    fit = c_fit("bits_misfit", args, refs)
    if fit:
        return
    for m, r in zip(args, refs):
        if isinstance(m, torch.Tensor) and m.dtype == torch.uint8:
            BitMask(m, r.shape)  # raises, saying what does not fit
    if fit is False:
        raise RuntimeError("check_mask_args: ssam_kernels._host refused mask bits that BitMask accepts")
