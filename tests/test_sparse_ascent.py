"""The ascent modes on whole models and through the optimizers."""

import contextlib
import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, MLP, RecordOps, make_closure, rand_mask, regression_batch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import flop_registry

import ssam
from ssam.models import resnet18_cifar
from ssam.models.vit import ViT
from ssam_kernels import pack_mask, sparse_ascent


# the matrix products autograd runs (each mm/addmm/bmm call, and each masked weight gradient:
# one op, whichever backend computes it)
MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.ssam_kernels.masked_weight_grad.default)


def _nonempty_masks(model, gen) -> dict:
    """Random half-density masks with at least one entry each (an empty one would be frozen)."""
    masks = {p: rand_mask(p.shape, 0.5, gen) for p in model.parameters()}
    for m in masks.values():
        m.view(-1)[0] = True
    return masks


def _tiny_vit():
    return ViT(img_size=8, patch=4, dim=16, depth=2, heads=2, num_classes=3)


def _ssamf(model, mode, structure="2:4", **kw):
    return ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=None, num_samples=8, update_freq=1,
                      structure=structure, norm="masked", ascent_backward=mode, seed=0, lr=0.1, **kw)


def _dense_masked_grads(model, loss_fn, masks):
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    out = [p.grad * m for p, m in zip(model.parameters(), masks)]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_name", ["mlp", "vit"])
def test_exact_mode_yields_the_masked_gradient(backend, model_name, monkeypatch, gen):
    monkeypatch.setenv("SSAM_BACKEND", backend)
    torch.manual_seed(0)
    if model_name == "mlp":
        model = MLP(din=12, hidden=16, dout=4)
        x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    else:
        model = _tiny_vit()
        x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    opt = _ssamf(model, "exact")
    opt.update_mask(model, torch.utils.data.TensorDataset(x, y))
    masks = opt.masks()
    params = list(model.parameters())

    def loss():
        return F.cross_entropy(model(x), y)

    ref = _dense_masked_grads(model, loss, masks)
    with opt.ascent():
        loss().backward()
    for p, m, r in zip(params, masks, ref):
        assert p.grad is not None  # 2:4 masks: every tensor has masked entries
        torch.testing.assert_close(p.grad * m, r, rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in params)


