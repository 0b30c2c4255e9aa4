"""Masked perturbation with a compact backup, and the exact restore.

``perturb_`` computes ``w[m] = w[m] + scale * g[m]`` in fp32 (rounded once to ``w``'s dtype),
or in float64 where ``w`` is float64, and keeps only the original ``w[m]`` values.
``restore_`` writes them back, so ``w`` is bit-for-bit what it was; the official code's
``w -= e`` is not, after rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _checks
from .._backend import lazy, op_backends
from .bitmask import BitMask

_PERTURB = op_backends("perturb_")
_RESTORE = op_backends("restore_")


@dataclass
class PerturbBackup:
    """What ``perturb_`` overwrote: for tensor ``i``, ``values[i]`` holds the original values
    at the positions of ``masks[i]`` in row-major order (all values, shaped like the tensor,
    where ``masks[i]`` is None)."""

    values: list[torch.Tensor]
    masks: list[torch.Tensor | BitMask | None]

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update of a ``dtype`` weight is computed in: float64 for float64 (fp32
    math would round ``w + e`` to fp32 precision, so ``w + 0 * g`` would not be ``w``), fp32
    for every narrower dtype."""
    return torch.promote_types(dtype, torch.float32)


def _perturbed(w: torch.Tensor, g: torch.Tensor, scale) -> torch.Tensor:
    # torch reads a 0-dim scale in the math dtype (an fp32 scale widened, a float64 one rounded
    # to fp32 for fp32 math), as the kernels do
    dtype = math_dtype(w.dtype)
    return (w.to(dtype) + scale * g.to(dtype)).to(w.dtype)


def perturb_torch(params, grads, masks, scale) -> PerturbBackup:
    values = []
    for w, g, m in zip(params, grads, masks):
        if m is None:
            values.append(w.clone())
            w.copy_(_perturbed(w, g, scale))
        else:
            keep = _checks.as_bool(m)
            original = w[keep]
            values.append(original)
            w[keep] = _perturbed(original, g[keep], scale)
    return PerturbBackup(values, list(masks))


def restore_torch(params, backup: PerturbBackup) -> None:
    for w, v, m in zip(params, backup.values, backup.masks):
        if m is None:
            w.copy_(v)
        else:
            w[_checks.as_bool(m)] = v


_PERTURB.register("torch", perturb_torch)
_RESTORE.register("torch", restore_torch)
_PERTURB.register("triton", lazy("ssam_kernels.triton_ops.perturb", "perturb_triton"))
_PERTURB.register("ext", lazy("ssam_kernels.ext_ops", "perturb_ext"))
_RESTORE.register("triton", lazy("ssam_kernels.triton_ops.perturb", "restore_triton"))
_RESTORE.register("ext", lazy("ssam_kernels.ext_ops", "restore_ext"))


def check_writable(params: list[torch.Tensor]) -> None:
    for i, w in enumerate(params):
        if w.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"params[{i}] requires grad and grad mode is on; call under torch.no_grad()"
            )


def perturb_(params, grads, masks, scale, *, backend: str = "auto") -> PerturbBackup:
    """In place ``w += scale * g * m`` for every tensor; returns the compact backup.

    Args:
        params: list of floating-point tensors, modified in place.
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
    return _PERTURB(backend, params[0].device)(params, grads, masks, scale)


def check_backup(params: list[torch.Tensor], backup) -> None:
    """``backup`` is a PerturbBackup that fits ``params`` (kernels index it by mask position)."""
    if not isinstance(backup, PerturbBackup):
        raise TypeError(f"backup must be the PerturbBackup returned by perturb_, got {type(backup).__name__}")
    masks = _checks.mask_list(backup.masks, params, "params")
    if len(backup.values) != len(params):
        raise ValueError(f"backup holds {len(backup.values)} tensors but params has {len(params)}")
    for i, (w, v, m) in enumerate(zip(params, backup.values, masks)):
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


def restore_(params, backup: PerturbBackup, *, backend: str = "auto") -> None:
    """Put back the values ``perturb_`` overwrote, bit for bit."""
    params = _checks.tensor_list("params", params)
    check_backup(params, backup)
    check_writable(params)
    _RESTORE(backend, params[0].device)(params, backup)
