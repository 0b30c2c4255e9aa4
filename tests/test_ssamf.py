import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallConvBN, assert_tensors_equal, make_closure

import ssam
from ssam.fisher import empirical_fisher
from ssam_kernels import packed_nbytes

pytestmark = pytest.mark.cpu


def _setup(gen, structure="unstructured", sparsity=0.5, norm="full", n=40):
    torch.manual_seed(0)
    model = SmallConvBN()
    x, y = torch.randn(n, 2, 4, 4, generator=gen), torch.randint(0, 5, (n,), generator=gen)
    opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=sparsity, num_samples=16,
                     update_freq=2, structure=structure, norm=norm, lr=0.05, momentum=0.9, seed=1)
    return model, opt, torch.utils.data.TensorDataset(x, y)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_mask_is_global_topk_of_fisher_with_exact_count(sparsity, gen):
    model, opt, data = _setup(gen, sparsity=sparsity)
    assert opt.mask_density() == 0.0  # empty until the first update, as in the official code
    opt.update_mask(model, [data.tensors])
    params = list(model.parameters())
    fisher = torch.cat([f.reshape(-1) for f in empirical_fisher(model, params, [data.tensors], 16)])
    masks = torch.cat([opt.get_mask(p).reshape(-1) for p in params])
    k = int((1 - sparsity) * fisher.numel())
    assert int(masks.sum()) == k
    if 0 < k < fisher.numel():
        assert fisher[masks].min() >= fisher[~masks].max()
    assert opt.mask_density() == k / fisher.numel()


def test_masks_and_backup_are_compact(gen):
    model, opt, data = _setup(gen)
    opt.update_mask(model, data)
    for p in model.parameters():
        assert not opt.state[p]  # no float copies of anything
        bits = opt._masks[p].bits
        assert bits.dtype == torch.uint8 and bits.numel() == packed_nbytes(p.numel())
    x, y = data.tensors
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    kept = sum(int(opt.get_mask(p).sum()) for p in model.parameters())
    if opt._plan is not None:  # the planned step: one flat backup, each tensor's part on 16 bytes
        saved = sum(part.backup.nbytes for part in opt._pending.plan._impl.parts)
        tensors = len(list(model.parameters()))
        assert 4 * kept <= saved < 4 * kept + 16 * tensors
    else:
        saved = sum(b.nbytes() for _, _, b in opt._pending)
        assert saved == 4 * kept
    opt.second_step()


@pytest.mark.parametrize("norm", ["full", "masked"])
def test_perturbation_formula(norm, gen):
    model, opt, data = _setup(gen, norm=norm)
    opt.update_mask(model, data)
    x, y = data.tensors
    F.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]
    g = [p.grad.clone() for p in params]
    m = [opt.get_mask(p) for p in params]
    gm = [gi * mi for gi, mi in zip(g, m)]
    norm_of = gm if norm == "masked" else g
    scale = 0.1 / (torch.cat([t.reshape(-1) for t in norm_of]).norm() + 1e-7)
    opt.first_step()
    for p, wi, gmi in zip(params, w, gm):
        torch.testing.assert_close(p.detach(), wi + scale * gmi, rtol=1e-6, atol=1e-7)
    opt.second_step()