@pytest.mark.cpu
def test_exact_mode_skips_layers_without_masked_entries(gen):
    """3 linear layers, the first with an empty mask: dense autograd runs 3 forward and 5
    backward products (3 weight, 2 input gradients); exact runs 3 + 2 (no weight gradient
    for layer 1, no input gradient into it)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(32, 8, generator=gen)
    masks = _nonempty_masks(model, gen)
    masks[model[0].weight] = torch.zeros(16, 8, dtype=torch.bool)
    masks[model[0].bias] = torch.zeros(16, dtype=torch.bool)
    masks[model[2].weight][:8] = False  # rows without masked entries: the reference skips them
    masks[model[2].weight][8:, 0] = True  # and the other 8 rows all have one
    counts = {}
    for mode in ("dense", "exact"):
        model.zero_grad(set_to_none=True)
        with sparse_ascent(masks, mode, backend="torch"), RecordOps() as count:
            model(x).square().sum().backward()
        counts[mode] = count.count(*MATMULS)
        if mode == "exact":
            assert model[0].weight.grad is None and model[0].bias.grad is None
    assert counts == {"dense": 3 + 5, "exact": 3 + 3}
    assert model[0].weight.requires_grad  # unfrozen on exit
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for mode in ("dense", "exact"):
        model.zero_grad(set_to_none=True)
        with sparse_ascent(masks, mode, backend="torch"), FlopCounterMode(display=False) as counter:
            model(x).square().sum().backward()
        flops[mode] = counter.get_total_flops()
    forward = 2 * 32 * (8 * 16 + 16 * 16 + 16 * 4)
    dense_backward = 2 * forward - 2 * 32 * 8 * 16  # no input gradient into the model's input
    exact_backward = 2 * 32 * (16 * 4) * 2 + 2 * 32 * 8 * 16  # layer 3: dW + dX; layer 2: dW of 8 rows
    assert flops == {"dense": forward + dense_backward, "exact": forward + exact_backward}


@pytest.mark.cpu
def test_context_restores_state_after_an_error_and_refuses_reentry(gen):
    model = MLP()
    masks = {p: torch.zeros(p.shape, dtype=torch.bool) for p in model.parameters()}
    masks[model.net[2].weight] = rand_mask(model.net[2].weight.shape, 0.5, gen)
    ctx = sparse_ascent(masks, "exact")
    with pytest.raises(ZeroDivisionError):
        with ctx:
            assert not model.net[0].weight.requires_grad
            1 / 0
    assert all(p.requires_grad for p in model.parameters())
    with ctx:
        with pytest.raises(RuntimeError, match="already active"):
            ctx.__enter__()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.cpu
def test_all_empty_masks_leave_the_pass_dense(gen):
    model = MLP()
    x, y = regression_batch(gen)
    with sparse_ascent({p: torch.zeros(p.shape, dtype=torch.bool) for p in model.parameters()}, "exact"):
        F.mse_loss(model(x), y).backward()  # would raise if every parameter were frozen
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.cpu
def test_functional_linear_is_caught_and_attention_left_dense(gen):
    """``F.linear(input=..., weight=...)`` by keyword takes the ascent path (implicit, empty
    mask: no input gradient); nn.MultiheadAttention's projections, whose F.linear calls happen
    inside another torch-function-dispatching function, keep dense autograd."""
    x = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    w = torch.randn(3, 8, generator=gen, requires_grad=True)
    with sparse_ascent({w: torch.zeros(3, 8, dtype=torch.bool)}, "implicit"):
        (dx,) = torch.autograd.grad(F.linear(input=x, weight=w).sum(), x)
    assert bool((dx == 0).all())
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    with sparse_ascent({attn.out_proj.weight: torch.zeros_like(attn.out_proj.weight, dtype=torch.bool)}, "implicit"):
        (dx,) = torch.autograd.grad(attn(x, x, x, need_weights=False)[0].sum(), x)
    assert bool((dx != 0).any())


@pytest.mark.cpu
def test_bad_context_arguments():
    p = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        sparse_ascent({p: None}, "fast")
    with pytest.raises(TypeError, match="masks must be a mapping"):
        sparse_ascent([p], "exact")
    with pytest.raises(ValueError, match="a mask of shape"):
        sparse_ascent({p: torch.ones(4, 3, dtype=torch.bool)}, "exact")
    with pytest.raises(TypeError, match="must be a bool tensor, a BitMask or None"):
        sparse_ascent({p: torch.ones(4, 4)}, "exact")
    with pytest.raises(ValueError, match="gemm must be one of"):
        sparse_ascent({p: None}, "mvue", gemm="tiles")
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_ascent({p: None}, "exact", backend="bogus")


def _scattered_rows_mask(weight, gen):
    """Half the output rows (every other one) hold masked entries: the rest are skipped."""
    mask = rand_mask(weight.shape, 0.5, gen)
    mask[1::2] = False
    mask[0::2].view(mask[0::2].shape[0], -1)[:, 0] = True
    return mask


@pytest.mark.cpu
@pytest.mark.parametrize("dilation, padding, stride", [((2,), "same", 1), ([1], 1, (2,)), (1, "valid", [2])])
def test_exact_convolution_reads_arguments_as_torch_does(dilation, padding, stride, gen):
    """One-element sequences stand for every spatial dim (as torch reads them); the output and
    the masked gradient match plain autograd's."""
    x = torch.randn(2, 3, 9, 9, generator=gen, requires_grad=True)
    w = torch.randn(6, 3, 3, 5, generator=gen, requires_grad=True)
    mask = _scattered_rows_mask(w, gen)
    want = F.conv2d(x, w, None, stride, padding, dilation)
    gw, gx = torch.autograd.grad(want.square().sum(), (w, x))
    with sparse_ascent({w: mask}, "exact"):
        got = F.conv2d(x, w, None, stride, padding, dilation)
        hw, hx = torch.autograd.grad(got.square().sum(), (w, x))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(hx, gx)
    torch.testing.assert_close(hw[mask], gw[mask])


