"""SAM: ``e = rho * g / (||g|| + 1e-7)``, step at ``w + e``, then back to ``w`` and the base step.

Differences from the official code, all deliberate:

* ``second_step`` restores ``w`` bit-for-bit from a backup (the official ``w -= e`` drifts by
  rounding), and the backup holds only the perturbed values.
* A step that fails (the closure raises) leaves the weights as they were.
* Mixed precision, clipping and data parallelism are handled in the steps themselves
  (``grad_scaler=``, ``max_grad_norm=``, ``ascent(no_sync=)``), since each must act between
  the two passes, where a plain training loop cannot reach.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from fractions import Fraction
from typing import Callable, Iterable

import torch

import ssam_kernels
from ssam_kernels._checks import overlapping_pair
from ssam_kernels._host_loops import same_entries, same_values
from ssam_kernels.ops.sam_step import SGD_KEYS, PlanMismatch, SAMStepPlan, SGDGroup, check_sgd_groups, plan_backend

EPS = 1e-7


def _check_group(where: str, group: dict) -> None:
    """``group``'s own ``rho`` and ``adaptive`` (they may be set through ``param_groups``
    between steps, or come from a state_dict); ``where`` names it in the error."""
    for key in ("rho", "adaptive"):
        if key not in group:
            raise ValueError(f"{where} has no {key!r}")
    _check_rho(group["rho"], f"{where}['rho']")
    adaptive = group["adaptive"]
    if not isinstance(adaptive, bool):
        raise TypeError(f"{where}['adaptive'] must be a bool, got {type(adaptive).__name__}")


def _ascent_rho(group: dict) -> float:
    """The signed radius of a group's perturbation: ``-rho`` where its base optimizer maximizes
    (torch's ``maximize=True``), since the worst neighbour of a maximised objective lies against
    its gradient."""
    return -group["rho"] if group.get("maximize", False) else group["rho"]


def _check_rho(rho, name: str = "rho") -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(rho).__name__}")
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {rho!r}")
    return float(rho)


def _build_base(params: list, base_optimizer, base_kwargs: dict) -> torch.optim.Optimizer:
    """The base optimizer: the given instance (official SSAM convention) or ``cls(params, **kw)``."""
    if isinstance(base_optimizer, torch.optim.Optimizer):
        if base_kwargs:
            raise TypeError(
                f"base_optimizer is an optimizer instance, so keyword arguments {sorted(base_kwargs)} "
                "have nowhere to go; pass them when building it, or pass its class instead"
            )
        for i, item in enumerate(params):
            extra = sorted(k for k in item if k != "params") if isinstance(item, dict) else []
            if extra:
                raise ValueError(
                    f"params[{i}] sets {extra}, but base_optimizer is an optimizer instance, whose own "
                    "param_groups are used as they are: set these keys on the base optimizer's groups when "
                    "building it (rho and adaptive too), or pass its class instead"
                )
        ours = {id(p) for p in _flat_params(params)}
        theirs = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
        if ours != theirs:
            raise ValueError("base_optimizer must be built on the same parameters as the ones given here")
        return base_optimizer
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
        return base_optimizer(params, **base_kwargs)
    raise TypeError(
        "base_optimizer must be a torch.optim.Optimizer instance or subclass, got "
        f"{type(base_optimizer).__name__}"
    )


def _active_scaler(grad_scaler):
    """``grad_scaler`` if it is an enabled ``torch.amp.GradScaler``; None if None or disabled."""
    if grad_scaler is None:
        return None
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler or None, got {type(grad_scaler).__name__}")
    return grad_scaler if grad_scaler.is_enabled() else None


def _found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` found an inf or NaN: one host sync, as in
    ``GradScaler.step``. The per-device flags are the scaler's record of that unscale, the same
    ones its ``step`` and fused optimizers read."""
    return any(bool(flag.item()) for flag in scaler._found_inf_per_device(optimizer).values())


def _check_max_grad_norm(max_grad_norm) -> float | None:
    if max_grad_norm is None:
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise TypeError(f"max_grad_norm must be a real number or None, got {type(max_grad_norm).__name__}")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
    return float(max_grad_norm)


def _no_sync(module):
    """``module.no_sync()`` (a ``DistributedDataParallel`` model), or nothing for None."""
    if module is None:
        return contextlib.nullcontext()
    if not callable(getattr(module, "no_sync", None)):
        raise TypeError(
            f"no_sync must be a module with a no_sync() method (DistributedDataParallel), got {type(module).__name__}"
        )
    return module.no_sync()


def _check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"ascent_fraction must be a real number, got {type(fraction).__name__}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"ascent_fraction must be in (0, 1], got {fraction}")
    return float(fraction)


def _describe(x) -> str:
    return "a 0-dim tensor" if isinstance(x, torch.Tensor) else type(x).__name__


@contextlib.contextmanager
def _together(outer, inner):
    with outer, inner:
        yield


def _check_params(groups: list[dict], first: int = 0) -> None:
    """Every parameter is a floating tensor with data, once in its group (checked here, not at
    the first step; torch refuses a parameter in two groups itself). ``first``: the index of
    ``groups[0]`` in ``param_groups``."""
    for g, group in enumerate(groups, first):
        seen = set()
        for i, p in enumerate(group["params"]):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"param_groups[{g}]['params'][{i}] must be a tensor, got {type(p).__name__}")
            where = f"param_groups[{g}]['params'][{i}] (shape {tuple(p.shape)})"
            if id(p) in seen:
                raise ValueError(f"{where} appears twice in its group: it would be perturbed twice, and the "
                                 "restore would not return it to w")
            seen.add(id(p))
            if not p.is_floating_point():
                raise TypeError(f"{where} is {p.dtype}: SAM perturbs floating-point parameters only")
            if p.device.type == "meta":
                raise ValueError(f"{where} is on the meta device (no data): move the model to a real device first")


def _unnamed(item):
    """A parameter as torch's optimizers take it: a tensor, or a ``(name, tensor)`` pair."""
    return item[1] if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) else item


