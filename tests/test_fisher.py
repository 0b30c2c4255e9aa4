import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallConvBN, assert_tensors_equal
from torch import nn

import ssam.fisher
from ssam.fisher import draw_samples, empirical_fisher

pytestmark = pytest.mark.cpu

# Fisher methods against a batch-size-one loop: the same per-sample products in fp32, formed by
# other batched GEMMs and sums, so ~1e-7 relative per operation over a few dozen (8.8e-7 worst
# seen). The Fisher feeds a global top-k, where a 1e-4 error would reorder entries: 1e-5.
RTOL = 1e-5
METHODS = {"layerwise": ssam.fisher._Layerwise, "vmap": ssam.fisher._Vectorised, "loop": ssam.fisher._Looped}


def _use_only(monkeypatch, name: str) -> None:
    """Only the named per-sample-gradient method runs (no silent fallback: an unsupported
    model fails the test)."""
    choose = ssam.fisher._methods
    monkeypatch.setattr(ssam.fisher, "_methods", lambda *args: [m for m in choose(*args) if type(m) is METHODS[name]])


@pytest.fixture(params=list(METHODS))
def method(request, monkeypatch):
    _use_only(monkeypatch, request.param)
    return request.param


def _official_loop(model, xs, ys):
    """The official code's Fisher: batch size 1, loss.backward(), sum of grad**2 (on a copy,
    because this loop does update BatchNorm's running statistics)."""
    model = copy.deepcopy(model)
    fisher = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in zip(xs, ys):
        model.zero_grad()
        F.cross_entropy(model(x[None]), y[None]).backward()
        for f, p in zip(fisher, model.parameters()):
            f += p.grad.square()
    return fisher


def _data(gen, n=20):
    return torch.randn(n, 2, 4, 4, generator=gen), torch.randint(0, 5, (n,), generator=gen)


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 7, 32])
def test_equals_batch_size_one_loop_and_keeps_bn_stats(train_mode, chunk_size, method, gen):
    torch.manual_seed(0)
    model = SmallConvBN().train(train_mode)
    with torch.no_grad():  # non-trivial running stats, so eval mode differs from train mode
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x, y = _data(gen)
    buffers = copy.deepcopy(dict(model.named_buffers()))
    fisher = empirical_fisher(model, list(model.parameters()), [(x, y)], num_samples=20, chunk_size=chunk_size)
    expected = _official_loop(model, x, y)
    for f, e in zip(fisher, expected):
        torch.testing.assert_close(f, e, rtol=RTOL, atol=1e-7)
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert model.training is train_mode


