import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallConvBN

from ssam.fisher import draw_samples, empirical_fisher

pytestmark = pytest.mark.cpu


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
def test_equals_batch_size_one_loop_and_keeps_bn_stats(train_mode, chunk_size, gen):
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
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-7)
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert model.training is train_mode


def test_subset_of_parameters_and_batches(gen):
    model = SmallConvBN()
    x, y = _data(gen, 30)
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    params = [model.conv.weight, model.fc.bias]
    fisher = empirical_fisher(model, params, batches, num_samples=12)
    full = _official_loop(model, x[:12], y[:12])
    torch.testing.assert_close(fisher[0], full[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fisher[1], full[-1], rtol=1e-4, atol=1e-7)


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
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-6)


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
