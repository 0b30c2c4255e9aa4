"""A step, a load or a new group that raises leaves the optimizer as it was: the weights at
``w`` (not ``w + e``), the masks, the momentum buffers, the param_groups, and an optimizer (and
its GradScaler) ready for the next step. Also what used to pass silently and now raises: a
parameter twice in a group, bad ``rho``/SGD values set through ``param_groups``, a sparse
gradient."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import STEP_PATHS as PATHS
from helpers import assert_tensors_equal
from helpers import MLP, hand_written_sam_step, make_closure, regression_batch, setup_training, weights_of

import ssam

def _same(model, weights):
    return all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def _step(opt, model, x, y, **kwargs):
    opt.zero_grad()
    return opt.step(make_closure(model, x, y), **kwargs)


def _state(opt):
    """What a failed call must leave as it was, weights aside: the whole state_dict (a copy)."""
    return copy.deepcopy(opt.state_dict())


def _assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same_state(u, v)
    else:
        assert a == b or (a != a and b != b)


# SGD values torch.optim.SGD's constructor refuses, and what the fused step's check says of each
BAD_SGD_VALUES = [
    pytest.param("lr", -0.1, r"sgd\[0\]\.lr must be a number >= 0, got -0\.1", id="lr"),
    pytest.param("weight_decay", float("nan"), r"sgd\[0\]\.weight_decay must be a number >= 0, got nan",
                 id="weight_decay"),
    pytest.param("nesterov", True, r"sgd\[0\]: nesterov needs momentum > 0 and dampening == 0", id="nesterov"),
]


def _set_bad_sgd_value(group, key, value):
    if key == "nesterov":
        group["momentum"], group["dampening"] = 0.9, 0.5  # nesterov needs dampening 0
    group[key] = value


@pytest.mark.usefixtures("fused_sgd_everywhere")  # (on CPU the per-list path fuses only with this)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("backend, kind, mode", PATHS)
@pytest.mark.parametrize("key, value, message", BAD_SGD_VALUES)
def test_bad_sgd_values_set_between_steps_raise_with_the_weights_at_w(backend, kind, mode, adaptive, key, value,
                                                                         message, monkeypatch, gen):
    """Fused restore + SGD (the planned step, or the per-list ops where the plan does not
    apply: an adaptive group, the reference backend) checks the hyper-parameters it reads from
    param_groups: a value set there since the last step raises ValueError before anything is
    stepped, the weights back at w; set right, the next step runs."""
    monkeypatch.setenv("SSAM_BACKEND", backend)
    model, opt, x, y = setup_training(kind, mode, gen, adaptive=adaptive)
    _step(opt, model, x, y)
    group = opt.param_groups[0]
    good = group[key]
    _set_bad_sgd_value(group, key, value)
    before, state = weights_of(model), _state(opt)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.mse_loss(model(x), y).backward()
    assert opt._can_fuse_sgd()  # the fused path, which checks the values (torch's SGD step does not)
    with pytest.raises(ValueError, match=message):
        opt.second_step()
    assert _same(model, before) and not opt.perturbed
    _assert_same_state(opt.state_dict()["base_optimizer"]["state"], state["base_optimizer"]["state"])
    group[key] = good
    group["dampening"] = 0.0
    _step(opt, model, x, y)
    assert not _same(model, before)


@pytest.mark.parametrize("backend, kind, mode", PATHS)
@pytest.mark.parametrize("key, value", [pytest.param(*p.values[:2], id=p.id) for p in BAD_SGD_VALUES])
def test_bad_sgd_values_set_between_steps_go_to_torchs_sgd_when_unfused(backend, kind, mode, key, value, monkeypatch,
                                                                          gen):
    """With ``fuse_sgd=False`` the descent step is torch's own SGD, which takes what
    param_groups holds unchecked (its constructor checks, its step does not): the weights are
    restored to w and stepped as ``torch.optim.SGD.step`` steps them with those values, bit for
    bit (NaN where weight_decay is NaN)."""
    monkeypatch.setenv("SSAM_BACKEND", backend)
    model, opt, x, y = setup_training(kind, mode, gen, fuse_sgd=False)
    _step(opt, model, x, y)
    group = opt.param_groups[0]
    _set_bad_sgd_value(group, key, value)
    # torch's SGD from w, with the same values and momentum buffers
    twin = [torch.nn.Parameter(w) for w in weights_of(model)]
    twin_sgd = torch.optim.SGD(twin, lr=0.1)
    twin_sgd.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
    for p, t in zip(model.parameters(), twin):
        twin_sgd.state[t]["momentum_buffer"] = opt.base_optimizer.state[p]["momentum_buffer"].clone()
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.mse_loss(model(x), y).backward()
    assert not opt._can_fuse_sgd()
    for p, t in zip(model.parameters(), twin):
        t.grad = p.grad.clone()
    opt.second_step()
    twin_sgd.step()
    assert not opt.perturbed
    for p, t in zip(model.parameters(), twin):
        torch.testing.assert_close(p, t, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend, kind, mode", PATHS)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("rho", [-0.5, float("nan"), float("inf"), "0.1"])
def test_bad_rho_set_between_steps_raises_before_anything_moves(backend, kind, mode, adaptive, rho, monkeypatch, gen):
    monkeypatch.setenv("SSAM_BACKEND", backend)
    model, opt, x, y = setup_training(kind, mode, gen, adaptive=adaptive)
    _step(opt, model, x, y)
    opt.param_groups[0]["rho"] = rho
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    before = weights_of(model)
    for _ in range(2):  # the scaler is ready again after the failure
        opt.zero_grad()
        scaler.scale(F.mse_loss(model(x), y)).backward()
        with pytest.raises(TypeError if isinstance(rho, str) else ValueError, match=r"param_groups\[0\]\['rho'\]"):
            opt.first_step(grad_scaler=scaler)
        assert _same(model, before) and not opt.perturbed
    opt.param_groups[0]["rho"] = 0.05
    opt.zero_grad()
    _step(opt, model, x, y, grad_scaler=scaler)
    assert not _same(model, before)


@pytest.mark.parametrize("backend, kind, mode", PATHS)
def test_unscaling_by_hand_before_second_step_raises_with_the_weights_at_w(backend, kind, mode, monkeypatch, gen):
    """The usual AMP clipping recipe, ``scaler.unscale_(opt)`` before the step, meets
    second_step's own unscale: RuntimeError naming ``max_grad_norm=`` (the way to clip here),
    the weights back at w (they were left at w + e, the optimizer stuck between its steps), the
    next step fine."""
    monkeypatch.setenv("SSAM_BACKEND", backend)
    model, opt, x, y = setup_training(kind, mode, gen)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    before = weights_of(model)
    opt.zero_grad()
    scaler.scale(F.mse_loss(model(x), y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(F.mse_loss(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="pass max_grad_norm= instead"):
        opt.second_step(grad_scaler=scaler)
    assert _same(model, before) and not opt.perturbed
    _step(opt, model, x, y, grad_scaler=scaler, max_grad_norm=1.0)
    assert not _same(model, before)


@pytest.mark.parametrize("backend, kind, mode", PATHS)
def test_a_scaler_updated_by_hand_between_the_passes_raises_with_the_weights_at_w(backend, kind, mode, monkeypatch,
                                                                                  gen):
    """``scaler.update()`` between the passes (the usual AMP loop's last line) would update the
    scale twice in one step: second_step refuses, the weights back at w, the scale as that
    update left it (the step is not taken, so no second update), the next step fine."""
    monkeypatch.setenv("SSAM_BACKEND", backend)
    model, opt, x, y = setup_training(kind, mode, gen)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1)
    before = weights_of(model)
    opt.zero_grad()
    scaler.scale(F.mse_loss(model(x), y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()  # (growth_interval=1: a finite step grows the scale)
    scale = scaler.get_scale()
    scaler.scale(F.mse_loss(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="GradScaler was updated between first_step.. and second_step"):
        opt.second_step(grad_scaler=scaler)
    assert _same(model, before) and not opt.perturbed
    assert scaler.get_scale() == scale == 8.0
    _step(opt, model, x, y, grad_scaler=scaler)
    assert not _same(model, before) and scaler.get_scale() == 16.0


@pytest.mark.parametrize("backend, kind, mode", PATHS)
def test_a_gradient_laid_out_unlike_its_parameter_in_the_descent_pass_takes_the_unfused_step(backend, kind, mode,
                                                                                             monkeypatch, gen):
    """The planned step reads gradients by address, laid out like their parameters: a descent
    gradient that is not falls back to restore + torch's SGD (as the first step does)."""
    monkeypatch.setenv("SSAM_BACKEND", backend)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    model, opt, x, y = setup_training(kind, mode, torch.Generator().manual_seed(seed))
    twin, twin_opt, _, _ = setup_training(kind, mode, torch.Generator().manual_seed(seed), fuse_sgd=False)
    for m, o, transposed in ((model, opt, True), (twin, twin_opt, False)):
        _step(o, m, x, y)
        o.zero_grad()
        F.mse_loss(m(x), y).backward()
        o.first_step(zero_grad=True)
        F.mse_loss(m(x), y).backward()
        w = m.net[0].weight
        if transposed:
            w.grad = w.grad.t().contiguous().t()  # same values, other strides
        o.second_step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    _step(opt, model, x, y)  # and the next step plans again


@pytest.mark.cpu
@pytest.mark.parametrize("kind", ["SAM", "SSAMF", "SSAMD"])
def test_a_parameter_twice_in_a_group_is_refused(kind, gen):
    """Perturbed twice, it would not be restored to w (torch itself only warns)."""
    model = MLP()
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"params'\]\[4\].*appears twice"):
        _make(kind, params + [params[0]])
    opt = _make(kind, params[:2])
    with pytest.raises(ValueError, match="appears twice"):
        opt.add_param_group({"params": [params[2], params[2]]})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1


