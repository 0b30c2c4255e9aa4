"""Input checks shared by every op: one place, one wording, before anything is written."""

from __future__ import annotations

from operator import attrgetter
from typing import Sequence

import torch

from . import _host_loops
from ._host_loops import FLOAT_DTYPES, c_fit, c_loops, unexplained_misfit
from .ops.bitmask import BitMask, unpack_bits, unpack_mask


_requires_grad = attrgetter("requires_grad")


def any_requires_grad(tensors) -> bool:
    """Whether a tensor of the list requires a gradient (mapped in C: no Python frame per
    tensor; a generator under torch.compile, as Dynamo traces no attrgetter)."""
    if torch.compiler.is_compiling():
        return any(t.requires_grad for t in tensors)
    return any(map(_requires_grad, tensors))


def _kind(x) -> str:
    return f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def operand(op: str, name: str, t, dtypes: tuple, shape: tuple, device: torch.device | None = None) -> None:
    """A raw dispatcher op's tensor argument as its kernels index it: one of ``dtypes``, of
    ``shape`` (a None entry: any size), contiguous, on ``device``; else an error naming it. The
    public functions make their arguments so; a direct ``torch.ops.ssam_kernels`` call gets the
    error rather than a kernel that reads or writes past a tensor."""
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be a tensor of dtype {', '.join(map(str, dtypes))}; got {_kind(t)}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{op}: {name} must have shape {want}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (the kernels index it flat), got strides {t.stride()}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, the other operands on {device}")


