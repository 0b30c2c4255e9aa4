"""``compress_24`` / ``decompress_24`` (the CUTLASS 2:4 layout: kept values + 2-bit
metadata), per backend, beside ``torch.sparse.to_sparse_semi_structured`` where it runs.
Minimal traffic: the dense matrix one way, the values and metadata the other.

    python -m ssam_bench.bench_compress_24            # 8192 x 8192 and 3072 x 768
    python -m ssam_bench.bench_compress_24 --quick    # 256 x 512
"""

from __future__ import annotations

import sys

import torch

import ssam_kernels as sk
from ssam_bench.common import native_backends
from ssam_bench.opbench import Case, dtype_name, op_main

SHAPES = [(8192, 8192), (3072, 768)]
QUICK = [(256, 512)]
DTYPES = ("bfloat16", "float16")  # what the 2:4 layouts hold


def _torch_semi_structured(x: torch.Tensor):
    """torch's own converter, where this device and dtype have it; None otherwise."""
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from torch.sparse import to_sparse_semi_structured

        to_sparse_semi_structured(x)
    except (RuntimeError, ValueError, ImportError):
        return None
    return lambda: to_sparse_semi_structured(x)


def _cases(shape, device, dtype, gen) -> list[Case]:
    dense = torch.randn(shape, device=device, generator=gen).to(dtype)
    dense = dense * sk.nm_mask(dense, 2, 4)
    values, meta = sk.compress_24(dense, backend="torch")
    packed = values.numel() * values.element_size() + meta.numel() * meta.element_size()
    label = f"{shape[0]}x{shape[1]} {dtype_name(dtype)}"
    small = dense[:32, :32]
    comp = {b: (lambda b=b: sk.compress_24(dense, backend=b))
            for b in native_backends(device, lambda b: sk.compress_24(small, backend=b))}
    baseline = _torch_semi_structured(dense)
    if baseline is not None:
        comp["to_sparse_semi_structured"] = baseline
    nbytes = dense.numel() * dense.element_size() + packed
    svalues, smeta = sk.compress_24(small, backend="torch")
    decomp = {b: (lambda b=b: sk.decompress_24(values, meta, backend=b))
              for b in native_backends(device, lambda b: sk.decompress_24(svalues, smeta, backend=b))}
    return [Case("compress_24", label, comp, nbytes=nbytes), Case("decompress_24", label, decomp, nbytes=nbytes)]


def cases(device, dtype, quick) -> list[Case]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [c for shape in (QUICK if quick else SHAPES) for c in _cases(shape, device, dtype, gen)]


def main(argv=None) -> int:
    return op_main("compress_24", "compress_24 / decompress_24 (CUTLASS 2:4 layout)", cases, argv, __doc__,
                   dtypes=DTYPES)


if __name__ == "__main__":
    sys.exit(main())