def test_nm_structure(gen):
    model, opt, data = _setup(gen, structure="2:4", sparsity=None)
    assert opt.sparsity == 0.5
    opt.update_mask(model, data)
    fisher = empirical_fisher(model, list(model.parameters()), data, 16, generator=torch.Generator().manual_seed(1))
    for p, f in zip(model.parameters(), fisher):
        mask = opt.get_mask(p)

        def groups(t):  # the full groups of 4 along each row of the reduction dims
            rows = t.reshape(p.shape[0], -1) if p.dim() > 1 else t.reshape(1, -1)
            return rows[:, : rows.shape[1] // 4 * 4].reshape(rows.shape[0], -1, 4)

        full, scores = groups(mask), groups(f)
        assert bool((full.sum(-1) == 2).all())
        # each group keeps its 2 highest Fisher scores (ties either way)
        kept_min = torch.where(full, scores, torch.full_like(scores, float("inf"))).amin(-1)
        dropped_max = torch.where(full, torch.full_like(scores, -float("inf")), scores).amax(-1)
        assert bool((kept_min >= dropped_max).all())
    # conv weight: reduction dim 2*3*3 = 18 -> 4 full groups + a trailing pair (kept whole)
    conv_rows = opt.get_mask(model.conv.weight).reshape(6, 18)
    assert bool(conv_rows[:, 16:].all())
    assert opt.mask_density() == sum(int(opt.get_mask(p).sum()) for p in model.parameters()) / sum(
        p.numel() for p in model.parameters()
    )


def test_tensor_structure_selects_whole_tensors(gen):
    model, opt, data = _setup(gen, structure="tensor", sparsity=0.3)
    opt.update_mask(model, data)
    params = list(model.parameters())
    budget = int(0.7 * sum(p.numel() for p in params))
    kept = 0
    for p in params:
        mask = opt.get_mask(p)
        assert bool(mask.all()) or not bool(mask.any())
        kept += int(mask.sum())
    assert 0 < kept <= budget


def test_official_step_convention_updates_after_the_step(gen):
    model, opt, data = _setup(gen)
    x, y = data.tensors[0][:8], data.tensors[1][:8]
    messages = []
    for epoch, batch_idx, expect_update in [(0, 0, True), (0, 1, False), (1, 0, False), (2, 0, True)]:
        before = opt.mask_updates
        density_before = opt.mask_density()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        w_before = model.fc.weight.detach().clone()
        opt.step(make_closure(model, x, y, F.cross_entropy), model=model, epoch=epoch, batch_idx=batch_idx, train_data=data,
                 logger=messages.append, step=0)
        assert opt.mask_updates == before + expect_update
        if epoch == 0 and batch_idx == 0:
            # the first step ran with the empty mask: a plain SGD step (momentum buffer fresh)
            assert density_before == 0.0
        assert not torch.equal(model.fc.weight, w_before)
    total = sum(p.numel() for p in model.parameters())
    assert len(messages) == 2 and f"Mask Lived Weight: {int(0.5 * total) / total:.4f}" in messages[0]


@pytest.mark.parametrize("train_data, error, message", [
    (3, TypeError, "data must be a Dataset or an iterable of \\(x, y\\) batches, got int"),
    (torch.utils.data.TensorDataset(torch.zeros(0, 2, 4, 4), torch.zeros(0)), ValueError, "data is an empty Dataset"),
    ("pair", TypeError, "data is one \\(x, y\\) pair of tensors; pass an iterable of \\(x, y\\) batches"),
])
def test_a_step_due_to_update_the_mask_checks_the_data_before_it_moves_the_weights(train_data, error, message, gen):
    """The official ``step(..., train_data=)`` updates the mask after the step: data it cannot
    read is refused before the step (it raised after the weights had moved: a caller retrying
    took two steps), and no update is owed for it."""
    model, opt, data = _setup(gen)
    train_data = data.tensors if isinstance(train_data, str) else train_data
    x, y = data.tensors[0][:8], data.tensors[1][:8]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=message):
        opt.step(make_closure(model, x, y, F.cross_entropy), model=model, epoch=0, batch_idx=0, train_data=train_data)
    assert_tensors_equal(list(model.parameters()), before)
    assert opt.mask_updates == 0 and not opt._update_owed
    with pytest.raises(error, match=message):  # the same check where the mask is taken by hand
        opt.update_mask(model, train_data)


