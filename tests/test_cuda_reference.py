"""Tier cuda: the reference ops and optimizers on CUDA tensors equal their CPU results.

``SSAM_TEST_CUDA_DEVICE`` overrides the device (to dry-run these checks on a CPU)."""

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallConvBN, rand, rand_mask

import ssam
import ssam_kernels as sk

pytestmark = pytest.mark.cuda
DEVICE = os.environ.get("SSAM_TEST_CUDA_DEVICE", "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ops_match_cpu(dtype, gen):
    shapes = [(1,), (3, 5), (4095,), (10**6 + 3,)]
    ws = [rand(s, dtype, gen) for s in shapes]
    gs = [rand(s, dtype, gen) for s in shapes]
    ms = [rand_mask(s, generator=gen) for s in shapes]
    norm_cpu = sk.grad_norm(gs, ms)
    norm_dev = sk.grad_norm([g.to(DEVICE) for g in gs], [sk.pack_mask(m.to(DEVICE)) for m in ms])
    torch.testing.assert_close(norm_dev.cpu(), norm_cpu, rtol=1e-5, atol=0)
    wd = [w.to(DEVICE) for w in ws]
    with torch.no_grad():
        backup = sk.perturb_(wd, [g.to(DEVICE) for g in gs], [m.to(DEVICE) for m in ms], 0.3)
        sk.perturb_(ws, gs, ms, 0.3)
        for a, b in zip(wd, ws):
            assert torch.equal(a.cpu(), b)
        sk.restore_(wd, backup)
    scores = [rand(s, generator=gen) for s in shapes]
    for a, b in zip(sk.topk_mask([s.to(DEVICE) for s in scores], 0.3), sk.topk_mask(scores, 0.3)):
        assert torch.equal(a.cpu(), b)
    s2 = rand((64, 1000), generator=gen)
    assert torch.equal(sk.nm_mask(s2.to(DEVICE), 2, 4).cpu(), sk.nm_mask(s2, 2, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compress_24_matches_cpu(dtype, gen):
    w = rand((128, 256), dtype, gen)
    x = (w * sk.nm_mask(w, 2, 4)).to(DEVICE)
    values, meta = sk.compress_24(x)
    cpu_values, cpu_meta = sk.compress_24(x.cpu())
    assert torch.equal(values.cpu(), cpu_values) and torch.equal(meta.cpu(), cpu_meta)
    assert torch.equal(sk.decompress_24(values, meta), x)


def test_ssamf_step_matches_cpu(gen):
    torch.manual_seed(0)
    cpu_model = SmallConvBN()
    dev_model = SmallConvBN().to(DEVICE)
    dev_model.load_state_dict(cpu_model.state_dict())
    x, y = torch.randn(16, 2, 4, 4, generator=gen), torch.randint(0, 5, (16,), generator=gen)
    results = []
    for model, dev in ((cpu_model, "cpu"), (dev_model, DEVICE)):
        opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, num_samples=16,
                         update_freq=1, lr=0.1, seed=0)
        xd, yd = x.to(dev), y.to(dev)
        opt.update_mask(model, [(xd, yd)])

        def closure():
            loss = F.cross_entropy(model(xd), yd)
            loss.backward()
            return loss

        F.cross_entropy(model(xd), yd).backward()
        opt.step(closure)
        results.append(([p.detach().cpu() for p in model.parameters()], opt.mask_density()))
    assert results[0][1] == results[1][1]
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
