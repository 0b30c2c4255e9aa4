"""SAMStepPlan: the planned SAM / SSAM step (norm with the scale on the device, masked
perturbation with its backup, restore, restore + SGD) against plain-torch oracles, on every
backend; what a planned optimizer step launches and dispatches; its failure modes."""

import collections
import gc
import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import (BACKENDS_WITH_EXT, RecordOps, assert_tensors_equal, backend_dtypes, interpreter_fma_is_fused,
                     needs_ext, needs_interpreter, poisoned_allocations, rand, rand_mask)

import ssam
from ssam_kernels import SAMStepPlan, SGDGroup, _host_loops
from ssam_kernels.ops.bitmask import pack_mask
from ssam_kernels.ops.sam_step import PlanMismatch, plan_backend, storage_order

EPS = 1e-7
# 1 element, odd 2-D, one block short, two blocks and a tail, channels_last 4-D, 0 elements
SHAPES = [(1,), (3, 5), (4095,), (2 * 4096 + 3,), (4, 3, 5, 7), (0,)]
CHANNELS_LAST = 4
NO_GRAD = 1  # index of the parameter left without a gradient
KERNEL_BACKENDS = [p for p in BACKENDS_WITH_EXT if p.values[0] != "torch"]


def _params(dtype, gen, *, grads=True):
    ps = [rand(s, dtype, gen) for s in SHAPES]
    ps[CHANNELS_LAST] = ps[CHANNELS_LAST].contiguous(memory_format=torch.channels_last)
    if grads:
        for i, p in enumerate(ps):
            if i != NO_GRAD:
                p.grad = rand(p.shape, dtype, gen).contiguous(memory_format=torch.channels_last if p.dim() == 4
                                                              else torch.contiguous_format)
    return ps


def _masks(gen):
    masks = [rand_mask(s, 0.4, gen) for s in SHAPES]
    masks[0] = None  # unmasked: backed up whole
    masks[2] = torch.zeros(SHAPES[2], dtype=torch.bool)  # empty: nothing perturbed, no block launched
    masks[3][:4096] = False  # a block without a kept element beside one with
    return masks


def _oracle_perturbed(params, masks, groups, rho, masked_norm):
    """w + rho_g * g / (||g (* m)|| + eps), in float64, where masked and with a gradient."""
    total = 0.0
    for p, m in zip(params, masks):
        if p.grad is not None:
            g = p.grad.double()
            if masked_norm and m is not None:
                g = g * m
            total += float(g.square().sum())
    inv = 1.0 / (math.sqrt(total) + EPS)
    out = []
    for p, m, group in zip(params, masks, groups):
        if p.grad is None:
            out.append(p.double())
            continue
        new = p.double() + rho[group] * inv * p.grad.double()
        out.append(new if m is None else torch.where(m, new, p.double()))
    return out


def _clone(params):
    return [p.detach().clone() for p in params]


TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.float64: 1e-12}


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("masked_norm", [False, True])
def test_perturb_and_restore_against_the_oracle(backend, dtype, masked_norm, gen, poison_triton):
    params = _params(dtype, gen)
    masks = _masks(gen)
    groups = [0, 1, 0, 1, 0, 1]
    rho = [0.05, -0.2, 7.0]  # a negative rho (a maximizing group) moves against the gradient; group 2 holds none
    original = _clone(params)
    want = _oracle_perturbed(params, masks, groups, rho, masked_norm)
    with poison_triton():  # (Triton: the plan's backup and norm partials, and the step's tables)
        plan = SAMStepPlan(params, masks, groups=groups, num_groups=3, masked_norm=masked_norm, backend=backend)
        plan.perturb(rho)
    for p, w, o in zip(params, want, original):
        assert p.dtype == dtype and p.stride() == o.stride()
        torch.testing.assert_close(p.double(), w, rtol=TOL[dtype], atol=TOL[dtype] * 1e-2)
    for i, m in enumerate(masks):  # outside the mask, and without a gradient: untouched, bit for bit
        if m is not None:
            assert torch.equal(params[i][~m], original[i][~m])
    assert torch.equal(params[NO_GRAD], original[NO_GRAD])
    norm = 1.0 / float(plan.inv) - EPS
    total = sum(float((p.grad.double() * (m if masked_norm and m is not None else 1)).square().sum())
                for p, m in zip(params, masks) if p.grad is not None)
    assert norm == pytest.approx(math.sqrt(total), rel=1e-5 if dtype != torch.float64 else 1e-12)
    with torch.no_grad():
        for p, m in zip(params, masks):  # poison what restore must put back
            p[torch.ones_like(p, dtype=torch.bool) if m is None else m] = float("nan")
    with poison_triton():
        plan.restore()
    for p, o in zip(params, original):
        assert torch.equal(p, o) and p.stride() == o.stride()
    assert int(plan.skipped) == 0


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("masked_norm", [False, True])
def test_triton_perturbation_is_the_references_bit_for_bit(masked_norm, gen):
    """Same norm formula (reciprocal(sqrt(sum) + eps) * rho, unfused products): the fp32
    perturbation of the Triton kernels equals the reference backend's wherever the norms agree."""
    state = gen.get_state()
    groups, rho = [0, 1, 0, 1, 0, 1], [0.05, 0.2]
    results = []
    for backend in ("torch", "triton"):
        gen.set_state(state)
        params, masks = _params(torch.float32, gen), _masks(gen)
        original = _clone(params)
        plan = SAMStepPlan(params, masks, groups=groups, masked_norm=masked_norm, backend=backend)
        plan.perturb(rho)
        results.append((plan.inv.clone(), _clone(params)))
    (inv_a, a), (inv_b, b) = results
    if torch.equal(inv_a, inv_b):  # sums in another order may differ in the last bit
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    else:
        torch.testing.assert_close(inv_a, inv_b, rtol=1e-6, atol=0)
        # The norms differ in their last bits (relative difference rel). Each backend rounds
        # s = rho * inv and then s * g, half an ulp each, so the two perturbations e differ by
        # at most (rel + 2 eps) |e| (one eps more here for the second-order terms); each sum
        # w + e is rounded once, half an ulp of it (eps |w + e| for the two). Entries not
        # perturbed stay bit for bit.
        eps32 = torch.finfo(torch.float32).eps
        rel = float((inv_a.double() - inv_b.double()).abs() / inv_b.double())
        for x, y, w, p, m, g in zip(a, b, original, params, masks, groups):  # (p: the gradient)
            e = torch.zeros_like(w, dtype=torch.float64) if p.grad is None else \
                rho[g] * float(inv_b) * p.grad.double() * (1 if m is None else m)
            moved = e != 0
            bound = (rel + 3 * eps32) * e.abs() + eps32 * torch.maximum(x.double().abs(), y.double().abs()) * moved
            assert ((x.double() - y.double()).abs() <= bound).all()
            assert torch.equal(x[~moved], w[~moved]) and torch.equal(y[~moved], w[~moved])


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_last_norm_program_sums_every_partial_over_several_loop_steps(dtype, gen, monkeypatch):
    """The last norm program reads the partials four loads of FINAL_BLOCK at a time, unmasked,
    up to their zero padding: here several steps of its loop (FINAL_BLOCK cut to 16: three
    steps of 64 in fp32, five of 32 in float64) over 152 partials padded to 192, the plan's
    memory poisoned where Python allocates it (a padding not zeroed would enter the sum)."""
    from ssam_kernels.triton_ops import sam_step as triton_step

    monkeypatch.setattr(triton_step, "FINAL_BLOCK", 16)
    monkeypatch.setattr(triton_step.TritonStep, "partial_multiple", 64)
    block = triton_step.BLOCK // (2 if dtype == torch.float64 else 1)
    params = [rand((block * 70 + 5,), dtype, gen), rand((block * 81 - 3,), dtype, gen)]
    for p in params:
        p.grad = rand(p.shape, dtype, gen)
    want = _oracle_perturbed(params, [None, None], [0, 0], [0.05], False)
    with poisoned_allocations():
        plan = SAMStepPlan(params, backend="triton")
        assert plan._impl.norm_programs == 152 and plan._impl.partial.numel() == 192
        plan.perturb([0.05])
    total = sum(float(p.grad.double().square().sum()) for p in params)
    assert 1.0 / float(plan.inv) - EPS == pytest.approx(math.sqrt(total), rel=1e-5 if dtype != torch.float64 else 1e-12)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.double(), w, rtol=TOL[dtype], atol=TOL[dtype] * 1e-2)


