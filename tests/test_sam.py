import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import MLP, assert_tensors_equal, hand_written_sam_step, make_closure, regression_batch

import ssam

pytestmark = pytest.mark.cpu


def _model(seed=0):
    torch.manual_seed(seed)
    return MLP()


def _sam_steps(opt, model, batches):
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step(make_closure(model, x, y))


def _reference_sam(model, batches, rho, lr, momentum, adaptive=False):
    """SAM written out by hand (helpers.hand_written_sam_step), one step per batch."""
    buf = [None] * len(list(model.parameters()))
    for x, y in batches:
        hand_written_sam_step(model, x, y, rho, lr, momentum, adaptive, buf)


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_hand_written_reference(adaptive, gen):
    batches = [regression_batch(gen) for _ in range(5)]
    model, ref = _model(), _model()
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.1, momentum=0.9)
    _sam_steps(opt, model, batches)
    _reference_sam(ref, batches, rho=0.1, lr=0.1, momentum=0.9, adaptive=adaptive)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # and SAM really moved away from plain SGD
    sgd = _model()
    base = torch.optim.SGD(sgd.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        base.zero_grad()
        F.mse_loss(sgd(x), y).backward()
        base.step()
    assert not torch.allclose(next(model.parameters()), next(sgd.parameters()))


def test_rho_zero_is_exactly_the_base_optimizer(gen):
    batches = [regression_batch(gen) for _ in range(6)]
    model, plain = _model(), _model()
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    _sam_steps(opt, model, batches)
    base = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    for x, y in batches:
        base.zero_grad()
        F.mse_loss(plain(x), y).backward()
        base.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)


def test_instance_and_class_constructions_agree(gen):
    batches = [regression_batch(gen) for _ in range(4)]
    a, b = _model(), _model()
    opt_a = ssam.SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    base_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    opt_b = ssam.SAM(b.parameters(), base_b, rho=0.05)
    assert opt_b.param_groups is base_b.param_groups
    _sam_steps(opt_a, a, batches)
    _sam_steps(opt_b, b, batches)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_two_step_api_restores_exactly(gen):
    model = _model()
    x, y = regression_batch(gen)
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    F.mse_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(next(model.parameters()), before[0])
    F.mse_loss(model(x), y).backward()
    opt.second_step()  # lr = 0: weights must be bit-identical again
    assert_tensors_equal(model.parameters(), before)


def test_failed_closure_leaves_weights_untouched(gen):
    model = _model()
    x, y = regression_batch(gen)
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    before = copy.deepcopy(model.state_dict())
    F.mse_loss(model(x), y).backward()

    def broken():
        raise FloatingPointError("boom")

    with pytest.raises(FloatingPointError):
        opt.step(broken)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # and the optimizer is usable again
    F.mse_loss(model(x), y).backward()
    opt.step(make_closure(model, x, y))


def test_params_without_grad_are_skipped_and_per_group_rho(gen):
    model = _model()
    frozen = model.net[0].bias
    groups = [{"params": [model.net[0].weight, frozen], "rho": 0.0}, {"params": list(model.net[2].parameters())}]
    opt = ssam.SAM(groups, torch.optim.SGD, rho=0.3, lr=0.1)
    assert [g["rho"] for g in opt.param_groups] == [0.0, 0.3]
    x, y = regression_batch(gen)
    frozen.requires_grad_(False)
    w0 = model.net[0].weight.detach().clone()
    F.mse_loss(model(x), y).backward()
    opt.first_step()
    assert torch.equal(model.net[0].weight, w0)  # rho 0 in its group
    opt.second_step()


def test_scheduler_drives_shared_param_groups(gen):
    model = _model()
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _sam_steps(opt, model, [regression_batch(gen)])
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


def test_official_keywords_are_accepted(gen):
    model = _model()
    x, y = regression_batch(gen)
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    F.mse_loss(model(x), y).backward()
    loss = opt.step(make_closure(model, x, y), model=model, epoch=0, batch_idx=0, train_data=None, logger=None, step=0)
    assert loss.dim() == 0


