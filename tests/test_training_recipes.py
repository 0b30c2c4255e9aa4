"""How users really train: gradient accumulation over micro-batches in both passes, gradient
clipping between the passes, BatchNorm statistics updated once per step; for every optimizer
and ascent mode, and every backend."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (MLP, OPTIMIZER_CONFIGS, SmallConvBN, assert_tensors_equal, backend_configs, make_optimizer,
                     regression_batch, setup_training)

import ssam

# MVUE draws a fresh random 2:4 estimate per backward call, so micro-batches see other draws
# than one full batch: accumulation is the same computation only for the deterministic modes
DETERMINISTIC = [(k, m) for k, m in OPTIMIZER_CONFIGS if not m.startswith("mvue")]



def _accumulate(model, opt, x, y, micro):
    """One backward per micro-batch, each loss scaled by its share of the batch."""
    for xs, ys in zip(x.split(micro), y.split(micro)):
        (F.mse_loss(model(xs), ys) * (xs.shape[0] / x.shape[0])).backward()


@pytest.mark.parametrize(("backend", "kind", "mode"), backend_configs(DETERMINISTIC))
def test_accumulating_micro_batches_equals_the_full_batch(kind, mode, backend, monkeypatch, gen):
    """The recipe: accumulate the ascent gradient over micro-batches (inside ``opt.ascent()``),
    ``first_step(zero_grad=True)``, accumulate the descent gradient, ``second_step()``. Equal to
    full-batch steps up to fp32 summation order."""
    monkeypatch.setenv("SSAM_BACKEND", backend)
    state = gen.get_state()
    results = []
    for micro in (16, 5):
        gen.set_state(state)
        model, opt, x, y = setup_training(kind, mode, gen)
        for _ in range(2):
            opt.zero_grad()
            with opt.ascent():
                _accumulate(model, opt, x, y, micro)
            opt.first_step(zero_grad=True)
            _accumulate(model, opt, x, y, micro)
            opt.second_step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _clip_reference(model, opt, x, y, max_norm):
    """Clipping written out: first step, second pass, torch's clip_grad_norm_, second step."""
    opt.zero_grad()
    with opt.ascent():
        F.mse_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.mse_loss(model(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    assert norm > max_norm  # the test clips for real
    opt.second_step()


@pytest.mark.parametrize(("backend", "kind", "mode"), backend_configs())
@pytest.mark.usefixtures("fused_sgd_everywhere")
def test_max_grad_norm_clips_the_descent_gradient(kind, mode, backend, monkeypatch, gen):
    """``step(closure, max_grad_norm=c)`` clips the second pass's gradient before the (fused)
    base step, exactly as clip_grad_norm_ between the passes does (same function, same
    gradients: bit for bit)."""
    monkeypatch.setenv("SSAM_BACKEND", backend)
    state = gen.get_state()
    model, opt, x, y = setup_training(kind, mode, gen)
    for _ in range(2):
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), y).backward(), max_grad_norm=0.05)
    ours = [p.detach().clone() for p in model.parameters()]
    gen.set_state(state)
    model, opt, x, y = setup_training(kind, mode, gen)
    for _ in range(2):
        _clip_reference(model, opt, x, y, 0.05)
    for a, b in zip(ours, model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.cpu
def test_max_grad_norm_with_a_grad_scaler_clips_unscaled_gradients(gen):
    """With a GradScaler the descent gradient is unscaled before clipping (bf16: exact scale)."""
    x, y = regression_batch(gen, n=16)
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**8)):
        torch.manual_seed(0)
        model = MLP()
        opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.mse_loss(model(x), y)
            (loss if scaler is None else scaler.scale(loss)).backward()

        opt.zero_grad()
        opt.step(closure, grad_scaler=scaler, max_grad_norm=0.05)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.cpu
