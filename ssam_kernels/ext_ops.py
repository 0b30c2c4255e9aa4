"""Host side of the compiled extension ``torch.ops.ssam.*``: the ``ext`` implementations that
the ``torch.ops.ssam_kernels`` ops' kernels call (argument conversion; same contracts as the
references), the SAM step plan's ``ext`` kernel set, and the fake (meta) implementations of the
C++ ops. Imported once the library has loaded."""

from __future__ import annotations

import torch

from .ops.bitmask import bits_of, packed_nbytes
from .ops.grad_norm import accumulation_dtype, grad_norm_torch
from .ops.nm_mask import nm_mask_torch
from .ops.perturb import PerturbBackup, perturb_torch, restore_torch
from .ops.sam_step_tables import KernelStep

MAX_GROUP = 32  # kMaxGroup in csrc/ssam_common.h
PLAN_BLOCK = 8192  # kPlanBlock in csrc/ssam_common.h

_ops = torch.ops.ssam


def _contiguous(tensors) -> bool:
    # (one device: the ops refuse lists that span devices, or send them to the reference)
    return all(map(torch.Tensor.is_contiguous, tensors))


def grad_norm_ext(tensors, masks):
    if not _contiguous(tensors):
        return grad_norm_torch(tensors, masks)
    bits = bits_of(masks)
    return _ops.grad_norm(tensors, bits).to(tensors[0].device)


def perturb_ext(params, grads, masks, scale, values) -> None:
    if not _contiguous(params):
        return perturb_torch(params, grads, masks, scale, values)
    # a number stays on the host (the CUDA op reads it there: no copy to the device, no wait),
    # as a float64, which float64 params take unrounded
    scale_t = scale.reshape(()) if isinstance(scale, torch.Tensor) else torch.tensor(float(scale), dtype=torch.float64)
    _ops.perturb_(params, grads, bits_of(masks), values, scale_t)


def restore_ext(params, backup: PerturbBackup) -> None:
    if not _contiguous(params):
        return restore_torch(params, backup)
    _ops.restore_(params, backup.values, bits_of(backup.masks))


def nm_mask_ext(scores, n, m, magnitude):
    if m > MAX_GROUP:
        return nm_mask_torch(scores, n, m, magnitude)
    return _ops.nm_mask(scores, n, m, magnitude)


def compress_24_ext(x, check=True):
    return tuple(_ops.compress_24(x, check))


def decompress_24_ext(values, meta):
    return _ops.decompress_24(values, meta)


class ExtStep(KernelStep):
    """The extension's kernels of a :class:`~ssam_kernels.SAMStepPlan` (``torch.ops.ssam.plan_*``:
    C++ on CPU tensors, CUDA on CUDA ones), on blocks of ``kPlanBlock`` elements."""

    def block_size(self, dtype: torch.dtype) -> int:
        return PLAN_BLOCK

    def launch_norm(self, part, g_ptrs, g_aligned, first) -> None:
        plan = self.plan
        _ops.plan_norm(part.norm_rows, part.blk_tensor, part.blk_start, part.numel, g_ptrs,
                       part.bits_ptrs if plan.masked_norm else None, part.dtype, self.partial, self.counter, plan.inv,
                       plan.flags, first, self.norm_programs, plan.eps)

    def launch_perturb(self, part, g_ptrs, g_aligned, tensor_rho) -> None:
        plan = self.plan
        _ops.plan_perturb(part.kept, part.blk_tensor, part.blk_start, part.blk_base, part.numel, part.w_ptrs, g_ptrs,
                          part.bits_ptrs, part.backup, plan.inv, plan.flags, tensor_rho)

    def launch_restore(self, part) -> None:
        _ops.plan_restore(part.kept, part.blk_tensor, part.blk_start, part.blk_base, part.numel, part.w_ptrs,
                          part.bits_ptrs, part.backup)

    def launch_restore_sgd(self, part, g_ptrs, g_aligned, hyper, fresh, momentum) -> None:
        _ops.plan_restore_sgd(part.all, part.blk_tensor, part.blk_start, part.blk_base, part.numel, part.w_ptrs, g_ptrs,
                              part.buf_ptrs, part.bits_ptrs, part.backup, part.tensor_group, hyper, fresh)


# --- fake implementations: output metadata only, for torch.compile and opcheck ----------------

@torch.library.register_fake("ssam::pack_mask")
def _pack_mask_fake(mask):
    return mask.new_empty((packed_nbytes(mask.numel()),), dtype=torch.uint8)


@torch.library.register_fake("ssam::unpack_mask")
def _unpack_mask_fake(bits, numel):
    return bits.new_empty((numel,), dtype=torch.bool)


@torch.library.register_fake("ssam::grad_norm")
def _grad_norm_fake(tensors, masks):
    return tensors[0].new_empty((), dtype=accumulation_dtype(tensors))


@torch.library.register_fake("ssam::perturb_")
def _perturb_fake(params, grads, masks, backup, scale):
    return None


@torch.library.register_fake("ssam::restore_")
def _restore_fake(params, backup, masks):
    return None


@torch.library.register_fake("ssam::nm_mask")
def _nm_mask_fake(scores, n, m, magnitude):
    return torch.empty_like(scores, dtype=torch.bool)


@torch.library.register_fake("ssam::compress_24")
def _compress_24_fake(x, check=True):
    rows, cols = x.shape
    return x.new_empty((rows, cols // 2)), x.new_empty((rows, cols // 16), dtype=torch.int16)


@torch.library.register_fake("ssam::decompress_24")
def _decompress_24_fake(values, meta):
    return values.new_empty((values.shape[0], values.shape[1] * 2))


for _name in ("plan_norm", "plan_perturb", "plan_restore", "plan_restore_sgd"):  # write through addresses: nothing
    torch.library.register_fake(f"ssam::{_name}")(lambda *args, **kwargs: None)


# the planned cuSPARSELt ops (csrc/cuda/cusparselt.cpp) exist in a build with the CUDA part
if "ssam_cslt::mm" in torch._C._dispatch_get_all_op_names():
    from torch.utils.flop_counter import register_flop_formula

    from .sparse_gemm import cslt_flops

    register_flop_formula(torch.ops.ssam_cslt.mm)(cslt_flops)  # what torch._cslt_sparse_mm counts

    @torch.library.register_fake("ssam_cslt::compress")
    def _(a):
        # [m, the kept half and 2 bits per kept value]: cuSPARSELt's size except for small
        # operands, which it pads (known only on the device; sparse_mm_24 keeps its cuSPARSELt
        # calls out of compiled graphs, so this shape serves a trace of the op alone)
        m, k = a.shape
        return a.new_empty((m, -(-k * 9 // 16)))

    @torch.library.register_fake("ssam_cslt::mm")
    def _(packed, b, alg_id, split_k, split_k_mode, transpose_result):
        k, n = b.shape
        m = packed.shape[0] if packed.dim() == 2 else packed.numel() * 16 // (9 * k)  # 1-D: torch < 2.10
        return b.new_empty((n, m) if transpose_result else (m, n))
