"""The "budget" structure: the cost model against torch's FLOP counter, the selection within
its budgets, and SSAMF(structure="budget") training with the exact ascent backward."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallConvBN, assert_tensors_equal, needs_interpreter
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ssam
from ssam.budget import AscentCosts, budget_select, measure_costs, paper_flops
from ssam.models import GPTStack, ViT, resnet18_cifar
from ssam.structure import parse_structure
from ssam_kernels import sparse_ascent


class _Residual(nn.Module):
    """Two paths into a sum (a shortcut conv after the main path, as in ResNet), a BatchNorm,
    and a bare parameter read by a functional matmul."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.short = nn.Conv2d(8, 8, 1)
        self.head = nn.Parameter(torch.randn(5, 8) * 0.3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.b(torch.relu(self.bn(self.a(h)))) + self.short(h))
        return F.linear(h.mean((2, 3)), self.head)


class _SamePadding(nn.Module):
    """Convolutions the exact mode runs by plain autograd beside ones it takes row by row: an
    asymmetric "same" padding (even kernel), beside a symmetric one."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(4, 8, 3, padding=1)
        self.odd = nn.Conv1d(8, 8, 3, padding="same")
        self.even = nn.Conv1d(8, 8, 4, padding="same")  # asymmetric: plain autograd
        self.head = nn.Linear(8 * 16, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        return self.head(torch.tanh(self.even(torch.tanh(self.odd(h)))).flatten(1))


MODELS = {
    "residual": (_Residual, (3, 6, 6)),
    "same_padding": (_SamePadding, (4, 16)),
    "convbn": (SmallConvBN, (2, 4, 4)),
    "vit": (lambda: ViT(img_size=8, patch=4, dim=16, depth=2, heads=2, num_classes=3), (3, 8, 8)),
    "gpt": (lambda: GPTStack(16, 2, 2), (6, 16)),
}


def _model(name, gen, batch=3):
    torch.manual_seed(0)
    build, shape = MODELS[name]
    return build(), torch.randn(batch, *shape, generator=gen)


def _counted(fn) -> float:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _loss(model, x):
    return model(x).float().square().mean()


@pytest.mark.cpu
@pytest.mark.parametrize("name", list(MODELS))
def test_sgd_and_forward_costs_equal_the_flop_counter(name, gen):
    """The traced costs per sample, times the batch, are torch's counts of a forward and of a
    forward + backward (the SGD step's matmuls), to the FLOP."""
    model, x = _model(name, gen)
    params = list(model.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        costs = measure_costs(model, params, x)
    assert costs.forward * x.shape[0] == _counted(lambda: model(x))
    assert costs.sgd * x.shape[0] == _counted(lambda: _loss(model, x).backward())


def _random_row_masks(model, costs, gen, lowest):
    """Whole-row masks (as the cost model can take apart) on the parameters at or above the
    ``lowest``-th distinct position."""
    positions = sorted({p for p in costs.position if p is not None})
    depth = positions[lowest]
    masks = []
    for i, p in enumerate(model.parameters()):
        m = torch.zeros(p.shape, dtype=torch.bool)
        if costs.position[i] is not None and costs.position[i] >= depth:
            rows = costs.row_view(i, m)
            rows[torch.rand(rows.shape[0], generator=gen) < 0.5] = True
        masks.append(m)
    return masks


@pytest.mark.cpu
@pytest.mark.parametrize("name", list(MODELS))
def test_ascent_estimate_equals_the_exact_backward_count(name, gen):
    """For row masks cut at every depth, the estimated ascent FLOPs equal what the exact mode's
    forward + backward issues (the residual model's shortcut is the one place the estimate may
    exceed the count: it is an upper bound there)."""
    model, x = _model(name, gen)
    params = list(model.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        costs = measure_costs(model, params, x)
    for lowest in range(len({p for p in costs.position if p is not None})):
        masks = _random_row_masks(model, costs, gen, lowest)
        if not any(m.any() for m in masks):
            continue
        model.zero_grad(set_to_none=True)
        with sparse_ascent(dict(zip(params, masks)), "exact"):
            counted = _counted(lambda: _loss(model, x).backward())
        estimate = costs.ascent(masks) * x.shape[0]
        assert counted <= estimate
        if name != "residual":
            assert counted == estimate


@pytest.mark.cpu
def test_costs_of_parameters_that_are_not_the_models_are_refused(gen):
    """Parameters of another model would all cost nothing: a budget that no row fits, which
    SSAM-D (``ascent_costs=``) reported as a sparsity too high. Refused by name instead."""
    model, x = _model("convbn", gen)
    other, _ = _model("convbn", gen)
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"params \[1\] are not parameters of model"):
        measure_costs(model, [params[0], next(other.parameters())] + params[2:], x)
    measure_costs(model, iter(params), x)  # (a generator is read once)


@pytest.mark.cpu
@pytest.mark.parametrize("name", ["convbn", "gpt", "same_padding"])
def test_costs_measured_under_autocast_are_the_costs(name, gen):
    """Under autocast the layers read casts of the weights, not the weights: the cost model
    reads a cast as the weight it copies (FLOPs do not depend on the dtype)."""
    model, x = _model(name, gen)
    params = list(model.parameters())
    plain = measure_costs(model, params, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = measure_costs(model, params, x)
    assert (cast.forward, cast.sgd, cast.row_cost, cast.rows) == (plain.forward, plain.sgd, plain.row_cost, plain.rows)
    assert any(c > 0 for c in plain.row_cost)
    # positions count the casts too (other indices, same order): the ascent costs they give
    for lowest in range(len({p for p in plain.position if p is not None})):
        masks = _random_row_masks(model, plain, gen, lowest)
        assert cast.ascent(masks) == plain.ascent(masks)


@pytest.mark.interpret
@needs_interpreter
def test_ascent_count_is_the_same_when_triton_computes_the_weight_gradient(gen, monkeypatch):
    """The linears' masked weight gradient in the Triton kernel: FlopCounterMode still counts
    it (the op carries its FLOP formula), so the estimate still equals the count."""
    model, x = _model("gpt", gen)
    params = list(model.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        costs = measure_costs(model, params, x)
    masks = _random_row_masks(model, costs, gen, 1)
    monkeypatch.setenv("SSAM_BACKEND", "triton")
    with sparse_ascent(dict(zip(params, masks)), "exact"):
        counted = _counted(lambda: _loss(model, x).backward())
    assert counted == costs.ascent(masks) * x.shape[0]


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.depthwise(torch.relu(self.stem(x)))).mean((2, 3)))


@pytest.mark.cpu
def test_a_grouped_convolution_costs_its_whole_weight_gradient(gen):
    """The exact mode runs grouped convolutions with plain autograd (their output channels
    cannot be sliced apart): the cost model charges their weight gradient whole, however few
    of their rows a mask takes."""
    torch.manual_seed(0)
    model, x = _Grouped(), torch.randn(2, 3, 6, 6, generator=gen)
    params = list(model.parameters())
    costs = measure_costs(model, params, x)
    names = [n for n, _ in model.named_parameters()]
    depthwise, stem = names.index("depthwise.weight"), names.index("stem.weight")
    assert costs.row_view(depthwise, params[depthwise]).shape[0] == 1
    assert costs.row_view(stem, params[stem]).shape[0] == 8
    some, every = ([torch.zeros(p.shape, dtype=torch.bool) for p in params] for _ in range(2))
    some[depthwise][:2] = True
    every[depthwise][:] = True
    assert costs.ascent(some) == costs.ascent(every)


@pytest.mark.cpu
def test_resnet18_cut_estimate_is_exact_at_block_boundaries(gen):
    model = resnet18_cifar()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    params = list(model.parameters())
    costs = measure_costs(model, params, x)
    assert costs.sgd * 2 == _counted(lambda: F.cross_entropy(model(x), torch.tensor([1, 2])).backward())
    fc = [i for i, (n, _) in enumerate(model.named_parameters()) if n.startswith("fc.")]
    masks = [torch.full(p.shape, i in fc, dtype=torch.bool) for i, p in enumerate(params)]
    with sparse_ascent(dict(zip(params, masks)), "exact"):
        counted = _counted(lambda: F.cross_entropy(model(x), torch.tensor([1, 2])).backward())
    assert costs.ascent(masks) * 2 == counted  # the head alone: forward + its weight gradient


def _toy_costs():
    """Three 2-row weights in a chain (positions 0, 10, 20), forward 100 FLOPs; input
    gradients: 30 for ops depending on position >= 10, 20 more on >= 20."""
    return AscentCosts(forward=100.0, sgd=400.0, position=(0, 10, 20), row_cost=(50.0, 20.0, 5.0),
                       op_depths=(10, 20), op_input_grad=(30.0, 20.0), rows=(2, 2, 2))


@pytest.mark.cpu
def test_selection_takes_the_best_depth_and_rows_within_both_budgets():
    costs = _toy_costs()
    scores = [torch.tensor([[9.0, 9.0], [1.0, 0.0]]), torch.tensor([[3.0, 0.0], [2.0, 2.0]]),
              torch.tensor([[1.0, 0.0], [0.5, 0.0]])]
    # budget 160: every depth pays 100 + 50 (depth 0 or 10) or 100 + 20 (depth 20) first;
    # what is left fits param 2's rows only (5 each; param 1's cost 20): mass 1.5 everywhere
    choice = budget_select(scores, costs, keep=6, ascent_budget=160.0)
    assert choice.mass == pytest.approx(1.5)
    assert [m.tolist() for m in choice.masks] == [[[False, False], [False, False]], [[False, False], [False, False]],
                                                 [[True, True], [True, True]]]
    assert choice.ascent_flops == 100 + 20 + 10  # the cut is at param 2: 20 of input gradients
    # budget 250: depth 0 leaves 100 for rows, by mass per FLOP: param 0 row 0 (18/50), param 1
    # row 1 (4/20) and param 2 row 0 (1/5; the tie by mass), param 1 row 0 (3/20), param 2
    # row 1 (0.5/5): 50 + 20 + 5 + 20 + 5 = 100, mass 26.5; depth 10 or 20 cannot reach param 0
    choice = budget_select(scores, costs, keep=12, ascent_budget=250.0)
    assert choice.mass == pytest.approx(18 + 7 + 1.5)
    assert choice.masks[0].tolist() == [[True, True], [False, False]]
    assert choice.ascent_flops == pytest.approx(100 + 50 + 50 + 40 + 10)
    # the entry count binds: 2 entries -> the best single row within the FLOPs
    choice = budget_select(scores, costs, keep=2, ascent_budget=250.0)
    assert choice.mass == pytest.approx(18) and int(sum(m.sum() for m in choice.masks)) == 2
    # nothing fits: empty masks
    choice = budget_select(scores, costs, keep=6, ascent_budget=99.0)
    assert choice.mass == 0 and not any(m.any() for m in choice.masks)


@pytest.mark.cpu
def test_selection_keeps_required_rows_and_grows_only_allowed_ones():
    costs = _toy_costs()
    scores = [torch.tensor([[9.0, 9.0], [1.0, 0.0]]), torch.tensor([[3.0, 0.0], [2.0, 2.0]]),
              torch.tensor([[1.0, 0.0], [0.5, 0.0]])]
    none = [torch.zeros(2, 2, dtype=torch.bool) for _ in range(3)]
    # param 1's row 0 required: depth 0 or 10 only; at 10 (100 + 30 + 20 paid first, 50
    # left... budget 200) param 1 row 1 and param 2's rows fit too
    required = [none[0], torch.tensor([[True, False], [False, False]]), none[2]]
    choice = budget_select(scores, costs, keep=12, ascent_budget=200.0, required=required)
    assert choice.masks[1][0].all() and not choice.masks[0].any()
    assert choice.mass == pytest.approx(3 + 4 + 1.5) and choice.ascent_flops <= 200.0
    # param 0 row 0 not allowed: depth 0 would only add param 0 row 1 (mass 1 for 50 FLOPs)
    allowed = [torch.tensor([[False, False], [True, True]]), torch.ones(2, 2, dtype=torch.bool), none[2]]
    choice = budget_select(scores, costs, keep=12, ascent_budget=250.0, allowed=allowed)
    assert not choice.masks[0][0].any() and not choice.masks[2].any()
    # required rows that no depth can pay for: nothing is chosen
    required = [torch.tensor([[True, False], [True, False]]), none[1], none[2]]
    choice = budget_select(scores, costs, keep=12, ascent_budget=180.0, required=required)
    assert not any(m.any() for m in choice.masks)


def _ranges(n_rows, k):
    return [list(range(s, s + k)) for s in range(n_rows - k + 1)]


@pytest.mark.cpu
def test_rows_taken_in_a_weight_become_its_best_contiguous_range(gen):
    """Per weight, the rows taken become the range of as many rows holding the most mass (one
    product on views in the exact backward, no gather): the same FLOPs and entries; where the
    allowed rows leave no range that long, the longest they leave; where required rows lie
    apart, the rows stay as taken."""
    rows = 9
    costs = AscentCosts(forward=100.0, sgd=400.0, position=(0, 10), row_cost=(5.0, 0.0),
                        op_depths=(10,), op_input_grad=(10.0,), rows=(rows, rows))
    for _ in range(20):
        scores = [torch.rand(rows, 3, generator=gen), torch.rand(rows, generator=gen)]
        choice = budget_select(scores, costs, keep=rows * 3, ascent_budget=100.0 + 10 + 5 * 4)
        taken = choice.masks[0].any(1).nonzero().squeeze(1).tolist()
        assert len(taken) == 4 and taken == list(range(taken[0], taken[0] + 4))  # 4 rows fit: one range
        row_mass = scores[0].double().sum(1)
        best = max(float(row_mass[r].sum()) for r in _ranges(rows, 4))
        assert float(row_mass[taken].sum()) == pytest.approx(best)
        assert choice.masks[0][taken].all()  # whole rows
        assert choice.ascent_flops == pytest.approx(100 + 10 + 5 * 4)
        # the 1-D parameter (rows of no matmul cost): all taken, as they were
        assert choice.masks[1].all()
        assert choice.mass == pytest.approx(best + float(scores[1].sum()))
    # a required row: the best range holding it
    scores = [torch.tensor([5.0, 5, 5, 5, 0, 0, 0, 1, 1]).unsqueeze(1).repeat(1, 3), torch.zeros(rows)]
    required = [torch.zeros(rows, 3, dtype=torch.bool), torch.zeros(rows, dtype=torch.bool)]
    required[0][8, 0] = True
    choice = budget_select(scores, costs, keep=rows * 3, ascent_budget=100.0 + 10 + 5 * 4, required=required)
    assert choice.masks[0].any(1).nonzero().squeeze(1).tolist() == [5, 6, 7, 8]
    # required rows 8 apart with 4 rows taken: no range holds them; kept as taken
    required[0][0, 0] = True
    choice = budget_select(scores, costs, keep=rows * 3, ascent_budget=100.0 + 10 + 5 * 4, required=required)
    assert choice.masks[0].any(1).nonzero().squeeze(1).tolist() == [0, 1, 2, 8]
    # a row not allowed in the middle: the best range beside it
    allowed = [torch.ones(rows, 3, dtype=torch.bool), torch.ones(rows, dtype=torch.bool)]
    allowed[0][2] = False
    choice = budget_select(scores, costs, keep=rows * 3, ascent_budget=100.0 + 10 + 5 * 4, allowed=allowed)
    assert choice.masks[0].any(1).nonzero().squeeze(1).tolist() == [3, 4, 5, 6]
    # allowed rows in runs shorter than the rows taken: the longest run holding the most mass,
    # fewer rows (never a row not allowed), and the FLOPs of the rows kept
    allowed[0][:] = False
    allowed[0][[0, 1, 7, 8]] = True
    choice = budget_select(scores, costs, keep=rows * 3, ascent_budget=100.0 + 10 + 5 * 4, allowed=allowed)
    assert choice.masks[0].any(1).nonzero().squeeze(1).tolist() == [0, 1]
    assert choice.ascent_flops == pytest.approx(100 + 10 + 5 * 2)
    # a required row in such a run: the run around it
    required = [torch.zeros(rows, 3, dtype=torch.bool), torch.zeros(rows, dtype=torch.bool)]
    required[0][8, 0] = True
    choice = budget_select(scores, costs, keep=rows * 3, ascent_budget=100.0 + 10 + 5 * 4, allowed=allowed,
                           required=required)
    assert choice.masks[0].any(1).nonzero().squeeze(1).tolist() == [7, 8]


def _row_structured(costs, masks):
    return all(bool((costs.row_view(i, m).all(1) == costs.row_view(i, m).any(1)).all()) for i, m in enumerate(masks))


def _weights_hold_row_ranges(costs, masks) -> bool:
    """Every weight (a parameter whose rows cost FLOPs) holds its rows as one range."""
    for i, m in enumerate(masks):
        rows = costs.row_view(i, m).any(1).nonzero().squeeze(1)
        if costs.row_cost[i] > 0 and rows.numel() and int(rows[-1] - rows[0]) + 1 != rows.numel():
            return False
    return True


def _end_drop_reference(costs, masks, scores, rate):
    """SSAM-D's budget drop, one row at a time: of the live rows (a weight's row range: only its
    two ends), the one of lowest mean score goes (ties: the earlier in (parameter, row) order),
    ``int(rate * live rows)`` times. Returns the (parameter, row) pairs kept and the count."""
    live, order = {}, {}
    for i, m in enumerate(masks):
        if costs.position[i] is None:
            continue
        for k in costs.row_view(i, m).any(1).nonzero().squeeze(1).tolist():
            live.setdefault(i, []).append(k)
            order[i, k] = len(order)
    ranges = {i: costs.row_cost[i] > 0 and rows[-1] - rows[0] + 1 == len(rows) for i, rows in live.items()}
    mean = {i: costs.row_view(i, scores[i]).float().mean(1).tolist() for i in live}
    count = int(rate * len(order))
    for _ in range(count):
        candidates = [(i, k) for i, rows in live.items() if rows for k in ({rows[0], rows[-1]} if ranges[i] else rows)]
        i, k = min(candidates, key=lambda ik: (mean[ik[0]][ik[1]], order[ik]))
        live[i].remove(k)
    return [(i, k) for i, rows in live.items() for k in rows], count


@pytest.mark.cpu
@pytest.mark.parametrize("name", ["residual", "gpt"])
def test_ssamd_budget_masks_stay_in_the_paper_column_through_updates(name, gen):
    """SSAMD(structure="budget"): the random first mask and every drop/grow update are whole
    rows within the entry count, a counted step within the paper's column, the dropped rows of
    the lowest mean |grad| (a weight's from the ends of its row range, so its rows stay one
    range: the exact backward's views); the ascent gradient is the dense one masked."""
    model, x = _model(name, gen, batch=4)
    params = list(model.parameters())
    costs = measure_costs(model, params, x[:1])
    opt = ssam.SSAMD(params, torch.optim.SGD, rho=0.05, sparsity=0.9, drop_rate=0.5, T_end=10, structure="budget",
                     norm="masked", ascent_backward="exact", ascent_costs=costs, seed=0, lr=0.01)
    assert opt.ascent_costs() is costs
    sgd = _counted(lambda: _loss(model, x).backward())
    total = sum(p.numel() for p in params)
    grown_total = 0
    for epoch in range(3):
        masks = opt.masks()
        assert _row_structured(costs, masks) and 0 < opt.mask_density() <= 0.1
        model.zero_grad(set_to_none=True)
        reference = torch.autograd.grad(_loss(model, x), params)
        with opt.ascent():
            ascent = _counted(lambda: _loss(model, x).backward())
        assert (sgd + ascent) / sgd <= paper_flops(0.9) + 1e-12
        for p, m, r in zip(params, masks, reference):
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got * m, r * m, rtol=1e-5, atol=1e-6)
        for p, r in zip(params, reference):  # growth by gradient would need them all: set the dense ones
            p.grad = r.clone()
        opt.update_mask(epoch)
        new = opt.masks()
        kept, drop = _end_drop_reference(costs, masks, [p.grad.abs() for p in params], opt.death_rate(epoch))
        assert drop > 0
        assert all(bool(costs.row_view(i, new[i])[k].all()) for i, k in kept)  # survivors stay
        assert _weights_hold_row_ranges(costs, new)  # the exact backward's views, no gathers
        grown = sum(int((costs.row_view(i, n).any(1) & ~costs.row_view(i, m).any(1)).sum())
                    for i, (m, n) in enumerate(zip(masks, new)))
        grown_total += grown
        assert sum(int(m.sum()) for m in new) <= int(0.1 * total)
    # rows unmasked before were grown (not in every update: a weight grows only beside its
    # range, at an end that lost no row, and these small models have few weights to grow)
    assert grown_total > 0
    masks = opt.masks()  # after the last update: counted again
    assert _row_structured(costs, masks)
    model.zero_grad(set_to_none=True)
    with opt.ascent():
        ascent = _counted(lambda: _loss(model, x).backward())
    assert (sgd + ascent) / sgd <= paper_flops(0.9) + 1e-12


@pytest.mark.cpu
def test_ssamd_budget_update_at_drop_rate_one_readmits_rows():
    """Every row dropped, and none of those unmasked before fits: the update re-admits dropped
    rows instead of failing."""
    costs = _toy_costs()
    params = [torch.nn.Parameter(torch.randn(2, 2)) for _ in range(3)]
    # sparsity 0.5: the ascent pass may cost 0.65 x 400 = 260 FLOPs and keep 6 entries
    opt = ssam.SSAMD(params, torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=1.0, T_end=10, structure="budget",
                     norm="masked", ascent_backward="exact", ascent_costs=costs, seed=0, lr=0.01,
                     drop_strategy="weight")
    before = opt.masks()
    assert costs.ascent(before) <= 0.65 * 400 and 0 < sum(int(m.sum()) for m in before) <= 6
    for _ in range(3):
        opt.update_mask(0)  # drop rate 1 at T_start: every live row dropped
        after = opt.masks()
        assert _row_structured(costs, after) and any(m.any() for m in after)
        assert costs.ascent(after) <= 0.65 * 400 and sum(int(m.sum()) for m in after) <= 6


def _mlp_with_a_frozen_bias():
    """(Fixed data: whether an update grows rows depends on where the drops fall.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model[2].bias.requires_grad_(False)
    x, y = torch.randn(32, 32), torch.randint(0, 10, (32,))
    return model, x, y


@pytest.mark.cpu
@pytest.mark.filterwarnings("ignore:.*do not require grad")
def test_a_frozen_parameter_takes_no_budget():
    """A parameter that cannot be perturbed costs no FLOPs, so the selection took its rows
    first: SSAM-D (its growth score -inf) then found every depth's mass -inf and never changed
    its mask again; SSAM-F spent entries on it that the mask then dropped. Neither now: SSAM-D
    grows and drops rows, SSAM-F keeps as many entries as its choice says."""
    model, x, y = _mlp_with_a_frozen_bias()
    params = list(model.parameters())
    costs = measure_costs(model, params, x[:1])
    opt = ssam.SSAMD(params, torch.optim.SGD, rho=0.1, sparsity=0.5, drop_rate=0.5, T_end=10, structure="budget",
                     norm="masked", ascent_backward="exact", seed=0, ascent_costs=costs, lr=0.1)
    before = opt.masks()
    F.cross_entropy(model(x), y).backward()
    opt.update_mask(0)
    after = opt.masks()
    assert not before[3].any() and not after[3].any()  # the frozen bias
    assert sum(int((a & ~b).sum()) for a, b in zip(after, before)) > 0  # grown
    assert sum(int((b & ~a).sum()) for a, b in zip(after, before)) > 0  # dropped
    model.zero_grad(set_to_none=True)
    opt = ssam.SSAMF(params, torch.optim.SGD, rho=0.1, sparsity=0.5, num_samples=32, update_freq=1,
                     structure="budget", norm="masked", ascent_backward="exact", seed=0, lr=0.1)
    opt.update_mask(model, torch.utils.data.TensorDataset(x, y))
    assert not opt.masks()[3].any()
    assert sum(int(m.sum()) for m in opt.masks()) == sum(int(m.sum()) for m in opt.budget_choice.masks)


@pytest.mark.cpu
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
def test_non_finite_scores_count_as_finite_ones(poison):
    """A NaN score counts as 0 and an infinite one as its tensor's largest finite magnitude: a
    NaN sank every depth (no row fitted, a misleading ValueError) and an inf won one whatever it
    cost (density 0.07 where 0.49 was chosen without it)."""
    costs = _toy_costs()
    scores = [torch.rand(2, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    clean = budget_select(scores, costs, keep=6, ascent_budget=260.0)
    poisoned = [s.clone() for s in scores]
    poisoned[2][0, 0] = float(poison)
    expected = [s.clone() for s in scores]
    finite_top = float(scores[2].flatten()[1:].abs().max())
    expected[2][0, 0] = {"nan": 0.0, "inf": finite_top, "-inf": -finite_top}[poison]
    got, want = budget_select(poisoned, costs, keep=6, ascent_budget=260.0), budget_select(expected, costs, 6, 260.0)
    assert_tensors_equal(got.masks, want.masks, "masks from the poisoned scores")
    assert got.mass == want.mass
    assert any(m.any() for m in got.masks) and math.isfinite(got.mass)
    assert sum(int(m.sum()) for m in clean.masks) > 0


@pytest.mark.cpu
def test_add_param_group_with_the_budget_structure(gen):
    model, x = _model("residual", gen, batch=4)
    first, rest = [p for n, p in model.named_parameters() if n != "head"], [model.head]
    costs = measure_costs(model, first, x[:1])
    ssamd = ssam.SSAMD(first, torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=10, structure="budget",
                       norm="masked", ascent_backward="exact", ascent_costs=costs, seed=0, lr=0.01)
    with pytest.raises(ValueError, match="add_param_group.*ascent_costs"):
        ssamd.add_param_group({"params": rest})
    assert len(ssamd.params) == len(first)
    # SSAM-F measures the costs again, over every parameter, at the next update_mask
    ssamf = ssam.SSAMF(first, torch.optim.SGD, rho=0.05, sparsity=0.5, num_samples=4, update_freq=1,
                       structure="budget", norm="masked", ascent_backward="exact", seed=0, lr=0.01)
    loss_fn = lambda out, y: out.float().square().mean()  # noqa: E731
    ssamf.update_mask(model, [(x, torch.zeros(4))], loss_fn=loss_fn)
    assert len(ssamf.ascent_costs().rows) == len(first)
    ssamf.add_param_group({"params": rest})
    assert ssamf.ascent_costs() is None
    ssamf.update_mask(model, [(x, torch.zeros(4))], loss_fn=loss_fn)
    assert len(ssamf.ascent_costs().rows) == len(first) + len(rest)


@pytest.mark.cpu
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("name", ["residual", "vit", "gpt"])
def test_ssamf_budget_masks_meet_the_paper_column(name, sparsity, gen):
    """SSAMF(structure="budget", ascent_backward="exact"): a step's counted FLOPs (ascent +
    dense descent) are at most the paper's column times SGD's, the density at most 1 - s,
    and the ascent gradient is the dense one masked."""
    model, x = _model(name, gen, batch=4)
    params = list(model.parameters())
    opt = ssam.SSAMF(params, torch.optim.SGD, rho=0.05, sparsity=sparsity, num_samples=4, update_freq=1,
                     structure="budget", norm="masked", ascent_backward="exact", seed=0, lr=0.01)
    with sdpa_kernel(SDPBackend.MATH):
        opt.update_mask(model, [(x, torch.zeros(4))], loss_fn=lambda out, y: out.float().square().mean())
    assert 0 < opt.mask_density() <= 1 - sparsity
    masks = opt.masks()
    sgd = _counted(lambda: _loss(model, x).backward())
    model.zero_grad(set_to_none=True)
    reference = torch.autograd.grad(_loss(model, x), params)
    with opt.ascent():
        ascent = _counted(lambda: _loss(model, x).backward())
    assert (sgd + ascent) / sgd <= paper_flops(sparsity) + 1e-12
    for p, m, r in zip(params, masks, reference):
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got * m, r * m, rtol=1e-5, atol=1e-6)


@pytest.mark.cpu
def test_budget_errors(gen):
    model, x = _model("residual", gen)
    assert parse_structure("budget").kind == "budget"
    opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.99, num_samples=2, update_freq=1,
                     structure="budget", norm="masked", ascent_backward="exact", seed=0, lr=0.01)
    before = opt.masks()
    with pytest.raises(ValueError, match="no row of this model fits"):
        opt.update_mask(model, [(x, torch.zeros(3, dtype=torch.long))], loss_fn=lambda out, y: out.square().mean())
    assert_tensors_equal(before, opt.masks())
    params = list(model.parameters())
    ssamd = dict(rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=10, lr=0.01)
    with pytest.raises(ValueError, match="needs ascent_costs"):
        ssam.SSAMD(params, torch.optim.SGD, structure="budget", **ssamd)
    costs = measure_costs(model, params, x[:1])
    with pytest.raises(ValueError, match="applies to structure='budget' only"):
        ssam.SSAMD(params, torch.optim.SGD, ascent_costs=costs, **ssamd)
    with pytest.raises(TypeError, match="ascent_costs must be an ssam.budget.AscentCosts"):
        ssam.SSAMD(params, torch.optim.SGD, structure="budget", ascent_costs={"sgd": 1.0}, **ssamd)
    with pytest.raises(ValueError, match="measured on other parameters"):
        ssam.SSAMD(params[:-1], torch.optim.SGD, structure="budget", ascent_costs=costs, **ssamd)
    with pytest.raises(ValueError, match="no row of this model fits"):
        ssam.SSAMD(params, torch.optim.SGD, structure="budget", ascent_costs=costs, **{**ssamd, "sparsity": 0.99})
    with pytest.raises(ValueError, match="sparsity is required"):
        ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=None, num_samples=2, update_freq=1,
                   structure="budget", lr=0.01)


@pytest.mark.cpu
def test_paper_column():
    assert [paper_flops(s) for s in (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)] == [1.65, 1.44, 1.36, 1.33, 1.31, 1.30]
    assert paper_flops(0.6) == pytest.approx(1.3 + 0.7 * 0.4)


@pytest.mark.cuda
def test_fused_attention_costs_on_cuda():
    """On a GPU, SDPA runs fused (flash / memory-efficient) kernels with their own FLOP
    formulas (backward 2.5x the forward): the estimate must still equal the count."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here; run the cuda tier on a GPU machine")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = GPTStack(64, 2, 2).cuda()
    x = torch.randn(2, 128, 64, generator=gen).cuda()
    params = list(model.parameters())
    costs = measure_costs(model, params, x)
    with FlopCounterMode(display=False) as counter:
        _loss(model, x).backward()
    assert costs.sgd * 2 == counter.get_total_flops()
    masks = [m.cuda() for m in _random_row_masks(model, costs, gen, 3)]
    model.zero_grad(set_to_none=True)
    with sparse_ascent(dict(zip(params, masks)), "exact"), FlopCounterMode(display=False) as counter:
        _loss(model, x).backward()
    assert costs.ascent(masks) * 2 == counter.get_total_flops()