def _make(kind, params, **kwargs):
    common = dict(rho=0.05, lr=0.1, **kwargs)
    if kind == "SAM":
        return ssam.SAM(params, torch.optim.SGD, **common)
    if kind == "SSAMF":
        return ssam.SSAMF(params, torch.optim.SGD, sparsity=0.5, num_samples=4, update_freq=1, seed=1, **common)
    return ssam.SSAMD(params, torch.optim.SGD, sparsity=0.5, drop_rate=0.5, T_end=10, seed=1, **common)


@pytest.mark.cpu
@pytest.mark.parametrize("kind", ["SAM", "SSAMF", "SSAMD"])
@pytest.mark.parametrize("group, error, message", [
    pytest.param(lambda p: {"params": [p], "rho": -1.0}, ValueError,
                 r"param_group\['rho'\] must be a finite number >= 0, got -1\.0",
                 id="bad rho"),
    pytest.param(lambda p: {"params": [torch.zeros(3, dtype=torch.long)]}, TypeError,
                 r"param_groups\[1\]\['params'\]\[0\] \(shape \(3,\)\) is torch\.int64: SAM perturbs floating-point",
                 id="integer tensor"),
    pytest.param(lambda p: {"params": [torch.zeros(3, device="meta")]}, ValueError,
                 r"param_groups\[1\]\['params'\]\[0\] \(shape \(3,\)\) is on the meta device", id="meta tensor"),
    pytest.param(lambda p: {"params": [p], "adaptive": 1}, TypeError, r"param_group\['adaptive'\] must be a bool, got int",
                 id="adaptive not a bool"),
    pytest.param(lambda p: {"params": {p}}, TypeError,
                 r"param_group\['params'\] must be a tensor or an ordered collection of tensors", id="a set"),
])
def test_a_refused_param_group_is_not_added(kind, group, error, message, gen):
    model = MLP()
    params = list(model.parameters())
    opt = _make(kind, params[:2])
    x, y = regression_batch(gen)
    with pytest.raises(error, match=message):
        opt.add_param_group(group(params[2]))
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1
    _step(opt, model, x, y)  # still steps


@pytest.mark.cpu
def test_a_float64_group_is_refused_by_a_non_dense_ascent_mode(gen):
    model = MLP()
    params = list(model.parameters())
    opt = ssam.SSAMF(params[:2], torch.optim.SGD, rho=0.05, sparsity=0.5, num_samples=4, update_freq=1, lr=0.1,
                     norm="masked", ascent_backward="exact")
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\].*float64"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend, kind, mode", [p for p in PATHS if p.values[0] != "torch"])  # (see below)
@pytest.mark.parametrize("first, then", [(False, True), (True, False)])
def test_adaptive_set_through_param_groups_takes_effect(backend, kind, mode, first, then, monkeypatch, gen):
    """The planned step does not run ASAM: ``adaptive`` turned on (or off) between steps gives
    the step the per-list ops take with that setting (the reference backend, which reads
    ``adaptive`` every step), not the step of the setting the plan was made with. (The
    reference backend itself is checked against SAM written out by hand in the next test.)"""
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    results = {}
    for name, used, flags in (("toggled", backend, (first, then)), ("reference", "torch", (first, then)),
                              ("kept", backend, (first, first))):
        monkeypatch.setenv("SSAM_BACKEND", used)
        model, opt, x, y = setup_training(kind, mode, torch.Generator().manual_seed(seed), adaptive=flags[0])
        _step(opt, model, x, y)
        opt.param_groups[0]["adaptive"] = flags[1]
        _step(opt, model, x, y)
        results[name] = weights_of(model)
    for a, b in zip(results["toggled"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(results["toggled"], results["kept"]))


@pytest.mark.cpu
@pytest.mark.parametrize("first, then", [(False, True), (True, False)])
def test_adaptive_set_through_param_groups_steps_as_hand_written_sam_on_the_reference(first, then, monkeypatch, gen):
    """The reference backend reads ``adaptive`` every step: turned on (or off) between two
    steps, SAM takes the hand-written SAM step of the first setting, then the ASAM (or SAM)
    step of the second, and not that of the setting kept."""
    monkeypatch.setenv("SSAM_BACKEND", "torch")
    x, y = regression_batch(gen, n=16)
    results = {}
    for name, flags in (("toggled", (first, then)), ("kept", (first, first))):
        torch.manual_seed(0)
        model, ref = MLP(), MLP()
        ref.load_state_dict(model.state_dict())
        opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, adaptive=first, lr=0.1, momentum=0.9)
        bufs = [None] * len(list(ref.parameters()))
        for adaptive in flags:
            opt.param_groups[0]["adaptive"] = adaptive
            _step(opt, model, x, y)
            hand_written_sam_step(ref, x, y, rho=0.05, lr=0.1, momentum=0.9, adaptive=adaptive, bufs=bufs)
        # fp32 rounding only: the norm summed in another order moves e by an ulp or so, and the
        # weights by less than an ulp of w (|e| << |w|), as test_sam's hand-written reference
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        results[name] = weights_of(model)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(results["toggled"], results["kept"]))


@pytest.mark.cpu
@pytest.mark.parametrize("kind", ["SSAMF", "SSAMD"])
def test_a_refused_state_dict_loads_nothing(kind, gen):
    model, opt, x, y = setup_training(kind, "dense", gen)
    _step(opt, model, x, y)
    before = _state(opt)
    sam = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.5, momentum=0.9)
    _step(sam, model, x, y)
    with pytest.raises(ValueError, match="no masks"):
        opt.load_state_dict(sam.state_dict())
    wrong = copy.deepcopy(before)
    wrong["sam"]["param_groups"][0]["lr"] = 9.0
    wrong["base_optimizer"]["param_groups"][0]["lr"] = 9.0
    wrong["extra"]["masks"][0] = wrong["extra"]["masks"][0][:-1]
    with pytest.raises(ValueError, match="mask 0 does not fit"):
        opt.load_state_dict(wrong)
    _assert_same_state(opt.state_dict(), before)
    assert opt.param_groups is opt.base_optimizer.param_groups


@pytest.mark.cpu
def test_a_base_optimizer_state_that_torch_refuses_rolls_back_ours(gen):
    model, opt, x, y = setup_training("SSAMD", "dense", gen)
    _step(opt, model, x, y)
    before = _state(opt)
    wrong = copy.deepcopy(before)
    wrong["sam"]["param_groups"][0]["rho"] = 0.7
    wrong["base_optimizer"]["param_groups"][0]["params"] = [0]  # a group of another size
    with pytest.raises(ValueError):
        opt.load_state_dict(wrong)
    _assert_same_state(opt.state_dict(), before)
    assert opt.param_groups is opt.base_optimizer.param_groups


@pytest.mark.cpu
def test_ssamd_update_due_on_a_skipped_step_waits_for_the_next_one(gen):
    """With a GradScaler, an inf in the ascent pass skips the step; the mask update that was due
    (scored on inf/NaN gradients) is made at the next step instead."""
    model, opt, x, y = setup_training("SSAMD", "dense", gen)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    before = opt.masks()
    calls = []

    def closure():
        calls.append(1)
        loss = F.mse_loss(model(x), y)
        scaler.scale(loss * (float("inf") if len(calls) == 1 else 1.0)).backward()  # the first pass overflows
        return loss

    weights = weights_of(model)
    opt.zero_grad()
    opt.step(closure, epoch=0, batch_idx=0, grad_scaler=scaler)
    assert _same(model, weights) and opt.mask_updates == 0
    assert_tensors_equal(opt.masks(), before)
    opt.zero_grad()
    opt.step(closure, epoch=0, batch_idx=1, grad_scaler=scaler)  # not due, but owed
    assert opt.mask_updates == 1
    opt.zero_grad()
    opt.step(closure, epoch=0, batch_idx=2, grad_scaler=scaler)
    assert opt.mask_updates == 1


@pytest.mark.cpu
def test_ssamd_step_failing_after_its_mask_update_leaves_the_mask_as_it_was(gen):
    model, opt, x, y = setup_training("SSAMD", "dense", gen)
    masks, updates, rng = opt.masks(), opt.mask_updates, opt.generator.get_state()
    weights = weights_of(model)
    calls = []

    def failing_second_pass():
        calls.append(1)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if len(calls) == 2:
            raise KeyboardInterrupt
        return loss

    opt.zero_grad()
    with pytest.raises(KeyboardInterrupt):
        opt.step(failing_second_pass, epoch=0, batch_idx=0)
    assert _same(model, weights) and opt.mask_updates == updates
    assert_tensors_equal(opt.masks(), masks)
    assert torch.equal(opt.generator.get_state(), rng)
    opt.zero_grad()
    opt.step(make_closure(model, x, y), epoch=0, batch_idx=5)  # the update is owed: made now, once
    assert opt.mask_updates == updates + 1


@pytest.mark.parametrize("backend, kind, mode", PATHS)
def test_a_sparse_gradient_is_refused_by_name(backend, kind, mode, monkeypatch, gen):
    monkeypatch.setenv("SSAM_BACKEND", backend)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = _make(kind, list(emb.parameters()))
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\].*sparse"):
        opt.first_step()
    assert torch.equal(emb.weight, before) and not opt.perturbed


@pytest.mark.cpu
def test_the_ascent_pass_cannot_open_between_the_steps(gen):
    model, opt, x, y = setup_training("SAM", "dense", gen)
    F.mse_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="between first_step"):
        with opt.ascent():
            pass
    F.mse_loss(model(x), y).backward()
    opt.second_step()