def test_subset_of_parameters_and_batches(method, gen):
    model = SmallConvBN()
    x, y = _data(gen, 30)
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    params = [model.conv.weight, model.fc.bias]
    fisher = empirical_fisher(model, params, batches, num_samples=12)
    full = _official_loop(model, x[:12], y[:12])
    torch.testing.assert_close(fisher[0], full[0], rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(fisher[1], full[-1], rtol=RTOL, atol=1e-7)


def test_dataset_sampling_uses_the_generator(gen):
    x, y = _data(gen, 50)
    ds = torch.utils.data.TensorDataset(x, y)
    a = draw_samples(ds, 10, torch.Generator().manual_seed(3))
    b = draw_samples(ds, 10, torch.Generator().manual_seed(3))
    c = draw_samples(ds, 100, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and a[0].shape == (10, 2, 4, 4)
    assert c[0].shape[0] == 50  # capped at the dataset size, without replacement
    assert len({tuple(r.flatten().tolist()) for r in c[0]}) == 50


def test_custom_loss(gen):
    model = SmallConvBN().eval()
    x, y = _data(gen, 6)
    fisher = empirical_fisher(model, list(model.parameters()), [(x, y)], 6, loss_fn=lambda out, t: out.square().sum())
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(6):
        grads = torch.autograd.grad(model(x[i : i + 1]).square().sum(), list(model.parameters()))
        for e, g in zip(expected, grads):
            e += g.square()
    for f, e in zip(fisher, expected):
        torch.testing.assert_close(f, e, rtol=RTOL, atol=1e-6)


def test_errors(gen):
    model = SmallConvBN()
    x, y = _data(gen, 4)
    with pytest.raises(ValueError, match="not parameters of model"):
        empirical_fisher(model, [torch.nn.Parameter(torch.ones(2))], [(x, y)], 4)
    with pytest.raises(TypeError, match=r"\(x, y\)"):
        empirical_fisher(model, list(model.parameters()), [x], 4)
    with pytest.raises(ValueError, match="no samples"):
        empirical_fisher(model, list(model.parameters()), [], 4)
    with pytest.raises(TypeError, match="Dataset or an iterable"):
        empirical_fisher(model, list(model.parameters()), 3, 4)
    with pytest.raises(ValueError, match="same leading"):
        empirical_fisher(model, list(model.parameters()), [(x, y[:2])], 4)
    with pytest.raises(TypeError, match=r"data is one \(x, y\) pair of tensors"):
        empirical_fisher(model, list(model.parameters()), (x, y), 4)
    for method in ("auto", *ssam.fisher.METHODS):  # a loss that is not one sample's, named whichever method runs
        for loss_fn, got in ((lambda out, y: 1.0, "got float"), (lambda out, y: out, "got a tensor of shape")):
            # (the per-layer method, asked for by name, says it cannot take the model, and why)
            error = ValueError if method == "layerwise" else TypeError
            with pytest.raises(error, match=f"loss_fn\\(output, y\\) must return the loss of its one sample.*{got}"):
                empirical_fisher(model, list(model.parameters()), [(x, y)], 4, loss_fn=loss_fn, method=method)


class _Layers(nn.Module):
    """The layer variants the per-layer path computes: Conv1d with reflect 'same' padding,
    strided / dilated / grouped conv, BatchNorm1d on [N, C, T], Linear on [N, T, C], Conv3d
    with 'same' padding into a BatchNorm3d without affine parameters, a bias-free Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding="same", padding_mode="reflect")
        self.b1 = nn.BatchNorm1d(4)
        self.c2 = nn.Conv1d(4, 6, 3, stride=2, dilation=2, groups=2, padding=2)
        self.lin = nn.Linear(6, 5)
        self.c3 = nn.Conv3d(1, 2, 3, padding="same")
        self.b3 = nn.BatchNorm3d(2, affine=False)
        self.head = nn.Linear(7, 5, bias=False)

    def forward(self, x):
        h = self.c2(torch.relu(self.b1(self.c1(x))))
        h = self.lin(h.transpose(1, 2)).mean(1)
        v = self.b3(self.c3(x[:, :1, :8].reshape(-1, 1, 2, 2, 2))).flatten(1).mean(1, keepdim=True)
        return self.head(torch.cat([h, v, v], 1))


def _use_layerwise(monkeypatch, batched: bool) -> None:
    """Only the per-layer method, its per-sample products sample by sample (CPU's way) or
    batched (GPU's way: one grouped convolution / bmm per group of samples)."""
    def methods(model, names, fisher, loss_fn, device):
        layerwise = ssam.fisher._Layerwise.build(model, names, fisher, loss_fn, batched=batched)
        assert layerwise is not None
        return [layerwise]

    monkeypatch.setattr(ssam.fisher, "_methods", methods)


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("batched", [False, True])
def test_layerwise_layer_variants(train_mode, batched, monkeypatch, gen):
    _use_layerwise(monkeypatch, batched)
    # batched: at most 3 samples' gradients of the largest layer stacked, so chunks split in groups
    monkeypatch.setattr(ssam.fisher, "STACK_ELEMENTS", 3 * 6 * 2 * 3)
    model = _Layers().train(train_mode)
    x, y = torch.randn(9, 3, 12, generator=gen), torch.randint(0, 5, (9,), generator=gen)
    fisher = empirical_fisher(model, list(model.parameters()), [(x, y)], 9, chunk_size=4)
    for f, e in zip(fisher, _official_loop(model, x, y)):
        torch.testing.assert_close(f, e, rtol=RTOL, atol=1e-7)


def test_batched_layerwise_equals_the_official_loop_on_a_resnet_block(monkeypatch, gen):
    """The GPU's way (grouped per-sample convolutions, strided and 1x1 shortcut convs) against
    the batch-of-one loop. BatchNorm in eval mode with random running statistics: in train mode
    a sample whose channel is near-constant after a ReLU makes its batch-of-one normalisation so
    ill-conditioned that every batched method (vmap too) differs from the loop by summation order
    amplified (17% for 1 seed in 12); the per-sample train-mode form is tested on small models
    above. In float64: this checks the formula, not rounding. In float32 a pre-activation within
    rounding of a ReLU's kink flips for some seeds, and the batch-of-one loop itself was then 4e-4
    of the largest entry off the float64 Fisher (2 seeds in 60, one of them on CI)."""
    from ssam.models import resnet18_cifar

    _use_layerwise(monkeypatch, True)
    torch.manual_seed(0)
    model = resnet18_cifar(num_classes=10).eval()
    model.layers = model.layers[:3]  # the first stage and a strided block with its 1x1 shortcut
    model.fc = nn.Linear(128, 10)
    model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    x = torch.randn(6, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=gen)
    fisher = empirical_fisher(model, list(model.parameters()), [(x, y)], 6, chunk_size=4)
    for f, e in zip(fisher, _official_loop(model, x, y)):
        # The Fisher accumulates in float32: six squares, each rounded, summed with a rounding
        # each, are within 7 * 2**-24 = 4.2e-7 of the float64 sum (3.4e-7 seen over 30 seeds).
        torch.testing.assert_close(f, e.float(), rtol=1e-6, atol=1e-12 * e.abs().max().item())


class _Tied(nn.Module):
    def __init__(self, share: str):
        super().__init__()
        self.share = share
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 5)
        if share == "tied":
            self.c = nn.Linear(8, 8)
            self.c.weight = self.a.weight

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.share == "tied":  # one weight in two layers
            h = torch.relu(self.c(h))
        elif self.share == "twice":  # one layer run twice
            h = torch.relu(self.a(h))
        elif self.share == "functional":  # a layer's weight used outside it
            h = torch.relu(F.linear(h, self.a.weight))
        return self.b(h)


@pytest.mark.parametrize("share", ["tied", "twice", "functional"])
def test_weights_used_twice_fall_back_exactly(share, gen):
    """The per-layer path cannot square per-use gradients: these models take the next method."""
    model = _Tied(share)
    x, y = torch.randn(6, 8, generator=gen), torch.randint(0, 5, (6,), generator=gen)
    fisher = empirical_fisher(model, list(model.parameters()), [(x, y)], 6, chunk_size=4)
    for f, e in zip(fisher, _official_loop(model, x, y)):
        torch.testing.assert_close(f, e, rtol=RTOL, atol=1e-7)


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 5)

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.relu(self.a(t)), x, use_reentrant=False)
        return self.b(h)


def test_a_checkpointed_model_falls_back_with_the_fisher_untouched(gen, monkeypatch):
    """A non-reentrant checkpoint recomputes its region in the backward without the per-layer
    forwards, so the per-layer method's backward fails: the Fisher is put back as it was
    (its hooks had added a layer's terms already) and the next method takes the chunk."""
    model = _Checkpointed()
    x, y = torch.randn(6, 8, generator=gen), torch.randint(0, 5, (6,), generator=gen)
    calls = []
    original = ssam.fisher._Layerwise._backward
    monkeypatch.setattr(ssam.fisher._Layerwise, "_backward", lambda self, loss: calls.append(1) or original(self, loss))
    fisher = empirical_fisher(model, list(model.parameters()), [(x, y)], 6, chunk_size=4)
    assert calls  # the per-layer method was tried first
    for f, e in zip(fisher, _official_loop(model, x, y)):
        torch.testing.assert_close(f, e, rtol=RTOL, atol=1e-7)
    with pytest.raises(ValueError, match="method='layerwise' cannot take this model: the batched backward failed"):
        empirical_fisher(model, list(model.parameters()), [(x, y)], 6, method="layerwise")
    opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, num_samples=6, update_freq=1, lr=0.1)
    opt.update_mask(model, [(x, y)])  # (raised CheckpointError)
    assert sum(int(m.count_int()) for m in opt._masks.values()) == opt._keep()


