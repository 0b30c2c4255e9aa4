"""``pack_mask`` / ``unpack_mask`` (bool mask <-> 1 bit per entry). One implementation (plain
PyTorch); listed so every op has a number. Minimal traffic: n bytes one way, n / 8 the other.

    python -m ssam_bench.bench_bitmask            # 64M and 25.6M entries
    python -m ssam_bench.bench_bitmask --quick    # 1M entries
"""

from __future__ import annotations

import sys

import torch

import ssam_kernels as sk
from ssam_bench.opbench import Case, op_main

SIZES = [1 << 26, 25_557_032]
QUICK = [1 << 20]


def _cases(n: int, device, gen) -> list[Case]:
    mask = torch.rand(n, device=device, generator=gen) < 0.5
    bits = sk.pack_mask(mask)
    nbytes = n + sk.packed_nbytes(n)
    return [Case("pack_mask", f"{n / 1e6:.1f}M", {"torch": lambda: sk.pack_mask(mask)}, nbytes=nbytes),
            Case("unpack_mask", f"{n / 1e6:.1f}M", {"torch": lambda: sk.unpack_mask(bits)}, nbytes=nbytes)]


def cases(device, dtype, quick) -> list[Case]:
    """``dtype`` is unused: masks are bool."""
    gen = torch.Generator(device=device).manual_seed(0)
    return [c for n in (QUICK if quick else SIZES) for c in _cases(n, device, gen)]


def main(argv=None) -> int:
    return op_main("bitmask", "pack_mask / unpack_mask", cases, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