def tensor_list(name: str, tensors, *, floating: bool = True, allow_empty: bool = False) -> list[torch.Tensor]:
    """``tensors`` as a list, checked: a list/tuple of (floating-point) tensors."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(tensors).__name__}")
    out = list(tensors)
    if not out and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    fit = c_fit("tensors_misfit", out, floating, None)
    if not fit:
        for i, t in enumerate(out):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
            if floating and t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{name}[{i}] must be a floating-point tensor ({FLOAT_DTYPES}), got {t.dtype}")
        if fit is False:
            raise unexplained_misfit(name)
    return out


def overlapping_pair(tensors: list[torch.Tensor]) -> tuple[int, int] | None:
    """Indices ``(i, j)``, ``i < j``, of two of ``tensors`` that share memory (one tensor listed
    twice, or views of one buffer that overlap), or None. Bytes spanned, from each tensor's
    lowest to its highest element (dense tensors: their memory), per device: interleaved views
    that share no element (``x[::2]``, ``x[1::2]``) count as sharing."""
    if c_loops() and type(tensors) is list:
        try:
            return _host_loops._host.overlapping_pair(tensors)
        except RuntimeError:  # a tensor without an address to read: Python's rules decide (and say so)
            pass
    spans = sorted((str(t.device), t.data_ptr(), t.data_ptr() + _span_bytes(t), i)
                   for i, t in enumerate(tensors) if t.numel())
    for (device, _, end, i), (other, start, _, j) in zip(spans, spans[1:]):
        if device == other and start < end:
            return min(i, j), max(i, j)
    return None


def disjoint(name: str, tensors: list[torch.Tensor]) -> None:
    """ValueError where two of ``tensors`` share memory: an in-place multi-tensor op would back
    up values another entry of the same launch already changed, and on a GPU the two race."""
    disjoint_lists([(name, tensors)])


def disjoint_lists(named: list[tuple[str, list]]) -> None:
    """:func:`disjoint` across several lists written in place (None entries skipped), naming
    the two entries that share memory."""
    if torch.compiler.is_compiling():  # (traced tensors have no addresses; eager calls check)
        return
    # every list's entries end to end, None skipped; the names are made only for an error
    flat = list(named[0][1]) if len(named) == 1 else [t for _, tensors in named for t in tensors if t is not None]
    pair = overlapping_pair(flat)
    if pair is not None:
        where = [(name, i) for name, tensors in named for i, t in enumerate(tensors) if t is not None]
        first, second = (f"{where[i][0]}[{where[i][1]}]" for i in pair)
        raise ValueError(f"{first} and {second} share memory (the same tensor twice, or overlapping views): an "
                         "in-place step over both would be wrong")


def _span_bytes(t: torch.Tensor) -> int:
    return (1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))) * t.element_size()


def same_shapes(name: str, tensors: list[torch.Tensor], ref_name: str, refs: list[torch.Tensor]) -> None:
    """Each ``tensors[i]`` has the shape and device of ``refs[i]``, and the lists match in length."""
    if len(tensors) != len(refs):
        raise ValueError(f"{name} has {len(tensors)} entries but {ref_name} has {len(refs)}")
    fit = c_fit("tensors_misfit", list(tensors), False, list(refs))
    if fit:
        return
    for i, (t, r) in enumerate(zip(tensors, refs)):
        if t.shape != r.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, {ref_name}[{i}] has {tuple(r.shape)}")
        if t.device != r.device:
            raise ValueError(f"{name}[{i}] is on {t.device}, {ref_name}[{i}] is on {r.device}")
    if fit is False:
        raise unexplained_misfit(name)


def mask_facts(name: str, mask, *, none_ok: bool = False) -> tuple[torch.Size, torch.device]:
    """Shape and device of a mask entry that is a bool tensor or a BitMask (TypeError otherwise;
    ``none_ok`` only changes the wording, for callers that handle None themselves)."""
    if isinstance(mask, BitMask) or (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool):
        return torch.Size(mask.shape), mask.device
    allowed = "a bool tensor, a BitMask or None" if none_ok else "a bool tensor or a BitMask"
    raise TypeError(f"{name} must be {allowed}, got {_kind(mask)}")


def mask_list(masks, refs: list[torch.Tensor], ref_name: str) -> list[torch.Tensor | BitMask | None]:
    """``masks`` checked against ``refs``: None (no masking), or one entry per tensor, each a
    bool tensor or a :class:`BitMask` shaped like its tensor, or None (that tensor unmasked)."""
    if masks is None:
        return [None] * len(refs)
    if isinstance(masks, (torch.Tensor, BitMask)) or not isinstance(masks, Sequence):
        raise TypeError(f"masks must be None or a list of masks, got {type(masks).__name__}")
    masks = list(masks)
    if len(masks) != len(refs):
        raise ValueError(f"masks has {len(masks)} entries but {ref_name} has {len(refs)}")
    fit = c_fit("masks_misfit", masks, list(refs), BitMask)
    if fit:
        return masks
    for i, (m, r) in enumerate(zip(masks, refs)):
        if m is None:
            continue
        shape, device = mask_facts(f"masks[{i}]", m, none_ok=True)
        if shape != r.shape:
            raise ValueError(f"masks[{i}] has shape {tuple(shape)}, {ref_name}[{i}] has {tuple(r.shape)}")
        if device != r.device:
            raise ValueError(f"masks[{i}] is on {device}, {ref_name}[{i}] is on {r.device}")
    if fit is False:
        raise unexplained_misfit("masks")
    return masks


def as_bool(mask, like: torch.Tensor | None = None) -> torch.Tensor:
    """The bool tensor for an already checked mask entry: a bool tensor, a BitMask, or (inside
    an op) a BitMask's uint8 bits, shaped like ``like``."""
    if isinstance(mask, BitMask):
        return unpack_mask(mask)
    if mask.dtype == torch.uint8:
        if like is None:
            raise TypeError("as_bool: packed mask bits need the tensor they mask (like=)")
        return unpack_bits(mask, like.shape)
    return mask


def spans_devices(tensors) -> bool:
    """Whether a list of tensors lies on more than one device."""
    if c_loops() and type(tensors) is list:
        return _host_loops._host.first_elsewhere(tensors) >= 0
    return any(t.device != tensors[0].device for t in tensors)


def scalar(name: str, value) -> float | torch.Tensor:
    """A Python real or a 0-dim floating tensor (kept on its device to avoid a host sync)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number or a 0-dim tensor, got bool")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
        return value
    raise TypeError(f"{name} must be a real number or a 0-dim floating tensor, got {_kind(value)}")