@pytest.mark.cpu
def test_exact_convolution_leaves_torch_to_refuse_what_torch_refuses(gen):
    x = torch.randn(2, 3, 9, 9, generator=gen, requires_grad=True)
    w = torch.randn(6, 3, 3, 3, generator=gen, requires_grad=True)
    with sparse_ascent({w: _scattered_rows_mask(w, gen)}, "exact"):
        with pytest.raises(RuntimeError, match="same.*strided"):
            F.conv2d(x, w, None, 2, "same")
        with pytest.raises(RuntimeError, match="Invalid padding string: 'full'"):
            F.conv2d(x, w, None, 1, "full")


class _Checkpointed(nn.Module):
    """Two linears and a conv, the middle ones under torch.utils.checkpoint."""

    def __init__(self, recompute=None):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)
        self.recompute = recompute

    def _body(self, x):
        return torch.tanh(self.fc1(torch.relu(self.conv(x)).flatten(1)))

    def forward(self, x):
        context = (lambda: (contextlib.nullcontext(), self.recompute())) if self.recompute else None
        kwargs = {"context_fn": context} if context else {}
        h = torch.utils.checkpoint.checkpoint(self._body, x, use_reentrant=False, **kwargs)
        return self.fc2(h)


# the cuda tier runs it on the GPU too (SSAM_TEST_CUDA_DEVICE: a dry run elsewhere)
DEVICES = [pytest.param("cpu", marks=pytest.mark.cpu),
           pytest.param(os.environ.get("SSAM_TEST_CUDA_DEVICE", "cuda"), marks=pytest.mark.cuda, id="cuda")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["exact", "implicit", "mvue"])
def test_checkpointed_regions_recompute_inside_the_block(mode, device, gen):
    """A checkpoint recomputes its forward during the backward, outside every TorchFunctionMode:
    with the block's recompute context the masked layers take their ascent Functions again
    (without it: CheckpointError), and the gradients equal the unchekpointed block's."""
    torch.manual_seed(0)
    plain = _Checkpointed().to(device)
    model = copy.deepcopy(plain)
    x = torch.randn(4, 2, 4, 4, generator=gen).to(device)
    masks = {m.weight: _scattered_rows_mask(m.weight, gen).to(device) for m in (plain.fc1, plain.fc2, plain.conv)}
    if mode != "exact":
        masks = {w: None for w in masks}
    ours = {getattr(model, n).weight: masks[getattr(plain, n).weight] for n in ("fc1", "fc2", "conv")}
    grads = []
    for net, net_masks in ((plain, masks), (model, ours)):
        seeded = torch.Generator().manual_seed(3)
        block = sparse_ascent(net_masks, mode, generator=seeded)
        net.recompute = block.recompute if net is model else None
        with block:
            if net is plain:  # the reference: the same block without a checkpoint
                h = torch.tanh(net.fc1(torch.relu(net.conv(x)).flatten(1)))
                out = net.fc2(h)
            else:
                out = net(x)
            out.square().sum().backward()
        grads.append([p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a)
    model.zero_grad()
    model.recompute = None
    with sparse_ascent(ours, mode), pytest.raises(torch.utils.checkpoint.CheckpointError):
        model(x).square().sum().backward()


# --- through the optimizers ------------------------------------------------------------------

@pytest.mark.cpu
def test_exact_needs_the_masked_norm_and_modes_are_checked():
    model = MLP()
    with pytest.raises(ValueError, match="needs norm='masked'"):
        ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=10,
                   ascent_backward="exact", lr=0.1)
    with pytest.raises(ValueError, match="ascent_backward must be one of"):
        _ssamf(model, "sparse")