# Distributed shares. The ranks' Fishers add up the same per-sample terms as world_size=1, in
# another order and from other chunks (so other batched GEMMs and sums): they agree to fp32
# rounding, ~1e-7 relative per operation over a few dozen operations; rtol=1e-5 leaves room.
def _assert_share_sum(p, f):
    """The ranks' shares summed against the whole: per-sample gradients from convolutions over
    other chunk sizes differ by rounding at the tensor's scale (3.1e-7 of its largest entry seen
    over 61 seeds; an entry with cancellation in its gradient was 1.9e-5 off relative to itself,
    on CI), and a bias before BatchNorm has a Fisher of rounding noise (~1e-14): both bounded."""
    torch.testing.assert_close(p, f, rtol=1e-5, atol=1e-9 + 2e-6 * f.abs().max().item())


@pytest.mark.parametrize("world_size,num_samples", [(2, 12), (3, 10), (4, 25)])
def test_ranks_of_a_dataset_sum_to_the_whole(world_size, num_samples, gen):
    model = SmallConvBN()
    ds = torch.utils.data.TensorDataset(*_data(gen, 20))  # 25 samples: capped at 20
    whole = empirical_fisher(model, list(model.parameters()), ds, num_samples, generator=torch.Generator().manual_seed(7))
    parts = [torch.zeros_like(f) for f in whole]
    for rank in range(world_size):
        g = torch.Generator().manual_seed(7)  # seeded identically on every rank
        share = empirical_fisher(model, list(model.parameters()), ds, num_samples, generator=g, chunk_size=3,
                                 rank=rank, world_size=world_size)
        for p, f in zip(parts, share):
            p += f
    for p, f in zip(parts, whole):
        _assert_share_sum(p, f)


