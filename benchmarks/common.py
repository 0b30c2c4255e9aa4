"""What every benchmark shares: run metadata (device, versions, commit, date) and result files."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Callable, Hashable

import torch

import ssam_kernels
from ssam_bench.stamp import git_commit  # (its own module: gpu_check.sh runs it without torch)

_HERE = os.path.dirname(os.path.abspath(__file__))
# In a source checkout (editable install) results go to the repository's benchmarks/results/;
# an installed copy writes under the working directory instead of into site-packages.
RESULTS = (os.path.join(_HERE, "results") if os.path.exists(os.path.join(_HERE, "..", "setup.py"))
           else os.path.join(os.getcwd(), "ssam-bench-results"))


def device_facts(device: torch.device) -> dict:
    """Name, driver, clocks and memory of a CUDA device from nvidia-ml-py; the CPU otherwise."""
    if device.type != "cuda":
        return {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", "kind": "cpu"}
    facts = {"device": torch.cuda.get_device_name(device), "kind": "cuda",
             "capability": ".".join(map(str, torch.cuda.get_device_capability(device)))}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        facts.update(
            driver=pynvml.nvmlSystemGetDriverVersion(),
            sm_clock_max_mhz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            mem_clock_max_mhz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            memory_gib=round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30, 1),
        )
    except Exception as exc:  # no NVML: say so rather than guess
        facts["nvml_error"] = str(exc)
    return facts


SGD_BASELINE = "torch.optim.SGD(fused=True)"
SGD_BASELINE_ROW = "fused"  # its name in a table's SGD column (rows measured before it: "-", foreach=True)


def baseline_sgd(params, **hyper) -> torch.optim.SGD:
    """The SGD every benchmark compares against: torch's fastest, ``fused=True`` (one
    multi-tensor kernel per step, on CUDA and CPU), not its device default (``foreach`` on
    CUDA: on the H200, ResNet-18's 62 tensors took 0.69 ms per ``foreach`` step). Our SAM's
    second step fuses restore with the SGD update; a slower baseline would hand it that
    difference as speed of its own."""
    return torch.optim.SGD(params, fused=True, **hyper)


# NVML's reasons for a clock below its maximum that slow a timed call (power cap, thermal and
# hardware slowdowns; not idling, application clock settings or sync boost)
SLOWDOWNS = {"sw power cap": 0x4, "hw slowdown": 0x8, "sw thermal": 0x20, "hw thermal": 0x40, "hw power brake": 0x80}


class RunConditions:
    """What the GPU's clocks did while a table's calls were timed, for its metadata: two runs
    that disagree may differ in clocks, not in code. Read from NVML (nvidia-ml-py) once per
    timed round, while one of the round's calls runs on the GPU (a different call each round; a
    reading of an idle GPU is left out), with NVML's power and thermal violation counters (the
    time the GPU was held below its clocks) taken at the first and the last reading.
    :meth:`reset` starts a table's record (each benchmark's run calls it)."""

    def __init__(self):
        self._nvml = self._handle = None
        self.error: str | None = None  # NVML could not be opened: no readings at all
        self.reset()

    def reset(self) -> None:
        self.clocks_mhz: list[int] = []
        self.temperature_c: list[int] = []
        self.reasons = 0
        self.read_error: str | None = None  # a reading that failed (the others stand)
        self._violations_first = self._violations_last = None

    def _open(self, device: torch.device) -> None:
        import pynvml

        pynvml.nvmlInit()
        try:  # by UUID: torch's index counts CUDA_VISIBLE_DEVICES' GPUs, NVML's all of them
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(device).uuid}")
        except Exception:
            handle = None
        self._nvml = pynvml
        self._handle = handle if handle is not None else pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)

    def _violation_ns(self) -> dict[str, int] | None:
        nvml = self._nvml
        try:
            return {name: nvml.nvmlDeviceGetViolationStatus(self._handle, policy).violationTime
                    for name, policy in (("power", nvml.NVML_PERF_POLICY_POWER),
                                         ("thermal", nvml.NVML_PERF_POLICY_THERMAL))}
        except Exception:  # not every driver or VM exposes them: the readings still stand
            return None

    def sample(self, device: torch.device) -> None:
        if device.type != "cuda" or self.error is not None:
            return
        if self._handle is None:
            try:
                self._open(device)
            except Exception as exc:  # no NVML: said in the metadata, the timing goes on
                self.error = f"{type(exc).__name__}: {exc}"
                return
        nvml, handle = self._nvml, self._handle
        try:
            reasons = nvml.nvmlDeviceGetCurrentClocksEventReasons(handle)
            if reasons & nvml.nvmlClocksEventReasonGpuIdle:  # the call ended before the reading
                return
            clock = nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)
            temperature = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        except Exception as exc:
            self.read_error = f"{type(exc).__name__}: {exc}"
            return
        self.reasons |= reasons
        self.clocks_mhz.append(clock)
        self.temperature_c.append(temperature)
        violations = self._violation_ns()
        if violations is not None:
            self._violations_first = self._violations_first or violations
            self._violations_last = violations

    def facts(self) -> dict:
        if self.error is not None:
            return {"conditions_error": self.error}
        out = {}
        if self.clocks_mhz:
            out.update(sm_clock_mhz_timed=[min(self.clocks_mhz), max(self.clocks_mhz)],
                       temperature_c_max=max(self.temperature_c),
                       slowdowns_seen=[name for name, bit in SLOWDOWNS.items() if self.reasons & bit])
        first, last = self._violations_first, self._violations_last
        if first is not None:
            out["held_below_clocks_s"] = {k: (last[k] - first[k]) / 1e9 for k in first}
        if self.read_error is not None:
            out["conditions_read_error"] = self.read_error
        return out


CONDITIONS = RunConditions()  # this process's: every timed round reads it (interleaved_samples)


def describe_conditions(meta: dict) -> str:
    """One clause for a results file's header from a run's :class:`RunConditions` facts in
    ``meta`` ("" where none were read)."""
    if "conditions_error" in meta:
        return f" GPU clocks not read ({meta['conditions_error']})."
    if "sm_clock_mhz_timed" not in meta:
        return ""
    lo, hi = meta["sm_clock_mhz_timed"]
    held = meta.get("held_below_clocks_s")
    held = "" if held is None else ", held below its clocks between the first and last readings " + ", ".join(
        f"{v:.1f} s by {k}" for k, v in held.items())
    return (f" SM clock while timing {lo}-{hi} MHz, up to {meta['temperature_c_max']} C, slowdowns seen: "
            f"{', '.join(meta['slowdowns_seen']) or 'none'}{held}.")


def run_metadata(device: torch.device) -> dict:
    return {
        **device_facts(device),
        **(CONDITIONS.facts() if device.type == "cuda" else {}),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": ssam_kernels.backend_info()["triton"],
        "ssam_kernels": ssam_kernels.__version__,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec). Missing values print as '-'."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| " + " | ".join("-" if r.get(k) is None else format(r[k], f) for k, _, f in columns) + " |" for r in rows
    ]
    return "\n".join([head, rule, *body])


def write_results(name: str, meta: dict, rows: list[dict], markdown: str, out_dir: str = RESULTS) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    md_path = os.path.join(out_dir, f"{name}.md")
    _replace(json_path, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    _replace(md_path, markdown + "\n")
    return json_path, md_path


def _replace(path: str, text: str) -> None:
    """Write ``path`` whole or not at all (a benchmark stopped by its time limit while writing
    leaves the previous file, never half of one)."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")  # hidden, and ignored by git
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def device_slug(device: torch.device) -> str:
    """Folder name under results/ for a device (e.g. ``nvidia-h100-80gb-hbm3``)."""
    name = device_facts(device)["device"] if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[Hashable, Callable[[], object]], device: torch.device, warmup: int = 3,
                        reps: int = 20, cold: bool = False, busy: bool = False) -> dict[Hashable, float]:
    """Median seconds per call of each function, measured round-robin (one call of each per
    round) after ``warmup`` rounds, so drifting clocks hit every contender alike. CUDA: events.
    ``cold`` (CUDA): each call starts with an empty L2; ``busy``: the GPU's time alone (see
    :func:`interleaved_samples`)."""
    samples = interleaved_samples(fns, device, warmup, reps, cold, busy)
    return {name: statistics.median(ts) for name, ts in samples.items()}


