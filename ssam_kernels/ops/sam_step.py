"""A SAM / SSAM step over a fixed list of parameters and masks, planned once: :class:`SAMStepPlan`.

What every step needs is worked out when the plan is made (once per mask update, or when the
parameters change), and checked then: each tensor's memory order (``channels_last`` weights
are walked in memory order, their masks permuted to match), the blocks the kernels take and
the backup slot where each block's kept values go, one flat backup buffer, the device tables
of addresses. A step then only reads the gradients' addresses, and launches:

* :meth:`SAMStepPlan.perturb`: the norm of the gradient (or of ``g * m``), whose last program
  writes ``1 / (norm + eps)`` on the device, then ``w[m] += rho * g[m] / (norm + eps)`` with the
  old ``w[m]`` kept in the backup: 2 launches;
* :meth:`SAMStepPlan.restore_sgd`: the exact restore fused with ``torch.optim.SGD``'s update, 1
  launch; or :meth:`SAMStepPlan.restore`, 1 launch.

(Per weight dtype: a model in one dtype, the usual case, takes 3 launches per step.) No host
sync, no allocation and no Python work per tensor beyond reading each gradient's address (and
bumping the parameters' version counters, as torch's in-place ops do); the kernels can be
captured in a CUDA graph.

A gradient norm that is not finite (an inf or NaN in the ascent gradient) leaves the weights
unperturbed for that step, decided on the device; :attr:`SAMStepPlan.skipped` counts such steps
(a device tensor: reading it as a number is the only sync).

The reference backend (``backend="torch"``) does the same with torch ops, a full-size backup and
``torch.where`` (no host sync either); it runs on any device.
"""

from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import _checks
from .._backend import BackendUnavailableError, eager_when_traced, lazy, on_device
from .._library import backend_table
from .bitmask import BitMask, as_bitmask, pack_mask, unpack_mask
from .grad_norm import accumulation_dtype
from .perturb import _dtype, math_dtype
from .sgd_step import sgd_update_torch

# a kernel set chosen once per plan (its kernels: the ext backend's are the torch.ops.ssam.plan_*
# ops, the Triton ones launched from TritonStep)
_BACKENDS = backend_table("sam_step", ext_op="plan_norm")
# unbound methods, mapped over the tensors in C (no Python loop per tensor on the step path)
_data_ptr, _stride, _is_contiguous = torch.Tensor.data_ptr, torch.Tensor.stride, torch.Tensor.is_contiguous
_grad = operator.attrgetter("grad")
from .._host_loops import _host, bump_versions, same_versions, versions  # _host: the compiled per-step reads, or None
SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


class PlanMismatch(RuntimeError):
    """The parameters, gradients or masks no longer fit the plan (a parameter was moved or
    replaced, a gradient has another memory layout than its parameter, a mask's bits were written
    in place): make a new plan, or take the step another way."""


def storage_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """The permutation of ``t``'s dims under which it is contiguous (its memory order: the
    identity for a contiguous tensor, (0, 2, 3, 1) for a channels_last 4-D one); None where no
    permutation makes it contiguous (overlapping or gapped memory)."""
    if t.is_contiguous():
        return tuple(range(t.dim()))
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d])))
    return order if t.permute(order).is_contiguous() else None


def _memory_mask(mask: BitMask, order: tuple[int, ...]) -> BitMask:
    """``mask`` with its bits in the memory order ``order`` of its tensor."""
    if order == tuple(range(len(order))):
        return mask
    return pack_mask(unpack_mask(mask).permute(order).contiguous())


