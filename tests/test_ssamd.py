import math

import pytest
import torch
import torch.nn.functional as F
from helpers import MLP, make_closure, regression_batch

import ssam

pytestmark = pytest.mark.cpu


def _setup(structure="unstructured", sparsity=0.6, drop_rate=0.5, **kw):
    torch.manual_seed(0)
    model = MLP(din=12, hidden=16, dout=4)
    opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=sparsity, drop_rate=drop_rate,
                     T_end=10, structure=structure, lr=0.05, seed=3, **kw)
    return model, opt


def _backward(model, gen):
    x, y = regression_batch(gen, din=12)
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    return x, y


def _flat_masks(opt):
    return torch.cat([m.reshape(-1) for m in opt.masks()])


def test_cosine_schedule():
    for t in [0, 1, 2.5, 7, 10]:
        assert ssam.cosine_death_rate(t, 0.5, 0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * t / 10)) / 2)
    assert ssam.cosine_death_rate(15, 0.5, 0, 10) == 0.0  # clamped after T_end
    assert ssam.cosine_death_rate(-1, 0.5, 0, 10) == 0.5
    with pytest.raises(ValueError, match="t_end must be > t_start"):  # (a ZeroDivisionError)
        ssam.cosine_death_rate(3, 0.5, 5, 5)
    assert ssam.cosine_death_rate(3, 0.8, 2, 6) == pytest.approx(0.8 * (1 + math.cos(math.pi / 4)) / 2)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.6, 0.99])
def test_density_is_exact_and_constant(sparsity, gen):
    model, opt = _setup(sparsity=sparsity)
    total = sum(p.numel() for p in model.parameters())
    k = int((1 - sparsity) * total)
    assert int(_flat_masks(opt).sum()) == k
    for epoch in range(6):
        _backward(model, gen)
        opt.update_mask(epoch)
        assert int(_flat_masks(opt).sum()) == k


def test_drops_lowest_gradient_entries_and_grows_only_among_unmasked(gen):
    model, opt = _setup(drop_rate=0.5)
    _backward(model, gen)
    old = _flat_masks(opt)
    score = torch.cat([p.grad.abs().reshape(-1) for p in model.parameters()])
    live = int(old.sum())
    drop = int(opt.death_rate(0) * live)
    opt.update_mask(0)
    new = _flat_masks(opt)
    dropped = old & ~new
    grown = new & ~old
    assert int(dropped.sum()) == drop == int(grown.sum()) > 0
    # the dropped entries are exactly the `drop` masked entries of lowest |grad|
    survivors = old & new
    assert score[dropped].max() <= score[survivors].min()
    assert not bool((grown & old).any())


def test_growth_by_gradient_takes_the_largest_unmasked(gen):
    model, opt = _setup(growth_strategy="gradient", drop_strategy="weight")
    _backward(model, gen)
    old = _flat_masks(opt)
    opt.update_mask(2)
    new = _flat_masks(opt)
    score = torch.cat([p.grad.abs().reshape(-1) for p in model.parameters()])
    grown = new & ~old
    not_grown = ~old & ~new
    assert score[grown].min() >= score[not_grown].max()


def test_zero_drop_rate_keeps_the_mask(gen):
    model, opt = _setup(drop_rate=0.0)
    _backward(model, gen)
    old = _flat_masks(opt)
    opt.update_mask(0)
    assert torch.equal(old, _flat_masks(opt))