def _flat_params(params: list) -> list:
    """The parameters of ``params`` (tensors, ``(name, tensor)`` pairs, or groups of either)."""
    out = []
    for item in params:
        if isinstance(item, dict):
            group = item.get("params", [])
            out.extend(_unnamed(p) for p in ([group] if isinstance(group, torch.Tensor) else group))
        else:
            out.append(_unnamed(item))
    return out


# SAM's own keys in param_groups: a base optimizer with a hyper-parameter of one of these names
# (torch.optim.Adadelta's "rho") would share it with SAM
_SAM_KEYS = ("rho", "adaptive")


def _check_no_clash(base: torch.optim.Optimizer) -> None:
    clash = [k for k in _SAM_KEYS if k in base.defaults]
    if clash:
        raise ValueError(
            f"{type(base).__name__} has its own hyper-parameter {clash[0]!r} (default "
            f"{base.defaults[clash[0]]!r}), a name SAM uses for its param_groups[i][{clash[0]!r}]: the two "
            "would be one value. SAM cannot wrap this base optimizer"
        )


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around a base optimizer.

    Args:
        params: parameters (or ``(name, parameter)`` pairs) or parameter groups (a group may
            set its own ``rho``/``adaptive``; beside a base optimizer instance the groups hold
            ``params`` only: set other keys on the instance's groups).
        base_optimizer: an optimizer instance built on the same params, or an optimizer class
            constructed here with ``base_kwargs``. One with its own ``rho`` or ``adaptive``
            hyper-parameter (``torch.optim.Adadelta``) is refused: it would share SAM's key.
        rho: radius of the perturbation (>= 0; a group whose base optimizer maximizes,
            ``maximize=True``, is perturbed against its gradient, towards the worst neighbour of
            the objective it maximizes). ``rho=0`` follows the base optimizer exactly for
            fp32 and float64 parameters; for fp16/bf16 ones the fused SGD step (``fuse_sgd``)
            updates in fp32 and rounds once, where torch's SGD rounds after every op: within an
            ulp of it (``fuse_sgd=False``: exactly).
        adaptive: ASAM's scale-invariant perturbation ``e = rho * w^2 g / ||w g||``.
        fuse_sgd: when the base optimizer is plain ``torch.optim.SGD`` (not built with
            ``fused=True``: its own fused step then runs), ``second_step`` does
            the restore and the SGD update in one pass (the planned step's kernel, or
            ``ssam_kernels.restore_sgd_step_``) instead of calling ``base_optimizer.step()``;
            its momentum buffers stay in the base optimizer's state. Hooks registered on the
            base optimizer's ``step`` then do not run: pass False to keep them.
        ascent_fraction: in (0, 1]; the share of the batch whose gradient sets the
            perturbation (m-sharpness). The closure takes it with :meth:`batch`, which gives
            the first ``ceil(fraction * n)`` rows inside the ascent pass and the whole batch in
            the descent pass; the ascent pass then costs that fraction. 1 (the default): the
            paper's full-batch ascent. With ``first_step``/``second_step``, run the ascent
            forward/backward inside ``with opt.ascent():`` and take its rows there with
            ``opt.batch``; ``first_step`` raises a ``RuntimeError`` (weights untouched) when a
            fraction below 1 was set and the ascent pass did not call ``batch``.

    Use either ``loss.backward(); opt.step(closure)`` where ``closure`` recomputes the loss and
    calls ``backward()``, or ``first_step(zero_grad=True)``, a second forward/backward, then
    ``second_step()``. ``param_groups`` is the base optimizer's, so schedulers work on either.

    Steps run over an ``ssam_kernels.SAMStepPlan`` (3 launches, no host sync) wherever a kernel
    backend runs one for these parameters; otherwise over the per-list ops.

    Mixed precision: with fp16 and a ``torch.amp.GradScaler``, call ``scaler.scale(loss).backward()``
    in both passes and pass ``grad_scaler=scaler`` to both steps (or to ``step``); they unscale,
    skip the step where either pass has an inf/NaN gradient, and call ``scaler.update()``.
    """

    # plans refused (PlanMismatch) before completing a step, in a row; steps to run on the
    # per-list ops before the next plan; whole steps the current plan has completed (class
    # defaults: an optimizer pickled before they existed steps too)
    _plan_refusals = _plan_wait = _plan_steps = 0

    def __init__(self, params: Iterable, base_optimizer, rho: float = 0.05, adaptive: bool = False, *,
                 fuse_sgd: bool = True, ascent_fraction: float = 1.0, **base_kwargs):
        rho = _check_rho(rho)
        self.ascent_fraction = _check_fraction(ascent_fraction)
        for name, flag in (("adaptive", adaptive), ("fuse_sgd", fuse_sgd)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors or of parameter groups, not a tensor")
        params = list(params)
        if not params:
            raise ValueError("params is empty")
        base = _build_base(params, base_optimizer, base_kwargs)
        _check_no_clash(base)
        _check_params(base.param_groups)
        # the base optimizer's defaults too: schedulers read them (OneCycleLR and CyclicLR look
        # for ``momentum`` or ``betas`` there), as on davda54/sam
        super().__init__(base.param_groups, {**base.defaults, "rho": rho, "adaptive": adaptive})
        self.base_optimizer = base
        self.fuse_sgd = fuse_sgd
        self.param_groups = base.param_groups
        for i, group in enumerate(self.param_groups):
            group.setdefault("rho", rho)
            group.setdefault("adaptive", adaptive)
            _check_group(f"param_groups[{i}]", group)
        # (group, perturbed params, their backup) for each group, between the two steps
        self._pending: list[tuple[dict, list[torch.Tensor], ssam_kernels.PerturbBackup]] | None = None
        # between the steps: the GradScaler of first_step, and whether the step is skipped
        # (inf/NaN in the ascent gradient: nothing was perturbed and nothing will be stepped)
        self._scaler: torch.amp.GradScaler | None = None
        self._skipped = False
        self._in_ascent = False  # inside the ascent pass: batch() takes the ascent fraction
        self._ascent_batched = False  # batch() ran in this step's ascent pass
        # the planned step (ssam_kernels.SAMStepPlan): made on first use, again after
        # _invalidate_plan(); None where the planned path does not apply
        self._plan: SAMStepPlan | None = None
        self._plan_made = False
        self._captured_plans: list[SAMStepPlan] = []  # replaced plans a CUDA graph captured: kept for it
        self._plan_adaptive = False  # whether a group was adaptive when the plan (or its absence) was decided
        self._skips_before = None  # skipped steps counted by plans made before this one (device)
        self._skips_unplanned = None  # and by steps over the per-list ops (device)
        # the base optimizer's state the plan's momentum buffers were taken from: (its state
        # dict, each plan parameter's entry in it, its length), None until they are
        self._plan_buffers_synced: tuple | None = None
        # the fused step's hyper-parameters, last checked, and the param_groups values they came from
        self._sgd_checked: tuple[SGDGroup, ...] | None = None
        self._sgd_values: tuple | None = None

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the base optimizer (so its defaults such as ``lr`` apply) and to SAM."""
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__ on our own copy
            return super().add_param_group(param_group)
        if self._pending is not None:
            raise RuntimeError("add_param_group() between first_step() and second_step()")
        self._follow_base_groups()  # (a load_state_dict on the base optimizer: the group goes to its new list)
        param_group = self._checked_new_group(param_group)  # (raises before anything is added)
        self._invalidate_plan()
        self.base_optimizer.add_param_group(param_group)
        group = self.base_optimizer.param_groups[-1]
        for key, default in self.defaults.items():
            group.setdefault(key, default)

    def _checked_new_group(self, param_group) -> dict:
        """A copy of ``param_group`` with its params in a list, checked as the constructor checks
        its groups (``rho``, ``adaptive``, the parameters)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group.get("params")
        if isinstance(params, set) or params is None:
            raise TypeError("param_group['params'] must be a tensor or an ordered collection of tensors")
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        if any(isinstance(p, tuple) for p in group["params"]):  # (name, tensor) pairs, as torch takes them
            if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in group["params"]):
                raise TypeError("param_group['params'] must be all tensors or all (name, tensor) pairs")
            group["param_names"] = [name for name, _ in group["params"]]
            group["params"] = [p for _, p in group["params"]]
        _check_group("param_group", {key: group.get(key, self.defaults[key]) for key in ("rho", "adaptive")})
        _check_params([group], first=len(self.param_groups))
        return group

    # --- masks (SAM perturbs everything; sparse variants override) --------------------------

    def _mask(self, p: torch.Tensor):
        """The mask of ``p`` as passed to the backend: None (all), bool tensor or BitMask."""
        return None

    def _norm_masked(self) -> bool:
        """Whether the norm is over ``g * m`` (True) or over all of ``g`` (the paper)."""
        return False

    def _unperturbed_backup(self, p: torch.Tensor):
        """``(values, mask)`` standing for "nothing of ``p`` was perturbed", for a parameter
        that got no gradient in the ascent pass, so the fused SGD step can still take it; None
        where there is no such mask (SAM perturbs every parameter with a gradient)."""
        return None

    def ascent(self, *, no_sync=None):
        """Context manager around the ascent forward/backward (the pass at ``w`` whose gradient
        sets the perturbation). SAM's ascent pass is ordinary autograd.

        ``no_sync``: a ``DistributedDataParallel`` model whose gradient all-reduce is skipped in
        this pass (``model.no_sync()``). Each rank then perturbs along its own gradient
        (m-sharpness with m = the per-rank batch): one all-reduce of the gradients fewer per
        step, and a perturbation that differs from rank to rank. The descent pass still
        all-reduces, and ``second_step`` returns every rank to the same ``w``, so the weights
        stay identical across ranks."""
        return _together(self._ascending(), _no_sync(no_sync))

    @contextlib.contextmanager
    def _ascending(self):
        if self._in_ascent:
            raise RuntimeError("the ascent pass is already running (ascent() entered twice)")
        if self._pending is not None:
            raise RuntimeError("ascent() between first_step() and second_step(): the pass at w + e is the descent pass")
        self._in_ascent = True
        self._ascent_batched = False  # this pass's own record
        try:
            yield
        except BaseException:
            self._ascent_batched = False  # a failed pass took no rows the next first_step may use
            raise
        finally:
            self._in_ascent = False

    def batch(self, *tensors: torch.Tensor):
        """The rows of a batch that the current pass uses: inside the ascent pass with
        ``ascent_fraction < 1``, the first ``ceil(ascent_fraction * n)`` along dim 0 of each
        tensor; otherwise the tensors themselves. One tensor in: one out; several: a tuple::

            def closure():
                xb, yb = opt.batch(x, y)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss
        """
        if not tensors:
            raise TypeError("batch() needs at least one tensor")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                raise TypeError(f"batch() takes tensors with a batch dim; argument {i} is {_describe(t)}")
        sizes = {t.shape[0] for t in tensors}
        if len(sizes) > 1:
            raise ValueError(f"batch() needs tensors of one batch size (dim 0), got {sorted(sizes)}")
        if self._in_ascent:
            self._ascent_batched = True
        if self._in_ascent and self.ascent_fraction < 1.0:
            # the fraction as written (0.07 of 100 rows is 7, not ceil(7.000000000000001) = 8)
            rows = max(1, math.ceil(Fraction(repr(self.ascent_fraction)) * sizes.pop()))
            tensors = tuple(t[:rows] for t in tensors)
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    @property
    def perturbed(self) -> bool:
        """True between ``first_step`` and ``second_step``: the weights are at ``w + e``. A
        closure can use it to leave BatchNorm statistics alone in the second pass
        (:func:`ssam.frozen_batchnorm_stats`)."""
        return self._pending is not None and not self._skipped

    # --- the two steps -----------------------------------------------------------------------

    def _check_strided_grads(self) -> None:
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise TypeError(f"param_groups[{g}]['params'][{i}] (shape {tuple(p.shape)}) has a {p.grad.layout} "
                                    f"gradient: {type(self).__name__} takes dense (strided) gradients, e.g. "
                                    "nn.Embedding(sparse=False)")

    def _follow_base_groups(self) -> None:
        """Share the base optimizer's ``param_groups`` again where its ``load_state_dict`` (called
        on it directly) replaced them with a new list: SAM's keys carried over by position where
        the loaded groups lack them, the plan made anew."""
        groups = self.base_optimizer.param_groups
        if groups is self.param_groups:
            return
        for i, group in enumerate(groups):
            for key in _SAM_KEYS:
                group.setdefault(key, self.param_groups[i][key] if i < len(self.param_groups) else self.defaults[key])
        self.param_groups = groups
        self._invalidate_plan()

    def _with_grads(self) -> list[tuple[dict, list[torch.Tensor]]]:
        self._check_strided_grads()
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        if not any(ps for _, ps in groups):
            raise ValueError(
                f"no parameter has a gradient: call loss.backward() before {type(self).__name__}.first_step()/step()"
            )
        return [(g, ps) for g, ps in groups if ps]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Move to ``w + e`` (only masked entries for sparse variants), remembering ``w``.

        ``grad_scaler``: the ``GradScaler`` that scaled this pass's loss. The gradients are
        unscaled first; if one holds an inf or NaN, nothing is perturbed and the step is
        skipped (``second_step`` then only unscales, restores and updates the scaler)."""
        if self._pending is not None:
            raise RuntimeError("first_step() called twice without second_step() in between")
        self._follow_base_groups()
        scaler = _active_scaler(grad_scaler)
        for i, group in enumerate(self.param_groups):  # (rho, adaptive may be set through param_groups between steps)
            _check_group(f"param_groups[{i}]", group)
        batched, self._ascent_batched = self._ascent_batched, False
        if self.ascent_fraction < 1.0 and not batched:
            # otherwise the option would silently do nothing
            raise RuntimeError(
                f"ascent_fraction={self.ascent_fraction:g}, but the ascent pass did not take its rows with "
                "opt.batch(...) inside opt.ascent() (or inside the closure that step() runs first)"
            )
        if scaler is not None:
            self._with_grads()
            scaler.unscale_(self.base_optimizer)  # the ascent pass's record; second_step's is under self
            if _found_inf(scaler, self.base_optimizer):
                self._pending, self._scaler, self._skipped = [], scaler, True
                if zero_grad:
                    self.zero_grad()
                return
        plan = self._step_plan()
        if plan is not None:
            try:
                grads = plan.grad_addresses()
            except PlanMismatch:
                self._plan_refused()
                plan = None
            except RuntimeError:  # a gradient without storage to address (a sparse one): said below
                self._check_strided_grads()
                raise
        if plan is not None:
            if not any(grads):
                raise ValueError(f"no parameter has a gradient: call loss.backward() before "
                                 f"{type(self).__name__}.first_step()/step()")
            try:
                plan.perturb([_ascent_rho(g) for g in self.param_groups], grads=grads)
            except PlanMismatch:  # a mask's bits written in place: nothing perturbed; the per-list ops read them
                self._plan_refused()
                plan = None
            except BaseException:  # (nothing perturbed) the scaler's unscale_ above is undone by an update
                if scaler is not None:
                    scaler.update()
                raise
        if plan is not None:
            self._pending, self._scaler, self._skipped = _Planned(plan), scaler, False
            if zero_grad:
                self.zero_grad()
            return
        masked_norm = self._norm_masked()
        norm_inputs, norm_masks, plans = [], [], []
        for group, params in self._with_grads():
            grads = [p.grad for p in params]
            masks = [self._mask(p) for p in params]
            if group["adaptive"]:
                norm_inputs += [p.abs() * g for p, g in zip(params, grads)]
                directions = [p * p * g for p, g in zip(params, grads)]
            else:
                norm_inputs += grads
                directions = grads
            norm_masks += masks if masked_norm else [None] * len(params)
            plans.append((group, params, directions, masks))
        norm = ssam_kernels.grad_norm(norm_inputs, norm_masks)
        # an inf or NaN in the ascent gradient perturbs nothing, decided on the device (no sync):
        # a zero scale, and zero directions (0 * inf would be NaN); counted for skipped_steps()
        finite = torch.isfinite(norm)
        if self._skips_unplanned is not None and self._skips_unplanned.device == finite.device:
            self._skips_unplanned.add_(~finite)  # in place: a captured CUDA graph's replays count too
        else:
            earlier = 0 if self._skips_unplanned is None else self._skips_unplanned.to(finite.device)
            self._skips_unplanned = (~finite).long() + earlier
        pending = []
        try:
            for group, params, directions, masks in plans:
                scale = torch.where(finite, _ascent_rho(group) / (norm + EPS), 0.0)
                directions = [torch.where(finite, d, torch.zeros((), dtype=d.dtype, device=d.device))
                              for d in directions]
                pending.append((group, params, ssam_kernels.perturb_(params, directions, masks, scale)))
        except BaseException:
            self._restore(pending)
            if scaler is not None:
                scaler.update()
            raise
        self._pending, self._scaler, self._skipped = pending, scaler, False
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, grad_scaler: torch.amp.GradScaler | None = None,
                    max_grad_norm: float | None = None) -> None:
        """Return to ``w`` exactly and take the base optimizer's step with the current grads.

        Args:
            grad_scaler: the ``GradScaler`` given to ``first_step`` (both or neither). The
                gradients are unscaled; if this pass or the ascent pass had an inf or NaN, the
                weights are restored and not stepped. Then ``grad_scaler.update()`` is called:
                this replaces ``scaler.step(opt); scaler.update()``, so each SAM optimizer
                needs a scaler of its own. A ``scaler.unscale_(opt)`` or ``scaler.update()``
                called between the passes raises ``RuntimeError``, the weights back at ``w``.
            max_grad_norm: clip the descent gradient to this total norm (after unscaling)
                before the base step, with ``torch.nn.utils.clip_grad_norm_``.
        """
        if self._pending is None:
            raise RuntimeError("second_step() called without a preceding first_step()")
        try:  # bad input: back to w before raising
            max_grad_norm = _check_max_grad_norm(max_grad_norm)
            scaler = _active_scaler(grad_scaler)
            if scaler is not self._scaler:
                raise ValueError(
                    "grad_scaler must be the GradScaler given to first_step() (or None in both): "
                    f"first_step got {'one' if self._scaler is not None else 'none'}, second_step got "
                    f"{'none' if scaler is None else 'another' if self._scaler is not None else 'one'}"
                )
        except (TypeError, ValueError):
            self.restore()
            raise
        if scaler is not None:
            records = getattr(scaler, "_per_optimizer_states", None)  # (private: skipped if a torch lacks it)
            if records is not None and id(self.base_optimizer) not in records:
                # first_step's unscale record is gone: the scaler was updated between the passes
                # (an update resets the records); a second update here would count this step twice
                self._scaler = None
                self.restore()
                raise RuntimeError("the GradScaler was updated between first_step() and second_step(): by "
                                   "scaler.update(), or by another optimizer's second_step() (each SAM optimizer needs "
                                   "a GradScaler of its own); second_step(grad_scaler=...) updates it itself (the "
                                   "weights are back at w)")
            try:
                scaler.unscale_(self)
                found_inf = self._skipped or _found_inf(scaler, self)
            except RuntimeError as exc:  # back to w before raising
                self.restore()
                if "unscale_() has already been called" in str(exc):  # scaler.unscale_(opt) by hand
                    raise RuntimeError(f"{exc} second_step(grad_scaler=...) unscales the gradients itself: to clip "
                                       "them, pass max_grad_norm= instead (the weights are back at w)") from exc
                raise
            except BaseException:
                self.restore()
                raise
            if found_inf:
                self.restore()  # updates the scaler: the skip backs the scale off
                if zero_grad:
                    self.zero_grad()
                return
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.param_groups for p in g["params"] if p.grad is not None], max_grad_norm
            )
        fuse = self._can_fuse_sgd()
        try:  # hyper-parameters set through param_groups since the last step: back to w before raising
            sgd = self._sgd_groups() if fuse else None
        except ValueError:
            self.restore()
            raise
        pending, self._pending = self._pending, None
        left = pending  # what is still perturbed, should a step below fail
        try:
            if fuse and isinstance(pending, _Planned):
                try:
                    self._planned_sgd_step(pending.plan, sgd)
                except PlanMismatch:  # a gradient laid out unlike its parameter: the unfused step below
                    self._plan_refused()
                    fuse = False
            elif fuse:
                left = list(pending)
                self._fused_sgd_step(left)
            if not fuse:
                self._restore(pending)
                left = None
                self._plan_buffers_synced = None  # torch's SGD may make or replace momentum buffers
                self.base_optimizer.step()
            if isinstance(pending, _Planned) and pending.plan is self._plan:  # (not refused above)
                self._plan_steps += 1
        except BaseException:
            if left is not None:
                self._restore(left)
            self._end_scaler_iteration()
            raise
        # an optimizer step was taken: what torch's LR schedulers look for on the optimizer they
        # were built on (they watch `step`, which the two-step API and the fused path do not call)
        self._opt_called = self.base_optimizer._opt_called = True
        self._end_scaler_iteration()
        if zero_grad:
            self.zero_grad()

    def _sgd_groups(self) -> tuple[SGDGroup, ...]:
        """Each group's SGD hyper-parameters for the fused step, checked (``ValueError`` for
        what torch's SGD constructor refuses) and made once per change of their values: the
        same tuple while they hold, which the plan then takes without comparing."""
        values = tuple(tuple(g.get(k, False) for k in SGD_KEYS) for g in self.param_groups)
        if values != self._sgd_values:
            sgd = tuple(SGDGroup(*v[:4], bool(v[4]), bool(v[5])) for v in values)  # (flags read as torch's SGD reads them)
            check_sgd_groups(sgd, len(sgd))
            self._sgd_values, self._sgd_checked = values, sgd
        return self._sgd_checked

    def _end_scaler_iteration(self) -> None:
        """``update()`` the scaler of this step, so it is ready for the next one."""
        scaler, self._scaler, self._skipped = self._scaler, None, False
        if scaler is not None:
            scaler.update()

    _SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay")

    def _can_fuse_sgd(self) -> bool:
        """Restore + SGD in one pass when the base optimizer is plain ``torch.optim.SGD`` with
        number hyper-parameters and not ``fused=True``, and every parameter with a gradient now was perturbed or has a
        known empty perturbation (see ``_unperturbed_backup``)."""
        if not self.fuse_sgd or type(self.base_optimizer) is not torch.optim.SGD:
            return False
        for group in self.param_groups:
            # fused=True: torch's own fused step, which rounds unlike ours (rho=0 would not follow it)
            if group.get("differentiable") or group.get("fused") or any(
                isinstance(group[k], bool) or not isinstance(group[k], (int, float)) for k in self._SGD_KEYS
            ):
                return False
        if isinstance(self._pending, _Planned):  # the plan's backend has the fused kernel
            return True
        if not self._fast_fused_sgd(self._pending[0][1][0].device if self._pending and self._pending[0][1] else None):
            return False
        perturbed = {id(p) for _, params, _ in self._pending for p in params}
        return all(
            id(p) in perturbed or self._unperturbed_backup(p) is not None
            for g in self.param_groups for p in g["params"] if p.grad is not None
        )

    @staticmethod
    def _fast_fused_sgd(device: torch.device | None) -> bool:
        """Whether ``restore_sgd_step_`` has a kernel here. Its reference backend is a loop over
        tensors, slower than ``restore_`` followed by torch's own (foreach) SGD step, measured
        on CPU with ``ssam-bench overhead``; so without a kernel the step is not fused."""
        if device is None:
            return True
        return ssam_kernels.auto_backend("restore_sgd_step_", device) != "torch"

    def _fused_sgd_step(self, pending: list) -> None:
        """Restore + SGD per group over the per-list ops; each group's entry leaves ``pending``
        once stepped (what is left there is still perturbed, should a group fail)."""
        state = self.base_optimizer.state
        by_group = {id(entry[0]): entry for entry in pending}
        for group in self.param_groups:
            entry = by_group.get(id(group))
            _, params, backup = entry if entry is not None else (group, [], ssam_kernels.PerturbBackup([], []))
            params, backup = list(params), ssam_kernels.PerturbBackup(list(backup.values), list(backup.masks))
            perturbed = {id(p) for p in params}
            for p in group["params"]:  # stepped now, not perturbed (no gradient in the ascent pass)
                if p.grad is not None and id(p) not in perturbed:
                    values, mask = self._unperturbed_backup(p)
                    params.append(p)
                    backup.values.append(values)
                    backup.masks.append(mask)
            stepped = [i for i, p in enumerate(params) if p.grad is not None]
            idle = [i for i, p in enumerate(params) if p.grad is None]
            if idle:  # perturbed but no gradient in the second pass: only put back
                ssam_kernels.restore_([params[i] for i in idle], _sub_backup(backup, idle))
            if stepped:
                ps = [params[i] for i in stepped]
                buffers = ssam_kernels.restore_sgd_step_(
                    ps, [p.grad for p in ps], [state[p].get("momentum_buffer") for p in ps],
                    _sub_backup(backup, stepped), lr=group["lr"], momentum=group["momentum"],
                    dampening=group["dampening"], weight_decay=group["weight_decay"], nesterov=bool(group["nesterov"]),
                    maximize=bool(group.get("maximize", False)),  # (read truthily, as torch's SGD reads them)
                )
                if group["momentum"] != 0:
                    for p, b in zip(ps, buffers):
                        state[p]["momentum_buffer"] = b
            if entry is not None:
                pending.remove(entry)

    def _planned_sgd_step(self, plan: SAMStepPlan, sgd: tuple[SGDGroup, ...]) -> None:
        """Restore + SGD over the plan (one launch per weight dtype); the momentum buffers the
        step made join the base optimizer's state, where torch's SGD keeps them."""
        state = self.base_optimizer.state
        if not self._buffers_in_sync(plan, state):
            plan.set_buffers([_laid_out_like(state[p].get("momentum_buffer"), p) for p in plan.params])
            entries = [state[p] for p in plan.params]
            for entry, buf in zip(entries, plan.buffers):
                if buf is not None:
                    entry["momentum_buffer"] = buf
            self._plan_buffers_synced = (state, entries, list(state.values()))
        made = plan.restore_sgd(sgd)
        entries = self._plan_buffers_synced[1]
        for i in made:
            entries[i]["momentum_buffer"] = plan.buffers[i]

    def _buffers_in_sync(self, plan: SAMStepPlan, state) -> bool:
        """Whether the plan's momentum buffers are still the base optimizer's: the same state
        dict (``base_optimizer.load_state_dict`` makes a new one), the same entries in it (none
        replaced, ``state[p] = {}``, added or removed, ``clear()``; read in the dict's order,
        so no parameter is hashed) and every buffer the same tensor (one replaced by hand)."""
        synced = self._plan_buffers_synced
        if synced is None or synced[0] is not state or not same_values(state, synced[2]):
            return False
        return same_entries(synced[1], "momentum_buffer", plan.buffers)

    # --- the planned step ---------------------------------------------------------------------

    def _step_plan(self) -> SAMStepPlan | None:
        """The plan of this optimizer's step (made on first use and after anything it rests on
        changed), or None where the planned path does not apply: an adaptive group, parameters
        on several devices or not dense in memory, or no kernel for it on this device (the
        reference backend is not faster than the per-list ops), or gradients of another dtype
        than their parameters (``Tensor.grad_dtype``: the plan's kernels read a gradient in its
        parameter's dtype; a plan made and refused at every step would cost a plan a step)."""
        adaptive = any(g["adaptive"] for g in self.param_groups)  # (may be set through param_groups)
        if self._plan_made and adaptive == self._plan_adaptive:
            return self._plan
        self._invalidate_plan(backoff=True)
        # plans refused in a row: the per-list ops a while (see _plan_refused); not into a CUDA
        # graph, which would replay the per-list ops for good
        if self._plan_wait and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            self._plan_wait -= 1
            return None
        self._plan_steps = 0
        self._plan_made, self._plan_adaptive = True, adaptive
        params = [p for g in self.param_groups for p in g["params"]]
        shared = overlapping_pair(params)  # (weight tying by two Parameter objects over one tensor)
        if shared is not None:  # each would be perturbed and restored as if alone: wrong weights
            raise ValueError(f"{type(self).__name__}: parameters {shared[0]} and {shared[1]} (counted across "
                             "param_groups) share memory; give a tied weight once")
        if not params or adaptive:
            return None
        if any(getattr(p, "grad_dtype", p.dtype) not in (p.dtype, None) for p in params):  # (torch >= 2.12)
            return None
        device = params[0].device
        backend = plan_backend("auto", device)
        if backend in (None, "torch") or any(p.device != device for p in params):
            return None
        masks = [self._mask(p) for p in params]
        groups = [i for i, g in enumerate(self.param_groups) for _ in g["params"]]
        try:
            self._plan = SAMStepPlan(params, masks, groups=groups, num_groups=len(self.param_groups),
                                     masked_norm=self._norm_masked(), eps=EPS, backend=backend)
        except ValueError:  # a parameter that no permutation makes contiguous
            return None
        return self._plan

    def _plan_refused(self) -> None:
        """The plan refused a step (``PlanMismatch``: something it rests on changed): made anew
        for a later one. Where plans are refused before they complete a step, again and again
        (a gradient the plan cannot read that stays so, e.g. of another dtype under
        ``grad_dtype=None``), the next is made after 1, 2, 4 ... up to 256 steps on the per-list
        ops: a lasting mismatch costs a plan now and then, not one a step."""
        refusals = self._plan_refusals + 1 if self._plan_steps == 0 else 1
        self._invalidate_plan(backoff=True)
        self._plan_refusals, self._plan_wait = refusals, 0 if refusals == 1 else min(2 ** (refusals - 2), 256)

    def _invalidate_plan(self, backoff: bool = False) -> None:
        """Something the plan rests on changed (parameters, masks, state): make it anew at the
        next step (its count of skipped steps carried over, on the device). Unless ``backoff``
        (a refusal, or the plan's own remaking), the refusals' count and wait start over: the
        change may have removed their cause."""
        if not backoff:
            self._plan_refusals = self._plan_wait = 0
        if self._plan is not None:
            if self._plan.captured:
                # a CUDA graph replays its kernels, which read the plan's tables and buffers:
                # freed, their memory would be reused under the graph (and its count of skipped
                # steps, read live, goes on with the replays)
                self._captured_plans.append(self._plan)
                warnings.warn(f"{type(self).__name__}: the step plan a CUDA graph captured is replaced (masks, "
                              "parameters or state changed): that graph replays the old plan; capture it again. The "
                              "old plan stays allocated for it until forget_captured_plans()", stacklevel=3)
            else:
                self._count_skips_of(self._plan)
        self._plan, self._plan_made, self._plan_buffers_synced = None, False, None

    def _count_skips_of(self, plan: SAMStepPlan) -> None:
        """Carry a plan's count of skipped steps over to the optimizer's (on the device)."""
        count = plan.skipped
        self._skips_before = count.clone() if self._skips_before is None else self._skips_before + count

    def forget_captured_plans(self) -> None:
        """Free the step plans that CUDA graphs captured before they were replaced (kept so those
        graphs never replay on freed memory): call it once those graphs are deleted."""
        for plan in self._captured_plans:
            self._count_skips_of(plan)
        self._captured_plans.clear()

    def skipped_steps(self) -> int:
        """How many steps had an ascent gradient whose norm was not finite (an inf or NaN) and so
        perturbed nothing (the device decides, without a host sync; reading this count is one).
        The descent step still runs (with a ``GradScaler``, an inf skips the whole step instead,
        and is not counted here)."""
        counts = [self._skips_before, self._skips_unplanned, None if self._plan is None else self._plan.skipped]
        counts += [plan.skipped for plan in self._captured_plans]
        return sum(int(c) for c in counts if c is not None)

    @torch.no_grad()
    def restore(self) -> None:
        """Undo a ``first_step`` without stepping (e.g. when the second pass failed). A
        ``GradScaler`` given to ``first_step`` is updated, so the next step can use it."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._restore(pending)
            self._end_scaler_iteration()

    @staticmethod
    def _restore(pending) -> None:
        if isinstance(pending, _Planned):
            if pending.plan.perturbed:
                pending.plan.restore()
            return
        for _, params, backup in reversed(pending):
            ssam_kernels.restore_(params, backup)

    @torch.no_grad()
    def step(self, closure: Callable | None = None, model=None, epoch=None, batch_idx=None,
             train_data=None, logger=None, step=None, *, grad_scaler: torch.amp.GradScaler | None = None,
             max_grad_norm: float | None = None):
        """One SAM step. ``closure`` must recompute the loss and call ``backward()`` (with a
        ``grad_scaler``: ``grad_scaler.scale(loss).backward()``). The gradient at ``w`` is the
        one in ``.grad``; where no parameter has one (after ``zero_grad()``), the closure runs
        first for it, inside :meth:`ascent` (zero gradients left by
        ``zero_grad(set_to_none=False)`` count as that gradient: nothing is perturbed). Then the
        closure runs at ``w + e`` (grad enabled).
        Returns what the last closure call returned. If a closure raises, ``w`` is as it was.
        ``grad_scaler`` and ``max_grad_norm`` are as in :meth:`first_step` / :meth:`second_step`.

        The other arguments are the official training loop's; SAM accepts and ignores them so
        that loop runs unchanged with any of the three optimizers."""
        closure = self._check_step_args(closure, grad_scaler, max_grad_norm)
        self._ascent_pass(closure)
        self.first_step(zero_grad=True, grad_scaler=grad_scaler)
        loss = self._second_pass(closure)
        self.second_step(grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        return loss

    def _ascent_pass(self, closure, dense: bool = False) -> None:
        """When no parameter has a gradient yet, run ``closure`` for the ascent pass, inside
        :meth:`ascent` (or densely)."""
        if any(p.grad is not None for g in self.param_groups for p in g["params"]):
            return
        with torch.enable_grad(), (self._ascending() if dense else self.ascent()):
            closure()

    def _check_step_args(self, closure, grad_scaler, max_grad_norm):
        """``step()``'s own arguments, checked before anything runs; returns the closure."""
        _active_scaler(grad_scaler)
        _check_max_grad_norm(max_grad_norm)
        return self._check_closure(closure)

    def _check_closure(self, closure):
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step() needs a closure that recomputes the loss and calls backward(); "
                "or call first_step() and second_step() yourself"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        return closure

    def _second_pass(self, closure):
        try:
            with torch.enable_grad():
                return closure()
        except BaseException:
            self.restore()
            raise

    # --- state -------------------------------------------------------------------------------

    def _extra_state(self) -> dict:
        return {"skipped_steps": self.skipped_steps()}  # (one host sync: state_dict is not per step)

    def _check_extra_state(self, state: dict) -> None:
        """Raise ``ValueError`` where ``state`` (a state_dict's ``"extra"``) does not fit."""
        if not isinstance(state, dict):
            raise ValueError(f"state_dict['extra'] must be a dict, got {type(state).__name__}")
        skipped = state.get("skipped_steps", 0)  # (absent from state_dicts saved before it was kept)
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"state_dict['extra']['skipped_steps'] must be an int >= 0, got {skipped!r}")

    def _load_extra_state(self, state: dict) -> None:
        """Load ``state``, which :meth:`_check_extra_state` accepted."""
        if "skipped_steps" in state:
            # the plans kept for captured graphs count on, live: only what they count from now on adds
            live = sum((plan.skipped.cpu() for plan in self._captured_plans), torch.tensor(0))
            self._skips_before, self._skips_unplanned = torch.tensor(state["skipped_steps"]) - live, None

    def state_dict(self) -> dict:
        """``{"sam": torch's Optimizer.state_dict() of this optimizer (its groups' rho and
        adaptive), "base_optimizer": the base optimizer's, "extra": counters (skipped steps;
        SSAM: masks, mask updates, generator states)}``. Refused between ``first_step`` and
        ``second_step``."""
        if self._pending is not None:
            raise RuntimeError("state_dict() between first_step() and second_step() would save perturbed weights' state")
        return {
            "sam": super().state_dict(),
            "base_optimizer": self.base_optimizer.state_dict(),
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` saved, checked first (groups' ``rho`` / ``adaptive``,
        counters, masks): a ``ValueError`` / ``TypeError`` leaves the optimizer as it was."""
        if not isinstance(state_dict, dict) or not {"sam", "base_optimizer"} <= set(state_dict):
            raise ValueError(f"not a {type(self).__name__} state_dict (needs keys 'sam' and 'base_optimizer')")
        if self._pending is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        extra = state_dict.get("extra", {})
        self._check_extra_state(extra)  # (before anything is loaded)
        groups = state_dict["sam"].get("param_groups") if isinstance(state_dict["sam"], dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise ValueError("state_dict['sam']['param_groups'] must be a list of dicts")
        for i, group in enumerate(groups):
            _check_group(f"state_dict['sam']['param_groups'][{i}]", group)
        base_part = state_dict["base_optimizer"]  # (torch's load reads it with dict methods: an AttributeError)
        if not (isinstance(base_part, dict) and isinstance(base_part.get("state"), dict)
                and isinstance(base_part.get("param_groups"), list)
                and all(isinstance(g, dict) for g in base_part["param_groups"])):
            raise ValueError("state_dict['base_optimizer'] must be a base optimizer's state_dict (a dict with a dict "
                             "'state' and a list of dicts 'param_groups')")
        ours, base = super().state_dict(), self.base_optimizer.state_dict()  # to go back to, should a load fail
        try:
            self._load_states(state_dict["sam"], state_dict["base_optimizer"])
        except BaseException:
            self._load_states(ours, base)
            raise
        self._invalidate_plan()
        self._load_extra_state(extra)

    def _load_states(self, ours: dict, base: dict) -> None:
        super().load_state_dict(ours)
        self.base_optimizer.load_state_dict(base)
        # Both loads replace their param_groups lists; share the base optimizer's again.
        self.param_groups = self.base_optimizer.param_groups
        for group, saved in zip(self.param_groups, ours["param_groups"]):
            for key in ("rho", "adaptive"):
                group[key] = saved[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_optimizer={type(self.base_optimizer).__name__}, rho={self.defaults['rho']})"

    # --- copy.deepcopy and pickle ----------------------------------------------------------------

    def __getstate__(self) -> dict:
        """Everything but what is rebuilt at the next step: the step plan (device tables of
        these parameters' addresses), the plans CUDA graphs captured (their count of skipped
        steps carried over) and the hooks (as torch's optimizers drop them). Between
        ``first_step`` and ``second_step`` the weights are perturbed: refused there."""
        if self._pending is not None or self._in_ascent:
            raise RuntimeError(f"copying or pickling a {type(self).__name__} between first_step() and second_step() "
                               "(or inside its ascent pass) would copy perturbed weights' state")
        cls = type(self)
        # (an instance attribute over a method is a wrapper made for this object, such as the
        # one an LR scheduler puts over `step`: it would step the original)
        state = {k: v for k, v in self.__dict__.items()
                 if not (k.startswith("_optimizer_") and k.endswith("_hooks")) and not callable(getattr(cls, k, None))}
        state.update(_plan=None, _plan_made=False, _plan_buffers_synced=None, _captured_plans=[],
                     _plan_refusals=0, _plan_wait=0, _plan_steps=0,
                     _sgd_checked=None, _sgd_values=None, _skips_unplanned=None,
                     _skips_before=torch.tensor(self.skipped_steps()))  # (one host sync: not per step)
        return state  # (torch's __setstate__ makes the hooks' dicts anew and wraps step)


def _sub_backup(backup: ssam_kernels.PerturbBackup, index: list[int]) -> ssam_kernels.PerturbBackup:
    if len(index) == len(backup.values):
        return backup
    return ssam_kernels.PerturbBackup([backup.values[i] for i in index], [backup.masks[i] for i in index])


class _Planned:
    """The pending state of a first step taken over a plan (the plan holds the backup)."""

    __slots__ = ("plan",)

    def __init__(self, plan: SAMStepPlan):
        self.plan = plan

    def __bool__(self) -> bool:
        return True


def _laid_out_like(buf: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor | None:
    """A momentum buffer with its parameter's memory layout (a copy where it has another). One
    shaped otherwise is refused, as torch's SGD refuses it (a copy would broadcast it)."""
    if buf is None:
        return buf
    if not isinstance(buf, torch.Tensor) or buf.shape != p.shape:
        what = f"shape {tuple(buf.shape)}" if isinstance(buf, torch.Tensor) else f"a {type(buf).__name__}"
        raise ValueError(f"base_optimizer.state[p]['momentum_buffer'] is {what}, its parameter p a tensor of shape "
                         f"{tuple(p.shape)}: a momentum buffer is shaped like its parameter")
    if buf.stride() == p.stride() and buf.dtype == p.dtype and buf.device == p.device:
        return buf
    return torch.empty_like(p).copy_(buf)