@pytest.mark.cpu
@pytest.mark.parametrize("fuse_sgd", [True, False])
@pytest.mark.usefixtures("fused_sgd_everywhere")
def test_exact_training_equals_dense_training(fuse_sgd, gen):
    """norm="masked": the exact mode's steps equal the dense ones, including parameters frozen
    for the ascent pass (empty masks) that the fused SGD step still updates."""
    x, y = regression_batch(gen, n=16)
    results = []
    for mode in ("dense", "exact"):
        torch.manual_seed(3)
        model = MLP()
        opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=10,
                         structure="tensor", norm="masked", ascent_backward=mode, fuse_sgd=fuse_sgd, seed=1,
                         lr=0.1, momentum=0.9)
        assert any(m.count_int() == 0 for m in opt._masks.values())  # some tensors unperturbed
        closure = make_closure(model, x, y)
        calls = 0

        def counted():
            nonlocal calls
            calls += 1
            return closure()

        for _ in range(3):
            opt.zero_grad()
            opt.step(counted)
        assert calls == 6  # step ran the ascent pass itself
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.cpu
@pytest.mark.parametrize("mode", ["implicit", "mvue", "mvue_dx"])
def test_approximate_modes_train_and_resume_bit_identically(mode, gen):
    x, y = regression_batch(gen, n=16)
    torch.manual_seed(0)
    model = MLP(din=10, hidden=16, dout=4)
    opt = _ssamf(model, mode, structure="2:4:out", momentum=0.9)
    opt.update_mask(model, torch.utils.data.TensorDataset(x, y.argmax(1)))
    closure = make_closure(model, x, y)
    opt.zero_grad()
    opt.step(closure)
    state = opt.state_dict()
    snapshot = [p.detach().clone() for p in model.parameters()]
    runs = []
    for _ in range(2):
        with torch.no_grad():
            for p, s in zip(model.parameters(), snapshot):
                p.copy_(s)
        opt.load_state_dict(copy.deepcopy(state))  # loading aliases the momentum buffers
        for _ in range(2):
            opt.zero_grad()
            opt.step(closure)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # the MVUE draws come from the saved generator state
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.cpu
def test_ssamd_exact_with_gradient_growth_runs_update_steps_densely(gen):
    x, y = regression_batch(gen, n=16)
    model = MLP()
    opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=10,
                     growth_strategy="gradient", structure="tensor", norm="masked", ascent_backward="exact", seed=2,
                     lr=0.1)
    seen = []

    def closure():
        seen.append([p.requires_grad for p in model.parameters()])
        return make_closure(model, x, y)()

    for batch_idx in (0, 1):  # batch 0 updates the mask, so its ascent pass runs dense
        empty = [opt._masks[p].count_int() == 0 for p in model.parameters()]
        assert any(empty) and not all(empty)
        seen.clear()
        opt.zero_grad()
        opt.step(closure, epoch=0, batch_idx=batch_idx)
        ascent, descent = seen
        assert ascent == ([True] * len(empty) if batch_idx == 0 else [not e for e in empty])
        assert descent == [True] * len(empty)