def _sgd_reference(params, sgd_groups, groups, steps_grads):
    """torch.optim.SGD over the same weights and gradients (one optimizer per group)."""
    refs = [p.detach().clone() for p in params]
    opts = []
    for k, h in enumerate(sgd_groups):
        mine = [r for r, g in zip(refs, groups) if g == k]
        opts.append(torch.optim.SGD(mine, lr=h.lr, momentum=h.momentum, dampening=h.dampening,
                                    weight_decay=h.weight_decay, nesterov=h.nesterov, maximize=h.maximize))
    for grads in steps_grads:
        for r, g in zip(refs, grads):
            r.grad = None if g is None else g.clone()
        for o in opts:
            o.step()
    return refs, opts


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_restore_sgd_is_torch_sgd_on_the_restored_weights(backend, dtype, gen):
    """Two steps: the buffers start on each tensor's first step with a gradient (the one left
    without a gradient at step 1 starts at step 2; the empty one gets an empty buffer, as
    torch's SGD gives it), dampening, nesterov, maximize, weight decay and a group without
    momentum, against torch.optim.SGD on the CPU, bit for bit."""
    params = _params(dtype, gen)
    masks = _masks(gen)
    groups = [0, 1, 2, 1, 0, 0]
    sgd = [SGDGroup(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2),
           SGDGroup(lr=0.05, momentum=0.8, nesterov=True, maximize=True),
           SGDGroup(lr=0.2)]
    plan = SAMStepPlan(params, masks, groups=groups, backend=backend)
    start = _clone(params)
    history, made = [], []
    for step in range(2):
        plan.perturb([0.05, 0.1, 0.0])
        for i, p in enumerate(params):  # the descent gradients
            p.grad = None if (step == 0 and i == NO_GRAD) else rand(p.shape, dtype, gen).contiguous(
                memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format)
        history.append([None if p.grad is None else p.grad.clone() for p in params])
        made.append(plan.restore_sgd(sgd))
    assert made == [[0, 3, 4, 5], [1]]  # group 2 has no momentum: no buffers there
    refs, opts = _sgd_reference(start, sgd, groups, history)
    # bit for bit: a fused multiply-add exactly where torch's SGD has one (triton 3.6's interpreter
    # rounds tl.fma's product: within an ulp there; compiled kernels fuse)
    exact = backend != "triton" or interpreter_fma_is_fused()
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=2 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps)
    for p, r in zip(params, refs):
        torch.testing.assert_close(p, r, **tol)
        assert p.stride() == r.stride()
    states = {id(r): o.state[r] for o in opts for r in o.param_groups[0]["params"]}
    for i, (buf, r) in enumerate(zip(plan.buffers, refs)):
        ref_buf = states[id(r)].get("momentum_buffer")
        assert (buf is None) == (ref_buf is None), i
        if buf is not None:
            torch.testing.assert_close(buf, ref_buf, **tol)
            assert buf.stride() == params[i].stride()


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_an_empty_parameter_gets_a_buffer_only_where_its_group_has_momentum(backend, momentum, gen):
    """torch's SGD gives an empty parameter with a gradient an empty momentum buffer where its
    group has momentum, and none without. No kernel starts one, and the kernel side does not
    wait for one: once the others have theirs, its per-step fresh-flag bookkeeping ends (an
    empty tensor counted as waiting kept it going for good)."""
    params = [rand((5, 3), torch.float32, gen), rand((0, 3), torch.float32, gen)]
    for p in params:
        p.grad = rand(p.shape, torch.float32, gen)
    plan = SAMStepPlan(params, backend=backend)
    sgd = [SGDGroup(lr=0.1, momentum=momentum)]
    made = []
    for _ in range(2):
        plan.perturb([0.05])
        made.append(plan.restore_sgd(sgd))
    assert made == ([[0, 1], []] if momentum else [[], []])
    assert plan.buffers[1] is None if not momentum else plan.buffers[1].shape == (0, 3)
    assert plan._empty_waiting == []  # (nothing left to look at per step)
    if momentum and hasattr(plan._impl, "parts"):
        assert not any(part.any_fresh for part in plan._impl.parts)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_momentum_and_weight_decay_below_fp32s_range_step_as_torch_sgd(backend, gen):
    """A momentum and a weight decay that are not 0 but round to 0 in fp32 (1e-46): torch's SGD
    tests them against 0 as Python floats, so it keeps a buffer (with dampening: the buffer is
    0.5 d, not d) and adds ``w * 0`` (NaN at an infinite weight); the kernels decide the same in
    float64, before their fp32 math (they decided in fp32: no buffer written, no decay)."""
    params = _params(torch.float32, gen)
    for p in params:
        if p.numel():
            p[(-1,) * p.dim()] = float("inf")  # (a weight the perturbation moves or not, per its mask)
    masks = _masks(gen)
    sgd = [SGDGroup(lr=0.1, momentum=1e-46, dampening=0.5, weight_decay=1e-46)]
    plan = SAMStepPlan(params, masks, backend=backend)
    start = _clone(params)
    history = []
    for step in range(2):
        plan.perturb([0.05])
        for i, p in enumerate(params):
            p.grad = None if (step == 0 and i == NO_GRAD) else rand(p.shape, torch.float32, gen).contiguous(
                memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format)
        history.append([None if p.grad is None else p.grad.clone() for p in params])
        plan.restore_sgd(sgd)
    refs, opts = _sgd_reference(start, sgd, [0] * len(params), history)
    exact = backend != "triton" or interpreter_fma_is_fused()
    tol = dict(rtol=0, atol=0, equal_nan=True) if exact else dict(rtol=2e-7, atol=5e-7, equal_nan=True)
    for p, r in zip(params, refs):
        assert r.numel() == 0 or r[(-1,) * r.dim()].isnan()  # (what the decay does at the infinite weight)
        torch.testing.assert_close(p, r, **tol)
    states = opts[0].state
    for buf, r in zip(plan.buffers, refs):
        ref_buf = states[r].get("momentum_buffer")
        assert (buf is None) == (ref_buf is None)
        if buf is not None:
            torch.testing.assert_close(buf, ref_buf, **tol)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_scheduled_hyper_parameters_step_as_torch_sgd_without_new_tables(backend, gen):
    """A learning rate (and rho) that changes every step, as a schedule does: each step runs
    with its own values (against torch.optim.SGD with the same schedule, and the perturbation
    against the oracle), rewritten in the plan's own device buffers, not a new cached table
    per value."""
    from ssam_kernels._device_tables import CACHE

    params = _params(torch.float32, gen)
    params[NO_GRAD].grad = rand(params[NO_GRAD].shape, torch.float32, gen)
    masks = _masks(gen)
    groups = [0, 1, 0, 1, 0, 1]
    plan = SAMStepPlan(params, masks, groups=groups, backend=backend)
    start = _clone(params)
    schedule = [(SGDGroup(lr=0.1 / (k + 1), momentum=0.9, weight_decay=1e-2), SGDGroup(lr=0.3 - 0.1 * k))
                for k in range(3)]
    refs = [p.detach().clone() for p in start]
    opts = [torch.optim.SGD([r for r, g in zip(refs, groups) if g == k], lr=1.0, momentum=m, weight_decay=wd)
            for k, (m, wd) in enumerate([(0.9, 1e-2), (0.0, 0.0)])]
    for step, sgd in enumerate(schedule):
        rho = [0.05 * (step + 1), 0.02]
        if step == 2:  # (the first steps make the tables that stay: momentum flags...)
            misses = CACHE.misses
        expected = _oracle_perturbed(params, masks, groups, rho, masked_norm=False)
        plan.perturb(rho)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.double(), e, rtol=TOL[torch.float32], atol=TOL[torch.float32])
        for p in params:  # the descent gradients, in the ascent's tensors (their address tables hold)
            p.grad.copy_(rand(p.shape, torch.float32, gen))
        for r, p in zip(refs, params):
            r.grad = p.grad.clone()
        plan.restore_sgd(list(sgd))
        for o, h in zip(opts, sgd):
            o.param_groups[0]["lr"] = h.lr
            o.step()
    assert CACHE.misses == misses  # the last step's new rho and lr went into the plan's buffers
    exact = backend != "triton" or interpreter_fma_is_fused()
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=2e-7, atol=5e-7)
    for p, r in zip(params, refs):
        torch.testing.assert_close(p, r, **tol)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_a_list_of_sgd_groups_edited_in_place_is_read_again(backend, gen):
    """restore_sgd took the same list object as unchanged: an lr edited in it was ignored and a
    bad value not checked. A tuple (immutable) is taken as it is."""
    params = [rand((5,), generator=gen), rand((3, 4), generator=gen)]
    for p in params:
        p.grad = rand(p.shape, generator=gen)
    plan = SAMStepPlan(params, backend=backend)
    sgd = [SGDGroup(lr=0.8)]
    for lr in (0.8, 0.4):
        sgd[0] = SGDGroup(lr=lr)
        before = _clone(params)
        plan.perturb([0.0])
        plan.restore_sgd(sgd)
        for p, b in zip(params, before):  # torch SGD's op (within an ulp where triton 3.6 interprets tl.fma)
            tol = 0 if backend != "triton" or interpreter_fma_is_fused() else 2 * torch.finfo(p.dtype).eps
            torch.testing.assert_close(p, torch.add(b, p.grad, alpha=-lr), rtol=tol, atol=tol)
    sgd[0] = SGDGroup(lr=-1.0)
    plan.perturb([0.0])
    with pytest.raises(ValueError, match=r"sgd\[0\].lr must be a number >= 0"):
        plan.restore_sgd(sgd)
    plan.restore()


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_each_step_moves_the_version_counters_of_what_it_writes(backend, gen):
    """The kernels write through addresses; the plan bumps the parameters' version counters as
    torch's in-place ops do: a weight saved for a backward and perturbed is caught by autograd,
    and a cache keyed on a weight's version (sparse_mm_24's keep) sees the SGD step."""
    params, masks = _params(torch.float32, gen), _masks(gen)
    plan = SAMStepPlan(params, masks, backend=backend)
    versions = [p._version for p in params]
    plan.perturb([0.05])
    assert all(p._version > v for p, v in zip(params, versions))
    versions = [p._version for p in params]
    plan.restore()
    assert all(p._version > v for p, v in zip(params, versions))
    plan.perturb([0.05])
    versions = [p._version for p in params]
    plan.restore_sgd([SGDGroup(lr=0.1, momentum=0.9)])
    assert all(p._version > v for p, v in zip(params, versions))
    w = params[1]
    saved = w.detach().requires_grad_(True)
    loss = (saved * saved).sum()  # saves the weight's storage for the backward
    plan.perturb([0.05])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    plan.restore()


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_a_non_finite_ascent_gradient_perturbs_nothing(backend, gen):
    """An inf in the ascent gradient: the norm is not finite, so no weight moves (decided on the
    device, no host sync), the skip is counted, and the SGD step after it still runs."""
    params, masks = _params(torch.float32, gen), _masks(gen)
    plan = SAMStepPlan(params, masks, backend=backend)
    before = _clone(params)
    params[3].grad[7] = float("inf")
    plan.perturb([0.05])
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert int(plan.skipped) == 1 and float(plan.inv) == 0.0
    plan.restore()
    for p in params:
        if p.grad is not None:
            p.grad.nan_to_num_(posinf=0.0)
    plan.perturb([0.05])
    assert int(plan.skipped) == 1 and float(plan.inv) > 0
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    plan.restore_sgd([SGDGroup(lr=0.1)])
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_moved_parameters_and_mislaid_gradients_are_refused_before_any_write(backend, gen, monkeypatch):
    from ssam_kernels.ops import sam_step

    params, masks = _params(torch.float32, gen), _masks(gen)
    plan = SAMStepPlan(params, masks, backend=backend)
    before = _clone(params)
    params[2].grad = rand((4095 * 2,), generator=gen)[::2]  # strided: laid out unlike its parameter
    with pytest.raises(PlanMismatch, match="laid out unlike"):
        plan.perturb([0.05])
    params[2].grad = rand(SHAPES[2], generator=gen)
    params[CHANNELS_LAST].grad = params[CHANNELS_LAST].grad.contiguous()  # NCHW gradient, channels_last weight
    with pytest.raises(PlanMismatch, match="laid out unlike"):
        plan.perturb([0.05])
    params[CHANNELS_LAST].grad = params[CHANNELS_LAST].grad.contiguous(memory_format=torch.channels_last)
    # a gradient of another dtype (Tensor.grad_dtype allows it): the kernels would read it as
    # float32 (garbage from a float64 one's bytes; past the end of a bfloat16 one's)
    for dtype in (torch.float64, torch.bfloat16) if hasattr(torch.Tensor, "grad_dtype") else ():  # (torch >= 2.12)
        kept, params[2].grad = params[2].grad, None
        params[2].grad_dtype = dtype
        params[2].grad = kept.to(dtype)
        for host in (sam_step._host, None):  # the compiled reads and the Python ones
            monkeypatch.setattr(sam_step, "_host", host)
            with pytest.raises(PlanMismatch, match=f"{dtype}, its parameter torch.float32"):
                plan.perturb([0.05])
        monkeypatch.undo()
        params[2].grad = None
        params[2].grad_dtype = torch.float32
        params[2].grad = kept
    params[0].data = params[0].data.clone()  # as model.to(...) does
    with pytest.raises(PlanMismatch, match="moved"):
        plan.perturb([0.05])
    assert not plan.perturbed
    for p, b in zip(params, before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_perturb_takes_only_the_plans_own_gradient_addresses(backend, gen):
    """``perturb(grads=)`` writes through the addresses it is given: only the tuple the plan's
    ``grad_addresses()`` returned last is taken (a copy, numbers, another plan's are refused
    before any write), as is an SGD group not in a sequence."""
    params = _params(torch.float32, gen)
    plan = SAMStepPlan(params, backend=backend)
    before = _clone(params)
    addresses = plan.grad_addresses()
    other = SAMStepPlan(params, backend=backend).grad_addresses()
    for bad in (tuple(list(addresses)), list(addresses), (12345,) * len(params), other):
        with pytest.raises(ValueError, match="grads must be the tuple this plan's grad_addresses\\(\\) returned last"):
            plan.perturb([0.05], grads=bad)
    assert not plan.perturbed
    assert_tensors_equal(params, before)
    plan.perturb([0.05], grads=addresses)
    with pytest.raises(TypeError, match="sgd must be a list or tuple of SGDGroup"):
        plan.restore_sgd(SGDGroup(lr=0.1))
    plan.restore_sgd([SGDGroup(lr=0.1)])


@pytest.mark.cpu
def test_sam_steps_gradients_of_another_dtype_off_the_plan(monkeypatch):
    """SAM over bfloat16 weights with float32 gradients (``Tensor.grad_dtype``, torch >= 2.12):
    the plan cannot read them, so the step runs the per-list ops, and equals the reference
    backend's step."""
    if not hasattr(torch.Tensor, "grad_dtype"):
        pytest.skip("this torch has no Tensor.grad_dtype: a gradient always has its parameter's dtype")

    def run():
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3).to(torch.bfloat16)
        for p in model.parameters():
            p.grad_dtype = torch.float32
        opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        for _ in range(2):
            opt.zero_grad()
            model(x).float().square().mean().backward()
            assert all(p.grad.dtype == torch.float32 for p in model.parameters())
            opt.first_step(zero_grad=True)
            model(x).float().square().mean().backward()
            opt.second_step()
        return opt, [p.detach().clone() for p in model.parameters()]

    opt, got = run()
    assert opt._plan_made and opt._plan is None  # decided once: no plan (not made and dropped at every step)
    monkeypatch.setenv("SSAM_BACKEND", "torch")
    _, want = run()
    assert_tensors_equal(got, want)