def test_state_dict_round_trip(gen):
    batches = [regression_batch(gen) for _ in range(6)]
    a = _model()
    opt_a = ssam.SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    _sam_steps(opt_a, a, batches[:3])
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict())
    _sam_steps(opt_a, a, batches[3:])
    b = _model(seed=1)
    b.load_state_dict(saved_model)
    opt_b = ssam.SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt_b.load_state_dict(saved_opt)
    assert opt_b.param_groups is opt_b.base_optimizer.param_groups
    _sam_steps(opt_b, b, batches[3:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_add_param_group_gets_base_defaults(gen):
    model = _model()
    first, second = list(model.net[0].parameters()), list(model.net[2].parameters())
    opt = ssam.SAM(first, torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": second})
    assert opt.param_groups is opt.base_optimizer.param_groups and len(opt.param_groups) == 2
    assert opt.param_groups[1]["lr"] == 0.1 and opt.param_groups[1]["rho"] == 0.2
    x, y = regression_batch(gen)
    before = second[0].detach().clone()
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step(make_closure(model, x, y))
    assert not torch.equal(second[0], before)


@pytest.mark.parametrize("hyper", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, weight_decay=1e-3),
                                   dict(lr=0.05, momentum=0.9, nesterov=True), dict(lr=0.1, momentum=0.5, dampening=0.2)])
@pytest.mark.usefixtures("fused_sgd_everywhere")
def test_fused_sgd_second_step_equals_restore_then_sgd(hyper, gen):
    batches = [regression_batch(gen) for _ in range(4)]
    fused_model, plain_model = _model(), _model()
    fused = ssam.SAM(fused_model.parameters(), torch.optim.SGD, rho=0.1, **hyper)
    plain = ssam.SAM(plain_model.parameters(), torch.optim.SGD, rho=0.1, fuse_sgd=False, **hyper)
    calls = []
    plain.base_optimizer.register_step_post_hook(lambda *a: calls.append(1))
    fused.base_optimizer.register_step_post_hook(lambda *a: calls.append(2))
    _sam_steps(fused, fused_model, batches)
    _sam_steps(plain, plain_model, batches)
    assert calls == [1] * len(batches)  # the fused path does not call base_optimizer.step()
    for p, q in zip(fused_model.parameters(), plain_model.parameters()):
        assert torch.equal(p, q)
        if "momentum" in hyper:
            assert torch.equal(fused.base_optimizer.state[p]["momentum_buffer"],
                               plain.base_optimizer.state[q]["momentum_buffer"])


@pytest.mark.usefixtures("fused_sgd_everywhere")
def test_fused_sgd_with_a_parameter_idle_in_the_second_pass(gen):
    model = _model()
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    x, y = regression_batch(gen)
    bias = model.net[2].bias
    before = bias.detach().clone()
    F.mse_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.mse_loss(model(x), y).backward()
    bias.grad = None  # perturbed in the first step, no gradient in the second
    opt.second_step()
    assert torch.equal(bias, before)
    assert "momentum_buffer" not in opt.base_optimizer.state[bias]


@pytest.mark.parametrize("fuse_sgd", [True, False])
def test_an_empty_parameter_keeps_an_empty_momentum_buffer_as_torchs_sgd_does(fuse_sgd, gen):
    """torch's SGD gives an empty parameter with a gradient an empty momentum buffer; so does
    every second step (the planned kernels read an empty gradient's address, 0, as none), so
    the optimizer's state holds the same entries as a plain SGD's."""
    model = _model()
    empty = torch.nn.Parameter(torch.zeros(0, 3))
    params = [*model.parameters(), empty]
    opt = ssam.SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, fuse_sgd=fuse_sgd)
    x, y = regression_batch(gen)
    closure = make_closure(model, x, y, lambda out, y: F.mse_loss(out, y) + empty.sum())
    for _ in range(2):
        opt.zero_grad()
        closure()
        opt.step(closure)
    sgd = torch.optim.SGD([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.1, momentum=0.9)
    for q in sgd.param_groups[0]["params"]:
        q.grad = torch.ones_like(q)
    sgd.step()
    assert [sorted(opt.base_optimizer.state[p]) for p in params] == [sorted(sgd.state[q]) for q in
                                                                     sgd.param_groups[0]["params"]]
    assert opt.base_optimizer.state[empty]["momentum_buffer"].shape == empty.shape


@pytest.mark.parametrize("shape", [(6,), ()])
def test_a_momentum_buffer_shaped_unlike_its_parameter_is_refused_not_broadcast(shape, gen):
    """torch's SGD refuses it (its in-place add cannot broadcast); the planned step copied it
    into its parameter's layout, and the copy broadcast it. Refused, the weights back at w;
    the optimizer steps once the buffer is mended."""
    model = _model()
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    x, y = regression_batch(gen)
    _sam_steps(opt, model, [(x, y)])
    weight = model.net[0].weight  # (2-D: its buffer made 1-D or 0-dim below)
    opt.base_optimizer.state[weight]["momentum_buffer"] = torch.zeros(shape)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"momentum_buffer'\] is shape .* a momentum buffer is shaped like its parameter"):
        _sam_steps(opt, model, [(x, y)])
    assert_tensors_equal(model.parameters(), before)
    opt.base_optimizer.state[weight]["momentum_buffer"] = torch.zeros_like(weight)
    _sam_steps(opt, model, [(x, y)])
    assert not torch.equal(weight, before[0])


