"""Mixed precision: bf16 autocast, and fp16 with a GradScaler (unscale, skip on inf/NaN in
either pass with the weights restored bit for bit, scaler update), for every optimizer, every
ascent mode and every backend."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import MLP, assert_tensors_equal, backend_configs, regression_batch, setup_training

import ssam
import ssam_kernels
from ssam_kernels.ops.bitmask import computed_rows, row_span



def _amp_closure(model, x, y, dtype, scaler=None, poison=()):
    """Loss under ``dtype`` autocast, backward through ``scaler`` when given; the calls whose
    (0-based) number is in ``poison`` get a NaN loss, so their gradients are NaN."""
    calls = []

    def closure():
        with torch.autocast("cpu", dtype=dtype):
            loss = F.mse_loss(model(x), y)
        if len(calls) in poison:
            loss = loss * float("nan")
        calls.append(loss.detach())
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss

    return closure


def _bf16_may_reach_a_kernel(backend, mode):
    """Under bf16 autocast, these ascent modes may hand bf16 activations to a kernel (the masked
    weight gradient, the MVUE draw), which Triton's CPU interpreter cannot run: it refuses (the
    cuda tier runs Triton in bf16)."""
    return backend == "triton" and mode in ("exact", "mvue", "mvue_dx")


def _bf16_reaches_a_kernel(backend, mode, opt):
    """Whether it does with this optimizer's masks: the MVUE modes always; ``exact`` where a
    linear weight's rows holding a masked entry are scattered (wider than their span's slack:
    the masked weight gradient gathers them), not where every row holds one (plain autograd)
    or they form a range (a plain product on a view)."""
    if not _bf16_may_reach_a_kernel(backend, mode):
        return False
    if mode != "exact":
        return True
    return any(p.dim() == 2 and 0 < count < p.shape[0] and computed_rows(first, end, count) is None
               for p, (first, end, count) in ((p, row_span(opt.get_mask(p))) for p in opt.params))



def _train(model, opt, closure, steps=2, **step_kw):
    for _ in range(steps):
        opt.zero_grad()
        opt.step(closure, **step_kw)
    return [p.detach().clone() for p in model.parameters()]


# the kernel backends: the reference run inside each case (its weights fp32, finite and moved)
@pytest.mark.parametrize(("backend", "kind", "mode"), backend_configs(keep=lambda b, k, m: b != "torch"))
def test_bf16_autocast_trains_like_the_reference_backend(kind, mode, backend, monkeypatch, gen):
    """Under bf16 autocast the parameters stay fp32 and move; every kernel backend gives the
    reference backend's weights (same bf16 forward, fp32 optimizer math: fp32 rounding only)."""
    state = gen.get_state()
    model, opt, x, y = setup_training(kind, mode, gen)
    if _bf16_reaches_a_kernel(backend, mode, opt):
        monkeypatch.setenv("SSAM_BACKEND", backend)
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ssam_kernels.BackendUnavailableError, match="cannot run bfloat16"):
            _train(model, opt, _amp_closure(model, x, y, torch.bfloat16), steps=1)
        assert not opt.perturbed  # the failed step restored the weights, bit for bit
        assert_tensors_equal(before, model.parameters())
        return
    results = []
    for b in ("torch", backend):
        monkeypatch.setenv("SSAM_BACKEND", b)
        gen.set_state(state)
        model, opt, x, y = setup_training(kind, mode, gen)
        before = [p.detach().clone() for p in model.parameters()]
        results.append(_train(model, opt, _amp_closure(model, x, y, torch.bfloat16)))
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in results[-1])
        assert any(not torch.equal(a, b) for a, b in zip(before, results[-1]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("backend", "kind", "mode"),
                         backend_configs(keep=lambda b, k, m: not _bf16_may_reach_a_kernel(b, m)))
def test_grad_scaler_step_equals_the_unscaled_step(kind, mode, backend, monkeypatch, gen):
    """The scaler's plumbing, bit for bit: under bf16 autocast (fp32's exponent range, so no
    gradient under- or overflows) a power-of-two loss scale is exact, and the scaled step must
    equal the unscaled one; a missed or doubled unscale in either pass would show. The scaler
    grows after growth_interval clean steps (one update per SAM step)."""
    monkeypatch.setenv("SSAM_BACKEND", backend)
    state = gen.get_state()
    model, opt, x, y = setup_training(kind, mode, gen)
    plain = _train(model, opt, _amp_closure(model, x, y, torch.bfloat16), steps=3)
    gen.set_state(state)
    model, opt, x, y = setup_training(kind, mode, gen)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    scaled = _train(model, opt, _amp_closure(model, x, y, torch.bfloat16, scaler), steps=3, grad_scaler=scaler)
    for a, b in zip(plain, scaled):
        assert torch.equal(a, b)
    assert scaler.get_scale() == 2.0**11


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.base_optimizer.state_dict())