@pytest.mark.cpu
def test_plans_refused_step_after_step_are_made_less_and_less_often(monkeypatch):
    """Gradients of another dtype under ``grad_dtype=None`` (set by hand, as a framework may):
    each plan is refused at its first step. The next is made after 1, 2, 4 ... steps on the
    per-list ops (it was made at every step: a plan's cost a step), and the steps equal the
    reference backend's. A change that may remove the cause (masks, parameters, state) ends the
    wait."""
    if not hasattr(torch.Tensor, "grad_dtype"):
        pytest.skip("this torch has no Tensor.grad_dtype: a gradient always has its parameter's dtype")
    if plan_backend("auto", torch.device("cpu")) in (None, "torch"):
        pytest.skip("no planned step on CPU without the extension's CPU kernels")
    made = []
    init = SAMStepPlan.__init__

    def counting_init(self, *args, **kwargs):
        made.append(1)
        init(self, *args, **kwargs)

    def run():
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        for p in model.parameters():
            p.grad_dtype = None  # any dtype
        opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))

        def backward():
            model(x).square().mean().backward()
            for p in model.parameters():
                p.grad = p.grad.double()

        for _ in range(15):
            opt.zero_grad()
            backward()
            opt.first_step(zero_grad=True)
            backward()
            opt.second_step()
        return opt, [p.detach().clone() for p in model.parameters()]

    monkeypatch.setattr(SAMStepPlan, "__init__", counting_init)
    opt, got = run()
    assert len(made) == 5  # at steps 1, 2, 4, 7 and 12 (the next at 21)
    assert opt._plan_wait == 5
    # a change that may remove the cause (here a state_dict loaded) ends the wait: the next
    # step plans, and with gradients of the parameters' dtype the plan takes it
    opt.load_state_dict(opt.state_dict())
    model_params = [p for g in opt.param_groups for p in g["params"]]
    for p in model_params:
        p.grad = torch.ones_like(p)
    opt.first_step(zero_grad=False)
    opt.second_step()
    assert len(made) == 6 and opt._plan is not None and opt._plan_steps == 1
    monkeypatch.setenv("SSAM_BACKEND", "torch")
    assert_tensors_equal(got, run()[1])