@pytest.mark.parametrize("structure", ["2:4", "1:4", "3:4", "2:4:out"])
def test_nm_structure_kept_through_updates(structure, gen):
    """Every full group keeps exactly N; the entries of highest |gradient| among the perturbed
    ones (the global top live - drop, the drop rule) all survive; and a group refills from its
    unperturbed entries before it takes back one it dropped."""
    n, m = map(int, structure.split(":")[:2])
    model, opt = _setup(structure=structure, sparsity=None, drop_rate=1.0)

    def groups(t, p):  # (rows, groups, M): the full groups of t laid out as p's mask groups run
        rows = t.reshape(p.shape[0], -1) if p.dim() > 1 else t.reshape(1, -1)
        if structure.endswith(":out") and p.dim() > 1:
            rows = rows.t()  # groups run along the output dim
        return rows[:, : rows.shape[1] // m * m].reshape(rows.shape[0], -1, m)

    for epoch in range(3):
        _backward(model, gen)
        params = list(model.parameters())
        before = [mk.clone() for mk in opt.masks()]
        score = [p.grad.abs() for p in params]
        live = sum(int(mk.sum()) for mk in before)
        drop = min(int(opt.death_rate(epoch) * live), sum(mk.numel() for mk in before) - live)
        kept_scores = torch.cat([s[mk] for s, mk in zip(score, before)])
        # the lowest survivor's score (none survive where all are dropped)
        threshold = kept_scores.topk(live - drop).values.min() if live > drop else torch.tensor(float("inf"))
        opt.update_mask(epoch)
        for p, old, new, s in zip(params, before, opt.masks(), score):
            assert bool(new[old & (s > threshold)].all())  # survivors (ties at the threshold may go)
            old_g, new_g, s_g = groups(old, p), groups(new, p), groups(s, p)
            assert bool((new_g.sum(-1) == n).all())
            took_back_dropped = (new_g & old_g & (s_g < threshold)).any(-1)
            all_free_taken = (new_g | old_g).all(-1)
            assert bool(all_free_taken[took_back_dropped].all())
        changed = sum(int((a != b).sum()) for a, b in zip(before, opt.masks()))
        assert changed > 0


@pytest.mark.parametrize("drop_rate", [0.0, 0.5])
def test_nm_survivors_outrank_overflowed_growth_scores(drop_rate, gen):
    """An unperturbed entry whose gradient overflowed (growth score +inf, as after an inf
    ascent gradient, which the step still updates from) must not push out a group's survivors:
    with nothing dropped the mask stays, and a drop takes only its count."""
    p = torch.nn.Parameter(torch.zeros(6, 8))
    opt = ssam.SSAMD([p], torch.optim.SGD, rho=0.1, sparsity=None, structure="2:8", drop_rate=drop_rate, T_end=10,
                     growth_strategy="gradient", lr=0.1, seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
    before = opt.get_mask(p).clone()
    p.grad = torch.rand(6, 8, generator=gen) + 1.0
    p.grad[~before] = float("inf")  # every unperturbed entry: the lower indices of a group come first
    opt.update_mask(0)
    after = opt.get_mask(p)
    assert bool((after.view(6, -1).sum(-1) == 2).all())
    kept = int((after & before).sum())
    assert kept == int(before.sum()) - int(opt.death_rate(0) * int(before.sum()))


def test_tensor_structure(gen):
    model, opt = _setup(structure="tensor", sparsity=0.5, drop_rate=1.0)
    total = sum(p.numel() for p in model.parameters())
    for epoch in range(3):
        _backward(model, gen)
        opt.update_mask(epoch)
        for p in model.parameters():
            mask = opt.get_mask(p)
            assert bool(mask.all()) or not bool(mask.any())
        assert 0 < int(_flat_masks(opt).sum()) <= int(0.5 * total)


def test_official_step_updates_between_passes_from_the_first_gradient(gen):
    model, opt = _setup(drop_rate=0.8)
    x, y = _backward(model, gen)
    first_grad = [p.grad.clone() for p in model.parameters()]
    old_masks = opt.masks()
    w = [p.detach().clone() for p in model.parameters()]
    seen = {}

    def closure():
        # during the second pass the weights carry the perturbation of the OLD mask
        seen["delta"] = [(p.detach() - wi) for p, wi in zip(model.parameters(), w)]
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure, epoch=0, batch_idx=0, logger=None)
    for d, m in zip(seen["delta"], old_masks):
        assert not bool(d[~m].any())
    # the new mask was scored with the gradient at w, not the one at w + e
    score = torch.cat([g.abs().reshape(-1) for g in first_grad])
    old, new = torch.cat([m.reshape(-1) for m in old_masks]), _flat_masks(opt)
    assert score[old & ~new].max() <= score[old & new].min()
    assert opt.mask_updates == 1


def test_official_step_no_update_off_schedule(gen):
    model, opt = _setup(update_freq=2)
    x, y = _backward(model, gen)
    old = _flat_masks(opt)
    opt.step(make_closure(model, x, y), epoch=1, batch_idx=0)
    _backward(model, gen)
    opt.step(make_closure(model, x, y), epoch=2, batch_idx=3)
    assert torch.equal(old, _flat_masks(opt)) and opt.mask_updates == 0


def test_seed_reproducible_and_different_seeds_differ():
    _, a = _setup()
    _, b = _setup()
    assert torch.equal(_flat_masks(a), _flat_masks(b))
    torch.manual_seed(0)
    model = MLP(din=12, hidden=16, dout=4)
    c = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.6, drop_rate=0.5, T_end=10, lr=0.1, seed=4)
    assert not torch.equal(_flat_masks(a), _flat_masks(c))


