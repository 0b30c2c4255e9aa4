"""Compile every Triton kernel's launch configurations for real GPU targets, without a GPU.

The Triton interpreter runs kernels that a real compile rejects (an int64 shift that changes a
loop-carried type, say), and says nothing of registers, spills or vector widths. This module
compiles each configuration the host launchers really make down to a cubin for sm_80 and
sm_90 with Triton's own compiler and the ptxas in the triton wheel, and reports per kernel,
configuration and target: registers, spill bytes, shared memory, the widest global loads and
stores (from the PTX), and the MMA instructions a ``tl.dot`` became.

Where the configurations come from:

* a **sweep**: every op's public function, ``backend="triton"``, called on CPU tensors over
  the dtypes, flags and shapes it accepts, with the GPU-only choices (tiles, TF32) switched on
  (``ssam_kernels.triton_ops.tuning``). Launches are recorded, not run: each call's kernel
  arguments are compiled instead;
* **recorded launches** (``--launches FILE``): what the interpret tier launched, recorded by
  ``tests/conftest.py`` as argument descriptors (see :func:`describe`).

A stand-in active driver names the target, so ``JITFunction.run(..., warmup=True)`` specializes
the arguments exactly as a launch on that GPU would (dtypes, 16-byte alignment of pointers,
integer divisibility) and compiles. Every ``*_kernel`` in ``ssam_kernels.triton_ops`` must be
compiled at least once per target: a new kernel is found without editing this file.

    python -m ssam_bench.compile_kernels --json out.json [--launches FILE] [--md FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

TARGETS = (80, 90)  # compute capabilities: Ampere (A100) and Hopper (H100/H200)


# -- launches ------------------------------------------------------------------------------

@dataclass
class Launch:
    """One kernel launch as a host launcher made it: the JITFunction and its arguments."""

    kernel: object
    args: tuple
    kwargs: dict = field(default_factory=dict)


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return f"{fn.__module__}:{fn.__qualname__}"


def describe(value):
    """A JSON descriptor of one kernel argument: enough to specialize it again as Triton does
    (a tensor's dtype and its pointer's offset from 16 bytes; scalars by value)."""
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    if value is None:
        return ["none"]
    if isinstance(value, str):
        return ["str", value]
    raise TypeError(f"cannot describe a kernel argument of type {type(value).__name__}: {value!r}")


def describe_launch(kernel, args, kwargs) -> dict:
    return {"kernel": kernel_name(kernel), "args": [describe(a) for a in args],
            "kwargs": {k: describe(v) for k, v in sorted(kwargs.items())}}


def _rebuild(desc):
    kind = desc[0]
    if kind == "tensor":
        dtype = getattr(torch, desc[1])
        offset = desc[2]
        size = torch.empty((), dtype=dtype).element_size()
        raw = torch.empty(64, dtype=torch.uint8)  # CPU allocations are 64-byte aligned
        if raw.data_ptr() % 16:
            raise RuntimeError("CPU allocation not 16-byte aligned")
        return raw[offset: offset + 2 * size].view(dtype)
    if kind == "none":
        return None
    return desc[1]


def launch_from_description(desc: dict) -> Launch:
    module, qualname = desc["kernel"].split(":")
    kernel = importlib.import_module(module)
    for part in qualname.split("."):
        kernel = getattr(kernel, part)
    return Launch(kernel, tuple(_rebuild(a) for a in desc["args"]),
                  {k: _rebuild(v) for k, v in desc["kwargs"].items()})


@contextlib.contextmanager
def recording(into: list):
    """Within the block, Triton launches (of JITFunctions) are appended to ``into`` as
    :class:`Launch` and not run (outputs stay as allocated)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    originals = (JITFunction.run, InterpretedFunction.run)

    def record(self, *args, grid, warmup, **kwargs):
        into.append(Launch(self, args, kwargs))
        return None

    JITFunction.run = InterpretedFunction.run = record  # (under TRITON_INTERPRET=1 kernels are interpreted)
    try:
        yield
    finally:
        JITFunction.run, InterpretedFunction.run = originals


