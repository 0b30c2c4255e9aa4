"""What users do through the base optimizer and torch's tools around SAM / SSAM: an empty param
group, momentum buffers reset or reloaded on the base optimizer, its own load_state_dict,
schedulers that read the optimizer's defaults, ``maximize=True``; on every step path (the
planned step on the extension and Triton, the per-list ops on the reference)."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import STEP_PATHS as PATHS
from helpers import assert_tensors_equal
from helpers import MLP, fit_mask, interpreter_fma_is_fused, make_optimizer, regression_batch, weights_of

import ssam


def _two_passes(opt, model, x, y):
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.mse_loss(model(x), y).backward()
    opt.second_step()


@pytest.mark.parametrize("where", ["constructor", "add_param_group"])
@pytest.mark.parametrize("backend, kind, mode", PATHS)
@pytest.mark.usefixtures("fused_sgd_everywhere")
def test_an_empty_trailing_param_group_changes_nothing(backend, kind, mode, where, monkeypatch, gen):
    """torch's optimizers take a param group without parameters (an empty "no decay" group): the
    steps are those of the same optimizer without it, bit for bit (the planned step counted its
    groups from the parameters and refused every step: "rho must hold one number per group")."""
    monkeypatch.setenv("SSAM_BACKEND", backend)
    x, y = regression_batch(gen, n=16)
    runs = []
    for empty in (False, True):
        torch.manual_seed(0)
        model = MLP()
        holder = model
        if empty and where == "constructor":  # (make_optimizer reads parameters() alone)
            groups = [{"params": list(model.parameters())}, {"params": [], "lr": 0.5}]
            holder = types.SimpleNamespace(parameters=lambda: groups)
        opt = make_optimizer(kind, mode, holder, momentum=0.9)
        if empty and where == "add_param_group":
            opt.add_param_group({"params": [], "lr": 0.5})
        assert len(opt.param_groups) == 1 + empty
        fit_mask(opt, model, x, y)
        for _ in range(3):
            _two_passes(opt, model, x, y)
        runs.append(weights_of(model))
        if backend == "ext":
            assert opt._plan is not None and opt._plan.num_groups == 1 + empty
    without, with_empty = runs
    assert_tensors_equal(with_empty, without, "weights with an empty param group")


@pytest.mark.parametrize("change", ["base load_state_dict", "base state cleared", "a buffer replaced",
                                    "an entry replaced"])
@pytest.mark.parametrize("backend, kind, mode", PATHS)
@pytest.mark.usefixtures("fused_sgd_everywhere")
def test_momentum_changed_through_the_base_optimizer_is_followed(backend, kind, mode, change, monkeypatch, gen):
    """At rho 0 the steps are torch SGD's, bit for bit, also after the momentum buffers were
    reset through the base optimizer (the planned step kept its own buffers and ignored such a
    change: 0.17 off SGD after two steps); the state_dict then saves the buffers the step uses."""
    monkeypatch.setenv("SSAM_BACKEND", backend)
    x, y = regression_batch(gen, n=16)
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    opt = make_optimizer(kind, mode, model, momentum=0.9)
    for group in opt.param_groups:
        group["rho"] = 0.0
    fit_mask(opt, model, x, y)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    fresh_base, fresh_sgd = copy.deepcopy(opt.base_optimizer.state_dict()), copy.deepcopy(sgd.state_dict())

    def sgd_step():
        sgd.zero_grad()
        F.mse_loss(reference(x), y).backward()
        sgd.step()

    for _ in range(3):
        _two_passes(opt, model, x, y)
        sgd_step()
    if change == "base load_state_dict":
        opt.base_optimizer.load_state_dict(fresh_base)
        sgd.load_state_dict(fresh_sgd)
    elif change == "base state cleared":
        opt.base_optimizer.state.clear()
        sgd.state.clear()
    elif change == "a buffer replaced":
        for optimizer, module in ((opt.base_optimizer, model), (sgd, reference)):
            for p in module.parameters():
                optimizer.state[p]["momentum_buffer"] = torch.full_like(p, 0.01)
    else:  # one parameter's momentum reset by a new state entry (the others' entries kept)
        for optimizer, module in ((opt.base_optimizer, model), (sgd, reference)):
            optimizer.state[next(module.parameters())] = {}
    for _ in range(2):
        _two_passes(opt, model, x, y)
        sgd_step()
    assert opt.param_groups is opt.base_optimizer.param_groups and opt.param_groups[0]["rho"] == 0.0
    # bit for bit (within a few ulps where triton 3.6 interprets tl.fma with two roundings)
    tol = 0 if backend != "triton" or interpreter_fma_is_fused() else 1e-6
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
    saved = opt.state_dict()["base_optimizer"]["state"]
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(saved[i]["momentum_buffer"],
                                   sgd.state[list(reference.parameters())[i]]["momentum_buffer"], rtol=tol, atol=tol)


@pytest.mark.cpu
def test_a_base_load_state_dict_brings_its_learning_rate(gen):
    """``base_optimizer.load_state_dict`` replaces the base's param_groups list: SAM follows it
    (its rho kept), so the loaded lr is the one stepped with."""
    x, y = regression_batch(gen, n=16)
    torch.manual_seed(0)
    model = MLP()
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    saved = copy.deepcopy(opt.base_optimizer.state_dict())
    saved["param_groups"][0]["lr"] = 0.0
    opt.base_optimizer.load_state_dict(saved)
    before = weights_of(model)
    _two_passes(opt, model, x, y)
    assert opt.param_groups is opt.base_optimizer.param_groups and opt.param_groups[0]["rho"] == 0.3
    assert_tensors_equal(model.parameters(), before)  # lr 0: back at w, unmoved


@pytest.mark.cpu
@pytest.mark.parametrize("kind", ["SAM", "SSAMF", "SSAMD"])
def test_a_group_added_after_a_base_load_state_dict_joins_the_loaded_groups(kind, gen):
    """``add_param_group`` after ``base_optimizer.load_state_dict`` (before any step): the group
    goes to the base's new list, which SAM follows; SSAM's new parameters get their (empty)
    masks. They were given to the old list's last group, and every later step of SSAM-F /
    SSAM-D raised a KeyError (no mask)."""
    x, y = regression_batch(gen, n=16)
    torch.manual_seed(0)
    model = MLP()
    first, rest = list(model.net[0].parameters()), [p for m in list(model.net)[1:] for p in m.parameters()]
    make = {"SAM": lambda: ssam.SAM(first, torch.optim.SGD, rho=0.05, lr=0.1),
            "SSAMF": lambda: ssam.SSAMF(first, torch.optim.SGD, rho=0.05, sparsity=0.5, num_samples=4, update_freq=1,
                                        lr=0.1),
            "SSAMD": lambda: ssam.SSAMD(first, torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=10,
                                        lr=0.1)}
    opt = make[kind]()
    opt.base_optimizer.load_state_dict(copy.deepcopy(opt.base_optimizer.state_dict()))
    opt.add_param_group({"params": rest})
    assert opt.param_groups is opt.base_optimizer.param_groups and len(opt.param_groups) == 2
    if kind != "SAM":
        assert [m.any().item() for m in opt.masks()[len(first):]] == [False] * len(rest)
    before = weights_of(model)
    for _ in range(2):
        _two_passes(opt, model, x, y)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.cpu
@pytest.mark.parametrize("base_class, kwargs", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                                (torch.optim.Adam, dict(lr=1e-3))])
def test_schedulers_that_read_the_defaults_take_sam(base_class, kwargs, gen):
    """OneCycleLR and CyclicLR (cycle_momentum) look for momentum or betas in the optimizer's
    defaults: SAM's hold the base optimizer's, as davda54/sam's do, and the schedule reaches the
    base optimizer."""
    torch.manual_seed(0)
    model = MLP()
    opt = ssam.SAM(model.parameters(), base_class, rho=0.05, **kwargs)
    assert {**opt.base_optimizer.defaults, "rho": 0.05, "adaptive": False} == opt.defaults
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    x, y = regression_batch(gen)
    _two_passes(opt, model, x, y)
    one_cycle.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == one_cycle.get_last_lr()[0] != 0.1
    torch.optim.lr_scheduler.CyclicLR(opt, 0.01, 0.1)


@pytest.mark.parametrize("backend, kind, mode", PATHS)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.usefixtures("fused_sgd_everywhere")
def test_a_maximizing_group_is_perturbed_against_its_gradient(backend, kind, mode, adaptive, monkeypatch, gen):
    """SAM for an objective the base optimizer maximizes (``maximize=True``) looks for its worst
    neighbour, against the gradient: w + e with rho negated, per group, on every path."""
    monkeypatch.setenv("SSAM_BACKEND", backend)
    x, y = regression_batch(gen, n=16)
    perturbed = []
    for maximize in (False, True):
        torch.manual_seed(0)
        model = MLP()
        opt = make_optimizer(kind, mode, model, momentum=0.9, maximize=maximize, adaptive=adaptive)
        fit_mask(opt, model, x, y)
        w = weights_of(model)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.first_step()
        perturbed.append([p.detach() - v for p, v in zip(model.parameters(), w)])
        opt.restore()
        assert_tensors_equal(model.parameters(), w)
    assert any(bool(e.ne(0).any()) for e in perturbed[0])
    for up, down in zip(*perturbed):  # the same steps (a weight's rounding aside) in the other direction
        torch.testing.assert_close(down, -up, rtol=1e-5, atol=1e-6)
