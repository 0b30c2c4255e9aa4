"""Compute-aware masks: keep the most score mass under a FLOP budget for the ascent pass.

An element-wise mask saves nothing on dense hardware: the ascent backward still computes every
row of every weight gradient and every input gradient. What the exact ascent backward
(``ascent_backward="exact"``) really skips is

* the weight-gradient rows (output features / channels) without a masked entry (outside the
  span of those with one, where that span is barely wider: it is computed on views), and
* every input gradient below the lowest layer holding a masked entry (nothing there needs it).

So the ``"budget"`` structure chooses whole rows, at or above a depth, so that the ascent pass
(forward + that backward) costs at most the paper's FLOPs column minus the descent step:
``(0.3 + 0.7 (1 - s)) x`` an SGD step. Among the depths it keeps the rows with the most score
mass per FLOP (1-D parameters, whose gradients cost no matmul FLOPs, first), within the
sparsity's entry count as well; in each weight, as a contiguous range of rows, which the exact
backward computes on views of its operands (no gather, no scatter).

The costs come from one traced forward (:func:`measure_costs`), followed op by op at the
aten level: each parameter's position is the first op that reads it, each tensor carries the
highest position among the parameters it depends on, and each matmul / convolution /
attention op records its FLOPs (torch's FLOP counter formulas) and the weights it reads.
Backward FLOPs follow autograd: a weight op's weight gradient and input gradient each cost
its forward; an op between activations (attention) costs twice its forward (2.5x for fused
attention). An op's input gradient is needed when its activations depend on a parameter at
or above the lowest masked one: exact for a chain of layers, and on the safe side where a
branch depends on unmasked parameters above that depth. Weights the exact backward cannot
take apart (those inside ``nn.MultiheadAttention``, which keeps dense autograd) count as one
row: all of their weight gradient or none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakTensorKeyDictionary

from ssam_kernels.ops.ascent_conv import CONVS
from ssam_kernels.ops.bitmask import computed_rows
from ssam_kernels.sparse_ascent import row_sparse_weight

from .batchnorm import frozen_batchnorm_stats
from .distributed import unwrapped
from .fisher import check_model_params


# the paper's Tables 1-3, SSAM's FLOPs relative to SGD, by sparsity
PAPER_FLOPS = {0.5: 1.65, 0.8: 1.44, 0.9: 1.36, 0.95: 1.33, 0.98: 1.31, 0.99: 1.30}


def paper_flops(sparsity: float) -> float:
    """The paper's FLOPs column for SSAM at ``sparsity``, relative to SGD: the tables' value
    where they list it (they round below the formula), else ``1 + 0.3 + 0.7 (1 - s)``."""
    for s, flops in PAPER_FLOPS.items():
        if abs(sparsity - s) < 1e-9:
            return flops
    return 1.3 + 0.7 * (1.0 - sparsity)


@dataclass(frozen=True)
class AscentCosts:
    """Per-sample FLOPs of a model, from one traced forward (see the module docstring).

    ``forward``: one forward. ``sgd``: one forward and the full backward (an SGD step's
    FLOPs). Per parameter: ``position`` (the index of the first op reading it; None if the
    forward never does), ``rows`` and ``row_cost`` (weight-gradient FLOPs of one row; 0 for
    parameters no matmul reads). Per FLOP-counted op whose activations depend on a parameter:
    ``op_depths`` (the highest position among those parameters) and ``op_input_grad`` (the
    FLOPs of its input gradients).
    """

    forward: float
    sgd: float
    position: tuple[int | None, ...]
    row_cost: tuple[float, ...]
    op_depths: tuple[int, ...]
    op_input_grad: tuple[float, ...]
    rows: tuple[int, ...]  # rows a mask may take apart: shape[0], or 1 where the weight gradient is all or nothing

    def row_view(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like parameter ``i``) as ``[rows, -1]``."""
        return t.reshape(self.rows[i], -1)

    def input_grads_after(self, position: int) -> float:
        """FLOPs of the input gradients needed when no parameter below ``position`` is masked:
        those of the ops whose activations depend on a parameter at or above it."""
        return sum(f for d, f in zip(self.op_depths, self.op_input_grad) if d >= position)

    def ascent(self, masks: list[torch.Tensor]) -> float:
        """Estimated FLOPs of an exact ascent pass (forward + backward) under ``masks``."""
        used = [i for i, m in enumerate(masks) if self.position[i] is not None and bool(m.any())]
        if not used:
            return self.forward
        lowest = min(self.position[i] for i in used)
        rows = sum(self.row_cost[i] * _rows_computed(self.row_view(i, masks[i]).any(1)) for i in used)
        return self.forward + rows + self.input_grads_after(lowest)


