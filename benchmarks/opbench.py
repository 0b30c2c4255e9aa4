"""The runner the op microbenchmarks share: time every implementation of a case in one
interleaved loop and express each time as a fraction of the device's ceilings (copy
bandwidth for memory-bound ops, dense matmul rate for GEMMs) measured in the same run."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable

import torch

from ssam_bench.common import OUT_HELP, copy_bandwidth, interleaved_medians, matmul_ceiling, quick_out, report


@dataclass
class Case:
    """One op at one configuration. ``impls`` maps an implementation name (a backend, or a
    baseline such as ``torch.topk``) to a call; ``nbytes`` is what the op must read and write
    at least, ``flops`` the dense-equivalent FLOPs of a GEMM (0: not applicable)."""

    op: str
    config: str
    impls: dict[str, Callable[[], object]]
    nbytes: int = 0
    flops: int = 0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    matmul_dtype: str

    @classmethod
    def measure(cls, device: torch.device, quick: bool, dtype: torch.dtype = torch.bfloat16) -> "Ceilings":
        """The copy bandwidth, and the matmul rate in the GEMMs' ``dtype`` (a GEMM's fraction of
        its own dtype's peak). A CPU's bf16/fp16 matmul is an emulation: its ceiling is fp32."""
        if device.type != "cuda":
            dtype = torch.float32
        return cls(copy_bandwidth(device, nbytes=(1 << 26) if quick else (1 << 30)),
                   matmul_ceiling(device, dtype, 1024 if quick else 8192), str(dtype).split(".")[-1])

    def meta(self) -> dict:
        return {"copy_bandwidth_gbps": self.copy_bytes_per_s / 1e9,
                "matmul_ceiling_tflops": self.matmul_flops_per_s / 1e12, "matmul_ceiling_dtype": self.matmul_dtype}


def run_cases(cases: list[Case], device: torch.device, ceilings: Ceilings, reps: int) -> list[dict]:
    """One row per (case, implementation): median time, GB/s or TFLOP/s and the fraction of the
    matching ceiling, and the speed relative to the ``torch`` reference where it ran."""
    rows = []
    for case in cases:
        # rates: the GPU's time alone (the host's work per call left out, as in the ceilings), cold L2
        times = interleaved_medians(case.impls, device, warmup=3, reps=reps, cold=True, busy=True)
        for impl, t in times.items():
            row = dict(op=case.op, config=case.config, impl=impl, median_ms=t * 1e3, gbps=None, copy_fraction=None,
                       tflops=None, matmul_fraction=None, x_torch=times["torch"] / t if "torch" in times else None,
                       **case.extra)
            if case.nbytes:
                row.update(gbps=case.nbytes / t / 1e9, copy_fraction=case.nbytes / t / ceilings.copy_bytes_per_s)
            if case.flops:
                row.update(tflops=case.flops / t / 1e12, matmul_fraction=case.flops / t / ceilings.matmul_flops_per_s)
            rows.append(row)
    return rows


COLUMNS = [("op", "op", ""), ("config", "config", ""), ("impl", "impl", ""), ("median_ms", "median ms", ".3f"),
           ("gbps", "GB/s", ".1f"), ("copy_fraction", "of copy BW", ".2f"), ("tflops", "TFLOP/s", ".1f"),
           ("matmul_fraction", "of matmul peak", ".2f"), ("x_torch", "x torch ref", ".2f")]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


DTYPES = ("float32", "bfloat16", "float16")


def op_main(name: str, title: str, make_cases: Callable[[torch.device, torch.dtype, bool], list[Case]],
            argv=None, doc: str = "", dtypes: tuple[str, ...] = DTYPES) -> int:
    """The command line of one ``bench_<op>.py``; ``dtypes`` are the op's (the first is the default)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    p.add_argument("--dtype", choices=dtypes, default=dtypes[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help=OUT_HELP)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.out = quick_out(args.quick, args.out, device)
    ceilings = Ceilings.measure(device, args.quick, getattr(torch, args.dtype))
    rows = run_cases(make_cases(device, getattr(torch, args.dtype), args.quick), device, ceilings, 5 if args.quick else 30)
    report(name, title, rows, COLUMNS, device, args.out, meta_extra=ceilings.meta(),
           note=f", copy {ceilings.copy_bytes_per_s / 1e9:.0f} GB/s and {ceilings.matmul_dtype} matmul "
                f"{ceilings.matmul_flops_per_s / 1e12:.1f} TFLOP/s measured in this run")
    return 0