@dataclass(frozen=True)
class SGDGroup:
    """``torch.optim.SGD``'s hyper-parameters of one parameter group, as its constructor takes
    them: ``lr``, ``momentum``, ``dampening``, ``weight_decay`` finite numbers >= 0;
    ``nesterov`` (needs ``momentum > 0`` and ``dampening == 0``) and ``maximize`` bools. Checked
    when :meth:`SAMStepPlan.restore_sgd` first takes them."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    def values(self) -> tuple[float, ...]:
        return (float(self.lr), float(self.momentum), float(self.dampening), float(self.weight_decay),
                float(bool(self.nesterov)), float(bool(self.maximize)))


MIN_EPS = 2.0**-126  # fp32's smallest normal: 1 / eps stays finite
_LAST_CHECKED: list = [None]  # the last tuple check_sgd_groups passed (immutable: frozen SGDGroups)


def check_sgd_groups(groups, count: int) -> list[SGDGroup]:
    if groups is _LAST_CHECKED[0] and len(groups) == count:  # a frontend's checked tuple, passed on
        return list(groups)
    if not isinstance(groups, (list, tuple)) or len(groups) != count:
        raise ValueError(f"sgd must be a list of {count} SGDGroup (one per group), got {groups!r}")
    for i, g in enumerate(groups):
        if not isinstance(g, SGDGroup):
            raise TypeError(f"sgd[{i}] must be an SGDGroup, got {type(g).__name__}")
        for key in SGD_KEYS[:4]:
            value = getattr(g, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"sgd[{i}].{key} must be a number >= 0, got {value!r}")
        for key in SGD_KEYS[4:]:
            if not isinstance(getattr(g, key), bool):
                raise TypeError(f"sgd[{i}].{key} must be a bool, got {type(getattr(g, key)).__name__}")
        if g.nesterov and (g.momentum <= 0 or g.dampening != 0):
            raise ValueError(f"sgd[{i}]: nesterov needs momentum > 0 and dampening == 0 (as torch.optim.SGD)")
    if isinstance(groups, tuple):
        _LAST_CHECKED[0] = groups
    return list(groups)


class SAMStepPlan:
    """The plan of a SAM / SSAM step over ``params`` (see the module docstring).

    Args:
        params: the parameters (tensors with dense memory, all on one device, no two sharing memory;
            floating dtypes).
        masks: None (SAM: every entry perturbed), or one entry per parameter: a bool tensor or
            :class:`~ssam_kernels.BitMask` shaped like it, or None (all of it).
        groups: the parameter group of each parameter (ints from 0; default all 0): each group
            has its own ``rho`` and SGD hyper-parameters.
        num_groups: how many groups ``rho`` and the SGD hyper-parameters list (default
            ``max(groups) + 1``; more where trailing groups hold none of ``params``, as an
            optimizer's empty param group does).
        masked_norm: the norm over ``g * m`` (True) or over every gradient (False: the paper).
        eps: added to the norm before dividing (>= 2**-126, so 1 / eps is finite in fp32; the
            paper's 1e-7).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"ext"``.

    The plan holds the tensors, not copies: a step reads each parameter's ``.grad`` and writes
    the parameter in place, and reads the masks' bits. A parameter whose memory moved since
    (``p.data = ...``, ``model.to(...)``), a gradient laid out unlike its parameter, or a mask
    whose bits were written in place (a new mask needs a new plan) raises :class:`PlanMismatch`
    before anything is written.
    """

    @eager_when_traced
    def __init__(self, params: Sequence[torch.Tensor], masks=None, *, groups: Sequence[int] | None = None,
                 num_groups: int | None = None, masked_norm: bool = False, eps: float = 1e-7, backend: str = "auto"):
        params = _checks.tensor_list("params", params)
        masks = _checks.mask_list(masks, params, "params")
        device = params[0].device
        for i, p in enumerate(params):
            if p.device != device:
                raise ValueError(f"params[{i}] is on {p.device}, params[0] on {device}: a plan takes one device")
        groups = [0] * len(params) if groups is None else list(groups)
        if len(groups) != len(params) or any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in groups):
            raise ValueError(f"groups must hold one int >= 0 per parameter ({len(params)}), got {groups!r}")
        if num_groups is None:
            num_groups = max(groups) + 1
        elif isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= max(groups):
            raise ValueError(f"num_groups must be an int > max(groups) ({max(groups)}), got {num_groups!r}")
        if not isinstance(masked_norm, bool):
            raise TypeError(f"masked_norm must be a bool, got {type(masked_norm).__name__}")
        # (eps 0 and a zero gradient: 1 / 0 * 0, NaN weights where nothing should move; the same
        # where 1 / eps overflows fp32, so eps is at least fp32's smallest normal)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= MIN_EPS):
            raise ValueError(f"eps must be a finite number >= 2**-126 (1 / eps finite in fp32), got {eps!r}")
        orders = []
        for i, p in enumerate(params):
            order = storage_order(p)
            if order is None:
                raise ValueError(f"params[{i}] (shape {tuple(p.shape)}, strides {p.stride()}) is not dense in memory: "
                                 "a plan needs parameters that some permutation of their dims makes contiguous")
            orders.append(order)
        _checks.disjoint("params", params)
        self.params = list(params)
        self.masks = [as_bitmask(m) for m in masks]
        # the kernels read these bits at every step through tables counted from them now: a bit
        # set in place later would send a write past its tensor's share of the backup
        self._bits = [m.bits for m in self.masks if m is not None]
        self._bits_versions = versions(self._bits)
        self.groups = groups
        self.num_groups = num_groups
        self.masked_norm = masked_norm
        self.eps = float(eps)
        self.device = device
        self.backend = _BACKENDS.resolve(backend, device)
        self._orders = orders
        self._strides = [p.stride() for p in params]
        self._dtypes = [p.dtype for p in params]
        self._all_contiguous = all(o == tuple(range(len(o))) for o in orders)
        self._addresses = tuple(p.data_ptr() for p in params)
        self.norm_dtype = accumulation_dtype(params)
        # on the device: 1 / (norm + eps) (0 when skipped), and [skipped now, skipped in all]
        self.inv = torch.zeros(1, dtype=self.norm_dtype, device=device)
        self.flags = torch.zeros(2, dtype=torch.int64, device=device)
        self.buffers: list[torch.Tensor | None] = [None] * len(params)  # momentum buffers, once made
        self._empty = [i for i, p in enumerate(params) if p.numel() == 0]  # (see _start_empty)
        self._empty_waiting: list[int] = []  # those of them without a buffer, in a group with momentum
        self.perturbed = False
        self._issued = None  # the last tuple grad_addresses() returned: the one perturb(grads=) takes
        self._sgd = None  # the last hyper-parameters restore_sgd checked
        self._sgd_given = None
        with _launching(device):
            self._impl = _BACKENDS.impls[self.backend](self, [_memory_mask(m, o) if m is not None else None
                                                            for m, o in zip(self.masks, orders)])

    # --- what a step checks -------------------------------------------------------------------

    @eager_when_traced
    def grad_addresses(self, *, check_params: bool = True) -> tuple[int, ...]:
        """Each parameter's gradient address (0: no gradient), after checking that every
        parameter is where the plan found it (``check_params``) and that each gradient is laid
        out like its parameter. (Per tensor a few attribute reads: most of a step's host time,
        done in C by ``ssam_kernels._host`` where it is built, else mapped in Python.)"""
        params = self.params
        if _host is not None:  # the same reads in C; None: something does not fit, said below
            addresses = _host.grad_addresses(params, self._addresses if check_params else None)
            if addresses is not None:
                self._issued = addresses
                return addresses
        if check_params and tuple(map(_data_ptr, params)) != self._addresses:
            raise PlanMismatch("a parameter's memory moved since the plan was made (p.data = ..., model.to(...)): "
                               "make a new plan")
        grads = list(map(_grad, params))
        try:
            if self._all_contiguous:
                laid_out = all(map(_is_contiguous, grads))
            else:
                laid_out = list(map(_stride, grads)) == self._strides
            # (the kernels read a gradient as its parameter's dtype; Tensor.grad_dtype lets them differ)
            laid_out = laid_out and list(map(_dtype, grads)) == self._dtypes
            addresses = tuple(map(_data_ptr, grads))
        except TypeError:  # a parameter without a gradient: the loop below
            pass
        else:
            if laid_out:
                self._issued = addresses
                return addresses
        out = []
        for p, g, stride in zip(params, grads, self._strides):
            if g is None:
                out.append(0)
            elif g.stride() != stride:
                raise PlanMismatch(f"a gradient (shape {tuple(g.shape)}, strides {g.stride()}) is laid out unlike its "
                                   f"parameter (strides {stride})")
            elif g.dtype != p.dtype:
                raise PlanMismatch(f"a gradient (shape {tuple(g.shape)}) is {g.dtype}, its parameter {p.dtype} "
                                   "(Tensor.grad_dtype): the plan's kernels read it as the parameter's dtype")
            else:
                out.append(g.data_ptr())
        self._issued = tuple(out)
        return self._issued

    def _check_masks(self, call: str) -> None:
        if not same_versions(self._bits, self._bits_versions):
            left = " The weights stay as perturb() left them: the backup's slots follow the old bits." \
                if call != "perturb" else ""
            raise PlanMismatch(f"{call}(): a mask's bits were written in place since the plan was made (its "
                               f"tables count the old bits): make a new plan for the new mask.{left}")

    @property
    def captured(self) -> bool:
        """Whether a step of this plan ran inside a CUDA graph capture: the graph replays its
        kernels, which read the plan's tables and buffers, so the plan must outlive the graph."""
        return getattr(self._impl, "captured", False)

    @property
    def skipped(self) -> torch.Tensor:
        """How many steps' perturbations were skipped for a gradient norm that was not finite
        (a 0-dim int64 device tensor: reading it is a host sync)."""
        return self.flags[1]

    # --- the step -----------------------------------------------------------------------------

    @eager_when_traced
    def perturb(self, rho: Sequence[float], *, grads: tuple[int, ...] | None = None) -> None:
        """``w[m] += rho_group * g[m] / (norm + eps)`` from each parameter's current ``.grad`` (a
        parameter without one is left as it is), keeping the old values for :meth:`restore`.
        ``rho``: one finite number per group (a negative one moves against the gradient: SAM
        for a group whose optimizer maximizes). ``grads``: what :meth:`grad_addresses` just
        returned last, if the caller has it (read again otherwise; the kernels write through
        these addresses, so only that very tuple is taken); no gradient may have been replaced
        since (the addresses are not read again)."""
        if self.perturbed:
            raise RuntimeError("perturb() called twice without restore() or restore_sgd() in between")
        rho = _check_rho(rho, self.num_groups)
        self._check_masks("perturb")
        if grads is None:
            grads = self.grad_addresses()
        elif grads is not self._issued:
            raise ValueError("grads must be the tuple this plan's grad_addresses() returned last (the kernels write "
                             f"through its addresses), got another {type(grads).__name__}")
        with _launching(self.device):
            self._impl.perturb(grads, rho)
        bump_versions(self.params)  # the kernels write through addresses: tell autograd's version counters
        self.perturbed = True

    @eager_when_traced
    def restore(self) -> None:
        """Put back the weights :meth:`perturb` changed, bit for bit."""
        if not self.perturbed:
            raise RuntimeError("restore() without a preceding perturb()")
        self._check_masks("restore")
        with _launching(self.device):
            self._impl.restore()
        bump_versions(self.params)
        self.perturbed = False

    @eager_when_traced
    def restore_sgd(self, sgd: Sequence[SGDGroup]) -> list[int]:
        """:meth:`restore`, then ``torch.optim.SGD``'s step of every parameter with the current
        ``.grad`` (parameters without one are only restored), ``sgd[group]`` giving each group's
        hyper-parameters. Momentum buffers are made on a parameter's first step, as torch's SGD
        does (:attr:`buffers`); returns the indices of the parameters that got one now.

        fp32 and float64 parameters step bit for bit as ``torch.optim.SGD`` does. For
        float16/bfloat16 the Triton and ext kernels keep the intermediates (decayed gradient,
        momentum, Nesterov term) in fp32 and round the weight and the buffer once each, where
        torch (and the reference backend) rounds after every op: not bitwise equal."""
        if not self.perturbed:
            raise RuntimeError("restore_sgd() without a preceding perturb()")
        self._check_masks("restore_sgd")
        # checked once per change: the tuple given last time (immutable) is taken as it is; a
        # list may have been edited in place since, so its entries are compared
        if not (sgd is self._sgd_given and type(sgd) is tuple):
            if not isinstance(sgd, (list, tuple)):
                raise TypeError(f"sgd must be a list or tuple of SGDGroup, one per group ({self.num_groups}), "
                                f"got {type(sgd).__name__}")
            if tuple(sgd) != self._sgd:
                self._sgd = tuple(check_sgd_groups(sgd, self.num_groups))
                self._empty_waiting = self._waiting()
        self._sgd_given = sgd
        grads = self.grad_addresses(check_params=False)
        with _launching(self.device):
            made = self._impl.restore_sgd(grads, self._sgd)
        if self._empty_waiting:
            made += self._start_empty()
        bump_versions(self.params)  # (not the momentum buffers: optimizer state, which no graph saves)
        self.perturbed = False
        return made

    @eager_when_traced
    def set_buffers(self, buffers: Sequence[torch.Tensor | None]) -> None:
        """Momentum buffers to continue from (e.g. the base optimizer's after a resume): each
        None or shaped and laid out like its parameter."""
        if len(buffers) != len(self.params):
            raise ValueError(f"buffers must hold one entry per parameter ({len(self.params)}), got {len(buffers)}")
        for i, (b, p) in enumerate(zip(buffers, self.params)):
            if b is not None and (not isinstance(b, torch.Tensor) or b.shape != p.shape or b.device != p.device
                                  or b.stride() != p.stride() or b.dtype != p.dtype):
                raise ValueError(f"buffers[{i}] must be None or a {p.dtype} tensor shaped and laid out like params[{i}]")
        _checks.disjoint_lists([("params", self.params), ("buffers", buffers)])
        self.buffers = list(buffers)
        self._empty_waiting = self._waiting()
        with _launching(self.device):
            self._impl.buffers_changed()

    def _waiting(self) -> list[int]:
        """The empty parameters without a buffer whose group has momentum (the last
        hyper-parameters given; none before a first step): only they may get one."""
        if self._sgd is None:
            return []
        return [i for i in self._empty if self.buffers[i] is None and self._sgd[self.groups[i]].momentum != 0]

    def _start_empty(self) -> list[int]:
        """Momentum buffers of the empty parameters stepped now (with a gradient, in a group with
        momentum): torch's SGD gives them an empty one, which no kernel makes (an empty
        gradient's address is 0, read as no gradient)."""
        made = [i for i in self._empty_waiting if self.params[i].grad is not None]
        for i in made:
            self.buffers[i] = torch.empty_like(self.params[i])
        if made:
            self._empty_waiting = self._waiting()
        return made


_NOTHING = contextlib.nullcontext()


def _launching(device: torch.device):
    """Grad mode off and ``device`` current while a step's kernels launch: nothing to do in the
    optimizers' steps (already under no_grad, on the current device), where a context would cost
    a microsecond or two per step."""
    grad = torch.is_grad_enabled()
    switch = device.type == "cuda" and device.index != torch.cuda.current_device()
    if not grad and not switch:
        return _NOTHING
    stack = contextlib.ExitStack()
    if grad:
        stack.enter_context(torch.no_grad())
    if switch:
        stack.enter_context(on_device(device))
    return stack


def _check_rho(rho, groups: int) -> tuple[float, ...]:
    if not isinstance(rho, (list, tuple)) or len(rho) != groups:
        raise ValueError(f"rho must hold one number per group ({groups}), got {rho!r}")
    for r in rho:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise ValueError(f"rho must hold finite numbers, got {rho!r}")
    return tuple(float(r) for r in rho)


class _ReferenceStep:
    """The plan's steps with torch ops: a full backup of every parameter, ``torch.where`` for
    the masks and the skip (no host sync), torch's SGD op for op."""

    def __init__(self, plan: SAMStepPlan, memory_masks):
        self.plan = plan
        self.keep = [None if m is None else unpack_mask(m) for m in plan.masks]
        self.backup: list[torch.Tensor] = []

    def perturb(self, grads, rho) -> None:
        plan = self.plan
        dtype = plan.norm_dtype
        parts = []
        for p, keep, g_addr in zip(plan.params, self.keep, grads):
            if g_addr == 0:
                continue
            g = p.grad.to(dtype)
            if plan.masked_norm and keep is not None:
                g = torch.where(keep, g, 0)
            parts.append(g.square().sum())
        total = torch.stack(parts).sum() if parts else torch.zeros((), dtype=dtype, device=plan.device)
        finite = torch.isfinite(total)
        inv = torch.where(finite, (total.sqrt() + plan.eps).reciprocal(), 0)
        plan.inv.copy_(inv)
        plan.flags[0] = (~finite).to(torch.int64)
        plan.flags[1] += (~finite).to(torch.int64)
        self.backup = [p.clone() for p in plan.params]
        for p, keep, g_addr, group in zip(plan.params, self.keep, grads, plan.groups):
            if g_addr == 0:
                continue
            math = math_dtype(p.dtype)
            scale = (inv * rho[group]).to(math)
            new = (p.to(math) + scale * p.grad.to(math)).to(p.dtype)
            move = finite if keep is None else finite & keep
            p.copy_(torch.where(move, new, p))

    def restore(self) -> None:
        for p, b in zip(self.plan.params, self.backup):
            p.copy_(b)
        self.backup = []

    def restore_sgd(self, grads, sgd) -> list[int]:
        plan = self.plan
        self.restore()
        made = []
        for i, (p, g_addr, group) in enumerate(zip(plan.params, grads, plan.groups)):
            if g_addr == 0:
                continue
            h = sgd[group]
            buf = plan.buffers[i] if h.momentum != 0 else None
            (buf,) = sgd_update_torch([p], [p.grad], [buf], h.lr, h.momentum, h.dampening, h.weight_decay,
                                      h.nesterov, h.maximize)
            if h.momentum != 0 and plan.buffers[i] is None:
                plan.buffers[i] = buf
                made.append(i)
        return made

    def buffers_changed(self) -> None:
        pass


_BACKENDS.register("torch", _ReferenceStep)
_BACKENDS.register("triton", lazy("ssam_kernels.triton_ops.sam_step", "TritonStep"))
_BACKENDS.register("ext", lazy("ssam_kernels.ext_ops", "ExtStep"))


def plan_backend(backend: str, device: torch.device) -> str | None:
    """The backend a plan would run with, or None where ``backend`` cannot run it here."""
    try:
        return _BACKENDS.resolve(backend, device)
    except BackendUnavailableError:
        return None
