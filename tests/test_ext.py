"""The compiled extension: schemas and fake implementations (torch.library.opcheck), tracing
under torch.compile, and its ops beside the other backends. The op-by-op comparisons with the
references live in test_<op>.py (backend "ext")."""

import pytest
import torch
import torch.nn.functional as F
from helpers import EXT_BUILT, SmallConvBN, make_closure, rand, rand_mask

import ssam
import ssam_kernels as sk

pytestmark = [pytest.mark.cpu, pytest.mark.skipif(not EXT_BUILT, reason="ssam_kernels._C not built")]


def _samples(gen):
    ws = [rand((37,), generator=gen), rand((5, 16), generator=gen)]
    gs = [rand((37,), generator=gen), rand((5, 16), generator=gen)]
    bits = [sk.pack_mask(rand_mask((37,), generator=gen)), None]
    empty_backup = [ws[0].new_empty((bits[0].count_int(),)), torch.empty_like(ws[1])]
    mask = rand_mask((9, 7), generator=gen)
    w24 = rand((64, 64), torch.float16, gen)
    x24 = w24 * sk.nm_mask(w24, 2, 4)
    values, meta = sk.compress_24(x24, backend="torch")
    backup = [ws[0][bits[0].to_bool()].clone(), ws[1].clone()]
    return {
        "pack_mask": (mask,),
        "unpack_mask": (sk.pack_mask(mask).bits, mask.numel()),
        "grad_norm": (gs, [bits[0].bits, None]),
        "perturb_": ([w.clone() for w in ws], gs, [bits[0].bits, None], empty_backup, torch.tensor(0.1)),
        "restore_": ([w.clone() for w in ws], backup, [bits[0].bits, None]),
        "nm_mask": (rand((6, 13), generator=gen), 2, 4, True),
        "compress_24": (x24,),
        "decompress_24": (values, meta),
    }


@pytest.mark.parametrize("name", ["pack_mask", "unpack_mask", "grad_norm", "perturb_", "restore_", "nm_mask",
                                  "compress_24", "decompress_24"])
def test_opcheck(name, gen):
    torch.library.opcheck(getattr(torch.ops.ssam, name).default, _samples(gen)[name])


def test_pack_unpack_match_python(gen):
    mask = rand_mask((1001,), generator=gen)
    assert torch.equal(torch.ops.ssam.pack_mask(mask), sk.pack_mask(mask).bits)
    assert torch.equal(torch.ops.ssam.unpack_mask(sk.pack_mask(mask).bits, 1001), mask)


def test_traces_under_torch_compile(gen):
    scores = rand((32, 64), generator=gen)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def select(s):
        return torch.ops.ssam.nm_mask(s * 2, 2, 4, True)

    assert torch.equal(select(scores), sk.nm_mask(scores * 2, 2, 4, backend="torch"))


def test_errors_surface_as_python_errors(gen):
    w = rand((32, 32), torch.float16, gen)
    x = w * sk.nm_mask(w, 2, 4)
    x[3, 4:7] = 1.0
    x[3, 7] = 0.0
    with pytest.raises(ValueError, match="row 3, group 1"):
        sk.compress_24(x, backend="ext")
    with pytest.raises(RuntimeError, match="holds 3 values but the mask sets 16"):
        torch.ops.ssam.perturb_([torch.zeros(16)], [torch.ones(16)], [torch.full((2,), 255, dtype=torch.uint8)],
                                [torch.zeros(3)], torch.tensor(1.0))


def test_three_backends_agree_in_the_optimizer(gen, monkeypatch):
    x, y = torch.randn(32, 2, 4, 4, generator=gen), torch.randint(0, 5, (32,), generator=gen)
    results = {}
    for backend in ("torch", "ext") + (("triton",) if _triton_on_cpu() else ()):
        monkeypatch.setenv("SSAM_BACKEND", backend)
        torch.manual_seed(0)
        model = SmallConvBN()
        opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, drop_rate=0.5, T_end=5, lr=0.1,
                         momentum=0.9, fuse_sgd=False, seed=0)
        for epoch in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(make_closure(model, x, y, F.cross_entropy), epoch=epoch, batch_idx=0)
        results[backend] = [p.detach().clone() for p in model.parameters()]
    for backend, params in results.items():
        for a, b in zip(params, results["torch"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=backend)


def _triton_on_cpu():
    from helpers import TRITON_ON_CPU

    return TRITON_ON_CPU
