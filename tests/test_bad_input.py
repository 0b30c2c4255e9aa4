"""Bad input gets a clear ValueError/TypeError naming what is wrong, before anything changes."""

import pytest
import torch
import torch.nn.functional as F
from helpers import MLP, assert_tensors_equal, make_closure, regression_batch

import ssam
from ssam_kernels import nm_mask, perturb_

pytestmark = pytest.mark.cpu

SGD = torch.optim.SGD


def _params():
    return list(MLP().parameters())


def _ssamf(**kw):
    args = dict(rho=0.05, sparsity=0.5, num_samples=4, update_freq=1, lr=0.1)
    args.update(kw)
    return ssam.SSAMF(_params(), SGD, **args)


def _ssamd(**kw):
    args = dict(rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=10, lr=0.1)
    args.update(kw)
    return ssam.SSAMD(_params(), SGD, **args)


@pytest.mark.parametrize("make", [_ssamf, _ssamd])
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval(make, sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        make(sparsity=sparsity)


@pytest.mark.parametrize("make", [_ssamf, _ssamd])
def test_sparsity_type_and_nm_conflict(make):
    with pytest.raises(TypeError, match="sparsity must be a real number"):
        make(sparsity="0.5")
    with pytest.raises(ValueError, match="implies sparsity 0.75"):
        make(structure="1:4", sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity is required"):
        make(sparsity=None)


@pytest.mark.parametrize("rho", [-0.01, float("nan"), float("inf")])
def test_bad_rho(rho):
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        ssam.SAM(_params(), SGD, rho=rho, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        _ssamf(rho=rho)


def test_rho_type():
    with pytest.raises(TypeError, match="rho must be a real number"):
        ssam.SAM(_params(), SGD, rho="0.1", lr=0.1)


def test_a_groups_rho_and_adaptive_are_checked_when_made_at_each_step_and_on_load():
    """A group's ``rho`` and ``adaptive`` may come with the group, be set through
    ``param_groups`` between steps or come from a state_dict: each way is checked (a non-bool
    ``adaptive`` such as ``"no"`` used to run ASAM's perturbation silently), before anything
    changes."""
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['adaptive'\] must be a bool, got str"):
        ssam.SAM([{"params": _params(), "adaptive": "no"}], SGD, rho=0.1, lr=0.1)
    model = MLP()
    opt = ssam.SAM(model.parameters(), SGD, rho=0.1, lr=0.1)
    x, y = regression_batch(torch.Generator().manual_seed(0))
    F.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    group = opt.param_groups[0]
    for key, value, error, message in [
        ("adaptive", None, TypeError, r"param_groups\[0\]\['adaptive'\] must be a bool, got NoneType"),
        ("rho", torch.tensor(0.1), TypeError, r"param_groups\[0\]\['rho'\] must be a real number, got Tensor"),
        ("rho", -1.0, ValueError, r"param_groups\[0\]\['rho'\] must be a finite number >= 0, got -1\.0"),
    ]:
        kept, group[key] = group[key], value
        with pytest.raises(error, match=message):
            opt.first_step()
        assert opt._pending is None
        assert_tensors_equal(list(model.parameters()), before)
        group[key] = kept
    saved = opt.state_dict()

    def without_rho(groups):
        del groups[0]["rho"]

    for edit, error, message in [
        (without_rho, ValueError, r"state_dict\['sam'\]\['param_groups'\]\[0\] has no 'rho'"),
        (lambda groups: groups[0].update(adaptive="x"), TypeError, r"\[0\]\['adaptive'\] must be a bool, got str"),
        (lambda groups: groups[0].update(rho=-5.0), ValueError, r"\[0\]\['rho'\] must be a finite number >= 0"),
    ]:
        bad = {**saved, "sam": {**saved["sam"], "param_groups": [dict(g) for g in saved["sam"]["param_groups"]]}}
        edit(bad["sam"]["param_groups"])
        with pytest.raises(error, match=message):
            opt.load_state_dict(bad)
        assert opt.param_groups[0]["rho"] == 0.1 and opt.param_groups[0]["adaptive"] is False
    opt.first_step()  # still steps
    opt.second_step()


@pytest.mark.parametrize("make", [_ssamf, _ssamd])
@pytest.mark.parametrize("structure", ["2-4", "dense", "4:4", "0:4", "5:4", "a:b"])
def test_unknown_structure_and_bad_nm(make, structure):
    with pytest.raises(ValueError, match="structure"):  # (named: "N:M sparsity needs 1 <= n < m" did not say where)
        make(structure=structure)


@pytest.mark.parametrize("args, match", [
    (("unstructred",), "structure kind must be one of"), (("nm", 2, 0), "N:M needs ints 1 <= n < m"),
    (("nm", 4, 2), "N:M needs ints 1 <= n < m"), (("nm", 2, 4, "sideways"), "along must be 'in' or 'out'"),
    (("tensor", 2, 4), "'tensor' takes no n, m or along")])
def test_a_structure_made_by_hand_is_checked(args, match):
    """``ssam.Structure`` is public and taken as it is: a kind misspelt made whole-tensor masks,
    m=0 divided by zero."""
    with pytest.raises(ValueError, match=match):
        _ssamf(structure=ssam.Structure(*args))


def test_structure_type():
    with pytest.raises(TypeError, match="structure must be a string"):
        _ssamf(structure=24)


@pytest.mark.parametrize("field", ["drop_strategy", "growth_strategy"])
def test_unknown_strategy(field):
    with pytest.raises(ValueError, match=f"{field} must be one of"):
        _ssamd(**{field: "magnitude"})


def test_ssamd_schedule_arguments():
    with pytest.raises(ValueError, match="drop_rate must be in"):
        _ssamd(drop_rate=1.5)
    with pytest.raises(ValueError, match="T_end is required"):
        _ssamd(T_end=None)
    with pytest.raises(ValueError, match="T_end must be greater"):
        _ssamd(T_start=5, T_end=5)


def test_counts_and_norm():
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        _ssamf(num_samples=0)
    with pytest.raises(TypeError, match="update_freq must be an int"):
        _ssamf(update_freq=1.5)
    with pytest.raises(ValueError, match="norm must be one of"):
        _ssamf(norm="l1")


def test_nm_mask_n_m():
    with pytest.raises(ValueError, match="1 <= n < m"):
        nm_mask(torch.ones(4, 8), 4, 4)
    with pytest.raises(ValueError, match="1 <= n < m"):
        nm_mask(torch.ones(4, 8), 0, 4)


def test_mask_param_shape_mismatch():
    with torch.no_grad(), pytest.raises(ValueError, match=r"masks\[0\] has shape \(3,\), params\[0\] has \(4,\)"):
        perturb_([torch.zeros(4)], [torch.zeros(4)], [torch.ones(3, dtype=torch.bool)], 1.0)


def test_params_with_no_grad(gen):
    model = MLP()
    opt = ssam.SAM(model.parameters(), SGD, rho=0.05, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        opt.first_step()
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        opt.step(lambda: None)
    assert_tensors_equal(model.parameters(), before)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model, opt, weights, masks=None):
    """Nothing moved: the weights bit for bit, no step pending, the masks (and their count) as
    they were."""
    assert_tensors_equal(list(model.parameters()), weights, "weights")
    assert not opt.perturbed
    if masks is not None:
        assert opt.mask_updates == masks[1]
        assert_tensors_equal(list(opt.masks()), masks[0], "masks")


def test_missing_or_bad_closure(gen):
    model = MLP()
    x, y = regression_batch(gen)
    weights = _weights(model)
    opt = ssam.SAM(model.parameters(), SGD, rho=0.05, lr=0.1)
    F.mse_loss(model(x), y).backward()  # (a gradient at w: step() would perturb along it)
    with pytest.raises(ValueError, match=r"SAM\.step\(\) needs a closure"):
        opt.step()
    _unchanged(model, opt, weights)
    with pytest.raises(TypeError, match="closure must be callable, got int"):
        opt.step(3)
    _unchanged(model, opt, weights)
    opt = ssam.SSAMD(model.parameters(), SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=3, lr=0.1)
    masks = opt.masks(), opt.mask_updates
    with pytest.raises(ValueError, match=r"SSAMD\.step\(\) needs a closure"):
        opt.step(epoch=0, batch_idx=0)  # (an update due: not made either)
    _unchanged(model, opt, weights, masks)


def test_official_convention_partial_arguments(gen):
    model = MLP()
    x, y = regression_batch(gen)
    closure = make_closure(model, x, y)  # (a real one: a step taken would move the weights)
    weights = _weights(model)
    opt = ssam.SSAMF(model.parameters(), SGD, rho=0.05, sparsity=0.5, num_samples=4, update_freq=1, lr=0.1)
    F.mse_loss(model(x), y).backward()
    masks = opt.masks(), opt.mask_updates
    with pytest.raises(ValueError, match="needs all of model, epoch, batch_idx and train_data"):
        opt.step(closure, model=model, epoch=0)
    _unchanged(model, opt, weights, masks)
    opt_d = ssam.SSAMD(model.parameters(), SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=3, lr=0.1)
    masks = opt_d.masks(), opt_d.mask_updates
    with pytest.raises(ValueError, match="both epoch and batch_idx"):
        opt_d.step(closure, epoch=0)
    _unchanged(model, opt_d, weights, masks)
    with pytest.raises(TypeError, match="epoch must be an int, got str"):
        opt_d.step(closure, epoch="0", batch_idx=0)
    _unchanged(model, opt_d, weights, masks)


def test_base_optimizer_mismatches():
    params = _params()
    with pytest.raises(TypeError, match="base_optimizer must be"):
        ssam.SAM(params, "sgd", lr=0.1)
    with pytest.raises(TypeError, match="nowhere to go"):
        ssam.SAM(params, SGD(params, lr=0.1), lr=0.1)
    with pytest.raises(ValueError, match="same parameters"):
        ssam.SAM(params, SGD(_params(), lr=0.1))
    with pytest.raises(ValueError, match="params is empty"):
        ssam.SAM([], SGD, lr=0.1)
    # torch takes empty groups; a sparse optimizer makes its masks and generator for its
    # parameters at construction (SSAM-D failed on an IndexError)
    with pytest.raises(ValueError, match="every param group is empty; SSAMD needs its parameters"):
        ssam.SSAMD([{"params": []}], SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=3, lr=0.1)
    with pytest.raises(ValueError, match="every param group is empty; SSAMF needs its parameters"):
        ssam.SSAMF([{"params": []}], SGD, rho=0.05, sparsity=0.5, num_samples=4, update_freq=1, lr=0.1)


def test_step_order_misuse(gen):
    model = MLP()
    weights = _weights(model)
    opt = ssam.SAM(model.parameters(), SGD, rho=0.05, lr=0.1)
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()
    _unchanged(model, opt, weights)
    x, y = regression_batch(gen)
    F.mse_loss(model(x), y).backward()
    opt.first_step()
    perturbed = _weights(model)
    assert not all(torch.equal(a, b) for a, b in zip(perturbed, weights))
    with pytest.raises(RuntimeError, match=r"first_step\(\) called twice without second_step\(\) in between"):
        opt.first_step()  # (a second perturbation would leave w + 2e, and restore to w + e)
    assert_tensors_equal(list(model.parameters()), perturbed, "weights after the refused first_step (w + e)")
    assert opt.perturbed
    # the step goes on: back to w exactly, then torch's SGD step with the gradient at w + e
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    twin = [torch.nn.Parameter(w.clone()) for w in weights]
    for t, p in zip(twin, model.parameters()):
        t.grad = p.grad.clone()
    SGD(twin, lr=0.1).step()
    opt.second_step()
    assert_tensors_equal(list(model.parameters()), twin, "weights after second_step vs torch's SGD")
    assert not opt.perturbed


def test_get_mask_of_foreign_parameter():
    opt = _ssamd()
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.get_mask(torch.nn.Parameter(torch.ones(3)))


@pytest.mark.parametrize("args, error, match", [
    ((float("nan"), 0.5, 0, 10), ValueError, "epoch must be finite"),
    ((1, -3.0, 0, 10), ValueError, r"drop_rate must be in \[0, 1\]"),
    ((1, 0.5, 0, "10"), TypeError, "t_end must be a real number"),
    ((True, 0.5, 0, 10), TypeError, "epoch must be a real number")])
def test_cosine_death_rate_checks_its_arguments(args, error, match):
    """Public: it returned NaN for a NaN epoch and a negative rate for a negative drop_rate."""
    with pytest.raises(error, match=match):
        ssam.cosine_death_rate(*args)


def test_measure_costs_names_a_bad_model_or_batch():
    """An empty batch divided by zero; a model that is not a Module, or a 0-dim x, failed
    inside torch."""
    from ssam.budget import measure_costs

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6))
    params = list(model.parameters())
    x = torch.randn(1, 6)
    for call, error, match in ((lambda: measure_costs(5, params, x), TypeError, "model must be"),
                               (lambda: measure_costs(model, params, [x]), TypeError, "x must be a tensor"),
                               (lambda: measure_costs(model, params, x[0, 0]), ValueError, "at least one sample"),
                               (lambda: measure_costs(model, params, x[:0]), ValueError, "at least one sample")):
        with pytest.raises(error, match=match):
            call()


def test_a_state_dict_whose_base_part_is_not_a_state_dict_is_refused_by_name():
    opt = ssam.SAM(_params(), SGD, rho=0.05, lr=0.1)
    good = opt.state_dict()
    for bad in (5, {"state": {}}, {"state": [], "param_groups": []}, {"state": {}, "param_groups": [3]}):
        with pytest.raises(ValueError, match=r"state_dict\['base_optimizer'\] must be"):
            opt.load_state_dict({**good, "base_optimizer": bad})
    opt.load_state_dict(good)
