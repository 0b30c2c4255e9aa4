"""``mvue24`` (unbiased 2:4 sparsification of a gradient), per backend. Minimal traffic: read
the tensor, write the 2:4 tensor (the random uniforms are drawn in-kernel from a seed).

    python -m ssam_bench.bench_mvue24            # dYᵀ of a GPT-2 MLP layer at 8k and 32k tokens
    python -m ssam_bench.bench_mvue24 --quick    # 256 x 512
"""

from __future__ import annotations

import sys

import torch

import ssam_kernels as sk
from ssam_bench.common import native_backends
from ssam_bench.opbench import Case, dtype_name, op_main

SHAPES = [(3072, 8192), (3072, 32768)]
QUICK = [(256, 512)]


def _case(shape, device, dtype, gen) -> Case:
    x = torch.randn(shape, device=device, generator=gen).to(dtype)
    impls = {b: (lambda b=b: sk.mvue24(x, seed=1, backend=b))
             for b in native_backends(device, lambda b: sk.mvue24(x[:1], seed=1, backend=b))}
    return Case("mvue24", f"{shape[0]}x{shape[1]} {dtype_name(dtype)}", impls, nbytes=2 * x.numel() * x.element_size())


def cases(device, dtype, quick) -> list[Case]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [_case(shape, device, dtype, gen) for shape in (QUICK if quick else SHAPES)]


def main(argv=None) -> int:
    return op_main("mvue24", "mvue24 (MVUE 2:4 sparsification)", cases, argv, __doc__,
                   dtypes=("bfloat16", "float16", "float32"))


if __name__ == "__main__":
    sys.exit(main())
