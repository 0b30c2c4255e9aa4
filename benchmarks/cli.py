"""``ssam-bench``: what SSAM really costs on this machine, beside the paper's FLOPs.

    ssam-bench                 # everything (on a GPU: longer than a 10-minute slot; see below)
    ssam-bench --quick         # tiny sizes: a smoke run (21-31 s on an idle 2-core CPU; never into results/)
    ssam-bench step --models resnet18_cifar --sparsities 0.5 2:4
    ssam-bench ops | overhead | masks
    ssam-bench plot DIR        # redraw the plots of a results folder
    ssam-bench readme          # rewrite README.md's results section from the committed results

Subcommands: ``step`` (step time and counted FLOPs relative to SGD, the paper's Tables 1-3),
``ops`` (every op on every backend against the copy-bandwidth and matmul ceilings measured in
the same run), ``overhead`` (optimizer time outside forward/backward: ours vs the official
loop vs ``torch._foreach_*``, and the planned step's host time: ``bench_sam_step``), ``masks`` (SSAM-F Fisher and SSAM-D update, ours vs the
official algorithms). Without a subcommand all four run. On a GPU each writes
``<name>.json`` (rows plus device facts from nvidia-ml-py, versions, commit, date) and
``<name>.md`` to ``benchmarks/results/<device>/`` and draws ``step.png`` / ``ops.png``. On a
CPU the figures are printed, labelled CPU, and written only with ``--out``. A ``--quick`` run on
a GPU writes to ``--out`` or else to a new temporary folder: a smoke run never merges into (or
replaces rows of) ``benchmarks/results/<device>/``.

On a GPU the whole suite takes longer than one 10-minute slot (the first H200 run needed eight
commands of 14 to 129 s for a part of it). ``bash benchmarks/gpu_check.sh --help`` lists parts
that each finish inside 8 minutes; parts run in separate sessions add up to one results folder
(the step, overhead and mask tables merge their rows by model).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys

import torch
from tqdm import tqdm

from ssam import train
from ssam_bench import bench_masks, bench_overhead, bench_sam_step, bench_step, plots
from ssam_bench.common import CONDITIONS, OUT_HELP, markdown_table, quick_out, report, results_dir
from ssam_bench.opbench import COLUMNS as OP_COLUMNS
from ssam_bench.opbench import Ceilings, run_cases

# op -> dtype its microbenchmark runs in here (parameters and scores fp32, 2:4 data bf16)
OP_BENCHES = {"grad_norm": torch.float32, "sgd_step": torch.float32, "nm_mask": torch.float32,
              "compress_24": torch.bfloat16, "mvue24": torch.bfloat16, "bitmask": torch.float32,
              "masked_weight_grad": torch.bfloat16}
# benchmarks with their own tables (baselines beside the backends), run by `ops` too
OWN_TABLE_BENCHES = ("perturb", "topk_mask", "ascent_linear")
SUBCOMMANDS = ("step", "ops", "overhead", "masks")
GPU_NOTE = ("No GPU here: the summary gives counted FLOPs only; every timing above is a CPU figure "
            "(labelled so, written only to an --out folder, never to benchmarks/results/). GPU figures need a "
            "GPU: run `ssam-bench` on an A100/H100.")


def run_ops(args, device, progress_factory) -> list[dict]:
    ceilings = Ceilings.measure(device, args.quick)
    cases = []
    for op, dtype in OP_BENCHES.items():
        cases += importlib.import_module(f"ssam_bench.bench_{op}").cases(device, dtype, args.quick)
    bar = progress_factory(total=len(cases) + len(OWN_TABLE_BENCHES), desc="ops")
    rows = []
    for case in cases:
        rows += run_cases([case], device, ceilings, 5 if args.quick else 30)
        bar.update(1)
    report("ops", "Ops vs the device's ceilings", rows, OP_COLUMNS, device, args.out, meta_extra=ceilings.meta(),
           note=f", copy {ceilings.copy_bytes_per_s / 1e9:.0f} GB/s and {ceilings.matmul_dtype} matmul "
                f"{ceilings.matmul_flops_per_s / 1e12:.1f} TFLOP/s measured in this run")
    rows += run_own_tables(args, device, bar)
    bar.close()
    return rows


def run_own_tables(args, device, bar) -> list[dict]:
    """The benchmarks of :data:`OWN_TABLE_BENCHES` but those in ``args.skip``, each writing its
    own table; their rows, labelled by op."""
    rows = []
    for name in OWN_TABLE_BENCHES:
        if name not in (getattr(args, "skip", None) or ()):
            module = importlib.import_module(f"ssam_bench.bench_{name}")
            sub = argparse.Namespace(quick=args.quick, lists=None, dtype="float32", scores=None)
            CONDITIONS.reset()
            own_rows, meta, note = module.run(sub, device)
            report(name, module.TITLE, own_rows, module.COLUMNS, device, args.out, meta_extra=meta, note=note,
                   merge_on=getattr(module, "MERGE_ON", None), comparable=getattr(module, "comparable", None))
            rows += [dict(r, op=name) for r in own_rows]
        bar.update(1)
    return rows


def run_subcommand(name: str, args, device, progress_factory) -> list[dict]:
    CONDITIONS.reset()  # each table's metadata: the GPU's clocks while its own calls ran
    if name == "ops":
        return run_ops(args, device, progress_factory)
    module = {"step": bench_step, "overhead": bench_overhead, "masks": bench_masks}[name]
    rows = module.run(args, device, progress_factory)
    module.write(rows, device, args.out)
    if name == "overhead":  # and the planned step's host side (a CPU measurement wherever it runs)
        host = bench_sam_step.run(args, device)
        bench_sam_step.write(host, device, args.out)
        rows += [dict(r, params=f"{r['tensors']} tensors", host=True) for r in host]
    return rows


def _graph(row: dict) -> bool:
    """Whether a step row was replayed from a CUDA graph (rows of older runs have no ``launch``)."""
    return (row.get("launch") or "eager") != "eager"


def summarize(results: dict[str, list[dict]], timed: bool) -> list[dict]:
    """A few lines per benchmark: the figures a reader looks for first. ``timed`` False (a
    CPU run): counted FLOPs only; CPU timings of tiny models are noise as figures of merit,
    so they stay in the tables printed above, labelled CPU."""
    out = []
    step = results.get("step", [])
    key = "step_vs_sgd" if timed else "counted_flops_vs_sgd"
    unit = "x SGD" if timed else "x SGD FLOPs (counted, not timed)"
    for model in dict.fromkeys(r["model"] for r in step):
        rows = [r for r in step if r["model"] == model]
        # a row without its ratio (a failed CUDA-graph capture, or its SGD's) is said to have failed
        for r in rows:
            if r[key] is None:
                out.append(dict(benchmark="step", what=f"{model} {r['contender']}", figure="failed: not timed",
                                reference=r.get("launch") or ""))
        rows = [r for r in rows if r[key] is not None]
        picks = [r for r in rows if r["optimizer"] == "SAM"]
        # the best per sparsity among steps launched alike (eager, or replayed from a CUDA graph)
        for sparsity, graph in dict.fromkeys((r["sparsity"], _graph(r)) for r in rows if r["sparsity"] is not None):
            picks.append(min((r for r in rows if r["sparsity"] == sparsity and _graph(r) == graph), key=lambda r: r[key]))
        for r in picks:
            out.append(dict(benchmark="step", what=f"{model} {r['contender']}" + (" (best)" if r["sparsity"] else ""),
                            figure=f"{r[key]:.2f}{unit}", reference=f"paper {r['paper_flops_vs_sgd']:.2f}x"))
    if not timed:
        return out
    for r in results.get("ops", []):
        frac = r.get("copy_fraction") if r.get("copy_fraction") is not None else r.get("matmul_fraction")
        if r.get("impl") in ("triton", "ext", "ours") and frac is not None:
            out.append(dict(benchmark="ops", what=f"{r['op']} {r.get('config', r.get('params', ''))} [{r['impl']}]",
                            figure=f"{frac:.2f} of ceiling", reference=f"{r['median_ms']:.3f} ms"))
    for r in results.get("overhead", []):
        if r.get("host"):
            continue
        if r["impl"] == "ours":
            vs = r.get("beyond_sgd_vs_foreach")
            out.append(dict(benchmark="overhead", what=f"{r['params']} {r.get('optimizer', 'SSAM')}",
                            figure=f"{r['x_foreach']:.2f}x foreach" + ("" if vs is None else f", {vs:.2f} of its time beyond SGD"),
                            reference=f"{r['median_ms']:.2f} ms"))
    for r in results.get("masks", []):
        out.append(dict(benchmark="masks", what=f"{r['model']} {r['update']}", figure=f"{r['speedup']:.1f}x official",
                        reference="meets the 20x target" if r["meets_target"] else "below the 20x target"))
    return out


SPLIT_NOTE = ("ssam-bench: the whole suite takes longer than a 10-minute GPU slot. Where time is limited, run it "
              "in parts: `bash benchmarks/gpu_check.sh --help` lists parts that each finish in 8 minutes on an H200 "
              "(or pick `ssam-bench step --models M`, `ops`, `overhead`, `masks`); their results add up in one folder.")


def split_note(command: str, args, device: torch.device) -> str | None:
    """What to say before a GPU run of the whole suite: that it does not fit a slot, and how to
    split it (None for a subcommand, a --quick run or a CPU run)."""
    if command != "all" or args.quick or device.type != "cuda":
        return None
    return SPLIT_NOTE


SUMMARY_COLUMNS = [("benchmark", "benchmark", ""), ("what", "what", ""), ("figure", "figure", ""),
                   ("reference", "beside", "")]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few repetitions (a smoke run: on a GPU written to --out or a new temporary "
                        "folder, never to benchmarks/results/<device>/)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", default=None, help=OUT_HELP)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssam-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", metavar="{all,step,ops,overhead,masks,plot,readme}")
    everything = sub.add_parser("all", help="step, ops, overhead and masks (the default)")
    for q in (p, everything):
        _common(q)
        bench_step.add_arguments(q)
        bench_overhead.add_arguments(q)
        bench_masks.add_arguments(q)
    for name, module in (("step", bench_step), ("overhead", bench_overhead), ("masks", bench_masks)):
        q = sub.add_parser(name, help=module.__doc__.split("\n\n")[0].replace("\n", " "))
        _common(q)
        module.add_arguments(q)
    ops = sub.add_parser("ops", help="every op on every backend against the measured ceilings")
    _common(ops)
    ops.add_argument("--skip", nargs="+", choices=OWN_TABLE_BENCHES, default=[],
                     help="leave out these tables (e.g. ascent_linear, which gpu_check.sh's sparse24 part runs alone)")
    plot = sub.add_parser("plot", help="redraw step.png / ops.png from a results folder's JSON")
    plot.add_argument("folder")
    readme = sub.add_parser("readme", help="rewrite README.md's results section from the committed results")
    readme.add_argument("--check", action="store_true", help="only report whether it is up to date (exit 1 if not)")
    # an option given before the subcommand holds unless given again after it: a subcommand's
    # copy of a top-level option sets nothing by default (argparse would reset it)
    shared = {a.dest for a in p._actions}
    for q in sub.choices.values():
        for action in q._actions:
            if action.dest in shared and action.dest != "help":
                action.default = argparse.SUPPRESS
    return p


def parse_device(name: str | None) -> torch.device:
    """``--device`` (``ssam-train``'s rule), or CUDA where torch sees it when not given."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return train.parse_device(name)
    except ValueError as exc:
        raise SystemExit(f"ssam-bench: {exc}") from None


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    command = args.command or "all"
    if command == "plot":
        if not os.path.isdir(args.folder):
            raise SystemExit(f"ssam-bench plot: {args.folder!r} is not a folder")
        if not plots.have_matplotlib():
            raise SystemExit("ssam-bench plot: matplotlib is not installed (pip install matplotlib)")
        written = plots.plot_dir(args.folder)
        if not written:
            raise SystemExit(f"ssam-bench plot: no step.json or ops.json in {args.folder}")
        print("\n".join(f"wrote {w}" for w in written))
        return 0
    if command == "readme":
        from ssam_bench import update_readme

        return update_readme.main(["--check"] if args.check else [])
    device = parse_device(args.device)
    args.out = quick_out(args.quick, args.out, device)
    note = split_note(command, args, device)
    if note:
        print(note, file=sys.stderr)
    progress = functools.partial(tqdm, file=sys.stderr, leave=False, dynamic_ncols=True)
    names = SUBCOMMANDS if command == "all" else (command,)
    results = {}
    for name in tqdm(names, desc="ssam-bench", file=sys.stderr, leave=False, disable=len(names) == 1):
        try:
            results[name] = run_subcommand(name, args, device, progress)
        except ValueError as exc:  # bad option values: a message, not a traceback
            raise SystemExit(f"ssam-bench {name}: {exc}") from None
    print("# ssam-bench summary" + ("" if device.type == "cuda" else " (CPU run: not GPU figures)") + "\n")
    print(markdown_table(summarize(results, timed=device.type == "cuda"), SUMMARY_COLUMNS))
    target = results_dir(device, args.out)
    if target:
        if plots.have_matplotlib():
            for image in plots.plot_dir(target):
                print("wrote", image)
        else:
            print(f"matplotlib is not installed here: draw the plots later with `ssam-bench plot {target}`")
    if device.type != "cuda":
        print("\n" + GPU_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
