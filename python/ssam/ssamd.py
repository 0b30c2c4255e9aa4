"""SSAM-D: Sparse SAM whose mask evolves by dynamic sparse training (drop and grow)."""

from __future__ import annotations

import heapq

import math
import warnings

import torch

import ssam_kernels

from .budget import AscentCosts, budget_select, check_costs, set_rows
from .sparse import SparseSAM, check_logger, check_positive_int
from .structure import nm_select, parse_structure, tensor_select, whole_tensor_masks

STRATEGIES = ("gradient", "weight", "random")


def cosine_death_rate(epoch: float, drop_rate: float, t_start: float, t_end: float) -> float:
    """``drop_rate * (1 + cos(pi * (t - T_start) / (T_end - T_start))) / 2`` with ``t`` clamped
    to ``[T_start, T_end]`` (the official code lets the rate rise again after ``T_end``, and
    before ``T_start`` gives less than ``drop_rate``: 0 at ``T_start - (T_end - T_start)``; its
    configs start at ``T_start = 0``)."""
    for name, v in (("epoch", epoch), ("drop_rate", drop_rate), ("t_start", t_start), ("t_end", t_end)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v!r}")
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate!r}")
    if not t_end > t_start:
        raise ValueError(f"t_end must be > t_start, got t_start={t_start!r}, t_end={t_end!r}")
    t = min(max(epoch, t_start), t_end)
    return drop_rate * (1.0 + math.cos(math.pi * (t - t_start) / (t_end - t_start))) / 2.0