L2_FLUSH_BYTES = 256 << 20  # read before each cold call: several times any GPU's L2 (50-60 MB on Hopper)
BUSY_CYCLES = 4_000_000  # about 2 ms of GPU clock: longer than a call's host work (torch's cuSPARSELt path: ~0.8 ms)
MAX_BUSY_CYCLES = 200_000_000  # about 100 ms: a call whose host work takes longer is timed with some of it


def interleaved_samples(fns: dict[Hashable, Callable[[], object]], device: torch.device, warmup: int = 3,
                        reps: int = 20, cold: bool = False, busy: bool = False) -> dict[Hashable, list[float]]:
    """:func:`interleaved_medians`'s measurements: seconds per call of each function, round by
    round (entry ``i`` of every list from the same round). ``cold`` (CUDA): a 256 MiB read
    before each call, outside its events, so no call finds its operands in L2 left by the last
    one (a read leaves no dirty lines to write back inside the next call's time); without
    ``busy`` the host waits for it before the call, so the call's host work is all in its time.
    ``busy`` (CUDA): a spin on the GPU before each call's start event, so the host has launched
    the whole call before the GPU reaches it: the time is the GPU's alone, without the call's
    host overhead (for kernel rates against ceilings; a step's cost, launches included, takes
    neither). The spin is ``BUSY_CYCLES``, or longer for a function whose fastest warm-up call
    took the host longer (4 cycles a nanosecond of it: twice it at 2 GHz)."""
    flush = torch.zeros(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device) \
        if cold and device.type == "cuda" else None
    host = {name: float("inf") if warmup else 0.0 for name in fns}  # (the fastest warm-up call: a first one compiles)
    for _ in range(warmup):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            host[name] = min(host[name], time.perf_counter() - t0)
    spin = {name: min(max(BUSY_CYCLES, int(4e9 * t)), MAX_BUSY_CYCLES) for name, t in host.items()}
    _sync(device)
    times: dict[Hashable, list[float]] = {name: [] for name in fns}
    for r in range(reps):
        sampled = r % len(fns)  # the call whose run the clocks are read during, a different one each round
        for i, (name, fn) in enumerate(fns.items()):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if flush is not None:
                    flush.sum()
                    if not busy:
                        _sync(device)
                if busy:
                    torch.cuda._sleep(spin[name])
                start.record()
                fn()
                end.record()
                if i == sampled:  # (host time outside the events, while the GPU runs the call)
                    if busy:
                        start.synchronize()  # past the spin: the call itself runs now
                    CONDITIONS.sample(device)
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted): the ceiling for
    memory-bound kernels, measured in the same run as them."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = interleaved_medians({"copy": lambda: dst.copy_(src)}, device, warmup=3, reps=reps, busy=True)["copy"]
    return 2 * nbytes / t


