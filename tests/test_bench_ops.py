"""The op benchmarks run end to end (tiny sizes) and report what they claim to."""

import collections
import sys
import types

import pytest
import torch

from ssam_bench import bench_perturb, bench_topk_mask, common

pytestmark = pytest.mark.cpu


def test_required_bytes():
    # 16 fp32 params, 8 kept in 2 sectors: norm 64 + perturb (128 + 2 + 64 + 32) + restore (2 + 32 + 64)
    assert bench_perturb.required_bytes(16, 8, 4, 4, sectors=2) == 64 + 226 + 98


def test_written_sectors_count_the_32_byte_sectors_holding_a_kept_entry():
    one_per_sector = torch.zeros(80, dtype=torch.bool)
    one_per_sector[::8] = True  # fp32: 8 to a sector, 10 sectors
    assert bench_perturb.written_sectors([one_per_sector], 4) == 10
    assert bench_perturb.written_sectors([one_per_sector], 2) == 5  # bf16: 16 to a sector
    assert bench_perturb.written_sectors([torch.ones(3, 9, dtype=torch.bool)], 4) == 4  # 27 entries: a partial tail
    tail_only = torch.zeros(17, dtype=torch.bool)
    tail_only[16] = True
    assert bench_perturb.written_sectors([tail_only, torch.zeros(5, dtype=torch.bool)], 4) == 1