def test_no_fused_sgd_without_a_kernel_for_it(gen, monkeypatch):
    """With the reference backend, restore_sgd_step_ is a loop over tensors, slower than
    restore_ + torch's SGD: the second step then calls the base optimizer. A planned step (a
    kernel backend: the extension on CPU) fuses the restore and the SGD step in one kernel."""
    import ssam_kernels
    from helpers import EXT_BUILT

    monkeypatch.setenv("SSAM_BACKEND", "torch")
    model = _model()
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    assert ssam_kernels.auto_backend("restore_sgd_step_", "cpu") == "torch"
    calls = []
    opt.base_optimizer.register_step_post_hook(lambda *a: calls.append(1))
    _sam_steps(opt, model, [regression_batch(gen)])
    assert calls == [1] and opt._plan is None
    if not EXT_BUILT:
        return
    monkeypatch.setenv("SSAM_BACKEND", "ext")
    model = _model()
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    calls = []
    opt.base_optimizer.register_step_post_hook(lambda *a: calls.append(1))
    _sam_steps(opt, model, [regression_batch(gen)])
    assert calls == [] and opt._plan is not None and opt._plan.backend == "ext"


@pytest.mark.parametrize("fuse_sgd", [True, False])
@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.usefixtures("fused_sgd_everywhere")
def test_rho_zero_on_a_float64_model_is_exactly_sgd(sparse, backend, fuse_sgd, gen, monkeypatch):
    """w + 0 * g == w only if perturb_ computes in float64 for float64 weights (fp32 math
    drifted from SGD by ~1e-9): the float64 norm, scale and perturbation, then the (fused)
    SGD step, bit for bit as torch.optim.SGD over several steps."""
    from helpers import EXT_BUILT

    if backend == "ext" and not EXT_BUILT:
        pytest.skip("ssam_kernels._C not built")
    monkeypatch.setenv("SSAM_BACKEND", backend)
    batches = [(torch.randn(8, 10, generator=gen, dtype=torch.float64),
                torch.randn(8, 4, generator=gen, dtype=torch.float64)) for _ in range(5)]
    model, plain = _model().double(), _model().double()
    with torch.no_grad():  # weights with all 53 bits in use (fp32 math would keep fp32 values exact)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64), alpha=1e-3)
    plain.load_state_dict(model.state_dict())
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    if sparse:  # every entry perturbed (by 0): the masked kernels' float64 path
        opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.0, sparsity=0.5, num_samples=8, update_freq=1,
                         fuse_sgd=fuse_sgd, **hyper)
        opt._set_masks([torch.ones_like(p, dtype=torch.bool) for p in opt.params])
        opt.mask_updates += 1  # as update_mask does: no "empty mask" warning
        assert opt.mask_density() == 1.0
    else:
        opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.0, fuse_sgd=fuse_sgd, **hyper)
    _sam_steps(opt, model, batches)
    base = torch.optim.SGD(plain.parameters(), **hyper)
    for x, y in batches:
        base.zero_grad()
        F.mse_loss(plain(x), y).backward()
        base.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert p.dtype == torch.float64 and torch.equal(p, q)