def all_kernels() -> dict[str, object]:
    """Every ``*_kernel`` JITFunction of ``ssam_kernels.triton_ops``, by name."""
    from triton.runtime.jit import JITFunction

    import ssam_kernels.triton_ops as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel") and value.fn.__module__ == module.__name__:
                found[kernel_name(value)] = value
    return found


# -- the sweep -----------------------------------------------------------------------------

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SIZES = (1, 4095, 8192 * 2 + 24)  # a short tail, a multiple of 8, several chunks with a tail


def _params(dtype, sizes=SIZES, offset=False):
    """Tensors of these sizes; ``offset``: the first starts 4 bytes past 16 (a view), as a
    parameter carved out of a flat buffer can."""
    ts = [torch.randn(n).to(dtype) for n in sizes]
    if offset:
        base = torch.randn(sizes[0] + 1).to(dtype)
        ts[0] = base[1:]
    return ts


def _masks(tensors, density=0.5):
    from ssam_kernels.ops.bitmask import pack_mask

    return [pack_mask(torch.rand(t.shape) < density) for t in tensors]


def sweep_calls():
    """(label, thunk) per call of a public op with ``backend="triton"``."""
    import ssam_kernels as sk

    calls = []
    for wd in FLOATS:
        for gd in sorted({wd, torch.float32}, key=str):
            for offset in (False, True):
                def perturb_cycle(wd=wd, gd=gd, offset=offset):
                    ws = _params(wd, offset=offset)
                    gs = [torch.randn(w.shape).to(gd) for w in ws]
                    for masks in ([None] * len(ws), _masks(ws)):
                        for scale in (0.05, torch.tensor(0.05)):
                            backup = sk.perturb_(ws, gs, masks, scale, backend="triton")
                            sk.restore_(ws, backup, backend="triton")
                        for momentum, nesterov, wdecay, maximize in ((0.0, False, 0.0, False), (0.9, False, 5e-4, False),
                                                                    (0.9, True, 0.0, True)):
                            backup = sk.perturb_(ws, gs, masks, 0.05, backend="triton")
                            bufs = [None] * len(ws)
                            for _ in range(2):  # a new buffer, then an existing one
                                bufs = sk.restore_sgd_step_(ws, gs, bufs, backup, lr=0.1, momentum=momentum,
                                                            nesterov=nesterov, weight_decay=wdecay,
                                                            maximize=maximize, backend="triton")
                    for masks in (None, _masks(ws)):
                        sk.grad_norm(gs, masks, backend="triton")
                calls.append((f"perturb/restore/sgd/grad_norm w={wd} g={gd} offset={offset}", perturb_cycle))
    for wd in FLOATS:
        # offset: the first weight starts 4 bytes past 16 (every load scalar), or the first
        # gradient does (as a DDP bucket's gradient views can; the weights keep their vectors)
        for offset in (False, True, "grad"):
            for masked_norm in (False, True):
                def planned_step(wd=wd, offset=offset, masked_norm=masked_norm):
                    ws = _params(wd, offset=offset is True)
                    grads = _params(wd, offset=offset == "grad")
                    for w, g in zip(ws, grads):
                        w.grad = g
                    masks = [None] + [torch.rand(w.shape) < 0.5 for w in ws[1:]]
                    plan = sk.SAMStepPlan(ws, masks, groups=[0, 1, 1], masked_norm=masked_norm, backend="triton")
                    for momentum in (0.0, 0.9):
                        for _ in range(2):  # new buffers, then existing ones
                            plan.perturb([0.05, 0.1])
                            plan.restore_sgd([sk.SGDGroup(lr=0.1, momentum=momentum), sk.SGDGroup(lr=0.1)])
                    plan.perturb([0.05, 0.1])
                    plan.restore()
                calls.append((f"sam_step w={wd} offset={offset} masked_norm={masked_norm}", planned_step))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        calls.append((f"topk_mask {dtype}", lambda d=dtype: sk.topk_mask(_params(d), density=0.1, backend="triton")))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, m in ((2, 4), (1, 4), (4, 8), (8, 16), (16, 32), (3, 7)):
            for magnitude in (True, False):
                calls.append((f"nm_mask {n}:{m} {dtype} magnitude={magnitude}",
                              lambda d=dtype, n=n, m=m, g=magnitude: sk.nm_mask(torch.randn(64, 96).to(d), n, m,
                                                                                magnitude=g, backend="triton")))
        for n, m in ((5, 16), (3, 32)):  # one group per row and rows not a multiple of 16 (their own specialization)
            calls.append((f"nm_mask {n}:{m} {dtype} one group per row",
                          lambda d=dtype, n=n, m=m: sk.nm_mask(torch.randn(7, m - 3).to(d), n, m, backend="triton")))
    # (a seed as ascent_linear draws them, in [0, 2^62): a 64-bit argument, divisible by 16 here)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        calls.append((f"mvue24 {dtype}", lambda d=dtype: (sk.mvue24(torch.randn(64, 96).to(d), seed=(1 << 40) + 16,
                                                                    backend="triton"),
                                                          sk.mvue24(torch.randn(64, 96).to(d), uniforms=torch.rand(64, 24),
                                                                    backend="triton"))))
    for dtype in (torch.float16, torch.bfloat16):
        def compress_cycle(d=dtype):
            x = torch.randn(64, 128).to(d) * sk.nm_mask(torch.randn(64, 128), 2, 4)
            values, meta = sk.compress_24(x, backend="triton")
            sk.decompress_24(values, meta, backend="triton")
        calls.append((f"compress_24/decompress_24 {dtype}", compress_cycle))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for tokens, out_f, in_f in ((512, 256, 384), (77, 200, 300), (64, 64, 40)):
            for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
                def wgrad(d=dtype, t=tokens, o=out_f, i=in_f, tf32=tf32):
                    with _allow_tf32(tf32):
                        mask = torch.rand(o, i) < 0.5
                        sk.masked_weight_grad(torch.randn(t, o).to(d), torch.randn(t, i).to(d), mask, backend="triton")
                        mask[torch.rand(o) < 0.5] = False  # rows without a masked entry: gathered rows
                        sk.masked_weight_grad(torch.randn(t, o).to(d), torch.randn(t, i).to(d), mask, backend="triton")
                calls.append((f"masked_weight_grad {dtype} T={tokens} OUT={out_f} IN={in_f} tf32={tf32}", wgrad))
    return calls