@pytest.mark.parametrize(("backend", "kind", "mode"), backend_configs())
@pytest.mark.parametrize("fuse_sgd", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("bad_pass", [0, 1], ids=["ascent-nan", "descent-nan"])
@pytest.mark.usefixtures("fused_sgd_everywhere")
def test_grad_scaler_skips_a_step_with_nan_in_either_pass(kind, mode, bad_pass, fuse_sgd, backend, monkeypatch, gen):
    """A NaN gradient in the ascent or the descent pass skips the whole step: weights and
    momentum exactly as before, the scale backed off; the next step trains again."""
    monkeypatch.setenv("SSAM_BACKEND", backend)
    model, opt, x, y = setup_training(kind, mode, gen, fuse_sgd=fuse_sgd)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _train(model, opt, _amp_closure(model, x, y, torch.float16, scaler), steps=1, grad_scaler=scaler)
    weights, state = _snapshot(model, opt)
    opt.zero_grad()
    opt.step(_amp_closure(model, x, y, torch.float16, scaler, poison=(bad_pass,)), grad_scaler=scaler)
    after, after_state = _snapshot(model, opt)
    for a, b in zip(weights, after):
        assert torch.equal(a, b)
    for key, value in state["state"].items():
        assert torch.equal(value["momentum_buffer"], after_state["state"][key]["momentum_buffer"])
    assert scaler.get_scale() == 2.0**9
    assert not opt.perturbed
    moved = _train(model, opt, _amp_closure(model, x, y, torch.float16, scaler), steps=1, grad_scaler=scaler)
    assert any(not torch.equal(a, b) for a, b in zip(weights, moved))
    assert all(torch.isfinite(p).all() for p in moved)


@pytest.mark.cpu
def test_grad_scaler_two_step_api(gen):
    """first_step/second_step with a scaler: the ascent gradient is unscaled before the norm
    (the perturbation is the unscaled run's, bit for bit under bf16 as above), and so is the
    descent gradient before the step."""
    x, y = regression_batch(gen)
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        torch.manual_seed(0)
        model = MLP()
        opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
        closure = _amp_closure(model, x, y, torch.bfloat16, scaler)
        closure()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        perturbed = [p.detach().clone() for p in model.parameters()]
        closure()
        opt.second_step(grad_scaler=scaler)
        runs.append((perturbed, [p.detach().clone() for p in model.parameters()]))
    (unscaled_perturbed, unscaled_weights), (scaled_perturbed, scaled_weights) = runs
    assert_tensors_equal(scaled_perturbed, unscaled_perturbed, "perturbed weights with the scaler")
    assert_tensors_equal(scaled_weights, unscaled_weights, "weights after the step with the scaler")


@pytest.mark.cpu
def test_grad_scaler_bad_input(gen):
    x, y = regression_batch(gen)
    model = MLP()
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    closure = _amp_closure(model, x, y, torch.float16)
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler"):
        opt.step(closure, grad_scaler=object())
    assert all(p.grad is None for p in model.parameters())  # checked before the ascent pass ran
    weights = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu")
    closure = _amp_closure(model, x, y, torch.float16, scaler)
    closure()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    closure()
    with pytest.raises(ValueError, match="grad_scaler must be the GradScaler given to first_step"):
        opt.second_step()
    assert not opt.perturbed
    assert_tensors_equal(list(model.parameters()), weights, "weights after the refused second_step")
    # the failed step closed the scaler's iteration: the next step can use it
    opt.zero_grad()
    opt.step(closure, grad_scaler=scaler)
    # a disabled scaler is no scaler
    opt.zero_grad()
    opt.step(_amp_closure(model, x, y, torch.bfloat16), grad_scaler=torch.amp.GradScaler("cpu", enabled=False))
