"""SSAM-F: Sparse SAM whose mask keeps the entries of highest empirical Fisher information."""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from .distributed import all_reduce_sum_, world
from .budget import costs_from_state, costs_state, measure_costs
from .fisher import check_data, draw_samples, empirical_fisher
from .sparse import SparseSAM, check_logger, check_positive_int
from .structure import select_mask


class SSAMF(SparseSAM):
    """Sparse SAM with a Fisher-information mask (SSAM-F).

    Args:
        params, base_optimizer, rho, adaptive, fuse_sgd, ascent_fraction, **base_kwargs: as
            :class:`ssam.SAM`.
        sparsity: fraction of entries *not* perturbed, in [0, 1). With an ``"N:M"`` structure
            it is implied (1 - N/M): pass None or that value.
        num_samples: samples in the empirical Fisher (>= 1).
        update_freq: recompute the mask every ``update_freq`` epochs (official convention).
        structure: ``"unstructured"``, ``"N:M"`` (groups along the input dim), ``"N:M:out"``
            (along the output dim: what the 2:4 sparse GEMM modes need), ``"tensor"`` or
            ``"budget"`` (see :mod:`ssam.structure`). ``"budget"``: whole rows at or above a
            depth, the most Fisher mass whose exact ascent pass costs at most the paper's FLOPs column at this
            sparsity (:mod:`ssam.budget`); cheaper only with ``ascent_backward="exact"``. The
            model's FLOPs are measured once, on one sample, at the first :meth:`update_mask`.
        norm: ``"full"`` (paper: ``||g||``) or ``"masked"`` (``||g * m||``).
        seed: seeds the generator that draws Fisher samples from a Dataset (None: from torch's
            global RNG). Its state is in ``state_dict()``.
        fisher_chunk_size: samples per vectorised per-sample-gradient batch (memory knob).
        loss_fn: ``loss_fn(output, y)`` of the empirical Fisher in the mask updates of
            ``step(closure, model=, epoch=, batch_idx=, train_data=)`` and of :meth:`update_mask`
            called without one (None: cross-entropy, as the official code).
        ascent_backward: how the ascent pass's backward runs inside :meth:`ascent` (and in
            ``step(closure)`` after ``zero_grad()``): ``"dense"`` (the paper), ``"exact"``
            (only ``g * m``, skipping what the mask does not need; needs ``norm="masked"``),
            ``"implicit"``, ``"mvue"`` or ``"mvue_dx"`` (approximate; see
            :mod:`ssam_kernels.ops.ascent_linear`). The descent pass is always dense.

    The mask starts empty, as in the official code: nothing is perturbed until the first
    :meth:`update_mask`. With the official ``step(closure, model=, epoch=, batch_idx=,
    train_data=)`` the mask is recomputed after the step when ``epoch % update_freq == 0`` and
    ``batch_idx == 0``. An update due on a step that raises (or whose update raises) is made
    after the next step with these arguments instead, and the mask is left as it was; a step
    that a ``GradScaler`` skips still makes its update (the Fisher is taken on its own samples).
    """

    def __init__(
        self,
        params,
        base_optimizer,
        rho: float,
        sparsity: float | None,
        num_samples: int,
        update_freq: int,
        structure: str = "unstructured",
        norm: str = "full",
        *,
        adaptive: bool = False,
        fuse_sgd: bool = True,
        seed: int | None = None,
        fisher_chunk_size: int = 32,
        ascent_backward: str = "dense",
        loss_fn: Callable | None = None,
        ascent_fraction: float = 1.0,
        **base_kwargs,
    ):
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.update_freq = check_positive_int("update_freq", update_freq)
        self.fisher_chunk_size = check_positive_int("fisher_chunk_size", fisher_chunk_size)
        super().__init__(params, base_optimizer, rho, sparsity, structure, norm, adaptive, fuse_sgd, seed,
                         dict(base_kwargs, ascent_fraction=ascent_fraction), ascent_backward)
        self._set_masks([torch.zeros(p.shape, dtype=torch.bool, device=p.device) for p in self.params])
        self._warned_empty = False

    def _generator_device(self) -> torch.device:
        return torch.device("cpu")  # draws dataset indices

    def update_mask(self, model: torch.nn.Module, data, loss_fn: Callable | None = None) -> None:
        """Recompute the mask from the empirical Fisher of ``model`` on ``num_samples`` samples
        of ``data`` (a Dataset, or an iterable of ``(x, y)`` batches). ``loss_fn(output, y)``
        defaults to the constructor's ``loss_fn`` (itself cross-entropy by default). Model
        weights, grads and BatchNorm statistics are unchanged.

        Under torch.distributed every rank calls this: from a Dataset, the ranks draw the same
        ``num_samples`` indices (same seed) and each takes every ``world_size``-th; from an
        iterable, each rank takes its share of its own batches. The Fisher sums are all-reduced,
        so the mask is chosen from ``num_samples`` samples in all, at ``1/world_size`` of the
        time, and is the same on every rank."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if self._pending is not None:
            raise RuntimeError("update_mask() between first_step() and second_step(): the weights are perturbed")
        with self._undone_on_failure():
            if self.structure.kind == "budget" and self._costs is None:
                # before the Fisher draws: a copy of the generator, so the samples stay the same
                sample, _ = draw_samples(data, 1, _copy_generator(self.generator))
                self._costs = measure_costs(model, self.params, sample.to(self.params[0].device))
            if loss_fn is None:
                loss_fn = self.loss_fn
            rank, world_size = world()
            fisher = empirical_fisher(model, self.params, data, self.num_samples, loss_fn, self.generator,
                                      self.fisher_chunk_size, rank=rank, world_size=world_size)
            all_reduce_sum_(fisher)  # each rank computed its share of the samples
            flags = self._perturbable()
            if self.structure.kind == "budget":
                masks = self._budget_masks([f if ok else torch.zeros_like(f) for f, ok in zip(fisher, flags)])
            else:
                masks = self._select_perturbable(lambda s: select_mask(s, self.structure, self._keep()), fisher, flags)
            self._set_masks(self._excluded(masks, flags))
            self.mask_updates += 1

    def add_param_group(self, param_group: dict) -> None:
        """As :meth:`ssam.SAM.add_param_group`; the new parameters start unperturbed. With the
        ``"budget"`` structure the model's costs are measured again at the next
        :meth:`update_mask`, over every parameter."""
        super().add_param_group(param_group)
        if hasattr(self, "_costs"):
            self._costs = None

    # budget masks: the measured costs travel with the state, so a resumed run does not measure
    # them again (that draws a sample: an extra pass over a shuffling DataLoader, which moves
    # torch's global RNG and with it the Fisher's samples and the training order)
    def _extra_state(self) -> dict:
        state = super()._extra_state()
        if self._costs is not None:
            state["ascent_costs"] = costs_state(self._costs)
        return state

    # (costs saved by a budget optimizer and loaded into another structure: not read, as the
    # rest of a state loads whatever the structure)
    def _check_extra_state(self, state: dict) -> None:
        super()._check_extra_state(state)
        if self.structure.kind == "budget" and state.get("ascent_costs") is not None:
            costs_from_state(state["ascent_costs"], self.params)

    def _load_extra_state(self, state: dict) -> None:
        super()._load_extra_state(state)
        if self.structure.kind == "budget":  # (absent: measured at the next update, as in the saved run)
            saved = state.get("ascent_costs")
            self._costs = None if saved is None else costs_from_state(saved, self.params)

    @torch.no_grad()
    def step(self, closure=None, model=None, epoch=None, batch_idx=None, train_data=None, logger=None, step=None, *,
             grad_scaler=None, max_grad_norm=None):
        """A SAM step with the current mask. With the official keyword arguments (``model``,
        ``epoch``, ``batch_idx``, ``train_data``; ``logger`` optional; ``step`` accepted and
        unused), the mask is then recomputed (with the constructor's ``loss_fn``) when
        ``epoch % update_freq == 0 and batch_idx == 0``. An update due on a step that raises, or
        that raises itself, is made after the next such step instead (the mask as it was until
        then). ``grad_scaler`` and ``max_grad_norm``: as in :meth:`ssam.SAM.step`."""
        closure = self._check_step_args(closure, grad_scaler, max_grad_norm)
        check_logger(logger)
        official = [v is not None for v in (model, epoch, batch_idx, train_data)]
        if any(official) and not all(official):
            raise ValueError("the official calling convention needs all of model, epoch, batch_idx and train_data")
        due = all(official) and (self._due(epoch, batch_idx) or self._update_owed)
        if due:  # (before the step, not after it)
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
            check_data(train_data)
        if not any(official) and self.mask_updates == 0 and not self._warned_empty:
            warnings.warn("SSAMF.step() before any update_mask(): the mask is empty, nothing is perturbed", stacklevel=2)
            self._warned_empty = True
        try:
            loss = super().step(closure, grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        except BaseException:
            if due:  # (the mask unchanged)
                self._owe_update(None)
            raise
        if due:
            before = self._update_snapshot()
            try:
                self.update_mask(model, train_data)
                self._log_update(logger)
            except BaseException:
                self._owe_update(before)
                raise
            self._update_owed = False
        return loss


def _copy_generator(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy
