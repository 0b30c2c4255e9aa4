import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallConvBN, assert_tensors_equal, make_closure

import ssam

pytestmark = pytest.mark.cpu


def _make(kind, model):
    common = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    if kind == "sam":
        return ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, **common)
    if kind == "ssamf":
        return ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.7, num_samples=8,
                          update_freq=1, seed=5, **common)
    nm = kind == "ssamd-2:4"
    return ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=None if nm else 0.7, drop_rate=0.5,
                      T_end=4, structure="2:4" if nm else "unstructured", seed=5, **common)


def _train(model, opt, data, epochs):
    x_all, y_all = data.tensors
    for epoch in epochs:
        for batch_idx in range(3):
            x, y = x_all[batch_idx * 8 : (batch_idx + 1) * 8], y_all[batch_idx * 8 : (batch_idx + 1) * 8]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(make_closure(model, x, y, F.cross_entropy), model=model, epoch=epoch, batch_idx=batch_idx,
                     train_data=data)


@pytest.mark.parametrize("kind", ["sam", "ssamf", "ssamd", "ssamd-2:4"])
def test_resume_is_bit_identical(kind):
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 2, 4, 4, generator=gen), torch.randint(0, 5, (24,), generator=gen))
    torch.manual_seed(1)
    model = SmallConvBN()
    opt = _make(kind, model)
    _train(model, opt, data, range(2))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, data, range(2, 4))

    torch.manual_seed(2)  # a different initialisation and global RNG state: all must come from the checkpoint
    resumed = SmallConvBN()
    opt2 = _make(kind, resumed)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, opt2, data, range(2, 4))

    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    if kind != "sam":
        assert_tensors_equal(opt.masks(), opt2.masks())
        assert opt.mask_updates == opt2.mask_updates
        assert torch.equal(opt.generator.get_state(), opt2.generator.get_state())


def _budget_ssamf(model):
    return ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, num_samples=4, update_freq=1,
                      structure="budget", norm="masked", lr=0.1, seed=0)


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 4))


def test_budget_costs_are_resumed_so_a_shuffling_loader_draws_as_before(gen):
    """SSAM-F's budget costs are measured at the first update from a sample of the data: with a
    shuffling DataLoader that is one more pass over it, drawing its order from torch's global
    RNG. Resumed without its costs, the optimizer measured them again: the Fisher took other
    samples (another mask) and the training order diverged. They travel in the state_dict."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = _mlp()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(256, 8, generator=gen), torch.randint(0, 4, (256,), generator=gen)),
        batch_size=4, shuffle=True)
    opt = _budget_ssamf(model)
    opt.update_mask(model, loader)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    rng = torch.get_rng_state()
    opt.update_mask(model, loader)
    after = torch.get_rng_state()
    resumed = _budget_ssamf(model)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    torch.set_rng_state(rng)
    resumed.update_mask(model, loader)
    assert_tensors_equal(resumed.masks(), opt.masks())
    assert torch.equal(torch.get_rng_state(), after)
    assert resumed.ascent_costs() == opt.ascent_costs()


def test_saved_budget_costs_that_do_not_fit_are_refused_before_anything_loads(gen):
    model = _mlp()
    data = torch.utils.data.TensorDataset(torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen))
    opt = _budget_ssamf(model)
    opt.update_mask(model, data)
    good = opt.state_dict()
    other = _budget_ssamf(model)
    measured = _budget_ssamf(model)
    measured.update_mask(model, torch.utils.data.TensorDataset(torch.randn(16, 8, generator=gen) * 2, data.tensors[1]))
    own = (measured.ascent_costs(), [m.clone() for m in measured.masks()])
    for edit, match in [
        (lambda c: c.update(rows=c["rows"][:-1]), "not what costs_state"),
        (lambda c: c.update(rows=[7] * len(c["rows"])), "does not fit this optimizer"),
        (lambda c: c.update(rows=[-r for r in c["rows"]]), "not what costs_state"),
        (lambda c: c.update(position=[True] * len(c["position"])), "not what costs_state"),
        (lambda c: c.update(row_cost=[float("nan")] * len(c["row_cost"])), "not what costs_state"),
        (lambda c: c.update(forward="1"), "not what costs_state"),
        (lambda c: c.update(sgd=True), "not what costs_state"),
        (lambda c: c.pop("sgd"), "must be a dict of"),
        (lambda c: c.update({0: 1}), "must be a dict of"),
    ]:
        bad = copy.deepcopy(good)
        edit(bad["extra"]["ascent_costs"])
        with pytest.raises(ValueError, match=match):
            other.load_state_dict(bad)
        assert other.ascent_costs() is None and other.mask_updates == 0
        with pytest.raises(ValueError, match=match):
            measured.load_state_dict(bad)
        assert measured.ascent_costs() is own[0]
        assert_tensors_equal(measured.masks(), own[1])
    other.load_state_dict(good)
    assert other.ascent_costs() == opt.ascent_costs()
    # another structure loads the rest of the state, and has no costs to take
    plain = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, num_samples=4, update_freq=1,
                       lr=0.1, seed=0)
    plain.load_state_dict(good)
    assert plain.ascent_costs() is None and plain.mask_updates == 1


def test_state_dict_refused_mid_step():
    model = SmallConvBN()
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    F.cross_entropy(model(torch.randn(4, 2, 4, 4)), torch.tensor([0, 1, 2, 3])).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step"):
        opt.state_dict()
    opt.second_step()
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"state": {}})
    copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("kind", ["sam", "ssamf", "ssamd"])
def test_the_count_of_skipped_steps_is_resumed(kind):
    """skipped_steps() (ascent gradients whose norm was not finite) carries over a resume;
    a state_dict saved before the count was kept loads with the count as it is."""
    torch.manual_seed(0)
    model = SmallConvBN()
    opt = _make(kind, model)
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 5, (8,))
    for bad in (True, False, True):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if bad:
            next(model.parameters()).grad[0] = float("nan")
        opt.step(make_closure(model, x, y, F.cross_entropy))
    assert opt.skipped_steps() == 2
    state = opt.state_dict()
    fresh = _make(kind, model)
    fresh.load_state_dict(state)
    assert fresh.skipped_steps() == 2
    del state["extra"]["skipped_steps"]
    fresh.load_state_dict(state)
    assert fresh.skipped_steps() == 2
    state["extra"]["skipped_steps"] = -1
    with pytest.raises(ValueError, match="skipped_steps"):
        fresh.load_state_dict(state)


def _poisoned_closure(model, x, y, scaler, poison):
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss * (float("nan") if poison and len(calls) == 1 else 1.0)).backward()
        return loss

    return closure


@pytest.mark.parametrize("kind", ["ssamd", "ssamf"])
def test_a_mask_update_still_owed_is_resumed(kind):
    """A due update postponed (SSAM-D: a step the GradScaler skipped; SSAM-F: a step that
    raised) is in the state_dict: the resumed run makes it at its next step, as the
    uninterrupted run does. A state_dict saved before it was kept loads as not owed."""
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 2, 4, 4, generator=gen), torch.randint(0, 5, (24,), generator=gen))
    x_all, y_all = data.tensors

    def train(model, opt, scaler, steps, fail_first=False):
        for t in steps:
            x, y = x_all[(8 * t) % 24:(8 * t) % 24 + 8], y_all[(8 * t) % 24:(8 * t) % 24 + 8]
            epoch, batch_idx = divmod(t, 3)
            opt.zero_grad()
            kwargs = dict(model=model, train_data=data) if kind == "ssamf" else {}
            if fail_first and t == steps[0] and kind == "ssamf":
                def closure():
                    raise RuntimeError("transient")
                with pytest.raises(RuntimeError, match="transient"):
                    opt.step(closure, epoch=epoch, batch_idx=batch_idx, grad_scaler=scaler, **kwargs)
                continue
            opt.step(_poisoned_closure(model, x, y, scaler, fail_first and t == steps[0]), epoch=epoch,
                     batch_idx=batch_idx, grad_scaler=scaler, **kwargs)

    torch.manual_seed(1)
    model = SmallConvBN()
    opt = _make(kind, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    train(model, opt, scaler, [0, 1, 2])
    train(model, opt, scaler, [3], fail_first=True)  # epoch 1, batch 0: due, not made
    assert opt._update_owed
    updates = opt.mask_updates
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict()}, buffer)

    torch.manual_seed(2)
    resumed = SmallConvBN()
    opt2, scaler2 = _make(kind, resumed), torch.amp.GradScaler("cpu")
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    scaler2.load_state_dict(ckpt["scaler"])
    train(model, opt, scaler, [4, 5])
    train(resumed, opt2, scaler2, [4, 5])
    assert opt.mask_updates == opt2.mask_updates == updates + 1
    assert_tensors_equal(opt.masks(), opt2.masks())
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name

    old = ckpt["opt"]
    del old["extra"]["update_owed"]
    opt2.load_state_dict(old)
    assert opt2._update_owed is False
    old["extra"]["update_owed"] = 1
    with pytest.raises(ValueError, match="update_owed"):
        opt2.load_state_dict(old)


@pytest.mark.parametrize("kind", ["ssamd", "ssamf"])
@pytest.mark.parametrize("key", ["generator", "ascent_generator"])
def test_a_generator_state_of_another_device_type_loads_nothing(kind, key):
    """A CUDA generator's state is 16 bytes (seed, offset), a CPU one's 5056: a checkpoint
    saved with the other is refused by name before the base state, masks or counters move."""
    torch.manual_seed(0)
    model = SmallConvBN()
    opt = _make(kind, model)
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 5, (8,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step(make_closure(model, x, y, F.cross_entropy))
    saved = copy.deepcopy(opt.state_dict())
    fresh = _make(kind, model)  # no momentum yet, other masks and generator states
    before = copy.deepcopy(fresh.state_dict())
    saved["extra"][key] = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"'{key}'\] holds 16 bytes.*another device type"):
        fresh.load_state_dict(saved)
    saved["extra"][key] = torch.zeros(5056, dtype=torch.int64)
    with pytest.raises(ValueError, match=rf"'{key}'\] must be a uint8 tensor"):
        fresh.load_state_dict(saved)
    saved["extra"]["mask_updates"] = "1"
    with pytest.raises(ValueError, match="mask_updates"):
        fresh.load_state_dict(saved)
    after = fresh.state_dict()
    assert not after["base_optimizer"]["state"]
    for k in ("masks",):
        assert_tensors_equal(after["extra"][k], before["extra"][k])
    for k in ("generator", "ascent_generator"):
        assert torch.equal(after["extra"][k], before["extra"][k])
    assert after["extra"]["mask_updates"] == before["extra"]["mask_updates"]
    assert after["extra"]["skipped_steps"] == before["extra"]["skipped_steps"]
    assert fresh.param_groups is fresh.base_optimizer.param_groups


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", ["sam", "ssamf", "ssamd"])
def test_a_copied_optimizer_steps_as_the_original(kind, how):
    """``copy.deepcopy((model, opt))`` and a pickle round trip give an optimizer that trains the
    copied model as the original trains its own, bit for bit (masks, generators, momentum,
    schedule of mask updates, count of skipped steps included), leaving the original alone; the
    copy's step plan is made anew for its own parameters. Mid-step copies are refused."""
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 2, 4, 4, generator=gen), torch.randint(0, 5, (24,), generator=gen))
    torch.manual_seed(1)
    model = SmallConvBN()
    opt = _make(kind, model)
    # (a scheduler wraps opt.step in an instance attribute that refers to this optimizer: a copy
    # keeping it stepped the original, and pickling it failed)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    _train(model, opt, data, range(2))
    sched.step()
    if how == "deepcopy":
        model2, opt2, sched2 = copy.deepcopy((model, opt, sched))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt, sched.state_dict()), buffer)
        buffer.seek(0)
        model2, opt2, sched_state = torch.load(buffer, weights_only=False)
        sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1, gamma=0.5)
        sched2.load_state_dict(sched_state)
    assert type(opt2) is type(opt) and repr(opt2) == repr(opt)
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())  # the copy's own parameters
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2._plan is None
    for epoch in (2, 3):
        _train(model, opt, data, [epoch])
        _train(model2, opt2, data, [epoch])
        sched.step()
        sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.05 * 0.5**3
    assert_tensors_equal(list(model.state_dict().values()), list(model2.state_dict().values()))
    assert opt2.skipped_steps() == opt.skipped_steps()
    if kind != "sam":
        assert opt2.mask_updates == opt.mask_updates
        assert_tensors_equal(opt.masks(), opt2.masks())

    x, y = data.tensors[0][:8], data.tensors[1][:8]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="between first_step\\(\\) and second_step\\(\\)"):
        copy.deepcopy(opt)
    opt.restore()
    with opt.ascent(), pytest.raises(RuntimeError, match="inside its ascent pass"):
        copy.deepcopy(opt)