@pytest.mark.parametrize("host_loops", [True, False], ids=["C", "python"])
@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_a_mask_written_in_place_is_refused_before_any_write(backend, host_loops, gen, monkeypatch):
    """The plan's tables count each mask's bits once; a bit set in place later sent the kernels'
    backup writes into the next tensor's slots or past the backup's end (a segfault on the
    extension's CPU kernels). Refused now, by the bits' version counters, in C and in Python;
    once perturbed, restore() refuses too (its slots follow the old bits)."""
    if not host_loops:
        monkeypatch.setattr(_host_loops, "_host", None)
    params = _params(torch.float32, gen)
    masks = [None if m is None else pack_mask(m) for m in _masks(gen)]
    plan = SAMStepPlan(params, masks, backend=backend)
    before = _clone(params)
    masks[3].bits.fill_(255)  # every entry of a tensor whose plan kept 40% of them
    with pytest.raises(PlanMismatch, match="written in place"):
        plan.perturb([0.05])
    assert not plan.perturbed
    assert_tensors_equal(params, before, "params after the refused perturb")
    plan = SAMStepPlan(params, masks, backend=backend)  # a new plan takes the new bits
    plan.perturb([0.05])
    assert not torch.equal(params[3], before[3])
    masks[4].bits[:2] = 255
    for call in (plan.restore, lambda: plan.restore_sgd([SGDGroup(lr=0.1)])):
        with pytest.raises(PlanMismatch, match="restore.*written in place.*weights stay"):
            call()
        assert plan.perturbed


@pytest.mark.cpu
@needs_ext
def test_the_optimizer_steps_unplanned_when_its_mask_bits_were_written_in_place(gen, monkeypatch):
    """SSAM-F's planned step meets a mask written in place (its own masks are replaced whole; a
    write into their bits, as a broadcast into them would make): the perturbation goes through
    the per-list ops, which read the bits as they are now, and the next step plans anew."""
    monkeypatch.setenv("SSAM_BACKEND", "ext")
    torch.manual_seed(0)
    model = _model(2)
    params = list(model.parameters())
    opt = ssam.SSAMF(params, torch.optim.SGD, rho=0.05, sparsity=0.5, num_samples=1, update_freq=1, lr=0.1)
    opt._set_masks([torch.zeros(p.shape, dtype=torch.bool) for p in params])
    opt.mask_updates += 1
    x = rand((8, 4), generator=gen)

    def ascent():
        opt.zero_grad()
        model(x).square().sum().backward()
        before = _clone(params)
        opt.first_step()
        return before

    ascent()
    opt.second_step()
    assert opt._plan is not None
    opt._mask(params[0]).bits.fill_(255)  # every entry of the first weight
    before = ascent()
    moved = params[0] != before[0]
    assert bool(moved[params[0].grad != 0].all())  # the bits as they are now were read
    assert_tensors_equal(params[1:], before[1:])
    opt.second_step()
    ascent()
    assert opt._plan is not None  # planned again, on the bits as they are now
    opt.second_step()


