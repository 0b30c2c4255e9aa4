import pytest
import torch
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass as torch_compress,
    sparse_semi_structured_to_dense_cutlass as torch_decompress,
)

from helpers import BACKENDS_WITH_EXT, GridRecorder, backend_dtypes

from ssam_kernels import compress_24, decompress_24, nm_mask

DTYPES = [torch.float16, torch.bfloat16]
SHAPES = [(32, 32), (64, 96), (96, 64), (160, 256)]


def _sparse_24(rows, cols, dtype, gen, max_nonzeros=2):
    """Every group of 4 gets 0..max_nonzeros nonzeros at random positions."""
    x = torch.randn(rows, cols, generator=gen).to(dtype)
    x[x == 0] = 1  # so "zero" only ever means "pruned"
    order = torch.rand(rows, cols // 4, 4, generator=gen).argsort(-1)
    count = torch.randint(0, max_nonzeros + 1, (rows, cols // 4, 1), generator=gen)
    return (x.view(rows, cols // 4, 4) * (order < count)).view(rows, cols)


@pytest.mark.parametrize("backend,dtype", backend_dtypes(DTYPES, BACKENDS_WITH_EXT))
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_torch_cutlass_reference(dtype, shape, backend, gen, poison_triton):
    x = _sparse_24(*shape, dtype, gen)
    ref_values, ref_meta = torch_compress(x)
    # Triton allocates values, meta and the decompressed matrix poisoned (NaN, 0x5A5A): an
    # element the kernels leave unwritten fails, where a fresh allocation's zeros could pass
    # (the pruned half of a decompressed matrix is zeros). The references run outside.
    with poison_triton():
        values, meta = compress_24(x, backend=backend)
        dense = decompress_24(values, meta, backend=backend)
    assert values.dtype == dtype and meta.dtype == torch.int16
    assert torch.equal(values, ref_values)
    assert torch.equal(meta, ref_meta)
    assert torch.equal(dense, x)
    assert torch.equal(torch_decompress(values, meta), x)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_every_nonzero_pattern(backend, poison_triton):
    # all 11 patterns with <= 2 nonzeros, cycled over a 32x32 matrix
    patterns = [p for p in range(16) if bin(p).count("1") <= 2]
    groups = torch.tensor([[(p >> i) & 1 for i in range(4)] for p in patterns], dtype=torch.float16)
    x = groups[torch.arange(32 * 8) % len(patterns)].view(32, 32) * 3
    ref_values, ref_meta = torch_compress(x)
    with poison_triton():
        values, meta = compress_24(x, backend=backend)
        dense = decompress_24(values, meta, backend=backend)
    assert torch.equal(values, ref_values) and torch.equal(meta, ref_meta)
    assert torch.equal(dense, x)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
@pytest.mark.parametrize("nibble", [0b0101, 0b0000, 0b1111])
def test_metadata_naming_one_position_twice_keeps_the_second_value(backend, nibble, gen, poison_triton):
    """Metadata that names one position for both kept values of a group (compress_24 never
    writes it; hand-made or foreign metadata may): every backend puts the second value there,
    as consecutive writes leave it (the kernels disagreed: the CUDA and Triton ones kept the
    first). Every metadata word alike, so the CUTLASS interleaving does not matter."""
    rows, cols = 32, 64
    values = torch.randn(rows, cols // 2, generator=gen).to(torch.float16)
    meta = torch.full((rows, cols // 16), nibble * 0x1111, dtype=torch.int32).to(torch.int16)
    with poison_triton():
        dense = decompress_24(values, meta, backend=backend)
    expected = torch.zeros(rows, cols // 4, 4, dtype=torch.float16)
    expected[:, :, nibble & 0b11] = values.view(rows, cols // 4, 2)[:, :, 1]
    assert torch.equal(dense, expected.view(rows, cols))


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_kept_zeros_keep_their_sign(backend, gen, poison_triton):
    """A group with fewer than two nonzeros keeps a zero: -0.0 stays -0.0, as the reference's
    gather keeps it (equal values, but a bitwise contract). Triton's outputs are allocated
    poisoned: a zero it left unwritten fails."""
    x = torch.full((32, 64), -0.0, dtype=torch.float16)
    x[:, ::8] = torch.randn(32, 8, generator=gen).to(torch.float16)  # one nonzero in every other group
    ref_values, ref_meta = torch_compress(x)
    with poison_triton():
        values, meta = compress_24(x, backend=backend)
        dense = decompress_24(values, meta, backend=backend)
    assert torch.equal(meta, ref_meta)
    assert torch.equal(values.view(torch.int16), ref_values.view(torch.int16))  # the bits, signs of zeros too
    assert torch.equal(dense.view(torch.int16)[x != 0], x.view(torch.int16)[x != 0])
    assert torch.equal(dense, x)  # every element, the pruned zeros too (as values: they come back +0.0)


@pytest.mark.cpu
def test_from_nm_mask(gen):
    w = torch.randn(64, 128, generator=gen).to(torch.bfloat16)
    x = w * nm_mask(w, 2, 4)
    values, meta = compress_24(x)
    assert torch.equal(values, torch_compress(x)[0])
    assert torch.equal(decompress_24(values, meta), x)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_empty_rows(backend, poison_triton):
    with poison_triton():
        values, meta = compress_24(torch.zeros(0, 64, dtype=torch.float16), backend=backend)
        assert values.shape == (0, 32) and meta.shape == (0, 4)
        assert decompress_24(values, meta, backend=backend).shape == (0, 64)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_not_24_sparse_names_the_group(backend, gen, poison_triton):
    dense = _sparse_24(64, 64, torch.float16, gen)
    dense[37, 8:11] = 1.0  # three nonzeros in group 2 of row 37
    with poison_triton(), pytest.raises(ValueError, match="row 37, group 2"):
        compress_24(dense, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
@pytest.mark.parametrize("shape", [(32, 32), (64, 96), (32, 160)])
def test_unchecked_equals_checked_on_24_input(backend, shape, gen, poison_triton):
    x = _sparse_24(*shape, torch.float16, gen)
    ref_values, ref_meta = compress_24(x, backend="torch")
    with poison_triton():
        values, meta = compress_24(x, check=False, backend=backend)
    assert torch.equal(values, ref_values) and torch.equal(meta, ref_meta)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_unchecked_takes_non_24_input_without_error(backend, gen, poison_triton):
    dense = _sparse_24(64, 64, torch.float16, gen)
    dense[37, 8:11] = 1.0
    with poison_triton():
        values, meta = compress_24(dense, check=False, backend=backend)
    assert values.shape == (64, 32) and meta.shape == (64, 4)
    # the 2:4 groups are still compressed exactly (only row 37's group 2 is unspecified)
    keep = torch.ones(64, 16, dtype=torch.bool)
    keep[37, 2] = False
    back = decompress_24(values, meta, backend="torch").view(64, 16, 4)
    assert torch.equal(back[keep], dense.view(64, 16, 4)[keep])


@pytest.mark.cpu
def test_errors(gen):
    with pytest.raises(TypeError, match="check must be a bool"):
        compress_24(torch.zeros(32, 32, dtype=torch.float16), check=1)
    with pytest.raises(TypeError, match="dtype"):
        compress_24(torch.zeros(32, 32))
    with pytest.raises(ValueError, match="2-D"):
        compress_24(torch.zeros(32, 32, 1, dtype=torch.float16))
    with pytest.raises(ValueError, match="rows % 32"):
        compress_24(torch.zeros(33, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="cols % 32"):
        compress_24(torch.zeros(32, 48, dtype=torch.float16))
    dense = _sparse_24(32, 32, torch.float16, gen)
    dense[5, 8:11] = 1.0  # three nonzeros in group 2 of row 5
    with pytest.raises(ValueError, match="row 5, group 2"):
        compress_24(dense)
    values, meta = compress_24(_sparse_24(32, 64, torch.float16, gen))
    with pytest.raises(ValueError, match="meta has shape"):
        decompress_24(values, meta[:, :2])
    with pytest.raises(TypeError, match="int16"):
        decompress_24(values, meta.int())
    with pytest.raises(TypeError, match=r"values must have dtype in \(torch\.float16, torch\.bfloat16\), "
                                        r"got torch\.float32"):
        decompress_24(values.float(), meta)


@pytest.mark.cpu
def test_cusparselt_path_needs_cuda():
    from ssam_kernels import compress_24_cusparselt

    with pytest.raises(ValueError, match="CUDA tensors only"):
        compress_24_cusparselt(torch.zeros(32, 32, dtype=torch.float16))


@pytest.mark.cpu
@pytest.mark.parametrize("shape", [(32, 4_194_368), (2_097_184, 64)])
def test_triton_grid_fits_cuda_limits_on_wide_and_tall_operands(shape, monkeypatch):
    # a second grid axis stops at 65535 blocks: 4M columns of 64 per program; the interpreter
    # does not enforce it, so the launch grid is checked against CUDA's limits directly
    pytest.importorskip("triton")
    from ssam_kernels.triton_ops import compress_24 as triton_compress

    for kernel in ("_compress_kernel", "_decompress_kernel"):
        monkeypatch.setattr(triton_compress, kernel, GridRecorder())
    x = torch.empty(shape, dtype=torch.float16, device="meta")
    values, meta = triton_compress.compress_24_triton(x, check=False)
    triton_compress.decompress_24_triton(values, meta)
    for kernel in ("_compress_kernel", "_decompress_kernel"):
        recorder = getattr(triton_compress, kernel)
        assert recorder.within_cuda_limits(), recorder.grids
        assert recorder.grids[0][0] == shape[0] // 32 * -(-shape[1] // 64)  # every tile, once