@pytest.mark.cpu
def test_packed_and_bool_masks_agree(gen):
    model = MLP()
    x, y = regression_batch(gen)
    masks = _nonempty_masks(model, gen)
    grads = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        with sparse_ascent({p: pack_mask(m) if packed else m for p, m in masks.items()}, "exact"):
            F.mse_loss(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


_GEMM_NAMES = ("mm", "conv", "attention", "masked_weight_grad", "cslt")


@pytest.mark.cpu
@pytest.mark.parametrize("structure, sparsity", [("budget", 0.9), ("unstructured", 0.5), ("unstructured", 0.9),
                                                 ("unstructured", 0.99), ("2:4", None)])
@pytest.mark.parametrize("model_name", ["resnet18", "vit"])
def test_exact_ascent_costs_no_more_ops_than_dense(model_name, structure, sparsity, gen):
    """Issue 23's checks, with SSAM-F's own masks: the exact ascent forward + backward runs at
    most dense's ops plus 2 per masked layer, budget masks plus 2 per weight with rows to skip
    (2:4 masks skip none: the very ops of dense autograd), none of ``index_select``, ``index_put_``, ``zeros_like`` for budget masks
    (whole rows in a contiguous range: views), and FLOP counting sees every GEMM it runs."""
    torch.manual_seed(0)
    if model_name == "resnet18":
        model, size = resnet18_cifar(), 32
    else:
        model, size = ViT(img_size=16, patch=4, dim=32, depth=2, heads=2, num_classes=10), 16
    x, y = torch.randn(2, 3, size, size, generator=gen), torch.randint(0, 10, (2,), generator=gen)
    opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=sparsity,
                     num_samples=4, update_freq=1, structure=structure, norm="masked", ascent_backward="exact", seed=0,
                     lr=0.1)
    opt.update_mask(model, torch.utils.data.TensorDataset(x.repeat(2, 1, 1, 1), y.repeat(2)))
    masks = dict(zip(opt.params, opt.masks()))
    partial = [p for p, m in masks.items() if p.dim() > 1 and 0 < int(m.reshape(m.shape[0], -1).any(1).sum()) < p.shape[0]]
    counts = {}
    for mode in ("dense", "exact"):
        with sparse_ascent(dict(opt._masks), mode):  # warm: a mask's row facts are read once, then cached
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        # attention in its math form: torch's FLOP counter has no formula for the CPU flash
        # kernel (torch's op, not one this project launches)
        with sdpa_kernel(SDPBackend.MATH), sparse_ascent(dict(opt._masks), mode), RecordOps() as ops:
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        counts[mode] = ops
    dense, exact = counts["dense"].kernels(), counts["exact"].kernels()
    # the bound: 2 per masked layer (a partial layer whose rows are scattered is gathered,
    # 4 ops more, paid for by layers below the lowest masked one and all-rows ones)
    masked = [p for p, m in masks.items() if p.dim() > 1 and bool(m.any())]
    assert sum(exact.values()) <= sum(dense.values()) + 2 * len(masked), (exact - dense)
    # a scattered layer gathers dY's rows alone (a weight gradient reads only W's shape)
    assert exact["index_select"] <= len(partial), exact["index_select"]
    if structure == "budget":  # row ranges: views, so 2 per partial layer at most
        assert sum(exact.values()) <= sum(dense.values()) + 2 * len(partial), (exact - dense)
    if structure == "2:4":
        assert not partial and exact == dense
    if structure == "budget":
        assert partial  # rows skipped somewhere
        assert not {"index_select", "index_put_", "zeros_like", "index", "nonzero"} & set(exact)
    gemms = {f.overloadpacket for f in counts["exact"].ops if any(n in f.overloadpacket.__name__ for n in _GEMM_NAMES)}
    assert gemms and gemms <= set(flop_registry), gemms - set(flop_registry)


@pytest.mark.cpu
def test_ssamd_budget_masks_keep_row_ranges_through_updates(gen):
    """Issue 23's no-gather check for SSAM-D's budget masks, after drop/grow updates (they
    scattered a weight's rows before: 10 gathers a pass on ResNet-18)."""
    from ssam.budget import measure_costs

    torch.manual_seed(0)
    model = resnet18_cifar()
    x, y = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,), generator=gen)
    opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.9, drop_rate=0.5, T_end=10,
                     structure="budget", norm="masked", ascent_backward="exact", seed=0, lr=0.1,
                     ascent_costs=measure_costs(model, list(model.parameters()), x[:1]))
    for epoch in range(3):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()  # the gradient drop/grow reads
        opt.update_mask(epoch)
        model.zero_grad(set_to_none=True)
        with sparse_ascent(dict(opt._masks), "exact"):  # warm: row facts cached on the masks
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        with sparse_ascent(dict(opt._masks), "exact"), RecordOps() as ops:
            F.cross_entropy(model(x), y).backward()
        assert not {"index_select", "index_put_", "zeros_like", "index", "nonzero"} & set(ops.kernels()), epoch