@pytest.mark.cpu
@pytest.mark.parametrize("kind", ["SSAMF", "SSAMD"])
@pytest.mark.parametrize("structure", ["2:4", "2:4:out"])
def test_an_empty_parameter_gets_an_empty_nm_mask(kind, structure, gen):
    model = MLP()
    empty = torch.nn.Parameter(torch.zeros(0, 8))
    params = list(model.parameters()) + [empty]
    common = dict(rho=0.05, lr=0.1, structure=structure, sparsity=None, seed=1)
    if kind == "SSAMF":
        opt = ssam.SSAMF(params, torch.optim.SGD, num_samples=4, update_freq=1, **common)
        x, y = regression_batch(gen)
        opt.update_mask(_WithUnused(model, empty), torch.utils.data.TensorDataset(x, y), loss_fn=F.mse_loss)
    else:
        opt = ssam.SSAMD(params, torch.optim.SGD, drop_rate=0.5, T_end=10, **common)
    assert opt.get_mask(empty).shape == (0, 8)


class _WithUnused(torch.nn.Module):
    def __init__(self, model, unused):
        super().__init__()
        self.model, self.unused = model, unused

    def forward(self, x):
        return self.model(x)


@pytest.mark.cpu
def test_out_of_range_numbers_are_refused_by_name():
    params = list(MLP().parameters())
    with pytest.raises(ValueError, match="seed must be in"):
        ssam.SSAMD(params, torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=10, seed=2**64, lr=0.1)
    with pytest.raises(ValueError, match="T_end must be finite"):
        ssam.SSAMD(params, torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=float("inf"), lr=0.1)
    opt = ssam.SSAMD(params, torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=10, lr=0.1)
    with pytest.raises(ValueError, match="epoch must be finite"):
        opt.update_mask(float("nan"))


@pytest.mark.parametrize("backend, kind, mode", PATHS)
@pytest.mark.parametrize("on_base", [False, True])
def test_lr_schedulers_see_the_step_on_either_optimizer(backend, kind, mode, on_base, monkeypatch, gen):
    """torch's schedulers warn when their step() comes before the optimizer's, which they watch
    through ``optimizer.step``: the fused path (on the base optimizer) and the two-step API take
    the step without calling it."""
    import warnings

    monkeypatch.setenv("SSAM_BACKEND", backend)
    model, opt, x, y = setup_training(kind, mode, gen)
    scheduler = torch.optim.lr_scheduler.StepLR(opt.base_optimizer if on_base else opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.mse_loss(model(x), y).backward()
        opt.second_step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def _official_step(opt, net, x, y, **kwargs):
    """``_step`` taking the official ``model=`` among its keyword arguments."""
    opt.zero_grad()
    return opt.step(make_closure(net, x, y), **kwargs)


def _raising_first(model, x, y):
    """A closure whose first call (the ascent pass of the first step) raises."""
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("transient failure")
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.cpu
@pytest.mark.parametrize("kind", ["SSAMF", "SSAMD"])
def test_an_update_due_on_a_step_whose_ascent_pass_raises_is_made_at_the_next_one(kind, gen):
    """The due step raises before the update: the mask is as it was, and the update is made at
    the next step with the official arguments (not lost for the epoch)."""
    model, opt, x, y = setup_training(kind, "dense", gen)
    data = torch.utils.data.TensorDataset(x, y)
    kwargs = dict(model=model, train_data=data) if kind == "SSAMF" else {}
    if kind == "SSAMF":
        opt.loss_fn = F.mse_loss
    masks, updates, weights = opt.masks(), opt.mask_updates, weights_of(model)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="transient"):
        opt.step(_raising_first(model, x, y), epoch=0, batch_idx=0, **kwargs)
    assert _same(model, weights) and opt.mask_updates == updates
    assert_tensors_equal(opt.masks(), masks)
    _official_step(opt, model, x, y, epoch=0, batch_idx=1, **kwargs)  # not due, but owed
    assert opt.mask_updates == updates + 1
    _official_step(opt, model, x, y, epoch=0, batch_idx=2, **kwargs)
    assert opt.mask_updates == updates + 1