@contextlib.contextmanager
def _allow_tf32(on: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def gpu_launch_choices():
    """Make the public ops take their Triton path on CPU tensors with the choices they make on
    a GPU (the launches are recorded, never run)."""
    import ssam_kernels._backend as backend
    from ssam_kernels.triton_ops import tuning

    saved = backend.triton_interpreting, tuning.FOR_GPU
    backend.triton_interpreting = lambda: True
    tuning.FOR_GPU = True
    try:
        yield
    finally:
        backend.triton_interpreting, tuning.FOR_GPU = saved


def sweep_launches(only: str | None = None) -> list[Launch]:
    """The launches of the sweep's calls (those whose label matches the regex ``only``)."""
    launches: list[Launch] = []
    torch.manual_seed(0)
    with gpu_launch_choices(), recording(launches):
        for label, call in sweep_calls():
            if only and not re.search(only, label):
                continue
            try:
                call()
            except Exception as exc:  # a launcher that fails on the host is a finding too
                raise RuntimeError(f"sweep call {label!r} failed: {type(exc).__name__}: {exc}") from exc
    return launches


# -- compiling -----------------------------------------------------------------------------

class TargetDriver:
    """Stand-in active Triton driver that names a CUDA target and has no device: enough for
    ``JITFunction.run(..., warmup=True)`` to specialize and compile, never to launch."""

    def __init__(self, capability: int):
        self.capability = capability

    def get_current_device(self):
        return self.capability  # the per-device compile caches are then per target

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.capability, 32)

    def is_active(self):
        return True


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_LD = re.compile(r"^\s*(?:@%p\d+\s+)?ld\.global((?:\.[a-z0-9_:]+)*)\s", re.M)
_LD_CG = re.compile(r"^\s*(?:@%p\d+\s+)?ld\.global((?:\.[a-z0-9_:]+)*\.cg(?:\.[a-z0-9_:]+)*)\s", re.M)  # past L1
_ST = re.compile(r"^\s*(?:@%p\d+\s+)?st\.global((?:\.[a-z0-9_:]+)*)\s", re.M)
_FMA = re.compile(r"^\s*(?:@%p\d+\s+)?fma\.rn[.a-z0-9]*\s", re.M)  # floating-point fused multiply-adds
_CP_ASYNC = re.compile(r"cp\.async\.c[ag]\.shared\.global(?:\.[a-z0-9_:]+)*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)")


