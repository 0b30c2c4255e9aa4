"""``nm_mask`` (2:4 by magnitude along the last dim), per backend. Minimal traffic: read the
scores, write the bool mask.

    python -m ssam_bench.bench_nm_mask            # 8192 x 8192 and 3072 x 768
    python -m ssam_bench.bench_nm_mask --quick    # 256 x 512
"""

from __future__ import annotations

import sys

import torch

import ssam_kernels as sk
from ssam_bench.common import native_backends
from ssam_bench.opbench import Case, dtype_name, op_main

SHAPES = [(8192, 8192), (3072, 768)]
QUICK = [(256, 512)]


def _case(shape, device, dtype, gen) -> Case:
    scores = torch.randn(shape, device=device, generator=gen).to(dtype)
    impls = {b: (lambda b=b: sk.nm_mask(scores, 2, 4, backend=b))
             for b in native_backends(device, lambda b: sk.nm_mask(scores[:1], 2, 4, backend=b))}
    return Case("nm_mask", f"{shape[0]}x{shape[1]} {dtype_name(dtype)} 2:4", impls,
                nbytes=scores.numel() * (scores.element_size() + 1))


def cases(device, dtype, quick) -> list[Case]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [_case(shape, device, dtype, gen) for shape in (QUICK if quick else SHAPES)]


def main(argv=None) -> int:
    return op_main("nm_mask", "nm_mask (2:4)", cases, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