@pytest.mark.cpu
def test_the_compiled_host_reads_equal_the_python_ones(gen, monkeypatch):
    """ssam_kernels._host (C) and the Python fallback read the same addresses, and both refuse a
    moved parameter and a mislaid gradient (the C one by returning None: Python says which); its
    version-counter loop moves them as torch's does."""
    from ssam_kernels.ops import sam_step

    if sam_step._host is None:
        if os.environ.get("SSAM_BUILD_EXT") == "1":
            pytest.fail("ssam_kernels._host was not built (SSAM_BUILD_EXT=1)")
        pytest.skip("ssam_kernels._host not built")
    params = _params(torch.float32, gen)
    plan = SAMStepPlan(params, backend="torch")
    fast = plan.grad_addresses()
    assert fast[NO_GRAD] == 0 and fast[0] == params[0].grad.data_ptr()
    assert sam_step._host.grad_addresses(plan.params, None) == fast
    monkeypatch.setattr(sam_step, "_host", None)
    assert plan.grad_addresses() == fast
    monkeypatch.undo()
    params[CHANNELS_LAST].grad = params[CHANNELS_LAST].grad.contiguous()
    assert sam_step._host.grad_addresses(plan.params, plan._addresses) is None
    params[CHANNELS_LAST].grad = None
    params[3].data = params[3].data.clone()
    assert sam_step._host.grad_addresses(plan.params, plan._addresses) is None
    assert sam_step._host.grad_addresses(plan.params, None) is not None
    with pytest.raises(TypeError, match=r"params\[1\] is not a tensor"):
        sam_step._host.grad_addresses([params[0], 3], None)
    # version counters: the C loop moves each one as torch's does; inference tensors have none
    assert _host_loops._host is sam_step._host  # the plan and the ops bump through the C loop
    versions = [p._version for p in params]
    sam_step._host.bump_versions(params)
    torch._C._increment_version(params)
    assert [p._version for p in params] == [v + 2 for v in versions]
    with torch.inference_mode():
        frozen = torch.zeros(3)
    sam_step._host.bump_versions([frozen])
    sam_step._host.bump_versions([params[0], None])  # an optional operand not given: skipped
    assert params[0]._version == versions[0] + 3
    with pytest.raises(TypeError, match=r"tensors\[1\] is not a tensor or None"):
        sam_step._host.bump_versions([params[0], 3])
    # the optimizer's check that the base optimizer's state still holds the plan's buffers
    buffers = [torch.zeros(2), None, torch.zeros(2)]
    entries = [{"momentum_buffer": buffers[0]}, {}, {"momentum_buffer": buffers[2], "other": 1}]
    cases = [(entries, buffers, True), (entries, [buffers[0], None, torch.zeros(2)], False),
             (entries, buffers[:2], False), (entries[:1] + [{"momentum_buffer": None}] + entries[2:], buffers, True),
             ([{}, {}, {}], [None] * 3, True), ([{}, {}, {}], buffers, False)]
    for dicts, expected, same in cases:
        assert _host_loops.same_entries(dicts, "momentum_buffer", expected) is same
        monkeypatch.setattr(_host_loops, "_host", None)
        assert _host_loops.same_entries(dicts, "momentum_buffer", expected) is same
        monkeypatch.undo()
    with pytest.raises(TypeError, match=r"dicts\[1\] is not a dict"):
        sam_step._host.same_entries([{}, 1], "momentum_buffer", [None, None])
    # and that no entry of that state was replaced, added or removed (in the dict's order)
    state = collections.defaultdict(dict, zip(params[:3], entries))
    replaced = collections.defaultdict(dict, state)
    replaced[params[1]] = {}
    moved = dict(state)
    moved[params[0]] = moved.pop(params[0])  # removed and added again: last now
    for d, expected, same in [(state, entries, True), (state, entries[:2], False), (replaced, entries, False),
                              (moved, entries, False), (moved, entries[1:] + entries[:1], True), ({}, [], True)]:
        assert _host_loops.same_values(d, expected) is same
        monkeypatch.setattr(_host_loops, "_host", None)
        assert _host_loops.same_values(d, expected) is same
        monkeypatch.undo()
    # the overlap check of the list ops and the plan: the C loop finds what Python finds
    from ssam_kernels import _checks

    flat = torch.zeros(20)
    lists = [[flat[:5], flat[5:10]], [flat[:6], flat[5:]], [flat, torch.zeros(3), flat], [flat[::2], flat[1::2]],
             [torch.zeros(0), flat, flat[19:]], [flat.view(4, 5).t(), torch.zeros(2, 2)], [flat[10:], flat[:10]]]
    for tensors in lists:
        found = _checks.overlapping_pair(tensors)
        monkeypatch.setattr(_host_loops, "_host", None)
        assert _checks.overlapping_pair(tensors) == found
        monkeypatch.undo()
    assert [_checks.overlapping_pair(t) for t in lists] == [None, (0, 1), (0, 2), (0, 1), (1, 2), None, None]


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_parameters_that_share_memory_are_refused(backend, gen):
    """A tensor listed twice, or overlapping views of one buffer: the second entry would back up
    values the first already perturbed (and on a GPU both race), so the plan refuses them;
    views of one buffer that do not overlap are separate parameters."""
    flat = rand((40,), generator=gen)
    w = rand((3, 4), generator=gen)
    for params, pair in (([w, flat[:8], w], "params\\[0\\] and params\\[2\\]"),
                         ([flat[:20], flat[10:30]], "params\\[0\\] and params\\[1\\]"),
                         ([flat[:20].view(4, 5), flat[19:].view(3, 7)], "params\\[0\\] and params\\[1\\]"),
                         ([flat[:20].view(5, 4).t(), flat[16:]], "params\\[0\\] and params\\[1\\]")):
        with pytest.raises(ValueError, match=pair + " share memory"):
            SAMStepPlan(params, backend=backend)
    plan = SAMStepPlan([flat[:20].view(4, 5), flat[20:], w], backend=backend)
    for p in plan.params:
        p.grad = torch.ones_like(p)
    before = flat.clone()
    plan.perturb(rho=[0.5])
    plan.restore()
    assert torch.equal(flat, before)


@pytest.mark.cpu
def test_bad_input_names_what_is_wrong(gen):
    params = _params(torch.float32, gen)
    with pytest.raises(ValueError, match=r"params\[1\].*not dense"):
        SAMStepPlan([params[0], rand((6, 4), generator=gen)[:, ::2]])
    with pytest.raises(ValueError, match="one device"):
        SAMStepPlan([params[0], torch.zeros(3, device="meta")])
    with pytest.raises(ValueError, match="groups must hold one int"):
        SAMStepPlan(params, groups=[0, 1])
    with pytest.raises(ValueError, match="num_groups must be an int"):
        SAMStepPlan(params, num_groups=True)
    for eps in (0.0, 1e-39):  # (1 / eps * 0 for a zero gradient: NaN weights; 1e-39's inverse overflows fp32)
        with pytest.raises(ValueError, match=r"eps must be a finite number >= 2\*\*-126"):
            SAMStepPlan(params, eps=eps)
    with pytest.raises(TypeError, match=r"params\[0\] must be a floating-point"):
        SAMStepPlan([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"masks\[1\] has shape"):
        SAMStepPlan(params, [None, torch.zeros(2, dtype=torch.bool)] + [None] * 4)
    with pytest.raises(TypeError, match="masked_norm must be a bool, got int"):
        SAMStepPlan(params, masked_norm=1)
    plan = SAMStepPlan(params, groups=[0, 1, 0, 1, 0, 1], backend="torch")
    original = _clone(params)
    with pytest.raises(ValueError, match="rho must hold one number per group"):
        plan.perturb([0.05])
    with pytest.raises(ValueError, match="finite numbers"):
        plan.perturb([0.05, float("inf")])
    with pytest.raises(ValueError, match=r"num_groups must be an int > max\(groups\) \(1\)"):
        SAMStepPlan(params, groups=[0, 1, 0, 1, 0, 1], num_groups=2 - 1)
    with pytest.raises(RuntimeError, match="without a preceding perturb"):
        plan.restore()
    plan.perturb([0.05, 0.05])
    perturbed = _clone(params)
    assert not all(torch.equal(p, o) for p, o in zip(perturbed, original))
    with pytest.raises(RuntimeError, match="called twice"):
        plan.perturb([0.05, 0.05])
    with pytest.raises(TypeError, match=r"sgd\[1\] must be an SGDGroup"):
        plan.restore_sgd([SGDGroup(lr=0.1), {"lr": 0.1}])
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        plan.restore_sgd([SGDGroup(lr=0.1), SGDGroup(lr=0.1, nesterov=True)])
    with pytest.raises(ValueError, match=r"sgd\[0\].lr must be a number >= 0"):
        plan.restore_sgd([SGDGroup(lr=-1.0), SGDGroup(lr=0.1)])
    with pytest.raises(ValueError, match=r"sgd must be a list of 2 SGDGroup \(one per group\)"):
        plan.restore_sgd([SGDGroup(lr=0.1)])
    # refused before anything was written: still at w + e, and perturbed (restore puts back w)
    assert_tensors_equal(params, perturbed, "params after the refused restore_sgd (w + e)")
    assert plan.perturbed
    plan.restore()
    assert_tensors_equal(params, original)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_set_buffers_refuses_a_buffer_unlike_its_parameter(backend, gen):
    """The kernels write momentum buffers through their addresses, as their parameters' dtype
    and layout: a buffer of another dtype, shape or strides (or one too few, or one sharing a
    parameter's memory) raises ValueError naming it, the plan's buffers and the weights as they
    were; the step then runs from the buffers the plan had."""
    params = _params(torch.float32, gen)
    params[NO_GRAD].grad = rand(params[NO_GRAD].shape, torch.float32, gen)
    groups = [0, 1, 0, 1, 0, 1]
    plan = SAMStepPlan(params, _masks(gen), groups=groups, backend=backend)
    start = _clone(params)
    buffers = [rand(p.shape, torch.float32, gen).contiguous(memory_format=torch.channels_last if p.dim() == 4
                                                               else torch.contiguous_format) for p in params]
    plan.set_buffers(buffers)
    kept = list(plan.buffers)
    plan.perturb([0.05, 0.1])
    perturbed = _clone(params)

    def swapped(i, b):
        return buffers[:i] + [b] + buffers[i + 1:]

    for bad, message in (
            (buffers[:-1], r"buffers must hold one entry per parameter \(6\), got 5"),
            (swapped(1, buffers[1].half()), r"buffers\[1\] must be None or a torch\.float32 tensor shaped and laid "
                                            r"out like params\[1\]"),
            (swapped(0, buffers[0].double()), r"buffers\[0\] must be None or a torch\.float32 tensor"),
            (swapped(1, torch.zeros(5, 3)), r"buffers\[1\] must be None or a torch\.float32 tensor"),  # (3, 5) param
            (swapped(1, torch.zeros(5, 3).t()), r"buffers\[1\] must be None or a torch\.float32 tensor"),  # transposed
            (swapped(CHANNELS_LAST, buffers[CHANNELS_LAST].contiguous()),
             r"buffers\[4\] must be None or a torch\.float32 tensor"),  # not channels_last
            (swapped(3, params[3]), r"params\[3\] and buffers\[3\] share memory")):
        with pytest.raises(ValueError, match=message):
            plan.set_buffers(bad)
        assert all(a is b for a, b in zip(plan.buffers, kept)) and len(plan.buffers) == len(kept)
        assert_tensors_equal(params, perturbed, f"params after the refused set_buffers ({message})")
        assert plan.perturbed
    for p in params:  # the descent gradients
        p.grad = rand(p.shape, torch.float32, gen).contiguous(memory_format=torch.channels_last if p.dim() == 4
                                                              else torch.contiguous_format)
    sgd = [SGDGroup(lr=0.1, momentum=0.9), SGDGroup(lr=0.05, momentum=0.5, dampening=0.25)]
    refs = [s.clone() for s in start]
    opts = [torch.optim.SGD([r for r, g in zip(refs, groups) if g == k], lr=h.lr, momentum=h.momentum,
                            dampening=h.dampening) for k, h in enumerate(sgd)]
    for r, p, b, g in zip(refs, params, buffers, groups):
        r.grad = p.grad.clone()
        opts[g].state[r]["momentum_buffer"] = b.clone()
    assert plan.restore_sgd(sgd) == []  # every buffer given: none made
    for o in opts:
        o.step()
    # bit for bit: a fused multiply-add exactly where torch's SGD has one (as above)
    eps = torch.finfo(torch.float32).eps
    exact = backend != "triton" or interpreter_fma_is_fused()
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=2 * eps, atol=4 * eps)
    for p, r, b, o, g in zip(params, refs, plan.buffers, kept, groups):
        torch.testing.assert_close(p, r, **tol)
        assert b is o  # the buffers given, updated in place
        torch.testing.assert_close(b, opts[g].state[r]["momentum_buffer"], **tol)