def _access_bytes(suffix: str) -> int:
    """Bytes one ld/st.global moves, from its suffixes (``.v4.b32`` -> 16)."""
    parts = suffix.split(".")
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
    bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bufs]\d+", p)), 8)
    return vec * bits // 8


def _widths(pattern, ptx: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for suffix in pattern.findall(ptx):
        b = _access_bytes(suffix)
        counts[b] = counts.get(b, 0) + 1
    return counts


def ptx_facts(ptx: str) -> dict:
    """Global access widths (of every load, and of the ``.cg`` loads apart: those that read what
    other programs of the launch wrote), MMA instructions and floating-point FMAs of a kernel,
    from its PTX."""
    loads = _widths(_LD, ptx)
    for n in _CP_ASYNC.findall(ptx):  # asynchronous copies to shared memory (GEMM operands)
        loads[int(n, 0)] = loads.get(int(n, 0), 0) + 1
    if "cp.async.bulk.tensor" in ptx:
        loads["tma"] = loads.get("tma", 0) + ptx.count("cp.async.bulk.tensor")
    if "wgmma.mma_async" in ptx:
        mma = "wgmma"
    elif "mma.sync" in ptx:
        mma = "mma.sync"
    else:
        mma = None
    return {"loads": loads, "cg_loads": _widths(_LD_CG, ptx), "stores": _widths(_ST, ptx), "mma": mma,
            "fma": len(_FMA.findall(ptx))}


def config_label(launch: Launch) -> str:
    """The kernel's specialization in words: the dtypes of its tensors and its keywords."""
    dtypes = []
    for a in launch.args:
        if isinstance(a, torch.Tensor):
            name = str(a.dtype).removeprefix("torch.")
            aligned = "" if a.data_ptr() % 16 == 0 else "@" + str(a.data_ptr() % 16)
            dtypes.append(name + aligned)
    ints = []  # integers as Triton specializes them: equal to 1, or a multiple of 16
    unspecialized = {p.name for p in getattr(launch.kernel, "params", ()) if getattr(p, "do_not_specialize", False)}
    for name, a in zip(launch.kernel.arg_names, launch.args):
        if name in unspecialized:  # e.g. a float64's bits: one compile whatever the value
            continue
        if isinstance(a, int) and not isinstance(a, bool) and (a == 1 or a % 16 == 0):
            ints.append(f"{name}=1" if a == 1 else f"{name}%16=0")
    keys = [f"{k}={v}" for k, v in sorted(launch.kwargs.items())]
    return " ".join(sorted(set(dtypes), key=dtypes.index) + ints + keys)


def compile_launch(launch: Launch, capability: int, run) -> dict:
    """Compile one launch for one target; a row of the report (``error`` set on failure)."""
    from triton import knobs
    from triton.runtime.driver import driver

    row = {"kernel": kernel_name(launch.kernel).split(":")[1], "module": launch.kernel.fn.__module__,
           "config": config_label(launch), "target": f"sm_{capability}"}
    previous = driver._active  # None without a GPU (and then no default driver can be made)
    driver.set_active(TargetDriver(capability))
    log = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = run(launch.kernel, *launch.args, grid=(1,), warmup=True, **launch.kwargs)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
        return row
    finally:
        knobs.nvidia.dump_ptxas_log = old
        driver._active = previous
    row["seconds"] = round(time.perf_counter() - start, 3)
    text = log.getvalue()
    for key, pattern in _PTXAS.items():
        m = pattern.search(text)
        row[key] = int(m.group(1)) if m else 0
    if not _PTXAS["regs"].search(text):
        row["error"] = "no ptxas report (kernel came from a cache?)"
    row["shared"] = int(kernel.metadata.shared)
    row["num_warps"] = int(kernel.metadata.num_warps)
    row["uses_dot"] = "tt.dot" in kernel.asm.get("ttir", "")
    row.update(ptx_facts(kernel.asm["ptx"]))
    row["_id"] = id(kernel)
    return row


def _compile_shard(descriptions: list[dict]) -> list[dict]:
    """Compile launches given as descriptors, for every target (runs in a worker process)."""
    from triton import knobs
    from triton.runtime.jit import JITFunction

    knobs.compilation.always_compile = True  # never a cache hit: every compile runs ptxas (its report)
    run, rows, compiled = JITFunction.run, [], set()
    for desc in descriptions:
        launch = launch_from_description(desc)
        for cap in TARGETS:
            row = compile_launch(launch, cap, run)
            kernel_id = (cap, row.pop("_id", None))
            if kernel_id in compiled:
                continue  # the same specialization as an earlier launch: nothing new compiled
            if kernel_id[1] is not None:
                compiled.add(kernel_id)
            rows.append(row)
    return rows


def compile_all(launches: list[Launch], jobs: int = 1) -> list[dict]:
    """Compile every distinct launch for every target, in ``jobs`` processes; one row per
    compiled kernel (launches that specialize alike give one row)."""
    distinct = {}
    for launch in launches:
        desc = describe_launch(launch.kernel, launch.args, launch.kwargs)
        distinct.setdefault(json.dumps(desc, sort_keys=True), desc)
    descriptions = list(distinct.values())
    if jobs <= 1 or len(descriptions) < 2:
        return _compile_shard(descriptions)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # a kernel's launches stay in one shard (so its identical specializations are found there)
    by_kernel: dict[str, list[dict]] = {}
    for desc in descriptions:
        by_kernel.setdefault(desc["kernel"], []).append(desc)
    shards: list[list[dict]] = [[] for _ in range(jobs)]
    for group in sorted(by_kernel.values(), key=len, reverse=True):
        min(shards, key=len).extend(group)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return [row for part in pool.map(_compile_shard, shards) for row in part]


def run(launch_files=(), sweep: bool = True, jobs: int = 1, only: str | None = None) -> dict:
    """Sweep and/or recorded launches, compiled; the report as a dict."""
    import triton

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="ssam-compile-")  # leave the user's cache alone
    launches = sweep_launches(only) if sweep else []
    recorded = 0
    for path in launch_files:
        with open(path) as f:
            for line in f:
                if line.strip():
                    launches.append(launch_from_description(json.loads(line)))
                    recorded += 1
    start = time.perf_counter()
    rows = compile_all(launches, jobs)
    compiled = {(r["module"] + ":" + r["kernel"], r["target"]) for r in rows if "error" not in r}
    missing = [f"{name} on sm_{cap}" for name in all_kernels() for cap in TARGETS
               if (name, f"sm_{cap}") not in compiled]
    from .common import git_commit

    return {"triton": triton.__version__, "torch": torch.__version__, "commit": git_commit(), "launches": len(launches),
            "recorded": recorded, "rows": rows, "not_compiled": missing,
            "seconds": round(time.perf_counter() - start, 1), "jobs": jobs}