@pytest.mark.cpu
def test_the_optimizer_gives_checkpoints_its_recompute_context(gen):
    """opt.recompute_context() is the running ascent block's (nothing outside it): a model with
    checkpointed layers steps as the same model without them."""
    torch.manual_seed(0)
    plain = _Checkpointed()
    model = copy.deepcopy(plain)
    x, y = torch.randn(8, 2, 4, 4, generator=gen), torch.randn(8, 4, generator=gen)
    opts = []
    for net in (plain, model):
        opt = ssam.SSAMD(net.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=10, seed=1,
                         norm="masked", ascent_backward="exact", lr=0.1)
        if net is model:
            net.recompute = opt.recompute_context
        else:
            net.forward = lambda x, net=net: net.fc2(net._body(x))
        opts.append(opt)
        for _ in range(2):
            opt.zero_grad()
            opt.step(make_closure(net, x, y))
    assert isinstance(opts[1].recompute_context(), contextlib.nullcontext)
    for p, q in zip(plain.parameters(), model.parameters()):
        torch.testing.assert_close(q, p)


@pytest.mark.cpu
def test_the_optimizers_ascent_block_is_made_once_per_mask_set_and_dense_runs_no_mode(gen):
    """A step's host work stays off the ascent pass: the dense mode enters no TorchFunctionMode
    (every torch call inside one pays for it), and the other modes reuse the block made for
    the current masks until they change."""
    model = MLP()
    made = []
    original = ssam.sparse.sparse_ascent

    def counting(*args, **kwargs):
        made.append(args[1])
        return original(*args, **kwargs)

    for mode in ("dense", "exact"):
        opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, drop_rate=0.5, T_end=10,
                         seed=0, lr=0.1, norm="masked" if mode == "exact" else "full", ascent_backward=mode)
        masks = [rand_mask(p.shape, generator=gen) for p in opt.params]
        masks[0][0] = False  # a row to skip: the exact mode reroutes that layer, so it runs its mode
        opt._set_masks(masks)
        made.clear()
        ssam.sparse.sparse_ascent = counting
        try:
            for _ in range(3):
                with opt.ascent():
                    assert torch._C._len_torch_function_stack() == (0 if mode == "dense" else 1)
            assert made == ([] if mode == "dense" else ["exact"])
            masks = [rand_mask(p.shape, generator=gen) for p in opt.params]
            masks[0][0] = False
            opt._set_masks(masks)  # new masks: a new block
            with opt.ascent():
                pass
            with opt.ascent(gemm="dense"):  # another GEMM choice: another block
                pass
            assert made == ([] if mode == "dense" else ["exact"] * 3)
        finally:
            ssam.sparse.sparse_ascent = original
        with pytest.raises(ValueError, match="gemm must be one of"):
            opt.ascent(gemm="fast")