def _rows_computed(needed: torch.Tensor) -> int:
    """How many weight-gradient rows the exact backward computes for the rows ``needed``: the
    span where it computes the span (:func:`ssam_kernels.ops.bitmask.computed_rows`)."""
    rows = needed.nonzero().squeeze(1).tolist()
    span = computed_rows(rows[0], rows[-1] + 1, len(rows)) if rows else None
    return span[1] - span[0] if span else len(rows)


_CONV_FUNCS = frozenset(CONVS.values())


class _RowSparse(TorchFunctionMode):
    """Records the weights whose gradient ``sparse_ascent("exact")`` would compute row by row:
    those of the ``F.linear`` / ``F.conv*`` calls it reroutes (the same rule:
    :func:`ssam_kernels.sparse_ascent.row_sparse_weight`), made at the top level (not inside
    ``nn.MultiheadAttention``, whose projections keep dense autograd and so a whole weight
    gradient). A weight also used by a call that runs plain autograd is not row-sparse."""

    def __init__(self):
        super().__init__()
        self.seen: set[int] = set()
        self.whole: set[int] = set()  # weights some call runs by plain autograd

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func in _CONV_FUNCS:
            weight = row_sparse_weight(func, args, kwargs)
            if weight is not None:
                self.seen.add(id(weight))
            else:
                weight = args[1] if len(args) > 1 else kwargs.get("weight")
                if isinstance(weight, torch.Tensor):
                    self.whole.add(id(weight))
        return func(*args, **kwargs)

    def row_sparse(self, p: torch.Tensor) -> bool:
        return id(p) in self.seen and id(p) not in self.whole