def test_bench_perturb_quick_cpu_is_labelled_and_not_written(capsys):
    assert common.results_dir(torch.device("cpu"), None) is None  # CPU runs are never results
    assert bench_perturb.main(["--lists", "mlp-1M", "--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "CPU run: not a GPU figure" in out and "| mlp-1M |" in out and "wrote" not in out
    for impl in ("ours", "torch", "foreach", "official"):
        assert f"| {impl} |" in out


def test_bench_topk_quick_with_out(tmp_path, capsys):
    assert bench_topk_mask.main(["--scores", "20000", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "topk_mask.json").exists()
    assert "| True |" in capsys.readouterr().out


def test_bench_ascent_linear_quick_cpu_runs_dense_only(capsys):
    from ssam_bench import bench_ascent_linear

    assert bench_ascent_linear.main(["--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "CPU run: not a GPU figure" in out and "wrote" not in out
    for product in ("dW mvue", "dX mvue_dx", "dX implicit"):
        assert f"| {product} |" in out
    assert "cuSPARSELt runs on CUDA" in out  # the sparse columns say why they are empty


def test_bench_ascent_linear_writes_as_it_goes_targets_first(tmp_path, monkeypatch):
    """A GPU part has a time limit: the rows are written after each shape (a run cut short keeps
    what it measured), the shapes the targets name first (bf16 MLP layers, most tokens)."""
    import json

    from ssam_bench import bench_ascent_linear as bench

    items = bench.work_items(quick=False)
    assert [(i[0], i[1][0], i[2]) for i in items[:2]] == [(torch.bfloat16, "mlp_fc1", 32768),
                                                         (torch.bfloat16, "mlp_fc1", 16384)]
    assert len(items) == len(set(items)) == 2 * len(bench.LAYERS) * len(bench.TOKENS)
    seen = []
    monkeypatch.setattr(bench, "work_items", lambda quick: [(torch.float32, bench.LAYERS[3], 64),
                                                           (torch.float32, bench.LAYERS[1], 32)])
    monkeypatch.setattr(bench, "matmul_ceiling", lambda *a: 1e12)  # not the 8192-wide matmul, on a CPU
    monkeypatch.setattr(bench, "report", lambda name, title, rows, *a, **k: seen.append((title, len(rows)))
                        or k["merge_on"] == bench.MERGE_ON or pytest.fail("written without merging"))
    assert bench.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    assert seen == [(bench.TITLE + " (partial: the run goes on)", 3), (bench.TITLE + " (partial: the run goes on)", 6),
                    (bench.TITLE, 6)]
    rows, _, _ = bench.run(type("Args", (), {"quick": False})(), torch.device("cpu"))
    assert [r["layer"] for r in rows] == ["attn_out"] * 3 + ["mlp_fc2"] * 3  # table order, not run order
    json.dumps(rows)


@pytest.mark.parametrize("name", ["grad_norm", "nm_mask", "compress_24", "masked_weight_grad"])
def test_op_bench_implementations_agree(name):
    """Every implementation a microbenchmark times computes the same thing (so the timings
    compare like with like)."""
    import importlib

    module = importlib.import_module(f"ssam_bench.bench_{name}")
    dtype = torch.bfloat16 if name in ("compress_24", "masked_weight_grad") else torch.float32
    cases = module.cases(torch.device("cpu"), dtype, quick=True)
    assert cases
    for case in cases:
        outs = {impl: fn() for impl, fn in case.impls.items()}
        assert "torch" in outs and len(outs) >= 2
        ref = outs["torch"]
        for impl, out in outs.items():
            if name == "masked_weight_grad":
                # bf16 GEMM, fp32 accumulation in different orders, each result rounded to bf16:
                # one bf16 ulp apart (eps = 2**-7), near zero relative to the largest value
                eps = torch.finfo(torch.bfloat16).eps
                torch.testing.assert_close(out.float(), ref.float(), rtol=eps,
                                           atol=eps * ref.float().abs().max().item(), msg=impl)
            elif isinstance(ref, tuple):
                for a, b in zip(out, ref):
                    assert torch.equal(a, b), impl
            else:  # a norm of 11M fp32 squares: summation orders differ by ~sqrt(n) ulps
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=0, msg=impl)


def test_op_runner_fractions_follow_from_time_and_ceiling():
    from ssam_bench.opbench import Case, Ceilings, run_cases

    x = torch.randn(1000)
    ceilings = Ceilings(copy_bytes_per_s=1e9, matmul_flops_per_s=2e9, matmul_dtype="float32")
    rows = run_cases([Case("op", "cfg", {"torch": lambda: x * 2, "other": lambda: x + 1}, nbytes=8000, flops=1000)],
                     torch.device("cpu"), ceilings, reps=3)
    assert [r["impl"] for r in rows] == ["torch", "other"]
    for r in rows:
        t = r["median_ms"] / 1e3
        assert r["gbps"] == pytest.approx(8000 / t / 1e9)
        assert r["copy_fraction"] == pytest.approx(8000 / t / 1e9)
        assert r["matmul_fraction"] == pytest.approx(1000 / t / 2e9)
    assert rows[0]["x_torch"] == 1.0


def test_each_table_times_as_its_legend_says(monkeypatch):
    """The ops table: the GPU's time alone from an empty L2 (busy, cold), against a matmul
    ceiling in the bench's dtype; the perturb table: from an empty L2, host work included
    (cold, not busy). What each passes to the timer, recorded."""
    from ssam_bench import bench_perturb, opbench

    seen = []

    def record(fns, device, warmup=3, reps=20, cold=False, busy=False):
        seen.append((cold, busy))
        return {name: 1e-3 for name in fns}

    monkeypatch.setattr(opbench, "interleaved_medians", record)
    monkeypatch.setattr(bench_perturb, "interleaved_medians", record)
    x = torch.randn(8)
    opbench.run_cases([opbench.Case("op", "cfg", {"torch": lambda: x * 2}, nbytes=64)], torch.device("cpu"),
                      opbench.Ceilings(1e9, 1e9, "float32"), reps=2)
    assert seen == [(True, True)]
    seen.clear()
    bench_perturb.bench_list("mlp", [(64, 32), (64,)], torch.device("cpu"), torch.float32, reps=2)
    assert seen == [(True, False)]
    dtypes = []
    monkeypatch.setattr(opbench, "copy_bandwidth", lambda device, nbytes: 1e9)
    monkeypatch.setattr(opbench, "matmul_ceiling", lambda device, dtype, n: dtypes.append(dtype) or 1e12)
    gpu = torch.device("cuda", 0)  # (nothing runs on it: both ceilings are stand-ins)
    assert opbench.Ceilings.measure(gpu, True, torch.float16).matmul_dtype == "float16"
    assert opbench.Ceilings.measure(gpu, True).matmul_dtype == "bfloat16"
    assert opbench.Ceilings.measure(torch.device("cpu"), True, torch.float16).matmul_dtype == "float32"
    assert dtypes == [torch.float16, torch.bfloat16, torch.float32]


def test_native_backends_skip_triton_off_gpu():
    import ssam_kernels as sk

    found = common.native_backends(torch.device("cpu"), lambda b: sk.grad_norm([torch.ones(3)], backend=b))
    assert found[0] == "torch" and "triton" not in found  # the interpreter's timings mean nothing


def test_ascent_linear_rows_time_every_kernel_alone_beside_dense(monkeypatch):
    """The sparse path runs only on a GPU: with stand-ins for cuSPARSELt, a row reports the kept
    configuration (fastest with its compression in the tuning) and the fastest GEMM of every
    configuration timed beside dense, not the tuning's fastest (its trials are per call, host
    included: torch's path makes a plan per call). A configuration whose kernel another one
    runs (the same algorithm on the other path) is timed once."""
    from ssam_bench import bench_ascent_linear as bench
    from ssam_kernels.sparse_gemm import CsltConfig

    kept, fast, host_fast = CsltConfig(), CsltConfig(alg_id=1), CsltConfig(transpose_result=True)
    twin = CsltConfig(alg_id=1, planned=True)  # fast's kernel, through the kept plans
    work = {kept: 3, fast: 1, host_fast: 6, twin: 1}  # products a call makes: its time on this CPU
    configs = {c.label(): c for c in work}
    called = collections.Counter()

    def cslt_mm(packed, b, config):
        called[config] += 1
        for _ in range(work[config]):
            out = packed @ b
        return out

    monkeypatch.setattr(bench, "cusparselt_unsupported", lambda a, b: None)
    monkeypatch.setattr(bench, "tune", lambda a, b: {"dense": 1.0, "compress": 0.1, "planned compress": 0.1,
                                                     kept.label(): 0.8, fast.label(): 0.9, host_fast.label(): 0.3,
                                                     twin.label(): 0.5})
    monkeypatch.setattr(bench, "tuned_config", lambda a, b: kept)
    monkeypatch.setattr(bench, "tuned_configs", lambda a, b: configs)
    monkeypatch.setattr(bench, "compress", lambda a, config: a)
    monkeypatch.setattr(bench, "cslt_mm", cslt_mm)
    gen = torch.Generator().manual_seed(0)
    rows = bench.bench(bench.LAYERS[1], 256, torch.device("cpu"), torch.float32, 5, 1e12, gen)
    assert len(rows) == 3
    for row in rows:
        assert row["config"] == kept.label() and row["fastest_config"] == fast.label()
        assert row["fastest_speedup"] > row["speedup"] > 0 and row["speedup_total"] > 0
        assert f"{host_fast.label()} 3.33x" in row["configs"]  # (the tuning's per-call ratios, listed)
    assert called[twin] == 0 and called[fast] > 0 and called[host_fast] > 0


class _FakeNVML:
    """A stand-in pynvml: the readings a run would see, in order (a None reading raises), and
    violation counters that grow by ``step`` ns a reading."""
    nvmlClocksEventReasonGpuIdle = 0x1
    NVML_CLOCK_SM, NVML_TEMPERATURE_GPU = 0, 0
    NVML_PERF_POLICY_POWER, NVML_PERF_POLICY_THERMAL = 0, 1

    def __init__(self, readings, step=None, fail=None):
        self.readings, self.step, self.fail, self.now = list(readings), step, fail, None
        self.counters = [0, 0]

    def nvmlInit(self):
        if self.fail:
            raise RuntimeError(self.fail)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        self.now = self.readings.pop(0)
        if self.now is None:
            raise RuntimeError("GPU is lost")
        return self.now[0]

    def nvmlDeviceGetClockInfo(self, handle, kind):
        return self.now[1]

    def nvmlDeviceGetTemperature(self, handle, kind):
        return self.now[2]

    def nvmlDeviceGetViolationStatus(self, handle, policy):
        if self.step is None:
            raise RuntimeError("not supported")
        self.counters[policy] += self.step[policy]
        return types.SimpleNamespace(violationTime=self.counters[policy])


def test_run_conditions_keep_loaded_clocks_slowdowns_and_throttled_time(monkeypatch):
    """Readings of an idle GPU are left out; slowdown reasons accumulate; the violation counters
    count from the first reading to the last; a failed reading keeps the others; reset starts a
    new table's record; no NVML is said, not raised; a CPU device reads nothing."""
    gpu = torch.device("cuda", 0)
    nvml = _FakeNVML([(0x0, 1980, 50), (0x1, 345, 40), (0x4, 1755, 66), None, (0x20 | 0x2, 1830, 61)],
                     step=(5 * 10**8, 0))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    run = common.RunConditions()
    for _ in range(5):
        run.sample(gpu)
    run.sample(torch.device("cpu"))
    facts = run.facts()
    assert facts["sm_clock_mhz_timed"] == [1755, 1980] and facts["temperature_c_max"] == 66
    assert facts["slowdowns_seen"] == ["sw power cap", "sw thermal"]
    # three loaded readings, 0.5 s of power violation counted between each
    assert facts["held_below_clocks_s"] == {"power": 1.0, "thermal": 0.0}
    assert facts["conditions_read_error"] == "RuntimeError: GPU is lost"
    described = common.describe_conditions(facts)
    assert "1755-1980 MHz" in described and "1.0 s by power" in described and "sw power cap, sw thermal" in described

    run.reset()  # the next table: its own readings only
    nvml.readings = [(0x0, 1410, 45)]
    run.sample(gpu)
    assert run.facts() == {"sm_clock_mhz_timed": [1410, 1410], "temperature_c_max": 45, "slowdowns_seen": [],
                           "held_below_clocks_s": {"power": 0.0, "thermal": 0.0}}

    monkeypatch.setitem(sys.modules, "pynvml", _FakeNVML([(0x0, 1500, 40)]))  # no violation counters
    run = common.RunConditions()
    run.sample(gpu)
    assert run.facts() == {"sm_clock_mhz_timed": [1500, 1500], "temperature_c_max": 40, "slowdowns_seen": []}
    assert common.describe_conditions(run.facts()).endswith("slowdowns seen: none.")

    monkeypatch.setitem(sys.modules, "pynvml", _FakeNVML([], fail="NVML Shared Library Not Found"))
    run = common.RunConditions()
    run.sample(gpu)
    run.sample(gpu)  # (tried once)
    assert run.facts() == {"conditions_error": "RuntimeError: NVML Shared Library Not Found"}
    assert "not read" in common.describe_conditions(run.facts())
    assert common.RunConditions().facts() == {} and common.describe_conditions({}) == ""