def test_gradient_strategy_needs_gradients():
    model, opt = _setup()
    with pytest.raises(ValueError, match="needs gradients"):
        opt.update_mask(0)


def test_add_param_group_starts_unperturbed_then_joins_updates(gen):
    torch.manual_seed(0)
    model = MLP(din=12, hidden=16, dout=4)
    opt = ssam.SSAMD(list(model.net[0].parameters()), torch.optim.SGD, rho=0.1, sparsity=0.5, drop_rate=0.5,
                     T_end=10, lr=0.05, seed=3)
    opt.add_param_group({"params": list(model.net[2].parameters())})
    assert not opt.get_mask(model.net[2].weight).any() and not opt.get_mask(model.net[2].bias).any()
    live = int(0.5 * sum(p.numel() for p in model.net[0].parameters()))
    assert int(_flat_masks(opt).sum()) == live
    for epoch in range(3):  # the new tensors are candidates for growth; the count is kept
        _backward(model, gen)
        opt.update_mask(epoch)
        assert int(_flat_masks(opt).sum()) == live


@pytest.mark.parametrize("structure", ["unstructured", "2:4", "tensor"])
def test_frozen_parameters_get_no_mask_entries(structure, gen):
    """A requires_grad=False parameter is never perturbed: no entry at construction nor after
    updates, the count taken over the others, and the user told once."""
    torch.manual_seed(0)
    model = MLP(din=12, hidden=16, dout=4)
    model.net[0].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="do not require grad") as record:
        opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=None if ":" in structure else 0.5,
                         structure=structure, drop_rate=0.5, T_end=10, lr=0.05, seed=3)
        for epoch in range(3):
            _backward(model, gen)
            opt.update_mask(epoch)
            assert not opt.get_mask(model.net[0].weight).any()
    assert len([w for w in record if "require grad" in str(w.message)]) == 1
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if structure == "unstructured":
        assert int(_flat_masks(opt).sum()) == int(0.5 * trainable)


def test_a_parameter_the_model_never_uses_loses_its_entries_at_the_first_update(gen):
    """The first random mask cannot know which parameters the model uses; the first update does
    (no gradient after a full backward): their entries go to the others, the count is kept."""
    torch.manual_seed(0)
    model = MLP(din=12, hidden=16, dout=4)
    unused = torch.nn.Linear(8, 8)
    params = list(model.parameters()) + list(unused.parameters())
    opt = ssam.SSAMD(params, torch.optim.SGD, rho=0.1, sparsity=0.5, drop_rate=0.5, T_end=10, lr=0.05, seed=3)
    live = int(_flat_masks(opt).sum())
    assert opt.get_mask(unused.weight).any()
    _backward(model, gen)
    with pytest.warns(UserWarning, match="got no gradient"):
        opt.update_mask(0)
    assert not opt.get_mask(unused.weight).any() and not opt.get_mask(unused.bias).any()
    assert int(_flat_masks(opt).sum()) == live


def test_tensor_structure_frozen_tensors_take_no_room_in_the_budget():
    """A frozen tensor is no candidate for growth: it would take room in the entry budget,
    then be emptied (it cannot be perturbed), leaving that room unused."""
    a, x, b = (torch.nn.Parameter(torch.full((n,), v)) for n, v in ((2, 1.0), (8, 2.0), (10, 0.5)))
    frozen = torch.nn.Parameter(torch.full((3,), 0.1), requires_grad=False)
    e = torch.nn.Parameter(torch.full((12,), 5.0))
    with pytest.warns(UserWarning, match="do not require grad"):
        opt = ssam.SSAMD([a, x, b, frozen, e], torch.optim.SGD, rho=0.1, sparsity=0.5, drop_rate=1.0, T_end=10,
                         structure="tensor", drop_strategy="weight", growth_strategy="weight", lr=0.1, seed=0)
    assert opt._keep() == 16
    opt._set_masks([torch.full(p.shape, i < 2) for i, p in enumerate([a, x, b, frozen, e])])
    opt.update_mask(0)
    # all of A and X dropped; E grown (12), B does not fit, A re-admitted (2): 14 of 16
    assert [int(m.sum()) for m in opt.masks()] == [2, 0, 0, 0, 12]