class _Recorder(TorchDispatchMode):
    """Follows one forward op by op (aten level). Each parameter's position is the index of
    the first op that reads it. Each tensor carries the highest position among the parameters
    it depends on; a FLOP-counted op records its FLOPs, the weights it reads, and that value
    for its activation inputs (None: they depend on no parameter)."""

    def __init__(self, storages: dict[int, list[int]]):
        super().__init__()
        self.storages = storages
        self.position: dict[int, int] = {}
        self.depends = WeakTensorKeyDictionary()
        self.ops: list[tuple[float, list[int], int | None, bool]] = []  # flops, weights, activation depth, attention
        self.count = 0
        # copies of parameters (autocast's casts of the weights), by storage (views of them read
        # it too), while they live: read as the parameters they copy
        self.copies: dict[int, tuple[StorageWeakRef, list[int]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        index, self.count = self.count, self.count + 1
        reads, depth = [], None
        for a in tree_flatten((args, kwargs))[0]:
            if not isinstance(a, torch.Tensor):
                continue
            ptr = a.untyped_storage().data_ptr()
            owners = self.storages.get(ptr)
            if owners is None and ptr in self.copies and not self.copies[ptr][0].expired():
                owners = self.copies[ptr][1]
            if owners:
                reads += owners
                for i in owners:
                    self.position.setdefault(i, index)
                continue
            d = self.depends.get(a)
            depth = d if depth is None or (d is not None and d > depth) else depth
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and reads:
            self.copies[out.untyped_storage().data_ptr()] = (StorageWeakRef(out.untyped_storage()), reads)
        highest = max([self.position[i] for i in reads] + ([depth] if depth is not None else []), default=None)
        if highest is not None:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.depends[t] = max(highest, self.depends.get(t, highest))
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            flops = float(formula(*args, **kwargs, out_val=out))
            self.ops.append((flops, list(dict.fromkeys(reads)), depth, "attention" in func._overloadpacket.__name__))
        return out


def measure_costs(model: torch.nn.Module, params: list[torch.Tensor], x: torch.Tensor) -> AscentCosts:
    """:class:`AscentCosts` per sample of ``model`` on the batch ``x`` (one forward, no
    gradient; BatchNorm statistics untouched; a DDP / DataParallel wrapper is read through)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor (a batch: costs are per sample), got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must be a batch of at least one sample (dim 0), got shape {tuple(x.shape)}")
    model = unwrapped(model)
    params = list(params)
    # (their costs would all be 0: a budget that no row fits, said misleadingly later)
    check_model_params(model, params, "params")
    storages: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        storages.setdefault(p.untyped_storage().data_ptr(), []).append(i)
    recorder, row_sparse = _Recorder(storages), _RowSparse()
    with torch.no_grad(), frozen_batchnorm_stats(model), row_sparse, recorder:
        model(x)
    n = x.shape[0]
    weight_flops = [0.0] * len(params)
    op_depths, op_input_grad = [], []
    forward = 0.0
    for flops, reads, depth, attention in recorder.ops:
        flops /= n
        forward += flops
        weights = [i for i in reads if params[i].dim() >= 2]
        for i in weights:
            weight_flops[i] += flops
        if depth is not None:  # its activations need gradients when a parameter at or above depth is masked
            op_depths.append(depth)
            # a weight op: dX costs its forward; between activations: a gradient per input
            # (attention: 5 matmuls against the forward's 2)
            op_input_grad.append(flops if weights else (2.5 if attention else 2.0) * flops)
    position = tuple(recorder.position.get(i) for i in range(len(params)))
    # 1-D parameters: each entry a row of no matmul cost; weights that the exact backward
    # cannot take apart (not seen as a linear / conv weight): one row, the whole gradient
    rows = tuple(p.numel() if p.dim() < 2 else p.shape[0] if row_sparse.row_sparse(p) else 1 for p in params)
    row_cost = tuple(weight_flops[i] / rows[i] if rows[i] else 0.0 for i in range(len(params)))
    sgd = forward + sum(weight_flops) + sum(op_input_grad)  # every input gradient that depends on a parameter
    return AscentCosts(forward, sgd, position, row_cost, tuple(op_depths), tuple(op_input_grad), rows)


def ascent_budget(costs: AscentCosts, sparsity: float, ascent_fraction: float = 1.0) -> float:
    """Per-sample FLOPs the ascent pass may cost so that a step costs the paper's column at
    ``sparsity``: ``(column - 1) x`` an SGD step, ``1/ascent_fraction`` as much per sample when
    the ascent pass runs on that fraction of the batch."""
    return (paper_flops(sparsity) - 1.0) * costs.sgd / ascent_fraction


def no_fit_error(costs: AscentCosts, sparsity: float, ascent_fraction: float) -> ValueError:
    """The error for a budget that no row fits."""
    target = paper_flops(sparsity)
    return ValueError(
        f"structure='budget' at sparsity {sparsity:g}: the paper's FLOPs column ({target:.2f}x SGD) "
        f"leaves {target - 1:.3f}x SGD for the ascent pass, and no row of this model fits in it with "
        f"ascent_fraction={ascent_fraction:g} (the ascent forward alone costs "
        f"{ascent_fraction * costs.forward / costs.sgd:.3f}x SGD); use a lower sparsity or a smaller ascent_fraction"
    )


def check_costs(costs, params: list[torch.Tensor]) -> AscentCosts:
    """``costs`` measured on ``params`` (the optimizer's, in its order), or a clear error."""
    if not isinstance(costs, AscentCosts):
        raise TypeError(f"ascent_costs must be an ssam.budget.AscentCosts (from measure_costs), got {type(costs).__name__}")
    if len(costs.rows) != len(params) or any(
            p.numel() % r if r else p.numel() for p, r in zip(params, costs.rows)):
        raise ValueError(f"ascent_costs was measured on other parameters ({len(costs.rows)} of them): measure it "
                         f"with measure_costs(model, params, x) on this optimizer's {len(params)} parameters, in order")
    return costs


def costs_state(costs: AscentCosts) -> dict:
    """``costs`` as plain data (floats, ints, None, lists) for a state_dict: ``torch.load``'s
    ``weights_only`` loading takes it."""
    return {f.name: list(v) if isinstance(v := getattr(costs, f.name), tuple) else v for f in fields(AscentCosts)}


def costs_from_state(state, params: list[torch.Tensor]) -> AscentCosts:
    """The :class:`AscentCosts` that :func:`costs_state` saved, checked against ``params``, or
    a ``ValueError`` saying what does not fit."""
    names = [f.name for f in fields(AscentCosts)]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state) or sorted(state) != sorted(names):
        raise ValueError(f"state_dict['extra']['ascent_costs'] must be a dict of {names}, got "
                         f"{sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__}")

    def count(v) -> bool:  # an int >= 0 (not a bool)
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def flops(v) -> bool:  # a finite number >= 0 (not a bool)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    lists = ("position", "row_cost", "op_depths", "op_input_grad", "rows")  # (the tuple fields)
    ok = (flops(state["forward"]) and flops(state["sgd"]) and all(isinstance(state[k], list) for k in lists)
          and all(v is None or count(v) for v in state["position"])
          and all(flops(v) for k in ("row_cost", "op_input_grad") for v in state[k])
          and all(count(v) for k in ("op_depths", "rows") for v in state[k])
          and len(state["position"]) == len(state["row_cost"]) == len(state["rows"])
          and len(state["op_depths"]) == len(state["op_input_grad"]))
    if not ok:
        raise ValueError("state_dict['extra']['ascent_costs'] is not what costs_state() saves")
    costs = AscentCosts(**{k: tuple(v) if isinstance(v, list) else v for k, v in state.items()})
    try:
        return check_costs(costs, params)
    except ValueError as exc:
        raise ValueError(f"state_dict['extra']['ascent_costs'] does not fit this optimizer: {exc}") from None


@dataclass(frozen=True)
class BudgetChoice:
    """What :func:`budget_select` chose: the masks, the estimated ascent FLOPs (per sample)
    and the score mass kept."""

    masks: list[torch.Tensor]
    ascent_flops: float
    mass: float


def _finite(rows: torch.Tensor) -> torch.Tensor:
    """Scores as a row sum can take them: NaN as 0 (the other structures rank it lowest), an
    infinity as the largest finite magnitude of its tensor (a sum with +inf in it would win
    whatever it cost; with -inf, lose whatever else it held)."""
    if bool(torch.isfinite(rows).all()):
        return rows
    finite = rows[torch.isfinite(rows)]
    top = float(finite.abs().max()) if finite.numel() else 1.0
    return torch.nan_to_num(rows, nan=0.0, posinf=top, neginf=-top)


def budget_select(scores: list[torch.Tensor], costs: AscentCosts, keep: int, ascent_budget: float, *,
                  required: list[torch.Tensor] | None = None, allowed: list[torch.Tensor] | None = None) -> BudgetChoice:
    """Whole rows of the highest score mass per FLOP, at or above the depth that leaves the
    most mass, such that the estimated ascent pass costs at most ``ascent_budget`` FLOPs per
    sample and at most ``keep`` entries are kept.

    For each candidate depth (a parameter's position), the input gradients of the ops after it
    are paid first; the rows of the parameters at or above it are then taken greedily by mass
    per FLOP (rows of no matmul cost first, by mass), skipping any that no longer fits the
    FLOP or entry budget. The best depth wins; nothing fits: all masks empty. In each weight
    the rows taken then become the contiguous range of as many rows holding the most mass (the
    exact backward computes a range on views, without gathering the output gradient): the
    same FLOPs and entries, somewhat less mass.

    A NaN score counts as 0 and an infinite one as its tensor's largest finite magnitude.
    ``required`` (masks shaped like the scores): rows holding a True entry are taken before any
    other, and only depths at or below the lowest of them are tried; a depth where they do not
    all fit is skipped. ``allowed``: only rows holding a True entry (or required) are taken.
    SSAM-D's drop/grow uses both: its survivors are required, its growth allowed where nothing
    was masked before.
    """
    mass, cost, count, owner, local, must, may = [], [], [], [], [], [], []
    per_param = {}  # i -> (row mass, required rows, allowed rows): for the ranges
    for i, s in enumerate(scores):
        if costs.position[i] is None or s.numel() == 0:
            continue
        rows = _finite(costs.row_view(i, s.detach()).double().cpu())
        mass.append(rows.sum(1))
        cost.append(torch.full((rows.shape[0],), costs.row_cost[i], dtype=torch.float64))
        count.append(torch.full((rows.shape[0],), rows.shape[1], dtype=torch.float64))
        owner.append(torch.full((rows.shape[0],), i, dtype=torch.long))
        local.append(torch.arange(rows.shape[0]))
        for flags, out, default in ((required, must, False), (allowed, may, True)):
            out.append(torch.full((rows.shape[0],), default) if flags is None else costs.row_view(i, flags[i]).any(1).cpu())
        per_param[i] = (mass[-1], must[-1], may[-1])
    choice = BudgetChoice([torch.zeros(s.shape, dtype=torch.bool, device=s.device) for s in scores], costs.forward, 0.0)
    if not mass:
        return choice
    mass, cost, count, owner, local, must, may = (torch.cat(t) for t in (mass, cost, count, owner, local, must, may))
    # one order for every depth: required rows, then no-FLOP rows by mass, then by mass per
    # FLOP (stable: ties by index)
    ratio = torch.where(cost > 0, mass / cost.clamp_min(1e-300), torch.full_like(mass, math.inf))
    order = torch.sort(-mass, stable=True).indices
    order = order[torch.sort(-ratio[order], stable=True).indices]
    order = order[torch.sort((~must[order]).to(torch.uint8), stable=True).indices]
    mass, cost, count, owner, local, must, may = (t[order] for t in (mass, cost, count, owner, local, must, may))
    position = torch.tensor([costs.position[i] for i in owner.tolist()], dtype=torch.long)
    lowest_required = int(position[must].min()) if bool(must.any()) else math.inf
    needed = int(must.sum())
    best, best_taken = -math.inf, None
    for depth in sorted(set(position.tolist())):
        flops = costs.forward + costs.input_grads_after(depth)
        if flops > ascent_budget or depth > lowest_required:
            continue
        taken = _greedy(((position >= depth) & (may | must)).nonzero().squeeze(1), cost, count, ascent_budget - flops,
                        float(keep))
        if int(must[taken].sum()) < needed:
            continue
        kept = float(mass[taken].sum())
        if kept > best and taken.numel():
            best, best_taken = kept, taken
    if best_taken is None:
        return choice
    rows = _as_ranges(costs, per_param, owner[best_taken], local[best_taken])
    kept = 0.0
    for i, r in rows.items():
        costs.row_view(i, choice.masks[i])[r.to(choice.masks[i].device)] = True
        kept += float(per_param[i][0][r].sum())
    return BudgetChoice(choice.masks, costs.ascent(choice.masks), kept)


def _as_ranges(costs: AscentCosts, per_param: dict, owner: torch.Tensor, row: torch.Tensor) -> dict[int, torch.Tensor]:
    """The rows taken, per parameter; in each weight (a parameter whose rows cost FLOPs), as
    many rows as taken moved to the contiguous range of them holding the most mass among the
    ranges that hold every required row and only allowed ones. Where the allowed rows around
    the required ones (or, with none required, anywhere) leave no range that long, the longest
    one they leave: fewer rows, so fewer FLOPs and entries than the budget allows (SSAM-D's
    growth beside a range that lost rows at both ends). Kept as taken where the required rows
    lie apart, beyond the rows taken or across a row not allowed.
    The FLOPs and entries are those of the rows kept; the exact backward computes a range on
    views of its operands, where scattered rows cost a gather of the output gradient."""
    out = {}
    for i in torch.unique(owner).tolist():
        taken = row[owner == i]
        out[i] = taken
        mass, must, may = per_param[i]
        if costs.row_cost[i] == 0 or taken.numel() == mass.numel():
            continue
        window = _best_window(mass, must, may | must, taken.numel())
        if window is not None:
            out[i] = torch.arange(*window)
    return out


def _best_window(mass: torch.Tensor, must: torch.Tensor, free: torch.Tensor, k: int) -> tuple[int, int] | None:
    """``(start, end)`` of the range of at most ``k`` rows, all ``free``, holding every ``must``
    row, that is longest and then holds the most mass (the first such); None where the ``must``
    rows cannot share one."""
    n = mass.numel()
    blocked = (~free).nonzero().squeeze(1)
    if bool(must.any()):
        required = must.nonzero().squeeze(1)
        lo, hi = int(required[0]), int(required[-1]) + 1
        if hi - lo > k or bool((blocked >= lo).logical_and(blocked < hi).any()):
            return None
        # the run of free rows around the required ones
        first = int(blocked[blocked < lo].max()) + 1 if bool((blocked < lo).any()) else 0
        end = int(blocked[blocked >= hi].min()) if bool((blocked >= hi).any()) else n
        size = min(k, end - first)
    else:  # the longest run of free rows, at most k
        edges = torch.cat([torch.tensor([-1]), blocked, torch.tensor([n])])
        size = min(k, int((edges[1:] - edges[:-1] - 1).max()))
        if size == 0:
            return None
        lo, hi = n, 0
    starts = torch.arange(n - size + 1)
    ok = (_window_sums((~free).double(), size) == 0) & (starts <= lo) & (starts + size >= hi)
    sums = _window_sums(mass, size)
    start = int(torch.where(ok, sums, torch.full_like(sums, -math.inf)).argmax())
    return start, start + size


def _window_sums(values: torch.Tensor, k: int) -> torch.Tensor:
    """Sums of every ``k`` consecutive entries (``len(values) - k + 1`` of them)."""
    prefix = torch.cat([values.new_zeros(1), values.double().cumsum(0)])
    return prefix[k:] - prefix[:-k]


def _greedy(candidates: torch.Tensor, cost: torch.Tensor, count: torch.Tensor, flops_left: float,
            entries_left: float) -> torch.Tensor:
    """Walk ``candidates`` (indices, in order) and take each whose cost and count still fit.

    In vectorised rounds, the same as the walk: the room only shrinks, so a row that does not
    fit now never will and is dropped; of the rest, the longest prefix that fits is taken.
    """
    taken = []
    rest, c, n = candidates, cost[candidates], count[candidates]
    while rest.numel():
        fits = (c <= flops_left) & (n <= entries_left)
        rest, c, n = rest[fits], c[fits], n[fits]
        if not rest.numel():
            break
        prefix = (c.cumsum(0) <= flops_left) & (n.cumsum(0) <= entries_left)
        stop = len(rest) if bool(prefix.all()) else int((~prefix).nonzero()[0])  # >= 1: the first fits
        taken.append(rest[:stop])
        flops_left -= float(c[:stop].sum())
        entries_left -= float(n[:stop].sum())
        rest, c, n = rest[stop:], c[stop:], n[stop:]
    return torch.cat(taken) if taken else candidates[:0]


def set_rows(costs: AscentCosts, masks: list[torch.Tensor], owner: torch.Tensor, row: torch.Tensor, value: bool) -> None:
    """``masks[owner[j]]``'s row ``row[j]`` set to ``value`` for every j: one write per parameter."""
    for i in torch.unique(owner).tolist():
        rows = row[owner == i].to(masks[i].device)
        costs.row_view(i, masks[i])[rows] = value