class _FlakyDataset(torch.utils.data.TensorDataset):
    """Raises on its first read while ``fail`` is set (the indices are drawn by then)."""

    fail = True

    def __getitem__(self, i):
        if self.fail:
            raise KeyboardInterrupt
        return super().__getitem__(i)


@pytest.mark.cpu
def test_ssamf_update_that_raises_after_its_step_leaves_the_mask_and_is_owed(gen):
    """The update runs after the step: should it raise, the mask, its count and the generator
    (which drew the Fisher samples) are as before it, and the update is made at the next step."""
    model, opt, x, y = setup_training("SSAMF", "dense", gen)
    data = _FlakyDataset(x, y)
    masks, updates, rng = opt.masks(), opt.mask_updates, opt.generator.get_state()
    with pytest.raises(KeyboardInterrupt):
        _official_step(opt, model, x, y, model=model, epoch=0, batch_idx=0, train_data=data)
    assert opt.mask_updates == updates
    assert_tensors_equal(opt.masks(), masks)
    assert torch.equal(opt.generator.get_state(), rng)
    data.fail = False
    _official_step(opt, model, x, y, model=model, epoch=0, batch_idx=1, train_data=data)
    assert opt.mask_updates == updates + 1


@pytest.mark.cpu
@pytest.mark.parametrize("kind", ["SSAMF", "SSAMD"])
def test_a_logger_adapter_gets_the_update_message_and_a_bad_logger_is_refused_first(kind, gen, caplog):
    """logging.LoggerAdapter, like logging.Logger, takes .info(msg) (its .log needs a level); a
    logger of none of the accepted kinds raises a TypeError before the step runs."""
    model, opt, x, y = setup_training(kind, "dense", gen)
    data = torch.utils.data.TensorDataset(x, y)
    kwargs = dict(model=model, train_data=data) if kind == "SSAMF" else {}
    if kind == "SSAMF":
        opt.loss_fn = F.mse_loss
    weights, before = weights_of(model), _state(opt)
    with pytest.raises(TypeError, match="logger must be"):
        _official_step(opt, model, x, y, epoch=0, batch_idx=0, logger=42, **kwargs)
    assert _same(model, weights)
    _assert_same_state(opt.state_dict(), before)
    adapter = logging.LoggerAdapter(logging.getLogger("ssam.test_logger"), {"run": 1})
    with caplog.at_level(logging.INFO, logger="ssam.test_logger"):
        _official_step(opt, model, x, y, epoch=0, batch_idx=0, logger=adapter, **kwargs)
    assert any("Update Mask!" in r.getMessage() for r in caplog.records)
    assert opt.mask_updates == before["extra"]["mask_updates"] + 1


def _ssamd_growing_by_gradient():
    model = torch.nn.Linear(6, 3)
    opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=5, seed=0,
                     drop_strategy="random", growth_strategy="gradient", lr=0.1)
    return opt, lambda: opt.update_mask(0)  # no gradients: growing by gradient raises (after the drop's draws)


def _ssamf_budget_that_fits_no_row():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    data = torch.utils.data.TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.99, num_samples=8, update_freq=1,
                     structure="budget", seed=0, lr=0.1)
    return opt, lambda: opt.update_mask(model, data)  # 99%: raises once the Fisher's samples are drawn


@pytest.mark.cpu
@pytest.mark.parametrize("make", [_ssamd_growing_by_gradient, _ssamf_budget_that_fits_no_row])
def test_an_update_mask_that_raises_leaves_the_generator_as_it_was(make):
    """Called directly (not through step's official arguments, which already went back), an
    update that raised had drawn from the optimizer's generator: the next update then drew
    other samples than a run without the failed call."""
    opt, update = make()
    before = _state(opt)
    with pytest.raises(ValueError):
        update()
    _assert_same_state(_state(opt), before)  # masks, count and both generators' states