class SSAMD(SparseSAM):
    """Sparse SAM with a dynamic drop/grow mask (SSAM-D).

    Args:
        params, base_optimizer, rho, adaptive, fuse_sgd, ascent_fraction, **base_kwargs: as
            :class:`ssam.SAM`.
        sparsity: fraction not perturbed, in [0, 1) (implied by an ``"N:M"`` structure).
        drop_rate: fraction of the perturbed entries dropped (and regrown) at ``T_start``, in
            [0, 1]; decays to 0 at ``T_end`` by :func:`cosine_death_rate`.
        drop_strategy: score whose *lowest* masked entries are dropped: ``"gradient"``
            (``|grad|``, the default), ``"weight"`` (``|w|``) or ``"random"``.
        growth_strategy: score whose *highest* unmasked entries are grown (same choices,
            ``"random"`` by default).
        update_freq: update the mask every ``update_freq`` epochs (official convention).
        T_start, T_end: epochs spanned by the cosine schedule (``T_end``: usually the number
            of epochs; required).
        structure, norm, ascent_backward: as :class:`ssam.SSAMF`. ``"budget"``: whole rows under
            the paper's FLOPs column, as in SSAM-F; the first mask is random rows, each update
            drops and grows whole rows. With ``"exact"`` and
            ``growth_strategy="gradient"``, let ``step(closure)`` run the ascent pass (after
            ``zero_grad()``): on mask-update steps it runs it densely, since growth reads the
            unmasked entries' gradient.
        seed: seeds the generator of the initial mask and of random scores (None: from
            torch's global RNG). Its state is in ``state_dict()``.
        ascent_costs: structure ``"budget"`` only, and required there: the model's FLOPs,
            ``ssam.budget.measure_costs(model, params, x[:1])`` on this optimizer's parameters
            in order (SSAM-D never sees the model).

    Exactly ``int((1 - sparsity) * total)`` entries are perturbed at all times (unstructured),
    or exactly N per full group (N:M). Each update drops ``int(death_rate * live)`` entries
    (at most as many as are unmasked) and grows as many among entries unmasked before it.
    With ``"budget"`` the unit is a row and the FLOP budget the limit: an update drops
    ``int(death_rate * live rows)`` rows of lowest mean drop score (a weight's from the ends of its
    row range: its rows stay one range), grows rows unmasked before by growth score per FLOP while
    the ascent pass fits the paper's column (a weight beside its range, at an end that lost no
    row), then re-admits dropped rows where room is left; at most ``int((1 - sparsity) * total)``
    entries are perturbed.
    """

    def __init__(
        self,
        params,
        base_optimizer,
        rho: float,
        sparsity: float | None,
        drop_rate: float,
        drop_strategy: str = "gradient",
        growth_strategy: str = "random",
        update_freq: int = 1,
        T_start: int = 0,
        T_end: int | None = None,
        structure: str = "unstructured",
        norm: str = "full",
        *,
        adaptive: bool = False,
        fuse_sgd: bool = True,
        seed: int | None = None,
        ascent_backward: str = "dense",
        ascent_costs: AscentCosts | None = None,
        ascent_fraction: float = 1.0,
        **base_kwargs,
    ):
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)):
            raise TypeError(f"drop_rate must be a real number, got {type(drop_rate).__name__}")
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
        for name, value in (("drop_strategy", drop_strategy), ("growth_strategy", growth_strategy)):
            if value not in STRATEGIES:
                raise ValueError(f"{name} must be one of {STRATEGIES}, got {value!r}")
        if T_end is None:
            raise ValueError("T_end is required: the epoch where the drop rate reaches 0 (usually the number of epochs)")
        for name, value in (("T_start", T_start), ("T_end", T_end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if not T_end > T_start:
            raise ValueError(f"T_end must be greater than T_start, got T_start={T_start}, T_end={T_end}")
        self.drop_rate = float(drop_rate)
        self.drop_strategy = drop_strategy
        self.growth_strategy = growth_strategy
        self.update_freq = check_positive_int("update_freq", update_freq)
        self.T_start, self.T_end = T_start, T_end
        budget = parse_structure(structure).kind == "budget"
        if budget and ascent_costs is None:
            raise ValueError("structure='budget' needs ascent_costs=ssam.budget.measure_costs(model, params, x[:1]): "
                             "SSAM-D does not see the model")
        if not budget and ascent_costs is not None:
            raise ValueError(f"ascent_costs applies to structure='budget' only, got structure={structure!r}")
        super().__init__(params, base_optimizer, rho, sparsity, structure, norm, adaptive, fuse_sgd, seed,
                         dict(base_kwargs, ascent_fraction=ascent_fraction), ascent_backward)
        self._costs = check_costs(ascent_costs, self.params) if budget else None
        self._set_masks(self._initial_masks())

    # --- scores and the schedule -------------------------------------------------------------

    def death_rate(self, epoch: float) -> float:
        """The fraction of the mask dropped (and grown back) at ``epoch``: this optimizer's
        ``drop_rate`` on the cosine schedule from ``T_start`` to ``T_end``."""
        return cosine_death_rate(epoch, self.drop_rate, self.T_start, self.T_end)

    def _random(self, p: torch.Tensor) -> torch.Tensor:
        return torch.rand(p.shape, generator=self.generator, device=self.generator.device).to(p.device)

    def _scores(self, strategy: str) -> list[torch.Tensor]:
        """Non-negative scores (NaN read as 0) for every parameter."""
        params = self.params
        if strategy == "random":
            return [self._random(p) for p in params]
        if strategy == "weight":
            raw = [p.detach().abs() for p in params]
        else:
            if all(p.grad is None for p in params):
                raise ValueError("strategy 'gradient' needs gradients: call backward() before update_mask()")
            # a parameter without a gradient has a zero gradient
            raw = [p.grad.abs() if p.grad is not None else torch.zeros_like(p) for p in params]
        return [torch.where(torch.isnan(s), torch.zeros_like(s), s) for s in raw]

    # --- masks -------------------------------------------------------------------------------

    def _initial_masks(self) -> list[torch.Tensor]:
        flags = self._perturbable()
        scores = [self._random(p) for p in self.params]
        if self.structure.kind == "budget":  # random rows under the FLOP budget
            return self._excluded(self._budget_masks([s * f for s, f in zip(scores, flags)]), flags)
        if self.structure.kind == "nm":
            return self._excluded(nm_select(scores, self.structure), flags)
        if self.structure.kind == "tensor":
            sizes = [p.numel() if f else 0 for p, f in zip(self.params, flags)]
            order = torch.randperm(len(sizes), generator=self.generator, device=self.generator.device).tolist()
            return whole_tensor_masks(self.params, tensor_select([i for i in order if flags[i]], sizes, self._keep()))
        return self._select_perturbable(lambda s: ssam_kernels.topk_mask(s, k=self._keep()), scores, flags)

    @torch.no_grad()
    def update_mask(self, epoch: float) -> None:
        """Drop ``death_rate(epoch)`` of the perturbed entries (lowest drop score) and grow as
        many among the unperturbed ones (highest growth score)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
            raise TypeError(f"epoch must be a number, got {type(epoch).__name__}")
        if not math.isfinite(epoch):
            raise ValueError(f"epoch must be finite, got {epoch}")
        with self._undone_on_failure():
            flags = self._perturbable()
            if self.ascent_backward != "exact" and any(p.grad is not None for p in self.params):
                # a parameter without a gradient after a full backward is unused by the model: its
                # entries would perturb nothing (exact skips the empty-mask ones, so it cannot tell)
                idle = [f and p.grad is None for f, p in zip(flags, self.params)]
                if any(idle):
                    if not self._warned_idle:
                        shapes = [tuple(p.shape) for p, i in zip(self.params, idle) if i]
                        warnings.warn(f"SSAMD.update_mask: {len(shapes)} parameter(s) got no gradient (shapes "
                                      f"{shapes[:4]}{' ...' if len(shapes) > 4 else ''}): unused by the model, they "
                                      "lose their mask entries to the others", stacklevel=2)
                        self._warned_idle = True
                    flags = [f and not i for f, i in zip(flags, idle)]
            before = self.masks()
            count = sum(int(m.sum()) for m in before)  # kept through updates
            masks = self._excluded(before, flags)  # (a parameter frozen since holds no entry)
            drop_scores = self._scores(self.drop_strategy)
            grow_scores = self._restricted(self._scores(self.growth_strategy), flags)
            rate = self.death_rate(epoch)
            if self.structure.kind == "tensor":
                new = self._update_tensors(masks, drop_scores, grow_scores, rate, flags)
            elif self.structure.kind == "budget":
                new = self._update_rows(masks, drop_scores, grow_scores, rate)
            else:
                live = sum(int(m.sum()) for m in masks)
                free = sum(m.numel() for m, f in zip(masks, flags) if f) - live
                drop = min(int(rate * live), free)
                survivors = ssam_kernels.topk_mask(_only(drop_scores, masks), k=live - drop)
                if self.structure.kind == "nm":
                    new = self._refill_groups(masks, survivors, grow_scores)
                else:  # back to the count (entries of a parameter frozen since come back elsewhere)
                    grow = min(count - (live - drop), free)
                    grown = ssam_kernels.topk_mask(_only(grow_scores, [~m for m in masks]), k=grow)
                    new = [s | g for s, g in zip(survivors, grown)]
            self._set_masks(self._excluded(new, flags))
            self.mask_updates += 1

    def _refill_groups(self, masks, survivors, grow_scores) -> list[torch.Tensor]:
        """N:M: every group keeps its survivors, then its best previously-unmasked entries by
        growth score, then (if too few are free) its dropped entries: exactly N again."""
        # survivors rank +inf, above every growth score: an overflowed gradient's +inf score is
        # read as the largest finite one (a tie with a survivor would go to the lower index)
        ranks = [
            torch.where(s, torch.full_like(g, float("inf")),
                        torch.where(m, torch.full_like(g, -1.0), g.clamp(max=torch.finfo(g.dtype).max)))
            for m, s, g in zip(masks, survivors, grow_scores)
        ]
        return nm_select(ranks, self.structure, magnitude=False)

    def _update_tensors(self, masks, drop_scores, grow_scores, rate, flags) -> list[torch.Tensor]:
        """Whole tensors: drop the live tensors of lowest mean drop score (up to the drop
        budget), grow the free tensors of highest mean growth score into the budget, then (if
        none of those fits) re-admit dropped tensors, best drop score first. Only tensors that
        can be perturbed (``flags``) are candidates: the others take no room in the budget."""
        sizes = [m.numel() for m in masks]
        live = [i for i, m in enumerate(masks) if m.numel() and bool(m.all())]
        budget = int(rate * sum(sizes[i] for i in live))
        drop_mean = {i: float(drop_scores[i].float().mean()) for i in live}
        dropped = tensor_select(sorted(live, key=lambda i: drop_mean[i]), sizes, budget)
        kept = set(live) - dropped
        free = [i for i in range(len(masks)) if flags[i] and i not in live and sizes[i]]
        grow_mean = {i: float(grow_scores[i].float().mean()) for i in free}
        chosen = tensor_select(sorted(free, key=lambda i: -grow_mean[i]), sizes, self._keep(), kept)
        chosen = tensor_select(sorted(dropped, key=lambda i: -drop_mean[i]), sizes, self._keep(), chosen)
        return whole_tensor_masks(masks, chosen)

    def add_param_group(self, param_group: dict) -> None:
        """As :meth:`ssam.SAM.add_param_group`; the new parameters start unperturbed and become
        candidates for growth. Not with the ``"budget"`` structure: its ``ascent_costs`` cover
        the parameters given at construction only."""
        if getattr(self, "_costs", None) is not None:
            raise ValueError("add_param_group() with structure='budget': ascent_costs was measured on the "
                             "parameters given at construction; build the optimizer with every parameter")
        super().add_param_group(param_group)

    def _update_rows(self, masks, drop_scores, grow_scores, rate) -> list[torch.Tensor]:
        """Budget rows: drop ``int(rate * live rows)`` live rows of lowest mean drop score, grow
        rows unmasked before by growth score per FLOP into the FLOP and entry budget, then
        re-admit dropped rows (best drop score per FLOP) where room is left.

        A weight whose rows form a range (as the budget selection makes them: the exact backward
        then computes them on views, with no gather) keeps one: its rows are dropped from the
        range's ends only (the lower-scored end first), and it grows only at an end that lost no
        row (or anywhere, once every row is dropped), beside its range."""
        costs = self._costs
        heap, ranges = [], {}
        order = 0  # ties: the row earlier in (parameter, row) order drops first
        for i, m in enumerate(masks):
            if costs.position[i] is None or m.numel() == 0:
                continue
            rows = costs.row_view(i, m).any(1).nonzero().squeeze(1).cpu()
            if rows.numel() == 0:
                continue
            mean = costs.row_view(i, drop_scores[i]).float().mean(1).cpu().tolist()
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            if costs.row_cost[i] > 0 and hi - lo == rows.numel():
                ranges[i] = [lo, hi, lo, hi, mean, order - lo]  # now, before, scores, order of row 0
                for r in {lo, hi - 1}:
                    heapq.heappush(heap, (mean[r], order + r - lo, i, r))
            else:
                for j, r in enumerate(rows.tolist()):
                    heapq.heappush(heap, (mean[r], order + j, i, r))
            order += rows.numel()
        dropped = []
        while heap and len(dropped) < int(rate * order):
            _, _, i, r = heapq.heappop(heap)
            if i in ranges:
                rng = ranges[i]
                lo, hi, mean, base = rng[0], rng[1], rng[4], rng[5]
                if not (r == lo or r == hi - 1) or not lo <= r < hi:
                    continue  # (an end's entry for a row dropped already)
                if r == lo:
                    rng[0] = lo = lo + 1
                    if lo < hi - 1:
                        heapq.heappush(heap, (mean[lo], base + lo, i, lo))
                else:
                    rng[1] = hi = hi - 1
                    if lo < hi - 1:
                        heapq.heappush(heap, (mean[hi - 1], base + hi - 1, i, hi - 1))
            dropped.append((i, r))
        survivors = [m.clone() for m in masks]
        if dropped:
            set_rows(costs, survivors, torch.tensor([i for i, _ in dropped]), torch.tensor([r for _, r in dropped]),
                     False)
        allowed = [~m for m in masks]
        for i, (lo, hi, first, end, _, _) in ranges.items():
            if lo < hi:  # rows left: grow only beside the range, at an end that lost none
                grow = costs.row_view(i, allowed[i])
                if lo != first:
                    grow[:first] = False
                if hi != end:
                    grow[end:] = False
        # with every row dropped and no unmasked row fitting, growth is empty: the dropped rows
        # come back below
        grown = budget_select(grow_scores, costs, self._keep(), self._ascent_budget(), required=survivors,
                              allowed=self._perturbable_rows(grow_scores, allowed)).masks
        return self._budget_masks(drop_scores, required=grown, allowed=masks)

    # --- official calling convention ---------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None, epoch=None, batch_idx=None, logger=None, model=None, train_data=None, step=None, *,
             grad_scaler=None, max_grad_norm=None):
        """A SAM step with the current mask. With the official ``epoch`` and ``batch_idx``
        (``logger`` optional; ``model``, ``train_data`` and ``step`` accepted and unused), the
        mask is updated between the two passes, from the gradient at ``w``, when
        ``epoch % update_freq == 0 and batch_idx == 0``; it applies from the next step. An update
        due on a step that a ``GradScaler`` skips (its scores would be inf/NaN) or that raises
        is made at the next step instead (a step that raises leaves the mask as it was).
        ``grad_scaler`` and ``max_grad_norm``: as in :meth:`ssam.SAM.step`."""
        closure = self._check_step_args(closure, grad_scaler, max_grad_norm)
        check_logger(logger)
        if (epoch is None) != (batch_idx is None):
            raise ValueError("the official calling convention needs both epoch and batch_idx")
        due = epoch is not None and (self._due(epoch, batch_idx) or self._update_owed)
        try:
            # growing by gradient reads the unmasked entries' gradient, which "exact" skips
            self._ascent_pass(closure,
                              dense=due and self.growth_strategy == "gradient" and self.ascent_backward == "exact")
            self.first_step(grad_scaler=grad_scaler)
        except BaseException:
            if due:  # (nothing changed yet)
                self._owe_update(None)
            raise
        # an update due on a step the GradScaler skips (inf/NaN scores) or one that fails waits
        # for the next step: the mask, its count and the generator are as they were before it
        update = due and not self._skipped
        before = self._update_snapshot() if update else None
        try:
            if update:
                self.update_mask(epoch)
                self._log_update(logger)
            self._update_owed = due and not update
            self.zero_grad()
            loss = self._second_pass(closure)
            self.second_step(grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        except BaseException:
            self.restore()
            if before is not None:
                self._owe_update(before)
            raise
        return loss



def _only(scores: list[torch.Tensor], where: list[torch.Tensor]) -> list[torch.Tensor]:
    """Scores at ``where``, -inf elsewhere (so a top-k below the count of ``where`` stays inside)."""
    return [torch.where(w, s, torch.full_like(s, float("-inf"))) for s, w in zip(scores, where)]
