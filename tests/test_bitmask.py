import pytest
import torch
from helpers import ODD_SIZES, rand_mask

from ssam_kernels import BitMask, pack_mask, packed_nbytes, unpack_mask

pytestmark = pytest.mark.cpu


@pytest.mark.parametrize("numel", [0] + ODD_SIZES + [8, 16])
def test_round_trip_odd_sizes(numel, gen):
    mask = rand_mask((numel,), generator=gen)
    packed = pack_mask(mask)
    assert packed.bits.dtype == torch.uint8
    assert packed.bits.numel() == packed_nbytes(numel) == (numel + 7) // 8
    assert torch.equal(unpack_mask(packed), mask)
    assert int(packed.count()) == int(mask.sum())


def test_round_trip_keeps_shape(gen):
    mask = rand_mask((3, 5, 7), generator=gen)
    packed = pack_mask(mask)
    assert packed.shape == mask.shape
    assert torch.equal(packed.to_bool(), mask)


def test_bit_order_is_lsb_first_row_major():
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 0] = mask[0, 3] = mask[1, 3] = True  # flat indices 0, 3, 9
    bits = pack_mask(mask).bits
    assert bits.tolist() == [0b0000_1001, 0b0000_0010]


def test_padding_bits_are_zero():
    bits = pack_mask(torch.ones(11, dtype=torch.bool)).bits
    assert bits.tolist() == [0xFF, 0b0000_0111]


def test_bitmasks_compare_by_identity(gen):
    """Two BitMasks are equal only if they are one object (the dataclass compared tensors and
    raised: ``a == b``, ``a in [b]``); they hash by identity, as caches keyed on them need."""
    m = rand_mask((5, 7), 0.5, gen)
    a, b = pack_mask(m), pack_mask(m)
    assert a == a and a != b and a in [b, a] and [b, a].index(a) == 1 and len({a, b, a}) == 2


def test_rejects_bad_input():
    with pytest.raises(TypeError, match="bool tensor"):
        pack_mask(torch.ones(3))
    with pytest.raises(TypeError, match="BitMask"):
        unpack_mask(torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="uint8"):
        BitMask(torch.zeros(1, dtype=torch.int32), torch.Size([3]))
    with pytest.raises(ValueError, match="needs 2"):
        BitMask(torch.zeros(1, dtype=torch.uint8), torch.Size([9]))
    with pytest.raises(ValueError, match=r"sizes >= 0, got \(-4, 5\)"):
        BitMask(torch.zeros(0, dtype=torch.uint8), (-4, 5))  # (-20 elements: "needs -2 bytes" before)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="numel must be an int >= 0"):
            packed_nbytes(bad)
    assert [packed_nbytes(n) for n in (0, 1, 8, 9)] == [0, 1, 1, 2]


def _dirty(mask: BitMask) -> BitMask:
    """The same mask with every padding bit of its last byte set."""
    bits = mask.bits.clone()
    bits[-1] |= 0xFF << (mask.numel % 8) & 0xFF
    return BitMask(bits, mask.shape)


def test_padding_bits_are_not_counted(gen):
    mask = pack_mask(rand_mask((3, 7), generator=gen))  # 21 entries: 3 padding bits
    dirty = _dirty(mask)
    assert not torch.equal(dirty.bits, mask.bits)
    assert int(dirty.count()) == dirty.count_int() == int(mask.count())
    assert torch.equal(dirty.to_bool(), mask.to_bool())



def test_popcount_of_every_byte_and_a_masks_count(gen):
    from ssam_kernels.ops.bitmask import popcount_bytes

    every = torch.arange(256, dtype=torch.uint8)
    assert popcount_bytes(every).tolist() == [bin(b).count("1") for b in range(256)]
    mask = rand_mask((37, 29), 0.3, gen)
    assert int(pack_mask(mask).count()) == int(mask.sum())