@pytest.mark.cpu
def test_exact_runs_its_mode_only_where_a_trainable_masked_weight_has_rows_to_skip(gen):
    """Every torch call made inside a TorchFunctionMode pays a Python call: an exact block whose
    masked weights have no rows to skip (every row holds a masked entry, or the weight with rows
    to skip is frozen, or not a weight) runs none, and its pass equals the dense one; a float64
    weight still reaches the mode, which refuses it at its call, as before."""
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(5, 10, generator=gen)
    w1, b1, w2 = model.net[0].weight, model.net[0].bias, model.net[2].weight
    every_row = {p: pack_mask(torch.ones(p.shape, dtype=torch.bool)) for p in model.parameters()}
    gap = torch.ones(w1.shape, dtype=torch.bool)
    gap[8:] = False  # rows 8-15 to skip (rows inside a computed span would be computed: a tail)
    cases = [(every_row, 0), ({**every_row, w1: pack_mask(gap)}, 1), ({**every_row, w1: gap}, 1),  # bool masks too
             ({**every_row, b1: pack_mask(torch.zeros(b1.shape, dtype=torch.bool))}, 0)]  # a 1-D mask: no rows
    dense_loss = model(x).square().sum()
    dense = torch.autograd.grad(dense_loss, [w1, w2])
    for masks, stack in cases:
        block = sparse_ascent(masks, "exact")
        with block:
            assert torch._C._len_torch_function_stack() == stack
            got = torch.autograd.grad(model(x).square().sum(), [w1, w2])
        assert torch._C._len_torch_function_stack() == 0
        assert torch.equal(got[1], dense[1])
        if stack == 0:
            assert torch.equal(got[0], dense[0])  # the dense pass itself
        else:
            assert torch.equal(got[0][:8], dense[0][:8]) and not got[0][8:].any()  # rows 8-15 skipped
    w1.requires_grad_(False)  # the weight with rows to skip frozen by the user: nothing to reroute
    try:
        with sparse_ascent({**every_row, w1: pack_mask(gap)}, "exact"):
            assert torch._C._len_torch_function_stack() == 0
    finally:
        w1.requires_grad_(True)
    wide = MLP().double()
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        with sparse_ascent({p: pack_mask(torch.ones(p.shape, dtype=torch.bool))
                                        for p in wide.parameters()}, "exact"):
            wide(x.double()).sum().backward()