def test_dataset_shares_partition_one_draw(gen):
    ds = torch.utils.data.TensorDataset(*_data(gen, 30))
    x, y = draw_samples(ds, 11, torch.Generator().manual_seed(5))
    for rank in range(3):
        g = torch.Generator().manual_seed(5)
        xr, yr = draw_samples(ds, 11, g, rank=rank, world_size=3)
        assert torch.equal(xr, x[rank::3]) and torch.equal(yr, y[rank::3])


@pytest.mark.parametrize("world_size,num_samples", [(2, 12), (3, 10)])
def test_ranks_of_iterables_sum_to_the_whole(world_size, num_samples, gen):
    model = SmallConvBN()
    x, y = _data(gen, 24)
    whole = empirical_fisher(model, list(model.parameters()), [(x, y)], num_samples)
    parts = [torch.zeros_like(f) for f in whole]
    for rank in range(world_size):
        # rank r's loader shard: every world_size-th sample, in batches of 2, longer than its
        # share; its share count taken in order makes the union the first num_samples samples
        xs, ys = x[rank::world_size], y[rank::world_size]
        shard = [(xs[i : i + 2], ys[i : i + 2]) for i in range(0, xs.shape[0], 2)]
        share = empirical_fisher(model, list(model.parameters()), shard, num_samples, rank=rank, world_size=world_size)
        for p, f in zip(parts, share):
            p += f
    for p, f in zip(parts, whole):
        _assert_share_sum(p, f)