def test_a_training_mode_batchnorm_over_features_gets_a_note_on_the_fisher(gen):
    """A BatchNorm1d over (N, C) inputs in training mode cannot take the Fisher's batches of one
    sample: torch's error is kept, with a note saying why and what to do (eval mode)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, num_samples=4, update_freq=1, lr=0.1)
    batches = [(torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen))]
    with pytest.raises(ValueError, match="more than 1 value per channel") as info:
        opt.update_mask(model, batches)
    if hasattr(info.value, "add_note"):  # (Python >= 3.11)
        assert any("batch of one" in note and "model.eval()" in note for note in info.value.__notes__)
    model.eval()
    opt.update_mask(model, batches)
    assert opt.mask_updates == 1


def test_warns_once_when_stepping_with_an_empty_mask(gen):
    model, opt, data = _setup(gen)
    x, y = data.tensors
    with pytest.warns(UserWarning, match="mask is empty"):
        F.cross_entropy(model(x), y).backward()
        opt.step(make_closure(model, x, y, F.cross_entropy))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(make_closure(model, x, y, F.cross_entropy))


def test_update_mask_leaves_model_alone(gen):
    model, opt, data = _setup(gen)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt.update_mask(model, data)
    after = model.state_dict()
    assert list(after) == list(state)
    for k, v in after.items():
        assert_tensors_equal([v], [state[k]], f"state_dict[{k!r}]")
    assert all(p.grad is None for p in model.parameters())


def test_frozen_parameters_get_no_fisher_mask_entries(gen):
    model, opt, data = _setup(gen)
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    with pytest.warns(UserWarning, match="do not require grad"):
        opt.update_mask(model, data)
    assert not opt.get_mask(frozen).any()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kept = sum(int(opt.get_mask(p).sum()) for p in model.parameters())
    assert kept == int((1 - opt.sparsity) * trainable)


def test_tensor_structure_ranks_a_nan_score_lowest():
    """A tensor whose score mean is NaN is chosen last (a descending sort would put it first)."""
    from ssam.structure import parse_structure, select_mask

    scores = [torch.full((4,), 5.0), torch.tensor([1.0, float("nan"), 1.0, 1.0]), torch.full((4,), 2.0)]
    masks = select_mask(scores, parse_structure("tensor"), keep=8)
    assert [bool(m.all()) for m in masks] == [True, False, True]


def test_nan_fisher_entries_keep_the_count_beside_frozen_parameters(gen, monkeypatch):
    """NaN ranks as -inf; a frozen parameter takes no slot from it (it used to win the tie by
    index, then lose the entry to the exclusion, leaving fewer than the count)."""
    import ssam.ssamf

    model, opt, data = _setup(gen)
    params = list(model.parameters())
    params[0].requires_grad_(False)  # first in the concatenation: it would win the ties
    nan_fisher = [torch.full_like(p, float("nan")) for p in params]
    monkeypatch.setattr(ssam.ssamf, "empirical_fisher", lambda *args, **kwargs: nan_fisher)
    with pytest.warns(UserWarning, match="do not require grad"):
        opt.update_mask(model, data)
    assert not opt.get_mask(params[0]).any()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    assert sum(int(opt.get_mask(p).sum()) for p in params) == int((1 - opt.sparsity) * trainable)


def test_the_constructor_loss_fn_sets_the_fisher_of_step_mask_updates():
    """step(model=, epoch=, batch_idx=, train_data=) has no loss_fn of its own: the
    constructor's is used (cross-entropy only when None), and update_mask's explicit one wins."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=gen), torch.randn(64, 3, generator=gen)  # regression targets
    data = torch.utils.data.TensorDataset(x, y)

    def make(**kw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        return model, ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.9, num_samples=64,
                                 update_freq=1, lr=0.1, seed=0, **kw)

    model, opt = make(loss_fn=F.mse_loss)
    opt.zero_grad()
    opt.step(make_closure(model, x[:8], y[:8]), model=model, epoch=0, batch_idx=0, train_data=data)
    ref_model, ref = make()
    ref_model.load_state_dict(model.state_dict())  # the weights after the step
    ref.update_mask(ref_model, data, loss_fn=F.mse_loss)
    assert_tensors_equal(opt.masks(), ref.masks())
    ce_model, ce = make()
    ce_model.load_state_dict(model.state_dict())
    ce.update_mask(ce_model, data)
    assert not all(torch.equal(a, b) for a, b in zip(opt.masks(), ce.masks()))
    # update_mask without one takes the constructor's; an explicit one wins
    again_model, again = make(loss_fn=F.mse_loss)
    again_model.load_state_dict(model.state_dict())
    again.update_mask(again_model, data)
    assert_tensors_equal(again.masks(), ref.masks())
    explicit_model, explicit = make(loss_fn=lambda out, t: (_ for _ in ()).throw(AssertionError("not this one")))
    explicit_model.load_state_dict(model.state_dict())
    explicit.update_mask(explicit_model, data, loss_fn=F.mse_loss)
    assert_tensors_equal(explicit.masks(), ref.masks())
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        make(loss_fn="mse")


def test_batches_behind_only_getitem_are_taken_as_iter_takes_them(gen):
    """An object with only ``__getitem__`` (Python's old sequence protocol, which ``iter()``
    and a for loop take) gives its batches: the same mask as the list of them."""
    model, opt, data = _setup(gen)

    class Batches:  # no __iter__, no __len__: indexed until IndexError
        def __getitem__(self, i):
            if i >= 2:
                raise IndexError(i)
            return data.tensors[0][8 * i:8 * i + 8], data.tensors[1][8 * i:8 * i + 8]

    opt.update_mask(model, Batches())
    by_object = [m.clone() for m in opt.masks()]
    opt.update_mask(model, [Batches()[0], Batches()[1]])
    assert_tensors_equal(by_object, list(opt.masks()))
    assert 0 < opt.mask_density() < 1