def test_a_base_optimizer_with_its_own_rho_is_refused():
    """torch.optim.Adadelta's decay is param_groups[i]['rho'], SAM's radius too: SAM would
    perturb with Adadelta's 0.9. Refused, by name, before anything is built."""
    model = _model()
    with pytest.raises(ValueError, match="Adadelta has its own hyper-parameter 'rho'"):
        ssam.SAM(model.parameters(), torch.optim.Adadelta, rho=0.05, lr=1.0)
    with pytest.raises(ValueError, match="'rho'"):
        ssam.SAM(model.parameters(), torch.optim.Adadelta(model.parameters()), rho=0.05)
    # a per-group rho set on a base instance's groups is SAM's own, as documented
    base = torch.optim.SGD([{"params": model.parameters(), "rho": 0.3}], lr=0.1)
    assert ssam.SAM(model.parameters(), base, rho=0.05).param_groups[0]["rho"] == 0.3


def test_groups_given_beside_a_base_instance_hold_params_only():
    """With an optimizer instance, its param_groups are used: a rho, adaptive or lr in the
    groups given to SAM would be dropped silently, so they are refused."""
    model = _model()
    first, last = model.net[0], model.net[2]
    base = torch.optim.SGD([{"params": first.parameters()}, {"params": last.parameters()}], lr=0.1)
    for groups, key in (([{"params": first.parameters(), "rho": 0.5}, {"params": last.parameters()}], "rho"),
                        ([{"params": first.parameters()}, {"params": last.parameters(), "lr": 1.0}], "lr"),
                        ([{"params": first.parameters(), "adaptive": True}, {"params": last.parameters()}], "adaptive")):
        with pytest.raises(ValueError, match=rf"params\[\d\] sets \['{key}'\].*base optimizer's groups"):
            ssam.SAM(groups, base, rho=0.05)
    opt = ssam.SAM([{"params": first.parameters()}, {"params": last.parameters()}], base, rho=0.05)
    assert [g["rho"] for g in opt.param_groups] == [0.05, 0.05]


def test_named_parameters_with_a_base_instance(gen):
    """torch's optimizers take (name, param) pairs; so does SAM beside an instance (built on
    pairs or on plain parameters), and in add_param_group."""
    x, y = regression_batch(gen)
    for named_base in (True, False):
        model = _model()
        head = torch.nn.Linear(4, 4)
        base = torch.optim.SGD(model.named_parameters() if named_base else model.parameters(), lr=0.1)
        opt = ssam.SAM(model.named_parameters(), base, rho=0.05)
        # (torch refuses named and unnamed groups side by side)
        opt.add_param_group({"params": head.named_parameters() if named_base else head.parameters()})
        assert opt.param_groups[-1]["params"] == list(head.parameters())
        opt.zero_grad()
        opt.step(make_closure(model, x, y))
        opt.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="same parameters"):
        ssam.SAM(list(model.named_parameters())[:1], torch.optim.SGD(model.parameters(), lr=0.1))


def test_rho_zero_follows_a_fused_torch_sgd_exactly(gen):
    """SGD(fused=True) runs torch's own fused kernel, which rounds unlike ours: SAM leaves its
    step to it, so rho=0 stays the base optimizer bit for bit."""
    batches = [regression_batch(gen) for _ in range(8)]
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True, fused=True)
    model, plain = _model(), _model()
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.0, **hyper)
    base = torch.optim.SGD(plain.parameters(), **hyper)
    _sam_steps(opt, model, batches)
    for x, y in batches:
        base.zero_grad()
        F.mse_loss(plain(x), y).backward()
        base.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("fuse_sgd", [True, False])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_parameters_sharing_memory_are_refused_before_any_write(fuse_sgd, backend, monkeypatch):
    """Two Parameter objects over one tensor (old-style weight tying): each would be perturbed
    and restored as if alone, leaving the weights off on the planned and the per-list paths
    alike; the first step refuses them, weights untouched."""
    if backend == "torch":
        monkeypatch.setenv("SSAM_BACKEND", "torch")
    base = torch.randn(4, 3)
    a, b, c = torch.nn.Parameter(base), torch.nn.Parameter(base.data), torch.nn.Parameter(torch.randn(5))
    opt = ssam.SAM([c, a, b], torch.optim.SGD, rho=0.5, lr=0.1, fuse_sgd=fuse_sgd)
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in (a, b, c)]
    with pytest.raises(ValueError, match="parameters 1 and 2 .* share memory"):
        opt.first_step()
    assert_tensors_equal((a, b, c), before)