def test_empty_share_gives_zeros(gen):
    """num_samples < world_size: the ranks without a sample return zeros (their generator
    still advances like the others', and their loader is not started)."""
    model = SmallConvBN()
    ds = torch.utils.data.TensorDataset(*_data(gen, 20))
    states = []
    for rank in range(4):
        g = torch.Generator().manual_seed(1)
        fisher = empirical_fisher(model, list(model.parameters()), ds, 2, generator=g, rank=rank, world_size=4)
        assert all(torch.count_nonzero(f) == 0 for f in fisher) is (rank >= 2)
        states.append(g.get_state())
    assert_tensors_equal(states, [states[0]] * len(states), "generator states (each vs rank 0's)")

    def unstarted():
        raise AssertionError("the loader was iterated")
        yield

    fisher = empirical_fisher(model, list(model.parameters()), unstarted(), 2, rank=3, world_size=4)
    assert [f.shape for f in fisher] == [p.shape for p in model.parameters()]
    assert all(f.dtype == torch.float32 and torch.count_nonzero(f) == 0 for f in fisher)


@pytest.mark.parametrize("rank,world_size,error,match", [
    (-1, 2, ValueError, "rank"),
    (2, 2, ValueError, "rank must be < world_size"),
    (0, 0, ValueError, "world_size"),
    (1.0, 2, TypeError, "rank"),
    (True, 2, TypeError, "rank"),
    (0, "2", TypeError, "world_size"),
])
def test_bad_rank_arguments(rank, world_size, error, match, gen):
    model = SmallConvBN()
    x, y = _data(gen, 4)
    with pytest.raises(error, match=match):
        empirical_fisher(model, list(model.parameters()), [(x, y)], 4, rank=rank, world_size=world_size)
    with pytest.raises(error, match=match):
        draw_samples(torch.utils.data.TensorDataset(x, y), 4, torch.Generator(), rank=rank, world_size=world_size)


class _MixesSamples(nn.Module):
    """Samples meet outside BatchNorm (a batch-mean centring): batched gradients are not the
    per-sample ones."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.relu(h - h.mean(0, keepdim=True)))


class _Dropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.b(F.dropout(torch.relu(self.a(x)), 0.5, self.training))


@pytest.mark.parametrize("model_type,reason", [(_MixesSamples, "interact"), (_Dropout, "random")])
def test_layerwise_refuses_models_it_cannot_check(model_type, reason, gen):
    model = model_type()
    x, y = torch.randn(6, 8, generator=gen), torch.randint(0, 5, (6,), generator=gen)
    names = [n for n, _ in model.named_parameters()]
    fisher = [torch.zeros_like(p) for p in model.parameters()]
    for seed in range(20):  # whatever the dropout masks drawn (deterministic: the forward draws numbers)
        torch.manual_seed(seed)
        layerwise = ssam.fisher._Layerwise.build(model, names, fisher, F.cross_entropy)
        assert layerwise is not None  # built from the layer types alone; refused when it runs
        with pytest.raises(ssam.fisher._Unsupported, match=reason):
            layerwise(x, y)
        assert all(torch.count_nonzero(f) == 0 for f in fisher)


def test_samples_that_meet_outside_batchnorm_get_the_batch_of_one_fisher(gen):
    model = _MixesSamples()
    x, y = torch.randn(6, 8, generator=gen), torch.randint(0, 5, (6,), generator=gen)
    fisher = empirical_fisher(model, list(model.parameters()), [(x, y)], 6, chunk_size=4)
    for f, e in zip(fisher, _official_loop(model, x, y)):
        torch.testing.assert_close(f, e, rtol=RTOL, atol=1e-7)


class _ItemInForward(nn.Module):
    """LayerNorm (not a per-layer layer) and a host read in the forward, which vmap cannot trace."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.norm(x)) * (2.0 if x.sum().item() > 0 else 1.0)


def test_method_picks_one_way_or_says_why_it_cannot(gen):
    model = SmallConvBN()
    x, y = _data(gen, 8)
    params = list(model.parameters())
    expected = _official_loop(model, x, y)
    for name in ssam.fisher.METHODS:
        fisher = empirical_fisher(model, params, [(x, y)], 8, chunk_size=3, method=name)
        for f, e in zip(fisher, expected):
            torch.testing.assert_close(f, e, rtol=RTOL, atol=1e-7)
    with pytest.raises(ValueError, match="method must be 'auto' or one of"):
        empirical_fisher(model, params, [(x, y)], 8, method="batched")
    tied = _Tied("tied")
    xt, yt = torch.randn(4, 8, generator=gen), torch.randint(0, 5, (4,), generator=gen)
    with pytest.raises(ValueError, match="method='layerwise' cannot take this model"):
        empirical_fisher(tied, list(tied.parameters()), [(xt, yt)], 4, method="layerwise")
    dropout = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 5))
    with pytest.raises(ValueError, match="method='layerwise' cannot take this model: the forward is random"):
        empirical_fisher(dropout, list(dropout.parameters()), [(xt, yt)], 4, method="layerwise")