@pytest.mark.cpu
def test_storage_order():
    x = torch.zeros(2, 3, 4, 5)
    assert storage_order(x) == (0, 1, 2, 3)
    assert storage_order(x.contiguous(memory_format=torch.channels_last)) == (0, 2, 3, 1)
    assert storage_order(x.transpose(0, 1)) == (1, 0, 2, 3)
    assert storage_order(x[:, :, ::2]) is None
    assert storage_order(torch.zeros(3).expand(4, 3)) is None


# --- what a planned optimizer step costs on the host ------------------------------------------

class LaunchCounter:
    """The Triton kernels launched in a block (by name), compiled or interpreted; they run, out
    of sight of dispatch modes (the interpreter's own torch calls are not the step's ops)."""

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        self.names, self.keywords, self.saved = [], [], []
        for cls in (JITFunction, InterpretedFunction):
            original = cls.run

            def run(fn, *args, _original=original, **kwargs):
                self.names.append(fn.fn.__name__)
                self.keywords.append(kwargs)
                with torch._C._DisableTorchDispatch():
                    return _original(fn, *args, **kwargs)

            self.saved.append((cls, original))
            cls.run = run
        return self

    def __exit__(self, *exc):
        for cls, original in self.saved:
            cls.run = original


def _model(width):
    layers = []
    for _ in range(width):
        layers += [torch.nn.Linear(4, 4), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


@pytest.mark.interpret
@pytest.mark.parametrize("kind", ["SAM", "SSAMF"])
@needs_interpreter
def test_a_planned_step_launches_three_kernels_whatever_the_number_of_tensors(kind, monkeypatch):
    """SAM and SSAM-F with fused SGD on a GPU's choices (Triton): the norm, the perturbation,
    the restore + SGD: 3 launches, and the same dispatcher ops, for 8 tensors or 64, none of
    them a host sync. (The launches are recorded, not run.)"""
    monkeypatch.setenv("SSAM_BACKEND", "triton")
    counts, names = {}, {}
    for width in (4, 32):
        torch.manual_seed(0)
        model = _model(width)
        params = list(model.parameters())
        if kind == "SAM":
            opt = ssam.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        else:
            opt = ssam.SSAMF(params, torch.optim.SGD, rho=0.05, sparsity=0.5, num_samples=1, update_freq=1,
                             lr=0.1, momentum=0.9)
            opt._set_masks([torch.rand(p.shape) < 0.5 for p in params])  # as update_mask would
            opt.mask_updates += 1
        # the same gradient tensors in every step, as the allocator hands a training loop the
        # same blocks step after step: fresh ones at new addresses would cost one gradient-table
        # build (an op whatever the tensor count), or not, by the allocator's whim
        grads = [torch.ones_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.first_step()
        for p, g in zip(params, grads):
            p.grad = g
        opt.second_step()  # the plan is made here, and the momentum buffers
        for p, g in zip(params, grads):
            p.grad = g
        with LaunchCounter() as launches, RecordOps() as ops:
            opt.first_step()
            for p, g in zip(params, grads):
                p.grad = g
            opt.second_step()
        assert opt._plan is not None
        assert launches.names == ["_norm_kernel", "_perturb_kernel", "_restore_sgd_kernel"]
        assert ops.syncing == []
        counts[width] = len(ops.ops)
        names[width] = [str(f) for f in ops.ops]
    assert counts[4] == counts[32] <= 4, (counts, names)


def _steps_against_the_reference(dev, masks, backend, steps=2):
    """``steps`` planned steps (perturb, restore_sgd) of ``dev`` (any device) with ``backend``
    beside the reference backend's on CPU copies, compared after each perturb and each step.
    fp32 / float64: the reference on the same dtype (1e-5 / 1e-12). fp16 / bf16: the kernels
    compute in fp32 and round once when they store (weights, momentum buffers), where torch's
    SGD rounds after every op; so the reference runs on fp32 copies and its weights and buffers
    are rounded to the dtype after each step, as the kernels store them: then the two differ by
    the rounding of one fp32 result at most (a norm summed in another order), one ulp.
    Returns the two plans (device, reference)."""
    dtype = dev[0].dtype
    low = dtype in (torch.float16, torch.bfloat16)
    host = [p.detach().to("cpu", torch.float32 if low else dtype, copy=True) for p in dev]
    for h, p in zip(host, dev):
        h.grad = None if p.grad is None else p.grad.to("cpu", h.dtype, copy=True)
    groups, sgd = [0, 1, 0, 1, 0, 1], [SGDGroup(lr=0.1, momentum=0.9, weight_decay=1e-2),
                                       SGDGroup(lr=0.05, momentum=0.8, nesterov=True)]
    reference = SAMStepPlan(host, [None if m is None else m.cpu() for m in masks], groups=groups, masked_norm=True,
                            backend="torch")
    plan = SAMStepPlan(dev, masks, groups=groups, masked_norm=True, backend=backend)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}.get(
        dtype, dict(rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps * 1e-3))

    def compare(what):
        for i, (h, p) in enumerate(zip(host + reference.buffers, dev + plan.buffers)):
            assert (h is None) == (p is None), (what, i)
            if h is not None:
                torch.testing.assert_close(p.cpu(), h.to(dtype), **tol, msg=lambda m: f"{what}, tensor {i}: {m}")

    for step in range(steps):
        plan.perturb([0.05, 0.1])
        reference.perturb([0.05, 0.1])
        compare(f"step {step}: perturbed")
        plan.restore_sgd(sgd)
        reference.restore_sgd(sgd)
        if low:
            with torch.no_grad():
                for t in host + reference.buffers:
                    if t is not None:
                        t.copy_(t.to(dtype))
        compare(f"step {step}: after SGD")
    return plan, reference


@pytest.mark.interpret
@needs_interpreter
def test_gradients_off_16_bytes_cost_the_weights_no_vectors(gen):
    """Gradients as views of one flat bucket, each starting 4 bytes past 16 (DDP's
    ``gradient_as_bucket_view``): the steps equal the reference's, and the kernels are told the
    weights, backups and buffers still start on 16 bytes (ALIGNED) and the gradients do not
    (G_ALIGNED): only the gradients' loads give up their 16-byte vectors (the compile tier
    checks the code of that specialization)."""
    params = _params(torch.float32, gen)
    bucket = torch.zeros(sum(p.numel() + 4 for p in params) + 1)
    at = 1
    for p in params:
        if p.grad is not None:
            view = bucket.as_strided(p.shape, p.stride(), at)
            view.copy_(p.grad)
            p.grad = view
        at += -(-p.numel() // 4) * 4 + 4  # the next view 4 bytes past 16 again
    assert all(p.grad.data_ptr() % 16 == 4 for p in params if p.grad is not None and p.numel())
    with LaunchCounter() as launches:
        _steps_against_the_reference(params, _masks(gen), "triton")
    flags = {(name, kw["ALIGNED"], kw["G_ALIGNED"]) for name, kw in zip(launches.names, launches.keywords)}
    assert flags == {("_norm_kernel", True, False), ("_perturb_kernel", True, False),
                     ("_restore_sgd_kernel", True, False)}


@pytest.mark.parametrize("backend,dtype", backend_dtypes([torch.float16, torch.bfloat16], KERNEL_BACKENDS))
def test_low_precision_steps_round_once_from_fp32(backend, dtype, gen):
    """fp16 / bf16 weights: each step equals the fp32 step rounded once to the dtype (the
    weights and the momentum buffers), within an ulp, three steps in a row (the reference
    backend rounds after every op, as torch's SGD does; Triton's bf16 runs in the cuda tier)."""
    _steps_against_the_reference(_params(dtype, gen), _masks(gen), backend, steps=3)


@pytest.mark.cuda
@pytest.mark.memcheck
@pytest.mark.parametrize("backend", ["triton", "ext"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_kernels_against_the_reference_on_the_cpu(backend, dtype):
    """Each kernel backend on CUDA tensors against the reference backend on the same values on
    the CPU (``_steps_against_the_reference``): two steps, then a perturbation, a restore and
    a skipped step."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here; run the cuda tier on a GPU machine")
    from ssam_kernels._backend import extension_error, extension_has_kernel

    if backend == "ext" and (extension_error() is not None or not extension_has_kernel("plan_norm", "cuda")):
        pytest.fail("ssam_kernels._C has no CUDA kernels: build with SSAM_BUILD_EXT=1 on the GPU machine")
    gen = torch.Generator().manual_seed(3)
    host = _params(dtype, gen)
    masks = _masks(gen)
    dev = [p.cuda() for p in host]
    for p, q in zip(host, dev):
        q.grad = None if p.grad is None else p.grad.cuda()
    plan, _ = _steps_against_the_reference(dev, [None if m is None else m.cuda() for m in masks], backend)
    before = [b.clone() for b in dev]
    plan.perturb([0.05, 0.1])
    plan.restore()
    assert_tensors_equal(before, dev)
    dev[0].grad[0] = float("nan")  # (tensor 0 is unmasked: the masked norm reads it)
    plan.perturb([0.05, 0.1])
    assert_tensors_equal(dev, before, "params after the skipped perturb")
    assert int(plan.skipped) == 1
    plan.restore()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_a_plan_made_on_one_stream_steps_on_another(backend):
    """A plan made on the default stream and stepped on a side stream: its steps wait for its
    making (the counter's zero fill) and equal the same steps on the default stream; its memory
    is marked as used on the side stream, so a plan dropped while that stream still runs its
    step is not handed to the default stream's next allocations (they would be overwritten by
    the backup the queued step writes)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here; run the cuda tier on a GPU machine")
    from ssam_kernels._backend import extension_error, extension_has_kernel

    if backend == "ext" and (extension_error() is not None or not extension_has_kernel("plan_norm", "cuda")):
        pytest.fail("ssam_kernels._C has no CUDA kernels: build with SSAM_BUILD_EXT=1 on the GPU machine")
    gen = torch.Generator().manual_seed(4)
    host, masks = _params(torch.float32, gen), _masks(gen)
    masks = [None if m is None else m.cuda() for m in masks]

    def copies():
        dev = [p.cuda() for p in host]
        for p, q in zip(host, dev):
            q.grad = None if p.grad is None else p.grad.cuda()
        return dev

    sgd = [SGDGroup(lr=0.1, momentum=0.9)]
    eager = copies()
    reference = SAMStepPlan(eager, masks, masked_norm=True, backend=backend)
    for _ in range(2):
        reference.perturb([0.05])
        reference.restore_sgd(sgd)
    dev = copies()
    plan = SAMStepPlan(dev, masks, masked_norm=True, backend=backend)  # made on the default stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for _ in range(2):
            plan.perturb([0.05])
            plan.restore_sgd(sgd)
    assert side.cuda_stream in plan._impl.streams
    torch.cuda.current_stream().wait_stream(side)
    assert_tensors_equal(dev, eager)
    assert_tensors_equal([b for b in plan.buffers if b is not None], [b for b in reference.buffers if b is not None])
    written = [part.backup for part in plan._impl.parts] + [plan._impl.partial]
    sizes = [t.numel() for t in written]
    held = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in written]
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000_000)  # the side stream busy for ~1 s: the perturb below queued behind
        plan.perturb([0.05])
    del plan, written
    gc.collect()  # (the plan and its kernel side refer to each other)

    def allocate():  # tensors of the plan's buffers' sizes, and those of them inside its memory
        junk = [torch.full((n,), -1.0, device="cuda") for n in sizes for _ in range(32)]
        return junk, [j for j in junk if any(start <= j.data_ptr() < start + n for start, n in held)]

    junk, reused = allocate()
    torch.cuda.synchronize()
    assert not reused, "a dropped plan's memory was handed out while its stream's step still ran"
    assert all(bool((j == -1).all()) for j in junk), "a dropped plan's memory was reused under its stream's step"
    # the control: once the side stream is done, the same allocations do land in that memory
    # (else the check above held for another reason, and proved nothing)
    _, reused_after = allocate()
    assert reused_after, "control: allocations of these sizes never reach a dropped plan's memory, even " \
        "with its stream done; the check above is blind (change how it allocates)"


@pytest.mark.cuda
@pytest.mark.memcheck
@pytest.mark.parametrize("kind", ["SAM", "SSAM", "SSAM-masked-norm"])
def test_a_whole_step_captured_in_a_cuda_graph_replays_to_eager_weights(kind):
    """Both passes and the optimizer step (fixed mask: SSAM-D without updates, SSAM-F's step)
    in one CUDA graph: replaying it gives the weights of the same steps run eagerly. The
    gradients are set to None before each pass, as torch's whole-network capture does: made
    inside the capture, they come from the graph's pool (gradients made before it and freed
    inside would be memory the graph still writes)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here; run the cuda tier on a GPU machine")
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 10, generator=gen).cuda() for _ in range(3)]
    ys = [torch.randn(16, 4, generator=gen).cuda() for _ in range(3)]

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).cuda()
        params = list(model.parameters())
        if kind == "SAM":
            opt = ssam.SAM(params, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
        else:
            opt = ssam.SSAMD(params, torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=0.0, T_end=1, seed=0,
                             norm="masked" if kind == "SSAM-masked-norm" else "full", lr=0.05, momentum=0.9)
        return model, opt

    def step(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.mse_loss(model(x), y).backward()
        opt.second_step()

    eager_model, eager_opt = build()
    for i in range(3):
        step(eager_model, eager_opt, xs[i], ys[i])
    model, opt = build()
    x_static, y_static = xs[0].clone(), ys[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the plan, the buffers and the tables are made here
        step(model, opt, x_static, y_static)
    torch.cuda.current_stream().wait_stream(side)
    assert opt._plan is not None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):  # the warm-up's stream: the plan's memo must not hand its tables over
        step(model, opt, x_static, y_static)
    assert opt._plan.captured  # (replaced later, it would be kept for this graph)
    # the tables the graph reads stay alive when the evictable ones go and their memory is reused
    from ssam_kernels._device_tables import CACHE

    CACHE.clear()
    junk = [torch.full((4096,), -1, dtype=torch.int64, device="cuda") for _ in range(64)]
    for i in (1, 2):
        x_static.copy_(xs[i])
        y_static.copy_(ys[i])
        graph.replay()
    torch.cuda.synchronize()
    del junk
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cpu
@needs_ext
def test_the_optimizer_counts_skipped_steps_across_plans(gen, monkeypatch):
    monkeypatch.setenv("SSAM_BACKEND", "ext")
    model = _model(2)
    x = torch.randn(8, 4, generator=gen)
    opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, num_samples=1, update_freq=1,
                     lr=0.1)
    opt._set_masks([torch.rand(p.shape, generator=gen) < 0.5 for p in opt.params])
    opt.mask_updates += 1
    for bad in (True, False, True):
        opt.zero_grad()
        model(x).square().mean().backward()
        if bad:
            model[0].weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        opt.first_step(zero_grad=True)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) == bad
        model(x).square().mean().backward()
        opt.second_step()
        opt._set_masks([torch.rand(p.shape, generator=gen) < 0.5 for p in opt.params])  # a new plan each step
    assert opt.skipped_steps() == 2


# the kernels that count their norm blocks: Triton's and the CUDA kernel (the C++ CPU kernel sums
# in its last launch without a counter, so nothing there could fail this test)
@pytest.mark.parametrize("backend,device", [pytest.param(p.values[0], "cpu", marks=p.marks) for p in KERNEL_BACKENDS
                                            if p.values[0] == "triton"]
                         + [pytest.param(b, "cuda", marks=pytest.mark.cuda) for b in ("triton", "ext")])
def test_a_norm_launch_that_fails_part_way_leaves_the_next_step_right(backend, device, monkeypatch, gen):
    """The norm's last block (of the step's last norm launch) writes the scale and resets the
    blocks' counter. A failure between two parts' launches (a compile error of the second
    dtype's kernel, an interrupt) must not leave the first part's count for the next step,
    whose last block would then come early, from partial sums not all written."""
    params = [rand((5000,), torch.float32, gen, device), rand((3000,), torch.float64, gen, device)]  # two parts
    for p in params:
        p.grad = rand(p.shape, p.dtype, gen, device)
    reference = [p.detach().cpu() for p in params]
    for r, p in zip(reference, params):
        r.grad = p.grad.cpu()
    plan = SAMStepPlan(params, [None, None], backend=backend)
    oracle = SAMStepPlan(reference, [None, None], backend="torch")
    launch = type(plan._impl).launch_norm
    calls = []

    def fail_second(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return launch(self, *args)

    monkeypatch.setattr(type(plan._impl), "launch_norm", fail_second)
    with pytest.raises(KeyboardInterrupt):
        plan.perturb([0.1])
    assert len(plan._impl.parts) == 2 and len(calls) == 2 and not plan.perturbed
    assert int(plan._impl.counter) == 0
    monkeypatch.setattr(type(plan._impl), "launch_norm", launch)
    plan.perturb([0.1])
    oracle.perturb([0.1])
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.cpu(), r, rtol=1e-6, atol=1e-7)


@pytest.mark.cpu
@pytest.mark.parametrize("kind", ["SAM", "SSAM"])
@needs_ext  # (the CPU plan is the extension's)
def test_compiled_optimizer_steps_equal_eager_ones(kind):
    """torch.compile of first_step / second_step, from the first step on (the plan is made
    inside the compiled frame): the plan's kernels write through address tables, which no op
    schema declares, so traced they were dropped (weights left at w + e, no SGD step). The plan
    runs eagerly inside the compiled code: the same weights as eager, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    xs, ys = [torch.randn(16, 10, generator=gen) for _ in range(3)], [torch.randn(16, 4, generator=gen) for _ in range(3)]

    def run(compiled):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        if kind == "SAM":
            opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
        else:
            opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=0.0, T_end=1,
                             seed=0, lr=0.05, momentum=0.9)
        first, second = opt.first_step, opt.second_step
        if compiled:
            first, second = (torch.compile(f, backend="aot_eager") for f in (first, second))
        for x, y in zip(xs, ys):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            first(zero_grad=True)
            F.mse_loss(model(x), y).backward()
            second()
        assert opt._plan is not None  # the planned path ran
        return [p.detach() for p in model.parameters()]

    torch._dynamo.reset()
    eager, compiled = run(False), run(True)
    assert_tensors_equal(eager, compiled)


@pytest.mark.cpu
@needs_ext  # (the CPU plan is the extension's)
def test_a_captured_plan_outlives_its_replacement_until_forgotten(gen):
    """A mask update replaces the plan; one a CUDA graph captured is kept (the graph replays its
    kernels on its tables and buffers) with a warning to capture again, until
    forget_captured_plans(). (Capture itself needs a GPU: the flag a captured step sets is set
    by hand here.)"""
    model = _model(2)
    x = torch.randn(8, 4, generator=gen)
    opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=10, seed=0,
                     lr=0.1)

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.first_step(zero_grad=True)
        model(x).square().mean().backward()
        opt.second_step()

    step()
    plan = opt._plan
    assert plan is not None and not plan.captured
    opt.update_mask(0.0)  # not captured: replaced quietly
    step()
    assert opt._captured_plans == [] and opt._plan is not plan
    captured = opt._plan
    captured._impl.captured = True
    captured.flags[1] += 2  # two skipped steps it counted
    with pytest.warns(UserWarning, match="capture it again"):
        opt.update_mask(1.0)
    assert opt._captured_plans == [captured] and opt.skipped_steps() == 2
    step()
    captured.flags[1] += 1  # a replay of its graph skipped one more: counted live
    assert opt.skipped_steps() == 3
    state = opt.state_dict()
    opt.load_state_dict(state)  # the loaded count, and what the kept plan counts from now on
    assert opt.skipped_steps() == 3
    captured.flags[1] += 1
    assert opt.skipped_steps() == 4
    opt.forget_captured_plans()
    assert opt._captured_plans == [] and opt.skipped_steps() == 4
