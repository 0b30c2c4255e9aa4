"""Masked perturbation with a compact backup, and the exact restore.

``perturb_`` computes ``w[m] = w[m] + scale * g[m]`` in fp32 (rounded once to ``w``'s dtype),
or in float64 where ``w`` is float64, and keeps only the original ``w[m]`` values.
``restore_`` writes them back, so ``w`` is bit-for-bit what it was; the official code's
``w -= e`` is not, after rounding.
"""

from __future__ import annotations

import math
import numbers

from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter, eq

import torch

from .. import _checks
from .._backend import lazy
from .._host_loops import c_fit, c_loops, carve, check_list_operands, unexplained_misfit
from .._library import Op
from .bitmask import BitMask, mask_args, pack_mask


@dataclass
class PerturbBackup:
    """What ``perturb_`` overwrote: for tensor ``i``, ``values[i]`` holds the original values
    at the positions of ``masks[i]`` in row-major order (all values, shaped like the tensor,
    where ``masks[i]`` is None). Inside an op, a mask may also be a BitMask's uint8 ``bits``
    (what the dispatcher carries; the implementations read them as they are)."""

    values: list[torch.Tensor]
    masks: list[torch.Tensor | BitMask | None]

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update of a ``dtype`` weight is computed in: float64 for float64 (fp32
    math would round ``w + e`` to fp32 precision, so ``w + 0 * g`` would not be ``w``), fp32
    for every narrower dtype. (Not ``torch.promote_types``: a dispatcher op per call.)"""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _perturbed(w: torch.Tensor, g: torch.Tensor, scale) -> torch.Tensor:
    # torch reads a 0-dim scale in the math dtype (an fp32 scale widened, a float64 one rounded
    # to fp32 for fp32 math), as the kernels do
    dtype = math_dtype(w.dtype)
    return (w.to(dtype) + scale * g.to(dtype)).to(w.dtype)


def aligned_length(n: int, dtype: torch.dtype) -> int:
    """``n`` rounded up to the elements of ``dtype`` in 16 bytes (the kernels' vector width)."""
    step = max(1, 16 // dtype.itemsize)
    return -(-n // step) * step


_dtype = attrgetter("dtype")


def split_aligned(counts: list[int], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Tensors of these lengths carved out of one allocation, each starting on 16 bytes (views
    from one split: written in place by the kernels, never by autograd)."""
    pieces = []  # each tensor, then its padding to the next 16 bytes: one split makes every view
    for n in counts:
        pieces += (n, aligned_length(n, dtype) - n)
    return torch.empty(sum(pieces), dtype=dtype, device=device).split_with_sizes(pieces)[::2]


def backup_buffers(params, masks, counts: list[int], spans_devices: bool | None = None) -> list[torch.Tensor]:
    """Where ``perturb_`` keeps the original values: a contiguous tensor shaped like the param
    where it has no mask (``masks[i]`` None); else ``counts[i]`` values. The backups of one
    dtype and device share one allocation, each starting on 16 bytes (carved in C, no op per
    tensor, where ``ssam_kernels._host`` is built; else the masked ones share one and each
    unmasked one gets its own). Under torch.compile a count may be a data-dependent symbol,
    which nothing can compare and views of one allocation cannot be sized by: whether a tensor
    is masked comes from ``masks``, and each backup gets its own allocation. ``spans_devices``:
    whether ``params`` lie on several devices, where the caller knows (else it is looked up)."""
    traced = torch.compiler.is_compiling()
    if not traced and params:
        sizes = [w if m is None else c for w, m, c in zip(params, masks, counts)]
        first = params[0]
        if spans_devices is None:
            spans_devices = _checks.spans_devices(params)
        if all(map(eq, map(_dtype, params), repeat(first.dtype))) and not spans_devices:
            carved = carve(sizes, first)  # the usual case: one dtype, one device
            if carved is not None:
                return carved
    out: list = [None] * len(params)
    masked: dict = {}
    for i, (w, m) in enumerate(zip(params, masks)):
        if m is None:
            out[i] = torch.empty_like(w, memory_format=torch.contiguous_format)
        elif traced:
            out[i] = w.new_empty(counts[i])
        else:
            masked.setdefault((w.dtype, w.device), []).append(i)
    for (dtype, device), idx in masked.items():
        for i, v in zip(idx, split_aligned([counts[i] for i in idx], dtype, device)):
            out[i] = v
    return out


def perturb_torch(params, grads, masks, scale, values) -> None:
    """Reference: ``values[i]`` (allocated by the caller) gets the original ``w[m]``."""
    for w, g, m, v in zip(params, grads, masks, values):
        if m is None:
            v.copy_(w)
            w.copy_(_perturbed(w, g, scale))
        else:
            keep = _checks.as_bool(m, like=w)
            original = w[keep]
            v.copy_(original)
            w[keep] = _perturbed(original, g[keep], scale)


def restore_torch(params, backup: PerturbBackup) -> None:
    for w, v, m in zip(params, backup.values, backup.masks):
        if m is None:
            w.copy_(v)
        else:
            w[_checks.as_bool(m, like=w)] = v


def _perturb(impl, params, grads, masks, values, scale, scale_tensor):
    check_list_operands("perturb_", params, {"grads": grads}, values, masks)
    if scale_tensor is not None and (scale_tensor.numel() != 1 or not scale_tensor.is_floating_point()
                                     or scale_tensor.device != params[0].device):
        raise ValueError(f"perturb_: scale_tensor must be one floating-point value on {params[0].device}, got "
                         f"{scale_tensor.numel()} {scale_tensor.dtype} on {scale_tensor.device}")
    impl(params, grads, masks, scale if scale_tensor is None else scale_tensor, values)


def _restore(impl, params, values, masks):
    check_list_operands("restore_", params, {}, values, masks)
    impl(params, PerturbBackup(values, masks))


# The backup's buffers come from the caller (sized by the masks' counts, which a BitMask
# caches), so neither the kernels nor the fake need a host sync, and the op returns nothing
# (what torch.compile's functionalization of a mutating op takes). The scale is a number (read
# on the host at the call) or a tensor on the params' device. The op checks what its kernels
# index by (sizes, dtypes, devices; in C, a few ns per tensor), but not that a masked backup
# holds exactly one value per set bit, which only the device knows: the kernels touch no slot
# past its end.
PERTURB = Op("perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor?[] masks, Tensor(b!)[] values, float scale, "
             "Tensor? scale_tensor, str backend) -> ()",
             {"torch": perturb_torch,
              "triton": lazy("ssam_kernels.triton_ops.perturb", "perturb_triton"),
              "ext": lazy("ssam_kernels.ext_ops", "perturb_ext")},
             fake=lambda *args: None, adapt=_perturb)
RESTORE = Op("restore_(Tensor(a!)[] params, Tensor[] values, Tensor?[] masks, str backend) -> ()",
             {"torch": restore_torch,
              "triton": lazy("ssam_kernels.triton_ops.perturb", "restore_triton"),
              "ext": lazy("ssam_kernels.ext_ops", "restore_ext")},
             fake=lambda params, values, masks: None, adapt=_restore)


def _counted(mask: BitMask, count: int) -> BitMask:
    mask.memo("_count", lambda: count)  # known: count_int() reads no count back
    return mask


def mask_counts(masks) -> list[int]:
    """Set entries per mask (-1 for None): a BitMask's cached count, a bool mask's sum (one host
    sync each)."""
    return [-1 if m is None else m.count_int() if isinstance(m, BitMask) else int(m.sum()) for m in masks]


def scale_args(scale, device: torch.device) -> tuple[float, torch.Tensor | None]:
    """``(number, None)`` for a number or a CPU tensor (read on the host now, no device sync),
    ``(0.0, tensor)`` for a tensor on the params' ``device`` (read there by the kernels). Under
    ``torch.compile`` a CPU tensor goes to ``device`` instead: its value is data the graph cannot
    read on the host."""
    if not isinstance(scale, torch.Tensor):
        if torch.compiler.is_compiling():  # (a symbolic float: nothing to read on the host)
            return float(scale), None
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a real number or a tensor, got {type(scale).__name__}")
        if not math.isfinite(scale):  # (a tensor's is read by the kernels: an inf or NaN there is the caller's)
            raise ValueError(f"scale must be finite, got {scale}")
        return float(scale), None
    if scale.device.type == "cpu":
        if torch.compiler.is_compiling():
            return 0.0, scale.reshape(()).to(device)
        return float(scale), None
    if scale.device != device:
        raise ValueError(f"scale is on {scale.device}; give a number, a CPU tensor or a tensor on {device}")
    return 0.0, scale.reshape(())


def check_writable(params: list[torch.Tensor]) -> None:
    if not torch.is_grad_enabled():
        return
    if not _checks.any_requires_grad(params):
        return
    for i, w in enumerate(params):
        if w.requires_grad:
            raise RuntimeError(
                f"params[{i}] requires grad and grad mode is on; call under torch.no_grad()"
            )


def perturb_(params, grads, masks, scale, *, backend: str = "auto") -> PerturbBackup:
    """In place ``w += scale * g * m`` for every tensor; returns the compact backup.

    Args:
        params: list of floating-point tensors, modified in place; no two share memory.
        grads: list of tensors shaped like ``params`` (any floating dtype). The math is in fp32
            (one rounding to ``w``'s dtype), or in float64 for float64 params.
        masks: None (perturb everything), or one entry per tensor: bool tensor,
            :class:`~ssam_kernels.BitMask` or None. Unmasked positions are not written.
        scale: Python number or 0-dim floating tensor (e.g. ``rho / (norm + eps)``, no sync),
            read in the math dtype (a number as float64 for float64 params).
            A number or CPU tensor is read on the host when the call is made, so a captured
            CUDA graph replays that value; pass a tensor on the parameters' device to let it
            change between replays.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"ext"``.

    Returns:
        :class:`PerturbBackup` holding the original values at masked positions only.
    """
    params = _checks.tensor_list("params", params)
    grads = _checks.tensor_list("grads", grads)
    _checks.same_shapes("grads", grads, "params", params)
    masks = _checks.mask_list(masks, params, "params")
    scale = _checks.scalar("scale", scale)
    check_writable(params)
    _checks.disjoint("params", params)
    counts = mask_counts(masks)
    spans = _checks.spans_devices(params)
    values = backup_buffers(params, masks, counts, spans)
    if spans:
        PERTURB.across_devices(backend, params[0].device)(params, grads, masks, scale, values)
    else:
        PERTURB(params, grads, mask_args(masks), values, *scale_args(scale, params[0].device), backend=backend)
    # bit masks with their counts: restore_ reads no count back (a host sync), and a bool mask
    # the caller changes afterwards cannot misplace the restore
    return PerturbBackup(values, [m if m is None or isinstance(m, BitMask) else _counted(pack_mask(m), c)
                                  for m, c in zip(masks, counts)])


def check_backup(params: list[torch.Tensor], backup) -> None:
    """``backup`` is a PerturbBackup that fits ``params`` (kernels index it by mask position)."""
    if not isinstance(backup, PerturbBackup):
        raise TypeError(f"backup must be the PerturbBackup returned by perturb_, got {type(backup).__name__}")
    masks = _checks.mask_list(backup.masks, params, "params")
    if len(backup.values) != len(params):
        raise ValueError(f"backup holds {len(backup.values)} tensors but params has {len(params)}")
    fit = c_fit("backup_misfit", list(params), list(backup.values), mask_counts(masks)) if c_loops() else None
    if fit:
        return
    for i, (w, v, m) in enumerate(zip(params, backup.values, masks)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"backup.values[{i}] must be a tensor, got {type(v).__name__}")
        if v.dtype != w.dtype or v.device != w.device:
            raise ValueError(f"backup.values[{i}] is {v.dtype} on {v.device}; params[{i}] is {w.dtype} on {w.device}")
        if m is None and v.shape != w.shape:
            raise ValueError(f"backup.values[{i}] has shape {tuple(v.shape)}, params[{i}] has {tuple(w.shape)}")
        if m is not None and v.dim() != 1:
            raise ValueError(f"backup.values[{i}] must be 1-D (the masked values), got shape {tuple(v.shape)}")
        if m is not None:
            count = m.count_int() if isinstance(m, BitMask) else int(m.sum())
            if v.numel() != count:
                raise ValueError(f"backup.values[{i}] holds {v.numel()} values but masks[{i}] selects {count}")
    if fit is False:
        raise unexplained_misfit("backup")


def restore_(params, backup: PerturbBackup, *, backend: str = "auto") -> None:
    """Put back the values ``perturb_`` overwrote, bit for bit.

    Args:
        params: the tensors ``perturb_`` perturbed, in the same order (written in place; call
            under ``torch.no_grad()`` where they require grad).
        backup: the :class:`PerturbBackup` that ``perturb_`` returned for them.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"ext"``.
    """
    params = _checks.tensor_list("params", params)
    check_backup(params, backup)
    check_writable(params)
    _checks.disjoint("params", params)
    if _checks.spans_devices(params):
        RESTORE.across_devices(backend, params[0].device)(params, backup)
    else:
        RESTORE(params, backup.values, mask_args(backup.masks), backend=backend)