@pytest.mark.cpu
def test_exact_warns_when_a_reentrant_checkpoint_cuts_masked_layers_off(gen):
    """A reentrant checkpoint region passes gradients only through inputs that require them:
    fed by a layer the exact pass froze (empty mask), its masked layers get none. That cannot
    be undone from outside torch's checkpoint, so it must not pass silently: the block names
    the parameters left without a gradient; a non-reentrant region gets its gradients."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    a, b, c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
    x = torch.randn(4, 6, generator=gen)
    masks = {p: pack_mask(torch.ones(p.shape, dtype=torch.bool)) for p in (b.weight, b.bias, c.weight, c.bias)}
    masks.update({p: pack_mask(torch.zeros(p.shape, dtype=torch.bool)) for p in (a.weight, a.bias)})
    for reentrant in (True, False):
        for p in (*a.parameters(), *b.parameters(), *c.parameters()):
            p.grad = None
        block = sparse_ascent(masks, "exact")
        with contextlib.ExitStack() as stack:
            if reentrant:  # (entered first: the block warns as it exits)
                stack.enter_context(pytest.warns(UserWarning, match=r"2 masked parameter\(s\) got no gradient .*"
                                                                    r"\(8, 8\), \(8,\).*use_reentrant=False"))
            else:
                caught = stack.enter_context(warnings.catch_warnings(record=True))
                warnings.simplefilter("always")
            stack.enter_context(block)
            h = torch.tanh(a(x))
            h = checkpoint(lambda t: torch.tanh(b(t)), h, use_reentrant=reentrant,
                           **({} if reentrant else {"context_fn": lambda: (contextlib.nullcontext(), block.recompute())}))
            (c(h) ** 2).sum().backward()
        assert (b.weight.grad is None) == reentrant and c.weight.grad is not None
        assert a.weight.requires_grad and a.weight.grad is None  # unfrozen on exit; its pass skipped
    assert not [w for w in caught if "sparse_ascent" in str(w.message)]  # (the non-reentrant run)


@pytest.mark.cpu
@pytest.mark.parametrize(("structure", "warns"), [("2:4:out", False), ("1:4:out", False), ("1:2:out", False),
                                                  ("2:4", True), ("4:8:out", True), ("unstructured", True)])
def test_implicit_warns_where_its_masks_cannot_be_2_4_along_the_output_dim(structure, warns):
    """Outside 2:4 along the output dim the implicit mode's product runs dense (no time saved)
    and its input gradient drops what empty masks hold back: said once, at construction."""
    model = MLP()
    kwargs = dict(rho=0.05, sparsity=None if ":" in structure else 0.5, structure=structure, drop_rate=0.5, T_end=10,
                  seed=0, lr=0.1, ascent_backward="implicit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ssam.SSAMD(model.parameters(), torch.optim.SGD, **kwargs)
    said = [w for w in caught if "ascent_backward='implicit'" in str(w.message)]
    assert len(said) == warns and (not warns or f"structure={structure!r}" in str(said[0].message))
    assert not warns or said[0].filename == __file__  # points at the caller's line


@pytest.mark.cpu
def test_exact_scattered_rows_on_the_reference_gather_one_product_and_mask_nothing(monkeypatch, gen):
    """Rows too scattered for a span: on cuBLAS (the masked weight gradient's reference) the
    exact backward gathers them, runs one product and scatters it back; the masked norm reads
    only masked entries, so unpacking the mask to mask the rows would be work for nothing."""
    monkeypatch.setenv("SSAM_BACKEND", "torch")
    lin = nn.Linear(48, 64)
    x = torch.randn(10, 48, generator=gen)
    mask = torch.zeros(64, 48, dtype=torch.bool)
    mask[[1, 9, 30, 63], :5] = True
    lin(x).square().sum().backward()
    dense = lin.weight.grad.clone()
    block = sparse_ascent({lin.weight: pack_mask(mask)}, "exact")
    for call in range(2):
        lin.weight.grad = None
        with block:
            loss = lin(x).square().sum()
            ops = RecordOps()
            with ops:
                loss.backward()
        torch.testing.assert_close(lin.weight.grad[mask], dense[mask], rtol=1e-6, atol=1e-6)
        assert (lin.weight.grad[~mask.any(1)] == 0).all()
    # (the second call: the row index is kept on the mask)
    weight_ops = {k: v for k, v in ops.kernels().items() if k in ("index_select", "mm", "index_copy_", "where",
                                                                "bitwise_and", "index_put_", "nonzero")}
    assert weight_ops == {"index_select": 1, "mm": 1, "index_copy_": 1}


@pytest.mark.cpu
def test_exact_takes_a_non_leaf_key_with_an_empty_mask(gen):
    """A mask keyed by a non-leaf tensor (a weight computed from a parameter): the parameter
    reads its whole gradient, so the pass neither freezes it (torch refused the requires_grad
    flag) nor skips its rows: the dense gradient, and no warning."""
    base = torch.randn(6, 8, generator=gen, requires_grad=True)
    head = torch.randn(3, 6, generator=gen, requires_grad=True)
    frozen = torch.randn(8, 8, generator=gen, requires_grad=True)  # an empty mask: frozen for the pass
    x = torch.randn(4, 8, generator=gen)

    def loss(w):
        return F.linear(torch.tanh(F.linear(torch.tanh(F.linear(x, frozen)), w)), head).square().sum()

    dense = torch.autograd.grad(loss(base * 2), base)[0]
    for empty in (True, False):
        w = base * 2
        mask = torch.zeros(6, 8, dtype=torch.bool)
        if not empty:
            mask[:2, :3] = True  # rows to skip, were it a leaf
        base.grad = head.grad = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with sparse_ascent({w: mask, head: torch.ones(3, 6, dtype=torch.bool),
                                frozen: torch.zeros(8, 8, dtype=torch.bool)}, "exact"):
                loss(w).backward()
        torch.testing.assert_close(base.grad, dense)
        assert head.grad is not None and w.requires_grad and frozen.grad is None
        assert not [c for c in caught if "sparse_ascent" in str(c.message)]