def test_auto_warns_when_vmap_fails_and_loops(gen):
    model = _ItemInForward()
    x, y = torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
    with pytest.raises(ValueError, match="method='vmap' cannot take this model: vmap over the model failed"):
        empirical_fisher(model, list(model.parameters()), [(x, y)], 5, method="vmap")
    with pytest.warns(UserWarning, match="vmap over the model failed .*computing per-sample gradients in a loop"):
        fisher = empirical_fisher(model, list(model.parameters()), [(x, y)], 5)
    for f, e in zip(fisher, _official_loop(model, x, y)):
        torch.testing.assert_close(f, e, rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("train_mode", [True, False])
def test_syncbatchnorm_is_taken_per_sample_without_syncing(train_mode, monkeypatch, gen):
    """SyncBatchNorm's statistics are computed per sample by the layerwise method, as a
    BatchNorm's: no forward of the module itself, so nothing to sync across ranks (which, with
    uneven shares of the samples, would be mismatched collectives). Same Fisher as BatchNorm2d."""
    torch.manual_seed(0)
    model = SmallConvBN().train(train_mode)
    synced = copy.deepcopy(model)
    synced.bn = nn.SyncBatchNorm.convert_sync_batchnorm(synced).bn
    monkeypatch.setattr(nn.SyncBatchNorm, "forward", None)  # a call of the module's own forward fails the test
    x, y = _data(gen)
    want = empirical_fisher(model, list(model.parameters()), [(x, y)], num_samples=20, method="layerwise")
    got = empirical_fisher(synced, list(synced.parameters()), [(x, y)], num_samples=20, method="layerwise")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_ddp_wrapper_is_read_through(tmp_path, gen):
    """update_mask(ddp_model) (the official step's model=) takes the Fisher on the module inside:
    the wrapper's forward runs DDP's collectives, whose count would differ across ranks with
    uneven shares of the samples (a hang). Same masks as the module itself gives, no DDP forward."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import ssam

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = SmallConvBN()
        wrapper = DistributedDataParallel(model)
        calls = []
        original = DistributedDataParallel.forward

        def counted(self, *args, **kwargs):
            calls.append(1)
            return original(self, *args, **kwargs)

        DistributedDataParallel.forward = counted
        try:
            x, y = _data(gen)
            data = torch.utils.data.TensorDataset(x, y)
            masks = []
            for net in (wrapper, model):
                opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, num_samples=7,
                                 update_freq=1, fisher_chunk_size=1, seed=3, lr=0.1)
                opt.update_mask(net, data)
                masks.append(list(opt.masks()))
        finally:
            DistributedDataParallel.forward = original
        assert calls == []
        wrapped, plain = masks
        assert_tensors_equal(wrapped, plain, "masks from the DDP-wrapped model")
    finally:
        dist.destroy_process_group()


def test_params_may_be_a_generator_and_not_empty(gen):
    """``model.parameters()`` itself (a generator, read once: it was exhausted by a check and
    then indexed, a TypeError), and an empty list a ValueError naming params (an IndexError)."""
    model = SmallConvBN()
    x, y = _data(gen, n=6)
    from_list = empirical_fisher(model, list(model.parameters()), [(x, y)], 6)
    from_generator = empirical_fisher(model, model.parameters(), [(x, y)], 6)
    assert_tensors_equal(from_list, from_generator)
    with pytest.raises(ValueError, match="params is empty"):
        empirical_fisher(model, [], [(x, y)], 6)