@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), True, "1"])
def test_max_grad_norm_bad_input(bad, gen):
    x, y = regression_batch(gen)
    model = MLP()
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    error = TypeError if isinstance(bad, (bool, str)) else ValueError
    with pytest.raises(error, match="max_grad_norm"):
        opt.step(lambda: F.mse_loss(model(x), y).backward(), max_grad_norm=bad)
    assert all(p.grad is None for p in model.parameters())  # refused before the ascent pass
    weights = [p.detach().clone() for p in model.parameters()]
    F.mse_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.mse_loss(model(x), y).backward()
    with pytest.raises(error, match="max_grad_norm"):
        opt.second_step(max_grad_norm=bad)
    assert not opt.perturbed
    assert_tensors_equal(list(model.parameters()), weights, "weights after the refused second_step")


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize(("backend", "kind", "mode"), backend_configs())
def test_batchnorm_statistics_move_once_per_step(kind, mode, backend, monkeypatch, gen):
    """With ``frozen_batchnorm_stats(model, enabled=opt.perturbed)`` in the closure, a SAM step
    moves the running statistics exactly as one SGD step's forward at ``w`` does; without it,
    they also absorb the batch at ``w + e``."""
    monkeypatch.setenv("SSAM_BACKEND", backend)
    x = torch.randn(16, 2, 4, 4, generator=gen)
    y = torch.randint(0, 5, (16,), generator=gen)
    for frozen in (True, False):
        torch.manual_seed(0)
        model = SmallConvBN()
        opt = make_optimizer(kind, mode, model, momentum=0.9)
        if isinstance(opt, ssam.SSAMF):
            opt.update_mask(model, torch.utils.data.TensorDataset(x, y))
        expected = _reference_bn_state(model, x)

        def closure():
            with ssam.frozen_batchnorm_stats(model, enabled=frozen and opt.perturbed):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
        got = _bn_state(model)
        if frozen:
            assert list(got) == list(expected)
            for k, v in expected.items():
                assert_tensors_equal([got[k]], [v], f"running stats {k!r}")
        else:
            assert int(got["bn.num_batches_tracked"]) == 2
            assert not torch.equal(got["bn.running_mean"], expected["bn.running_mean"])
        assert model.bn.track_running_stats  # restored on exit


def _reference_bn_state(model, x):
    """The statistics after one train-mode forward at ``w``, on a copy."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(x)
    return _bn_state(twin)


@pytest.mark.cpu
def test_frozen_batchnorm_stats_bad_input():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        with ssam.frozen_batchnorm_stats(object()):
            pass
    with pytest.raises(TypeError, match="enabled must be a bool"):
        with ssam.frozen_batchnorm_stats(SmallConvBN(), enabled=1):
            pass


@pytest.mark.cpu
@pytest.mark.parametrize("mode", ["exact", "mvue"])
def test_float64_layers_in_a_sparse_ascent_mode_are_refused_before_any_perturbation(mode, gen):
    """At construction, naming the parameter; and, for a model made float64 after it, in the
    layer's backward before anything is perturbed."""
    x, y = regression_batch(gen, n=16)
    torch.manual_seed(0)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(16, 10\)\) is float64"):
        make_optimizer("SSAMD", mode, MLP().double())
    model = MLP()
    opt = make_optimizer("SSAMD", mode, model)
    model.double()  # in place: the optimizer's parameters, now float64
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        opt.step(lambda: F.mse_loss(model(x.double()), y.double()).backward())
    assert not opt.perturbed
    assert_tensors_equal(list(model.parameters()), weights, "weights after the refused step")


@pytest.mark.parametrize(("backend", "kind", "mode"),
                         backend_configs(keep=lambda b, k, m: m in ("dense", "exact")))
def test_a_non_finite_ascent_gradient_perturbs_nothing(kind, mode, backend, monkeypatch, gen):
    """One inf in the ascent gradient, no GradScaler: no weight moves in the first step (on the
    planned and the per-list path alike, no sync), the skip is counted, and the descent step
    still trains; SGD alone with the same inf would corrupt one entry, SAM must not corrupt all."""
    monkeypatch.setenv("SSAM_BACKEND", backend)
    model, opt, x, y = setup_training(kind, mode, gen)
    before = [p.detach().clone() for p in model.parameters()]
    with opt.ascent():
        F.mse_loss(model(x), y).backward()
    # an entry the perturbation reads (inside the mask: a masked norm ignores the others)
    p = next(p for p in model.parameters() if p.grad is not None and (kind == "SAM" or opt.get_mask(p).any()))
    at = 0 if kind == "SAM" else int(opt.get_mask(p).view(-1).nonzero()[0])
    p.grad.view(-1)[at] = float("inf")
    opt.first_step(zero_grad=True)
    assert_tensors_equal(before, model.parameters())
    F.mse_loss(model(x), y).backward()
    opt.second_step()
    assert opt.skipped_steps() == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
