"""``masked_weight_grad`` (the exact ascent mode's ``(dYᵀX) ⊙ M``), per backend, beside the
dense ``(dY.t() @ X) * M`` it replaces, at three mask layouts of a GPT-2 MLP weight
(3072 x 768, 8k tokens):

* ``2:4``: every 128x128 tile holds masked entries, so nothing can be skipped (the dense
  GEMM is the ceiling);
* ``rows 10%``: a tenth of the rows hold all the masked entries (Fisher masks concentrate);
* ``random 1%``: scattered entries, again in every tile.

TFLOP/s are dense-equivalent (``2 out in T`` over the time), against the dense matmul rate
measured in the same run: a skipping kernel can exceed 1.0 of it.

    python -m ssam_bench.bench_masked_weight_grad            # bf16
    python -m ssam_bench.bench_masked_weight_grad --quick    # 256 x 128 at 512 tokens
"""

from __future__ import annotations

import sys

import torch

import ssam_kernels as sk
from ssam_bench.common import native_backends
from ssam_bench.opbench import Case, dtype_name, op_main

SHAPE, TOKENS = (3072, 768), 8192
QUICK_SHAPE, QUICK_TOKENS = (256, 128), 512


def masks(shape, device, gen) -> dict[str, torch.Tensor]:
    rows = torch.zeros(shape, dtype=torch.bool, device=device)
    rows[torch.randperm(shape[0], device=device, generator=gen)[: shape[0] // 10]] = True
    return {"2:4": sk.nm_mask(torch.randn(shape, device=device, generator=gen), 2, 4),
            "rows 10%": rows,
            "random 1%": torch.rand(shape, device=device, generator=gen) < 0.01}


def _case(layout: str, mask, dy, x) -> Case:
    bits = sk.pack_mask(mask)
    impls = {b: (lambda b=b: sk.masked_weight_grad(dy, x, bits, backend=b))
             for b in native_backends(dy.device, lambda b: sk.masked_weight_grad(dy[:1], x[:1], bits, backend=b))}
    impls["dense mm * mask"] = lambda: (dy.t() @ x) * mask
    tokens, (out, inp) = dy.shape[0], mask.shape
    return Case("masked_weight_grad", f"{out}x{inp} T={tokens} {dtype_name(dy.dtype)} {layout}", impls,
                flops=2 * out * inp * tokens)


def cases(device, dtype, quick) -> list[Case]:
    gen = torch.Generator(device=device).manual_seed(0)
    (out, inp), tokens = (QUICK_SHAPE, QUICK_TOKENS) if quick else (SHAPE, TOKENS)
    dy = torch.randn(tokens, out, device=device, generator=gen).to(dtype)
    x = torch.randn(tokens, inp, device=device, generator=gen).to(dtype)
    return [_case(layout, m, dy, x) for layout, m in masks((out, inp), device, gen).items()]


def main(argv=None) -> int:
    return op_main("masked_weight_grad", "masked_weight_grad: exact masked weight gradient", cases, argv, __doc__,
                   dtypes=("bfloat16", "float16", "float32"))


if __name__ == "__main__":
    sys.exit(main())