def matmul_ceiling(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192, reps: int = 10) -> float:
    """Dense matmul rate (FLOP/s) of an n x n x n product in ``dtype``, measured in this run:
    the ceiling for compute-bound kernels."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = interleaved_medians({"mm": lambda: a @ b}, device, warmup=3, reps=reps, busy=True)["mm"]
    return 2 * n**3 / t


def native_backends(device: torch.device, probe: Callable[[str], object]) -> list[str]:
    """The ``ssam_kernels`` backends that run natively on ``device``: ``torch`` always, ``ext``
    where the compiled extension has the op, ``triton`` on a GPU only (on CPU tensors Triton
    runs in its interpreter, whose timings mean nothing). ``probe(backend)`` calls the op."""
    found = ["torch"]
    for backend in ("triton", "ext"):
        if backend == "triton" and device.type != "cuda":
            continue
        try:
            probe(backend)
            found.append(backend)
        except ssam_kernels.BackendUnavailableError:
            pass
    return found


def results_dir(device: torch.device, out: str | None) -> str | None:
    """Where a benchmark writes: ``--out`` if given, else results/<device>/ for a GPU run, and
    nowhere for a CPU run (CPU figures are printed, labelled CPU, never committed as results)."""
    if out:
        return out
    return os.path.join(RESULTS, device_slug(device)) if device.type == "cuda" else None


def quick_out(quick: bool, out: str | None, device: torch.device) -> str | None:
    """``--out`` for a run: as given, or for a ``--quick`` run on a GPU without it a fresh
    temporary folder (said on stderr): a smoke run's figures must never merge into, or replace
    rows of, benchmarks/results/<device>/."""
    if out or not quick or device.type != "cuda":
        return out
    out = tempfile.mkdtemp(prefix="ssam-bench-quick-")
    print(f"--quick on a GPU without --out: results go to {out}, not to benchmarks/results/", file=sys.stderr)
    return out


def merge_rows(path: str, rows: list[dict], meta: dict, key: str | tuple[str, ...],
               comparable: Callable[[dict], bool] | None = None) -> list[dict]:
    """``rows`` (this run's, stamped with its commit and date) after the rows of the results
    file at ``path`` whose ``key`` value (a row key, or a tuple of them) this run did not measure,
    when that file comes from the same device: parts of a benchmark run in separate sessions (a
    GPU slot each) add up to one table, each row keeping the stamp of the run that measured it.
    ``comparable(row)``: whether an earlier row was measured as this run's are (else dropped:
    a table whose columns would mean two things)."""
    keys = (key,) if isinstance(key, str) else tuple(key)

    def ident(r: dict) -> tuple:
        return tuple(r.get(k) for k in keys)

    stamped = [{**r, "commit": meta["commit"], "date": meta["date"]} for r in rows]
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return stamped
    if old.get("meta", {}).get("device") != meta["device"]:
        return stamped
    fresh = {ident(r) for r in rows}
    kept = [{"commit": old["meta"].get("commit", "unknown"), "date": old["meta"].get("date"), **r}
            for r in old.get("rows", []) if ident(r) not in fresh and (comparable is None or comparable(r))]
    return kept + stamped


def runs_note(rows: list[dict]) -> str:
    """Where merged rows come from more than one run: which (commit, date) pairs."""
    runs = sorted({(r["commit"], r["date"]) for r in rows if "commit" in r and "date" in r}, key=lambda cd: cd[1] or "")
    if len(runs) < 2:
        return ""
    return (f" Rows from {len(runs)} runs: " + "; ".join(f"commit {c}, {d}" for c, d in runs)
            + " (each row's own in the JSON).")


# One line per results table: what its columns mean and which direction is better.
LEGENDS = {
    "step": "step / SGD: median step time over an SGD step's, timed in the same loop (lower is better; SAM costs "
            "about 2x); its SGD ms: that SGD's median (a table merges parts run in separate processes: each row's "
            "ratio is against its own SGD); IQR: the interquartile range of that ratio taken round by round (its noise: differences "
            "below it are not measured differences); counted FLOPs / SGD: FlopCounterMode over one step; paper FLOPs / SGD: the paper's column; "
            "peak GiB: the contender's peak memory (lower is better); SGD: the SGD compared with (fused: "
            "torch.optim.SGD(fused=True); -: foreach=True, rows measured before 2026-12-07).",
    "overhead": "median ms: first_step + second_step with gradients present, no forward/backward; ms beyond SGD: "
                "that minus SGD alone (lower is better); beyond SGD vs foreach: that over the same optimizer's "
                "torch._foreach_* version's (lower is better; issue 22's target is at most 0.5); x official, "
                "x foreach: how many times faster than the official SSAM loop and the torch._foreach_* version "
                "of the same optimizer (above 1: ours is faster); ours triton / ours ext: the step pinned to "
                "that kernel backend; plan: the backend the step's plan runs on (list ops: no plan); SGD: SGD "
                "alone's and the foreach rows' (fused: torch.optim.SGD(fused=True); -: foreach=True, rows measured "
                "before 2026-12-07).",
    "masks": "official ms, ours ms: one mask update (lower is better); x official: official / ours (higher is "
             "better); ≥ 20x: whether the 20x target is met.",
    "perturb": "median ms: grad_norm + perturb_ + restore_ once, host work included, each cycle started with an "
               "empty L2 (lower is better); GB/s: the bytes the cycle must "
               "move (the weights' writes at kept entries as the 32-byte sectors they touch) over its time; of "
               "copy BW: that over the copy bandwidth measured in this run (1.0 is the ceiling; higher is better; "
               "where the host's launches take longer than the kernels, on the small lists, it measures them); "
               "x official, x foreach: speed relative to those (higher is better); "
               "extra B/param: optimizer memory per parameter, mask + backup (lower is better).",
    "sam_step": "host us: median CPU time of first_step + second_step with the kernels not run (lower is better); "
                "launches: Triton kernels per step; dispatcher ops: torch ops per step; syncs: those among them "
                "that wait for the device (0 wanted).",
    "ops": "median ms (lower is better; the GPU's time alone for one call, started with an empty L2: the host's "
           "launch work is left out, as in the ceilings); GB/s and of copy BW: bytes the op must move, over its time "
           "and over the measured copy bandwidth (the ceiling of ops that read and write; one that only reads, "
           "grad_norm, may pass it); TFLOP/s and of matmul peak: the same for GEMMs, against the dense matmul "
           "in the table's GEMM dtype (1.0 is the ceiling; higher is better); x torch ref: speed over the "
           "reference backend's GPU time (higher is better).",
    "topk_mask": "median ms (lower is better); x torch.topk: speed over torch.topk on the concatenated scores "
                 "(higher is better); exact k: whether exactly k entries are kept.",
    "ascent_linear": "dense ms, 2:4 GEMM ms: the product dense and on sparse tensor cores (lower is better), timed "
                     "as the timed column says: GPU alone (the host's work per call, such as torch's per-call "
                     "cuSPARSELt plan, left out), or per call, host included, where it says '-' (rows of runs "
                     "before the GPU-alone timing); x dense: "
                     "dense time / 2:4 time (above 1: the sparse GEMM wins; 2 is the sparse tensor cores' peak); "
                     "all in: with the sparsify and compress steps; config: the cuSPARSELt configuration kept "
                     "(planned: through the extension's kept cuSPARSELt plans, else torch's _cslt ops; alg N: its algorithm; "
                     "split-k N: the contraction split N ways; mode N: cuSPARSELt's split-k mode (1, 2: one or two kernels; "
                     "3-6: heuristic, data-parallel, split-k, stream-K); T: the result written transposed; kept: the fastest with "
                     "its path's compression); fastest GEMM alone x dense: the fastest of every configuration's GEMM, "
                     "each timed beside dense with the GPU's time alone (one per kernel: torch's path and the planned "
                     "one run the same kernel for a configuration; issue 25's GEMM target); each config tried: its "
                     "GEMM against the dense one (7 runs each, in the tuning, per call: host work included).",
    "ascent_quality": "cosine: between each mode's perturbation and the exact one (1 is identical; higher is "
                      "better); accuracy: digits test accuracy (higher is better), mean and std over runs.",
    "budget": "Fisher mass / top-k's: the mask's share of the unstructured top-k's Fisher mass (higher is better); "
              "cosine: to the top-k's perturbation (higher is better); step FLOPs / SGD with the exact backward "
              "(lower is better) beside the paper's column.",
    "budget_accuracy": "test accuracy: digits, mean and std over seeds (higher is better); step FLOPs / SGD: counted "
                       "(lower is better).",
    "flops": "counted / SGD: a step's FLOPs over SGD's, FlopCounterMode (lower is better); paper: the paper's column; "
             "paper model: the paper's assumption applied to the counted forward/backward split.",
}


def report(name: str, title: str, rows: list[dict], columns, device: torch.device, out: str | None,
           meta_extra: dict | None = None, note: str = "", merge_on: str | tuple[str, ...] | None = None,
           comparable: Callable[[dict], bool] | None = None) -> dict:
    """Print the Markdown table of a run (labelled CPU off a GPU) and write it where
    :func:`results_dir` says. ``merge_on``: a row key (e.g. ``"model"``) or a tuple of them; the
    written file keeps the earlier rows of this device for the values of it this run did not
    measure (:func:`merge_rows`). Returns the run metadata."""
    meta = {**run_metadata(device), **(meta_extra or {})}
    target = results_dir(device, out)
    if target and merge_on:
        rows = merge_rows(os.path.join(target, f"{name}.json"), rows, meta, merge_on, comparable)
    label = "" if device.type == "cuda" else " (CPU run: not a GPU figure)"
    legend = f"{LEGENDS[name]}\n\n" if name in LEGENDS else ""
    md = (f"# {title}{label}\n\n{meta['device']}{note}, torch {meta['torch']}, triton {meta['triton']}, "
          f"commit {meta['commit']}, {meta['date']}.{describe_conditions(meta)}{runs_note(rows)}\n\n{legend}"
          f"{markdown_table(rows, columns)}\n")
    print(md)
    if target:
        print("wrote", *write_results(name, meta, rows, md, target))
    return meta


OUT_HELP = ("results folder (default: benchmarks/results/<device>/ on a GPU, but a new temporary folder for --quick; "
            "on a CPU nothing is written)")


def standalone_main(doc: str, add_arguments, run, write, argv=None, quick_help: str = "tiny sizes, few repetitions") -> int:
    """The command line of a benchmark that ``ssam-bench`` also runs: ``run(args, device)``
    makes the rows, ``write(rows, device, out)`` reports them."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help=OUT_HELP)
    add_arguments(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.out = quick_out(args.quick, args.out, device)
    CONDITIONS.reset()
    try:
        rows = run(args, device)
    except ValueError as exc:  # bad option values: a message, not a traceback
        raise SystemExit(f"{p.prog}: {exc}") from None
    write(rows, device, args.out)
    return 0


def own_table_main(name: str, doc: str, title: str, columns, add_arguments, run, argv=None,
                   quick_help: str = "tiny sizes, few repetitions", merge_on=None, comparable=None) -> int:
    """:func:`standalone_main` of a benchmark with its own table (``ssam-bench ops`` runs it
    too), whose ``run(args, device)`` returns ``(rows, meta, note)``."""
    def write(result, device, out):
        rows, meta, note = result
        return report(name, title, rows, columns, device, out, meta_extra=meta, note=note, merge_on=merge_on,
                      comparable=comparable)

    return standalone_main(doc, add_arguments, run, write, argv, quick_help=quick_help)


def with_progress(items: list, progress_factory, desc: str):
    """Iterate ``items``, ticking a progress bar from ``progress_factory`` (None: no bar)."""
    if progress_factory is None:
        yield from items
        return
    bar = progress_factory(total=len(items), desc=desc)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