# -- the table -----------------------------------------------------------------------------

def _fmt_widths(widths: dict) -> str:
    if not widths:
        return "-"
    # (a report read back from JSON has the byte widths as strings: the same order either way)
    widths = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in widths.items()}
    return " ".join(f"{k}B×{v}" if k != "tma" else f"TMA×{v}"
                    for k, v in sorted(widths.items(), key=lambda kv: (isinstance(kv[0], str), -int(kv[0]) if not isinstance(kv[0], str) else 0)))


def markdown(reports: list[dict]) -> str:
    lines = ["# Triton kernels compiled for sm_80 and sm_90", "",
             "Written by `python -m ssam_bench.compile_kernels` (the `compile` test tier checks the same",
             "compile on every CI run). No GPU ran anything here: Triton's compiler and the ptxas in the",
             "triton wheel built each configuration the host launchers make down to a cubin. Loads and",
             "stores: bytes per global access instruction in the PTX × how many (16 B is a full vector;",
             "`cp.async` copies count as loads; the 8 B loads of multi-tensor kernels are their int64",
             "tables, the scalar ones their bounds-checked tail path). MMA: what `tl.dot` became (`fma`:",
             "no tensor cores). Configurations: dtypes of the tensor arguments (`@n`: a pointer n bytes",
             "past 16), integers Triton specializes (`=1`, `%16=0`), constexprs and launch options.", ""]
    for rep in reports:
        lines += [f"## triton {rep['triton']} (torch {rep['torch']}, commit {rep.get('commit', 'unknown')})", "",
                  f"{rep['launches']} launches ({rep['recorded']} recorded from the interpret tier), "
                  f"{len(rep['rows'])} distinct compiles in {rep.get('seconds', '?')} s with {rep.get('jobs', 1)} "
                  "processes (CPU).", ""]
        if rep["not_compiled"]:
            lines += [f"Not compiled: {', '.join(rep['not_compiled'])}", ""]
        lines += ["| kernel | configuration | target | regs | spill B (st/ld) | smem B | loads | stores | MMA |",
                  "|---|---|---|---:|---:|---:|---|---|---|"]
        for r in sorted(rep["rows"], key=lambda r: (r["kernel"], r["config"], r["target"])):
            if "error" in r:
                lines.append(f"| {r['kernel']} | {r['config']} | {r['target']} | **error**: "
                             f"{r['error'].splitlines()[0][:120]} | | | | | |")
                continue
            mma = r["mma"] or ("fma" if r["uses_dot"] else "-")
            lines.append(f"| {r['kernel']} | {r['config']} | {r['target']} | {r['regs']} | "
                         f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {_fmt_widths(r['loads'])} | "
                         f"{_fmt_widths(r['stores'])} | {mma} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ssam_bench.compile_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--launches", action="append", default=[], metavar="FILE",
                   help="JSON lines of launch descriptors to compile besides the sweep (recorded by the interpret tier)")
    p.add_argument("--no-sweep", action="store_true", help="compile only the --launches")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: one per core)")
    p.add_argument("--only", metavar="REGEX", help="sweep only the calls whose label matches (a partial report)")
    p.add_argument("--json", metavar="FILE", help="write the report here")
    p.add_argument("--md", metavar="FILE", help="write the table here, from this report and the --merge reports")
    p.add_argument("--merge", action="append", default=[], metavar="FILE",
                   help="another report (JSON, e.g. from another triton version) to put in the table")
    p.add_argument("--table-only", action="store_true",
                   help="compile nothing: write --md from the --merge reports (e.g. the compile tier's, kept with "
                        "SSAM_COMPILE_REPORT, one per triton version)")
    args = p.parse_args(argv)
    if args.table_only:
        if not args.md or not args.merge:
            p.error("--table-only writes --md FILE from --merge reports: give both")
        compiling = [f"--{name.replace('_', '-')}" for name in ("launches", "no_sweep", "only", "json")
                     if getattr(args, name)]
        if compiling:
            p.error(f"--table-only compiles nothing: {', '.join(compiling)} would do nothing")
        reports = []
        for path in args.merge:
            with open(path) as f:
                reports.append(json.load(f))
        with open(args.md, "w") as f:
            f.write(markdown(reports))
        print(f"wrote {args.md} from {len(reports)} reports")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("TRITON_INTERPRET=1 is set: the kernels would be interpreted, not compiled; unset it")

    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    report = run(args.launches, sweep=not args.no_sweep, jobs=args.jobs, only=args.only)
    errors = [r for r in report["rows"] if "error" in r]
    for r in errors:
        print(f"FAILED {r['kernel']} [{r['config']}] {r['target']}: {r['error'][:500]}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
    if args.md:
        reports = [report]
        for path in args.merge:
            with open(path) as f:
                reports.append(json.load(f))
        with open(args.md, "w") as f:
            f.write(markdown(reports))
    print(f"triton {report['triton']}: {len(report['rows'])} compiles of {report['launches']} launches "
          f"in {report['seconds']} s ({report['jobs']} processes), {len(errors)} failed, "
          f"not compiled: {report['not_compiled'] or 'none'}")
    return 1 if errors or report["not_compiled"] else 0


if __name__ == "__main__":
    sys.exit(main())
