import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallConvBN, make_closure

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
        assert all(torch.equal(a, b) for a, b in zip(opt.masks(), opt2.masks()))
        assert opt.mask_updates == opt2.mask_updates
        assert torch.equal(opt.generator.get_state(), opt2.generator.get_state())


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
