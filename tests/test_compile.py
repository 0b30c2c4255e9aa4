"""The compile tier: every Triton kernel launch (the sweep of ``ssam_bench.compile_kernels`` plus
whatever the interpret tier launched in this session) compiled to a cubin for sm_80 and sm_90,
without a GPU, and the compiled code checked for what makes it slow: spills, scalar loads on the
optimizer's step path, GEMM tiles off the tensor cores."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import conftest
from ssam_bench import compile_kernels as ck

pytestmark = pytest.mark.compile

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# Bandwidth-bound kernels: the multi-tensor kernels of the optimizer's step (norm, perturb,
# restore, restore + SGD) and of the top-k mask, 2:4 compression and MVUE. Their data must move
# in 16-byte vectors wherever every tensor starts on 16 bytes (multi-tensor: ALIGNED=True; the
# others: no pointer marked "@offset" in the configuration).
VECTOR_KERNELS = {"_count_bits_kernel", "_move_kernel", "_sum_squares_kernel", "_restore_sgd_kernel",
                  "_histogram_kernel", "_write_kernel", "_compress_kernel", "_decompress_kernel", "_mvue24_kernel",
                  "_norm_kernel", "_perturb_kernel", "_restore_kernel"}


# those of them that write their data (not only reductions): 16-byte stores too
WRITERS = {"_move_kernel", "_restore_sgd_kernel", "_write_kernel", "_compress_kernel", "_decompress_kernel",
           "_mvue24_kernel", "_perturb_kernel", "_restore_kernel"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if conftest.UNRECORDED_LAUNCHES:
        pytest.fail(f"interpret-tier launches that could not be recorded: {conftest.UNRECORDED_LAUNCHES[:5]}")
    tmp = tmp_path_factory.mktemp("compile")
    launches = tmp / "launches.jsonl"
    launches.write_text("".join(line + "\n" for line in conftest.RECORDED_LAUNCHES))
    out = tmp / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    proc = subprocess.run([sys.executable, "-m", "ssam_bench.compile_kernels", "--launches", str(launches),
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=3600)
    print(proc.stdout, proc.stderr[-4000:])
    if not out.exists():
        pytest.fail(f"the compile run wrote no report (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    if os.environ.get("SSAM_COMPILE_REPORT") and proc.returncode == 0:  # for the committed table (--table-only)
        shutil.copyfile(out, os.environ["SSAM_COMPILE_REPORT"])
    return json.loads(out.read_text())


def _rows(report, **where):
    return [r for r in report["rows"] if all(r.get(k) == v for k, v in where.items())]


@needs_triton
def test_every_launch_compiles_for_sm80_and_sm90(report):
    failed = [f"{r['kernel']} [{r['config']}] {r['target']}: {r['error'][:300]}" for r in report["rows"] if "error" in r]
    assert not failed, "\n".join(failed)
    assert {r["target"] for r in report["rows"]} == {"sm_80", "sm_90"}
    assert report["recorded"] == len(conftest.RECORDED_LAUNCHES)


@needs_triton
def test_every_kernel_is_compiled(report):
    """A new ``*_kernel`` is found without editing the tier; it must be launched by the sweep or
    the interpret tier."""
    assert report["not_compiled"] == []
    assert len({r["kernel"] for r in report["rows"]}) >= len(ck.all_kernels())


@needs_triton
def test_no_kernel_spills(report):
    spills = [f"{r['kernel']} [{r['config']}] {r['target']}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded"
              for r in report["rows"] if "error" not in r and (r["spill_stores"] or r["spill_loads"])]
    assert not spills, "\n".join(spills)


# Kernel arguments a launcher fills with a new value on every call (a random draw, a step's
# hyper-parameters as float64 bits, program counts of the step's layout): specialized, each value
# equal to 1 or divisible by 16 would compile another variant, at whichever step first meets one
PER_CALL = ("seed", "first", "programs", "eps_bits", "scale_bits", "lr_bits", "momentum_bits", "dampening_bits",
            "weight_decay_bits")


@needs_triton
def test_values_that_change_every_call_are_not_specialized(report):
    found = [f"{r['kernel']} [{r['config']}]" for r in report["rows"]
             if any(re.search(rf"(?:^| ){name}(?:=1|%16=0)(?: |$)", r["config"]) for name in PER_CALL)]
    assert not found, "\n".join(found)


# (kernel, configuration part) launched one element per thread: restore_sgd_step_'s float64
# variant, whose two-per-thread tiles spill on sm_80 under triton 3.6 (8-byte accesses are whole
# elements there)
ONE_PER_THREAD = [("_restore_sgd_kernel", "FP64=True HAS_MASK")]


def _flag(config: str, name: str) -> str | None:
    found = re.search(rf"(?:^| ){name}=(\w+)", config)
    return found and found.group(1)


@needs_triton
def test_bandwidth_bound_kernels_move_16_byte_vectors(report):
    rows = [r for r in report["rows"] if r["kernel"] in VECTOR_KERNELS and _flag(r["config"], "ALIGNED") != "False"
            and "@" not in r["config"] and not any(r["kernel"] == k and part in r["config"] for k, part in ONE_PER_THREAD)]
    aligned = [r for r in rows if _flag(r["config"], "G_ALIGNED") != "False"]
    assert {r["kernel"] for r in aligned} == VECTOR_KERNELS
    scalar = [f"{r['kernel']} [{r['config']}] {r['target']}: loads {r['loads']}, stores {r['stores']}" for r in aligned
              if "16" not in r["loads"] or (r["kernel"] in WRITERS and "16" not in r["stores"])]
    assert not scalar, "\n".join(scalar)
    # a planned step whose gradients alone start off 16 bytes (DDP bucket views): the weights,
    # backups and momentum buffers still move in vectors
    unaligned_grads = [r for r in rows if _flag(r["config"], "G_ALIGNED") == "False" and r["kernel"] in WRITERS]
    assert {r["kernel"] for r in unaligned_grads} == {"_perturb_kernel", "_restore_sgd_kernel"}
    scalar = [f"{r['kernel']} [{r['config']}] {r['target']}: loads {r['loads']}, stores {r['stores']}"
              for r in unaligned_grads if "16" not in r["loads"] or "16" not in r["stores"]]
    assert not scalar, "\n".join(scalar)


@needs_triton
def test_the_last_norm_program_reads_the_partials_in_16_byte_vectors(report):
    """One program sums every block's partial (173k of them on GPT-2 medium's weights), step by
    step waiting on its loads: in 4-byte loads that is four times the instructions, a serial
    tail on every step. Its reads are the kernel's only ``.cg`` loads."""
    from ssam_kernels.triton_ops import sam_step as triton_step

    # (the launcher's FINAL_BLOCK, half for float64: the interpret tier also records a test's
    # FINAL_BLOCK of 16, cut to run the loop several times, whose loads are a lane a thread)
    final = {"False": str(triton_step.FINAL_BLOCK), "True": str(triton_step.FINAL_BLOCK // 2)}
    rows = [r for r in _rows(report, kernel="_norm_kernel") if _flag(r["config"], "FINAL_BLOCK") == final[
        _flag(r["config"], "FP64")]]
    assert {_flag(r["config"], "FP64") for r in rows} == {"False", "True"}
    scalar = [f"{r['config']} {r['target']}: {r['cg_loads']}" for r in rows if set(r["cg_loads"]) != {"16"}]
    assert not scalar, "\n".join(scalar)


# kernels whose results must equal the reference's bit for bit: each product rounded before its
# sum (launched with enable_fp_fusion=False, as the extension is built with --fmad=false). (The
# SGD kernels are launched so too, but keep explicit tl.fma where torch's add(alpha=) fuses.)
UNFUSED = {"_move_kernel", "_perturb_kernel"}


@needs_triton
def test_exact_update_kernels_contract_no_fma(report):
    rows = [r for r in report["rows"] if r["kernel"] in UNFUSED and "error" not in r]
    assert {r["kernel"] for r in rows} == UNFUSED
    fused = [f"{r['kernel']} [{r['config']}] {r['target']}: {r['fma']} fma" for r in rows if r["fma"]]
    assert not fused, "\n".join(fused)
    # the check can fail: the norm's sum of squares is launched with its FMAs
    assert any(r["fma"] for r in report["rows"] if r["kernel"] == "_sum_squares_kernel" and "float32" in r["config"])


@needs_triton
def test_gemm_tiles_run_on_tensor_cores(report):
    """wgmma on sm_90 and mma.sync on sm_80 for bf16, fp16 and TF32 tiles; fp32 IEEE stays on FMA."""
    rows = _rows(report, kernel="_masked_wgrad_kernel")
    assert rows
    for r in rows:
        tensor_core = "PRECISION=tf32" in r["config"] or r["config"].startswith(("bfloat16", "float16"))
        # wgmma takes tiles of 64 rows or more (the GPU configurations); the interpret tier's
        # recorded 32-row tiles get mma.sync on sm_90 as on sm_80
        block_o = int(re.search(r"BLOCK_O=(\d+)", r["config"]).group(1))
        wgmma = r["target"] == "sm_90" and block_o >= 64
        want = ("wgmma" if wgmma else "mma.sync") if tensor_core else None
        assert r["mma"] == want, f"{r['config']} {r['target']}: {r['mma']}"
    assert any(r["mma"] == "wgmma" for r in rows)
    assert any("PRECISION=tf32" in r["config"] for r in rows)
    assert any(r["config"].startswith("bfloat16") for r in rows)


def test_ptx_access_widths_are_parsed():
    ptx = """
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p1 ld.global.b8 { %rs1 }, [ %rd2 + 0 ];
    ld.global.v2.b64 { %rd3, %rd4 }, [ %rd5 + 0 ];
    ld.global.cg.b32 { %r9 }, [ %rd8 + 0 ];
    @%p2 st.global.v2.b32 [ %rd6 + 0 ], { %r5, %r6 };
    cp.async.cg.shared.global [ %r7 + 0 ], [ %rd7 + 0 ], 0x10, %r8;
    wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};
    """
    facts = ck.ptx_facts(ptx)
    assert facts["loads"] == {16: 3, 4: 1, 1: 1}
    assert facts["cg_loads"] == {4: 1}
    assert facts["stores"] == {8: 1}
    assert facts["mma"] == "wgmma"
    assert ck.ptx_facts("mma.sync.aligned.m16n8k16")["mma"] == "mma.sync"
    assert ck.ptx_facts("fma.rn.f32 %f1, %f2, %f3, %f4;")["mma"] is None
    assert ck.ptx_facts("  fma.rn.f32 %f1, %f2, %f3, %f4;\n  @%p1 fma.rn.ftz.f64 %fd1, %fd2, %fd3, %fd4;\n"
                        "  mad.lo.s32 %r1, %r2, %r3, %r4;")["fma"] == 2
    # a report read back from JSON (string keys) renders its widths as the live one does
    live = {16: 2, 4: 8, 1: 1}
    assert ck._fmt_widths(live) == ck._fmt_widths(json.loads(json.dumps(live))) == "16B×2 4B×8 1B×1"


def test_descriptors_keep_dtype_and_alignment():
    import torch

    base = torch.zeros(9)
    for t in (base, base[1:], torch.zeros(5, dtype=torch.bfloat16)[3:]):
        desc = ck.describe(t)
        again = ck._rebuild(desc)
        assert again.dtype == t.dtype and again.data_ptr() % 16 == t.data_ptr() % 16
    assert ck.describe(7) == ["int", 7] and ck.describe(True) == ["bool", True] and ck.describe(0.5) == ["float", 0.5]
    with pytest.raises(TypeError, match="cannot describe"):
        ck.describe(object())
