"""ssam-bench: the step, overhead and mask benchmarks compute what they claim, the CLI runs
end to end off a GPU (labelled CPU), and the README's results section is regenerated."""

import gc
import json
import re
import weakref

import pytest
import torch
from helpers import assert_tensors_equal

import ssam
from ssam.models import DigitsMLP
from ssam_bench import bench_budget, bench_masks, bench_overhead, bench_step, cli, common, update_readme
from ssam_kernels import ASCENT_MODES

pytestmark = pytest.mark.cpu
CPU = torch.device("cpu")


def test_default_contender_grid():
    specs = bench_step.contenders(set(bench_step.OPTIMIZERS), bench_step.SPARSITIES, None)
    names = [c.name for c in specs]
    assert names[:2] == ["sgd", "sam"] and len(names) == len(set(names))
    # per SSAM optimizer: dense and exact at 6 sparsities, every mode at 2:4; SSAM-F's budget
    # structure (exact) at every unstructured sparsity, on half the batch at 95% and above
    assert len(specs) == 2 + 2 * (6 * 2 + len(ASCENT_MODES)) + 2 * 6
    assert [c.name for c in specs if c.budget and c.optimizer == "ssam-d"] == [
        "ssam-d 50% exact budget", "ssam-d 80% exact budget", "ssam-d 90% exact budget",
        "ssam-d 95% exact budget ascent 50%", "ssam-d 98% exact budget ascent 50%", "ssam-d 99% exact budget ascent 50%"]
    assert {c.mode for c in specs if c.sparsity == "2:4"} == set(ASCENT_MODES)
    every = bench_step.contenders({"ssam-d"}, ("0.9",), ["mvue", "implicit"])
    assert [c.name for c in every] == ["sgd", "ssam-d 90% mvue", "ssam-d 90% implicit"]
    assert [c.paper for c in specs[:3]] == [1.0, 2.0, 1.65]


def test_captured_contenders_follow_the_eager_ones_with_their_own_sgd():
    eager = bench_step.contenders({"sam", "ssam-f"}, ("0.5",), ["exact"])
    both = bench_step.contenders({"sam", "ssam-f"}, ("0.5",), ["exact"], graphs=("eager", "captured"))
    assert both[:len(eager)] == eager
    graphs = both[len(eager):]
    assert [c.name for c in graphs] == [c.name + " graph" for c in eager]
    assert graphs[0].name == "sgd graph" and all(c.captured and c.sgd == graphs[0] for c in graphs)
    assert all(c.sgd.name == "sgd" for c in eager)
    with pytest.raises(SystemExit, match="--graphs captured needs a CUDA device"):
        cli.main(["step", "--quick", "--device", "cpu", "--graphs", "captured"])


class _FakeGraph:
    """What the CPU can stand in for: a capture that records the step and a replay that runs it."""

    def __init__(self, step):
        self.step = step

    def replay(self):
        self.step()


def test_captured_rows_time_replays_against_the_replayed_sgd(monkeypatch):
    captures, replays = [], []

    graphs = []

    def fake_capture(step, device, warmup=3):
        captures.append(step)
        gc.collect()  # each captured contender's graph is let go once it is timed (SGD's kept)
        assert [g() is not None for g in graphs] == [True, False, False][:len(graphs)]
        if len(captures) == 3:  # the third contender's capture fails: its row says why, no timing
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
        graph = _FakeGraph(lambda: replays.append(step) or step())
        graphs.append(weakref.ref(graph))
        return graph

    monkeypatch.setattr(bench_step, "capture_step", fake_capture)
    workload = bench_step.QUICK_WORKLOADS["tiny_gpt"]
    specs = bench_step.contenders({"sam", "ssam-f"}, ("0.5",), ["dense"], graphs=("eager", "captured"))
    rows = bench_step.bench_workload("tiny_gpt", workload, specs, CPU, reps=3, timed=True, batch=workload.batch)
    by = {r["contender"]: r for r in rows}
    assert len(captures) == 3 and {id(s) for s in replays} == {id(captures[0]), id(captures[1])}
    assert [r["launch"] for r in rows[:3]] == ["eager"] * 3
    assert by["sgd graph"]["launch"] == by["sam graph"]["launch"] == "CUDA graph"
    failed = by["ssam-f 50% dense graph"]
    assert failed["launch"] == "CUDA graph: capture failed: CUDA error: operation not permitted when stream is capturing"
    assert failed["step_ms"] is None and failed["step_vs_sgd"] is None and failed["counted_gflop"] > 0
    assert by["sgd graph"]["step_vs_sgd"] == 1.0 and by["sgd"]["step_vs_sgd"] == 1.0
    for name in ("sam", "ssam-f 50% dense"):  # the same FLOPs however they launch
        assert by[name]["counted_flops_vs_sgd"] == pytest.approx(2.0, abs=1e-12)
    assert by["sam graph"]["counted_flops_vs_sgd"] == pytest.approx(2.0, abs=1e-12)
    assert by["sam graph"]["step_vs_sgd"] > 0 and by["sam graph"]["step_vs_sgd_iqr"] >= 0
    # the summary says the failed capture failed (no ratio to quote) and quotes the others, the
    # best per sparsity of the eager steps and of the replayed ones apart
    summary = {r["what"]: r for r in cli.summarize({"step": rows}, timed=True)}
    assert summary["tiny_gpt ssam-f 50% dense graph"]["figure"] == "failed: not timed"
    assert summary["tiny_gpt ssam-f 50% dense graph"]["reference"] == failed["launch"]
    assert {w for w, r in summary.items() if r["figure"].endswith("x SGD")} == {
        "tiny_gpt sam", "tiny_gpt sam graph", "tiny_gpt ssam-f 50% dense (best)"}


def test_eager_rows_are_checkpointed_before_the_captures(monkeypatch):
    """A workload's eager steps, the table's headline, are timed first, in one interleaved loop:
    their rows go to the checkpoint before the captured contenders, so a run stopped by its time
    limit there keeps them."""
    monkeypatch.setattr(bench_step, "capture_step", lambda step, device, warmup=3: _FakeGraph(step))
    real = bench_step.interleaved_samples

    def cut_short(fns, *args, **kwargs):  # a captured contender is timed beside the replayed SGD
        if "mine" in fns:
            raise KeyboardInterrupt
        return real(fns, *args, **kwargs)

    monkeypatch.setattr(bench_step, "interleaved_samples", cut_short)
    saved = []
    workload = bench_step.QUICK_WORKLOADS["tiny_gpt"]
    specs = bench_step.contenders({"sam"}, (), None, graphs=("eager", "captured"))
    with pytest.raises(KeyboardInterrupt):
        bench_step.bench_workload("tiny_gpt", workload, specs, CPU, reps=2, timed=True, batch=workload.batch,
                                  checkpoint=saved.append)
    assert [[r["contender"] for r in rows] for rows in saved] == [["sgd", "sam"]]
    assert all(r["step_vs_sgd"] > 0 and r["counted_flops_vs_sgd"] > 0 for r in saved[0])


def test_step_results_are_written_after_each_workload(tmp_path, monkeypatch):
    """``ssam-bench step`` writes (merges) its table after each model and inside one after its
    eager contenders: a run cut short keeps what it measured."""
    checkpoints = []

    def fake_workload(name, workload, specs, device, reps, timed, batch, progress=None, checkpoint=None):
        checkpoints.append(checkpoint)
        if name == "tiny_vit":  # the second model: its eager steps timed, then stopped in its captures
            checkpoint([dict(model=name, contender="sam", launch="eager", step_vs_sgd=1.5)])
            raise KeyboardInterrupt
        return [dict(model=name, contender=c.name, launch="eager", step_vs_sgd=1.0 + i) for i, c in enumerate(specs)]

    monkeypatch.setattr(bench_step, "bench_workload", fake_workload)
    argv = ["step", "--quick", "--models", "tiny_gpt", "tiny_vit", "--optimizers", "sam"]
    with pytest.raises(KeyboardInterrupt):
        bench_step.run(cli.parser().parse_args(argv + ["--out", str(tmp_path)]), CPU)
    rows = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert [(r["model"], r["contender"], r["step_vs_sgd"]) for r in rows] == [
        ("tiny_gpt", "sgd", 1.0), ("tiny_gpt", "sam", 2.0), ("tiny_vit", "sam", 1.5)]
    assert "(partial: the run goes on)" in (tmp_path / "step.md").read_text()
    bench_step.run(cli.parser().parse_args(argv[:4] + argv[5:]), CPU)  # a CPU run without --out writes nothing
    assert checkpoints[-1] is None


def test_captured_mvue_rows_say_their_draws_are_fixed(monkeypatch):
    monkeypatch.setattr(bench_step, "capture_step", lambda step, device, warmup=3: _FakeGraph(step))
    workload = bench_step.QUICK_WORKLOADS["tiny_gpt"]
    specs = bench_step.contenders({"ssam-f"}, ("2:4",), ["mvue", "implicit"], graphs=("captured",))
    rows = bench_step.bench_workload("tiny_gpt", workload, specs, CPU, reps=2, timed=True, batch=workload.batch)
    assert [r["launch"] for r in rows] == ["CUDA graph", "CUDA graph, MVUE draws fixed at capture", "CUDA graph"]
    assert all(r["step_vs_sgd"] > 0 for r in rows)


def test_plan_without_gpu_counts_real_models_and_times_tiny_ones():
    p = cli.parser()
    runs = bench_step.plan(p.parse_args(["step", "--models", "resnet50", "gpt2_small_2k", "gpt2_small_8k"]), CPU)
    assert [(n, timed, batch) for n, _, timed, batch in runs[:2]] == [("resnet50", False, 2), ("gpt2_small_128tok", False, 2)]
    assert [n for n, _, timed, _ in runs[2:] if timed] == list(bench_step.QUICK_WORKLOADS)
    quick = bench_step.plan(p.parse_args(["step", "--quick", "--models", "tiny_gpt"]), CPU)
    assert [(n, timed) for n, _, timed, _ in quick] == [("tiny_gpt", True)]
    with pytest.raises(ValueError, match="--quick runs only the tiny workloads"):
        bench_step.plan(p.parse_args(["step", "--quick", "--models", "resnet50"]), CPU)


def test_step_rows_count_flops_and_time_against_sgd():
    args = cli.parser().parse_args(["step", "--quick", "--models", "tiny_gpt", "--sparsities", "0.99", "2:4"])
    rows = {r["contender"]: r for r in bench_step.run(args, CPU)}
    assert set(rows) == {c.name for c in bench_step.contenders(set(bench_step.OPTIMIZERS), ("0.99", "2:4"), None)}
    assert rows["sgd"]["step_vs_sgd"] == 1.0 and rows["sgd"]["counted_flops_vs_sgd"] == 1.0
    assert rows["sam"]["counted_flops_vs_sgd"] == pytest.approx(2.0, abs=1e-12)  # two forward/backward passes
    # the ops of a warm step: SAM's are two passes' and its step's few planned kernels
    assert rows["sgd"]["ops_vs_sgd"] == 1.0 and 1.8 < rows["sam"]["ops_vs_sgd"] < 2.2
    for name, r in rows.items():
        assert r["step_ms"] > 0 and r["sgd_ms"] > 0 and r["peak_gib"] is None  # peak memory is a CUDA figure
        if r["mode"] == "dense":
            assert r["counted_flops_vs_sgd"] == pytest.approx(2.0, abs=1e-12)
        if r["mode"] == "exact":  # never more than SAM; fewer where whole rows are unmasked
            assert r["counted_flops_vs_sgd"] <= 2.0 + 1e-12
    assert rows["ssam-f 99% exact"]["counted_flops_vs_sgd"] < 2.0  # Fisher at 99% leaves rows empty
    for opt in ("ssam-f", "ssam-d"):
        budget = rows[f"{opt} 99% exact budget ascent 50%"]  # counted by torch, the ascent on 1 of 2 sequences
        assert budget["mode"] == "exact, budget mask, ascent on 50% of the batch"
        assert budget["counted_flops_vs_sgd"] <= 1.30 + 1e-12
    assert rows["ssam-d 99% dense"]["paper_flops_vs_sgd"] == 1.30
    assert all(r["step_vs_sgd_iqr"] >= 0 for r in rows.values())


def test_the_op_count_leaves_out_what_launches_nothing():
    """The ``ops`` column counts device work: the profiler markers torch.optim's step() enters,
    views and bare allocations are not kernels."""
    x = torch.randn(4, 4)

    def markers_views_allocations():
        with torch.autograd.profiler.record_function("step"):
            x.view(16)
            torch.empty(3)

    assert bench_step.counted(markers_views_allocations)[1] == 0
    assert bench_step.counted(lambda: x.add(1).mul_(2))[1] == 2
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.ones(3)
    opt = torch.optim.SGD([p], lr=0.1, foreach=True)  # one foreach update, inside its record_function
    assert bench_step.counted(opt.step)[1] == 1


def test_timed_sam_steps_move_batchnorm_statistics_once_a_step():
    """The benchmark's closure is the README's recipe: the pass at w + e runs inside
    frozen_batchnorm_stats, so a SAM step counts its batch once, as SGD's does."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    for make_opt in (lambda ps: torch.optim.SGD(ps, lr=0.1), lambda ps: ssam.SAM(ps, torch.optim.SGD, lr=0.1)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                    torch.nn.Linear(144, 4))
        step = bench_step.make_step(model, make_opt(model.parameters()), x, y, torch.nn.functional.cross_entropy,
                                    autocast=False)
        step()
        step()
        assert int(model[1].num_batches_tracked) == 2
        assert model[1].track_running_stats  # restored after each pass


def test_step_computes_the_fisher_scores_once_per_workload(monkeypatch):
    """Every SSAM-F contender of a workload gets the masks it would get on its own, from one
    Fisher computation."""
    import ssam.ssamf

    calls = []
    original = ssam.ssamf.empirical_fisher
    monkeypatch.setattr(ssam.ssamf, "empirical_fisher", lambda *a, **k: calls.append(1) or original(*a, **k))
    workload = bench_step.QUICK_WORKLOADS["tiny_convnet"]
    specs = [c for c in bench_step.contenders({"ssam-f"}, ("0.5", "0.9"), ["exact"]) if c.optimizer == "ssam-f"]

    def masks(spec):
        torch.manual_seed(0)
        model = workload.build()
        return [m.clone() for m in bench_step.build_optimizer(spec, model, workload, CPU, 4).masks()]

    alone = [masks(spec) for spec in specs]
    assert len(calls) == len(specs)
    with bench_step.fisher_once():
        shared = [masks(spec) for spec in specs]
    assert len(calls) == len(specs) + 1
    assert len(shared) == len(alone)
    for spec, got, want in zip(specs, shared, alone):
        assert_tensors_equal(got, want, f"{spec.name}: masks with the Fisher shared")


def test_official_fisher_mask_matches_ours():
    torch.manual_seed(0)
    model = DigitsMLP()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    official = bench_masks.official_fisher_mask(model, params, xs, ys, bench_step._cross_entropy, 0.5)
    opt = ssam.SSAMF(params, torch.optim.SGD, rho=0.05, sparsity=0.5, num_samples=16, update_freq=1, lr=0.1)
    opt.update_mask(model, [(xs, ys)])
    ours = opt.masks()
    total = sum(p.numel() for p in params)
    assert sum(int(m.sum()) for m in official) == sum(int(m.sum()) for m in ours) == int(total * 0.5)
    differ = sum(int((o.bool() != m).sum()) for o, m in zip(official, ours))
    assert differ <= 2e-3 * total  # near-ties may swap: the sums of squares round differently


def test_official_ssamd_update_keeps_density_and_moves_the_right_count():
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40, 30, generator=gen)), torch.nn.Parameter(torch.randn(30, generator=gen))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    masks = [(torch.rand(p.shape, generator=gen) < 0.5).float() for p in params]
    total = sum(p.numel() for p in params)
    live = int(0.5 * total)
    masks = [m.flatten() for m in masks]
    flat = torch.cat(masks)
    flat.zero_()
    flat[torch.randperm(total, generator=gen)[:live]] = 1
    masks = [flat[:1200].reshape(40, 30), flat[1200:]]
    new = bench_masks.official_ssamd_update(params, masks, death_rate=0.5, sparsity=0.5)
    old, now = torch.cat([m.flatten() for m in masks]), torch.cat([m.flatten() for m in new])
    assert int(now.sum()) == live
    kept = int((old * now).sum())
    assert kept == live - int(0.5 * live)  # survivors all come from the old mask
    grads = torch.cat([p.grad.abs().flatten() for p in params])
    survivors = (old * now).bool()
    dropped = old.bool() & ~survivors
    assert grads[survivors].min() >= grads[dropped].max()  # drop by |grad|


def test_official_mask_updates_are_warmed_before_their_timed_run(monkeypatch):
    """The official algorithms run once, timed: before it the Fisher loop runs on 2 samples and
    the SSAM-D update once (first-use setup outside their time), as ours are warmed."""
    events = []
    fisher, ssamd, medians = bench_masks.official_fisher_mask, bench_masks.official_ssamd_update, \
        bench_masks.interleaved_medians

    def timed(fns, device, warmup=3, reps=20):
        events.append(("timed", "fisher official" in fns, warmup))
        return medians(fns, device, warmup, reps)

    monkeypatch.setattr(bench_masks, "official_fisher_mask",
                        lambda model, params, xs, *a: events.append(("fisher", xs.shape[0])) or fisher(model, params, xs, *a))
    monkeypatch.setattr(bench_masks, "official_ssamd_update", lambda *a: events.append(("ssam-d",)) or ssamd(*a))
    monkeypatch.setattr(bench_masks, "interleaved_medians", timed)
    rows = bench_masks.bench_model("tiny_convnet", bench_step.QUICK_WORKLOADS["tiny_convnet"], CPU, reps=1, num_samples=4)
    official = events.index(("timed", True, 0))
    assert ("fisher", 2) in events[:official] and ("ssam-d",) in events[:official]
    assert events[official + 1:] == [("fisher", 4), ("ssam-d",)]  # the timed run: all the samples
    assert all(r["official_ms"] > 0 for r in rows)


def test_quick_runs_on_a_gpu_never_write_into_the_results_folder(monkeypatch):
    """A --quick run on a GPU without --out writes to a new temporary folder, never merging its
    smoke figures into benchmarks/results/<device>/: ssam-bench and each benchmark's own command."""
    import os

    from ssam_bench import bench_ascent_linear, bench_perturb, bench_topk_mask, common

    cuda = torch.device("cuda")
    scratch = common.quick_out(True, None, cuda)
    assert os.path.isdir(scratch) and not os.listdir(scratch)
    assert not os.path.realpath(scratch).startswith(os.path.realpath(common.RESULTS))
    assert common.quick_out(True, None, CPU) is None and common.quick_out(False, None, cuda) is None
    assert common.quick_out(True, "mine", cuda) == "mine"
    os.rmdir(scratch)

    def where(argv, main):  # the out folder a run is given (its work stubbed: no GPU here)
        outs = []
        main(argv, outs)
        assert outs and len(set(outs)) == 1, outs  # (ssam-bench: every subcommand the same folder)
        return outs[0]

    def cli_main(argv, outs):
        monkeypatch.setattr(cli, "parse_device", lambda name: cuda)
        monkeypatch.setattr(cli, "run_subcommand", lambda name, args, device, progress: outs.append(args.out) or [])
        monkeypatch.setattr(cli, "results_dir", lambda device, out: None)
        cli.main(argv)

    def standalone(argv, outs):
        common.standalone_main("doc", lambda p: None, lambda args, device: [], lambda rows, device, out: outs.append(out),
                               argv + ["--device", "cuda"])

    def own_main(module):
        def main(argv, outs):
            monkeypatch.setattr(module, "run", lambda args, device, *a: ([], {}, ""))
            report = lambda *a, **k: outs.append(a[5])  # noqa: E731
            monkeypatch.setattr(module, "report", report, raising=False)  # (its own main's, or
            monkeypatch.setattr(common, "report", report)  # common.own_table_main's)
            monkeypatch.setattr(module, "results_dir", lambda device, out: out, raising=False)
            module.main(argv + ["--device", "cuda"])
        return main

    for main in (cli_main, standalone, own_main(bench_perturb), own_main(bench_topk_mask),
                 own_main(bench_ascent_linear)):
        quick = where(["--quick"], main)
        assert quick and os.path.basename(quick).startswith("ssam-bench-quick-"), main
        os.rmdir(quick)
        assert where(["--quick", "--out", "given"], main) == "given"
        assert where([], main) is None  # a full run: results/<device>/
    assert "temporary folder" in " ".join(cli.parser().format_help().split())  # (--help says so)


def test_overhead_baselines_compute_our_step():
    shapes = [torch.Size([64, 32]), torch.Size([32]), torch.Size([10, 64])]
    gen = torch.Generator().manual_seed(0)
    ours_p = bench_overhead._params(shapes, CPU, gen)
    copies = [[torch.nn.Parameter(p.detach().clone()) for p in ours_p] for _ in range(2)]
    for c in copies:
        for p, q in zip(c, ours_p):
            p.grad = q.grad.clone()
    ours = ssam.SSAMD(ours_p, torch.optim.SGD, rho=bench_overhead.RHO, sparsity=0.5, drop_rate=0.0, T_end=1, seed=0,
                      **bench_overhead.SGD)
    masks = [m.float() for m in ours.masks()]
    official = bench_overhead.OfficialSSAM(copies[0], masks, torch.optim.SGD(copies[0], **bench_overhead.SGD))
    foreach_base = common.baseline_sgd(copies[1], **bench_overhead.SGD)  # the foreach row's, as timed
    for _ in range(2):
        ours.first_step()
        ours.second_step()
        official.first_step()
        official.second_step()
        bench_overhead.foreach_step(copies[1], masks, foreach_base)
    for p, a, b in zip(ours_p, *copies):
        torch.testing.assert_close(a, p, rtol=1e-6, atol=1e-7)  # official w -= e may differ by an ulp
        torch.testing.assert_close(b, p, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, p.grad)  # sanity: a step happened on real data


def test_sgd_baselines_are_torchs_fused_sgd(monkeypatch):
    """The step and overhead tables compare against torch's fastest SGD (SAM's second step fuses
    its update: a foreach baseline would count that difference as ours): every SGD the
    benchmarks build but the official loop's is fused=True."""
    built = []
    init = torch.optim.SGD.__init__

    def recording_init(self, params, *args, **kwargs):
        init(self, params, *args, **kwargs)
        built.append(self.defaults)

    monkeypatch.setattr(torch.optim.SGD, "__init__", recording_init)
    model = torch.nn.Linear(3, 2)
    opt = bench_step.build_optimizer(bench_step.Contender("sgd"), model, bench_step.QUICK_WORKLOADS["tiny_gpt"], CPU, 4)
    assert opt.defaults["fused"] is True and not opt.defaults["foreach"]
    built.clear()
    rows = bench_overhead.bench_list("tiny", [torch.Size([5, 3]), torch.Size([5])], CPU, reps=1)
    # SAM's and SSAM-D's bases (our fused step replaces theirs), the official loop's default SGD,
    # and the foreach rows' two and SGD alone: fused
    assert sum(d["fused"] is True for d in built) == 3 and not any(d["foreach"] for d in built)
    assert {r["sgd_baseline"] for r in rows} == {common.SGD_BASELINE_ROW}


def test_cli_quick_runs_everything_off_gpu(tmp_path, capsys):
    assert cli.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "# ssam-bench summary (CPU run: not GPU figures)" in out and cli.GPU_NOTE in out
    summary = out[out.index("# ssam-bench summary"):]
    # off a GPU the summary quotes counted FLOPs only, every model's (tiny ones included)
    lines = [line for line in summary.splitlines() if line.startswith("| step |")]
    assert lines and all("x SGD FLOPs (counted, not timed)" in line for line in lines)
    assert any("tiny_gpt" in line for line in lines)
    for bench in ("ops", "overhead", "masks"):
        assert f"| {bench} |" not in summary
    for name in ("step", "ops", "overhead", "masks", "perturb", "topk_mask", "ascent_linear"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["rows"] and data["meta"]["kind"] == "cpu"
        assert {"device", "torch", "triton", "commit", "date"} <= set(data["meta"])
        if name in ("step", "overhead"):
            assert data["meta"]["sgd_baseline"] == common.SGD_BASELINE
        assert "(CPU run: not a GPU figure)" in (tmp_path / f"{name}.md").read_text()
    assert (tmp_path / "step.png").stat().st_size > 0 and (tmp_path / "ops.png").stat().st_size > 0


def test_results_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A part's benchmark may be stopped by its time limit while writing: the new text goes to
    a file beside the result and is moved over it whole, so the previous result stays intact
    until then."""
    from ssam_bench import common

    common.write_results("t", {"run": 1}, [{"x": 1}], "# one", str(tmp_path))

    def killed(src, dst):  # the kill arrives after the new text is written, before the move
        assert json.loads(open(src).read()).get("rows") == [{"x": 2}]
        raise KeyboardInterrupt

    monkeypatch.setattr(common.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        common.write_results("t", {"run": 2}, [{"x": 2}], "# two", str(tmp_path))
    monkeypatch.undo()
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == [{"x": 1}]
    assert (tmp_path / "t.md").read_text() == "# one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.md"]  # the interrupted write removed
    common.write_results("t", {"run": 3}, [{"x": 3}], "# three", str(tmp_path))
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == [{"x": 3}]
    assert (tmp_path / "t.md").read_text() == "# three\n"


def test_cli_ops_skips_the_tables_it_is_told_to(monkeypatch):
    """gpu_check.sh's ops part leaves the 2:4 GEMM table to the sparse24 part (`--skip`)."""
    import types

    ran, ticks = [], []
    stub = {name: types.SimpleNamespace(run=lambda args, device, name=name: ([{"x": name}], {}, ""), TITLE=name,
                                        COLUMNS=[]) for name in cli.OWN_TABLE_BENCHES}
    monkeypatch.setattr(cli.importlib, "import_module", lambda module: stub[module.rsplit("bench_", 1)[1]])
    monkeypatch.setattr(cli, "report", lambda name, *a, **k: ran.append(name))
    bar = types.SimpleNamespace(update=ticks.append)
    args = cli.parser().parse_args(["ops", "--skip", "ascent_linear"])
    rows = cli.run_own_tables(args, CPU, bar)
    assert ran == [n for n in cli.OWN_TABLE_BENCHES if n != "ascent_linear"] and len(ticks) == 3
    assert [r["op"] for r in rows] == ran
    ran.clear()
    cli.run_own_tables(cli.parser().parse_args(["ops"]), CPU, bar)
    assert ran == list(cli.OWN_TABLE_BENCHES)
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["ops", "--skip", "step"])


def test_cli_rejects_bad_input(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["step", "--sparsities", "0.7"])
    with pytest.raises(SystemExit, match="--quick runs only the tiny workloads"):
        cli.main(["step", "--quick", "--models", "wrn28_10", "--device", "cpu"])
    with pytest.raises(SystemExit, match="not a folder"):
        cli.main(["plot", str(tmp_path / "missing")])
    for device in ("nonsense", "meta", "mps"):  # a message, not a torch traceback
        with pytest.raises(SystemExit, match="--device must be cpu or cuda"):
            cli.main(["masks", "--quick", "--device", device])


def test_options_before_the_subcommand_hold():
    """argparse resets an option given before a subcommand to the subcommand's own default; the
    usage line puts them there, so they must hold (and one given after still wins)."""
    p = cli.parser()
    for argv in (["--quick", "--out", "somewhere", "masks"], ["masks", "--quick", "--out", "somewhere"],
                 ["--quick", "all", "--out", "somewhere"]):
        args = p.parse_args(argv)
        assert (args.quick, args.out) == (True, "somewhere"), argv
    args = p.parse_args(["--device", "cpu", "step", "--device", "cuda"])
    assert args.device == "cuda"
    args = p.parse_args(["ops"])
    assert (args.quick, args.out, args.device, args.skip) == (False, None, None, [])


def _fake_results(root, device="NVIDIA H100 80GB HBM3", date="2026-11-30T10:00:00Z"):
    folder = root / "nvidia-h100"
    folder.mkdir(parents=True)
    meta = dict(device=device, kind="cuda", driver="580.1", torch="2.11.0", triton="3.6.0", commit="abc1234", date=date)
    step = [dict(model="resnet18_cifar", batch=128, optimizer="SGD", sparsity=None, mode=None, step_vs_sgd=1.0),
            dict(model="resnet18_cifar", batch=128, optimizer="SAM", sparsity=None, mode=None, step_vs_sgd=1.97),
            dict(model="resnet18_cifar", batch=128, optimizer="SSAM-F", sparsity="50%", mode="dense", step_vs_sgd=2.1),
            dict(model="resnet18_cifar", batch=128, optimizer="SSAM-D", sparsity="50%", mode="exact", step_vs_sgd=1.8)]
    (folder / "step.json").write_text(json.dumps({"meta": meta, "rows": step}))
    masks = [dict(model="resnet18_cifar", update="SSAM-D drop/grow", speedup=31.0)]
    (folder / "masks.json").write_text(json.dumps({"meta": meta, "rows": masks}))
    return folder


def test_readme_section_from_results(tmp_path):
    text = f"intro\n{update_readme.BEGIN}\nold\n{update_readme.END}\noutro\n"
    empty = update_readme.render(text, str(tmp_path))
    assert "No GPU results are committed yet" in empty and empty.startswith("intro\n") and empty.endswith("outro\n")
    _fake_results(tmp_path)
    full = update_readme.render(empty, str(tmp_path))
    assert "**NVIDIA H100 80GB HBM3**" in full and "2026-11-30" in full and "old" not in full
    assert "| resnet18_cifar (b128) | 1.97x | 1.80x (SSAM-D exact) |" in full  # the cheapest SSAM at 50%
    assert "31.0x" in full
    assert update_readme.render(full, str(tmp_path)) == full  # idempotent
    with pytest.raises(ValueError, match="marker"):
        update_readme.render("no markers", str(tmp_path))


def test_readme_section_keeps_eager_and_graph_rows_apart(tmp_path):
    """Step rows of a --graphs run: the headline table quotes the eager steps only (a replayed
    step's ratio is over a replayed SGD's), exact/dense pairs pair steps launched alike, and a
    failed capture (no ratio) is left out instead of crashing the section."""
    folder = _fake_results(tmp_path)
    data = json.loads((folder / "step.json").read_text())
    eager = [dict(r, launch="eager") for r in data["rows"]]

    def graph(row, ratio, launch="CUDA graph"):
        return dict(row, launch=launch, step_vs_sgd=ratio)

    sgd, sam, dense, exact = eager
    data["rows"] = eager + [graph(sgd, 1.0), graph(sam, 1.5), graph(dense, 1.2), graph(exact, 1.1),
                            graph(dict(exact, optimizer="SSAM-F"), None, "CUDA graph: capture failed: CUDA error")]
    (folder / "step.json").write_text(json.dumps(data))
    text = update_readme.render(f"{update_readme.BEGIN}\n{update_readme.END}\n", str(tmp_path))
    assert "| resnet18_cifar (b128) | 1.97x | 1.80x (SSAM-D exact) |" in text  # eager, not 1.50x / 1.10x
    assert "eager steps: those replayed from CUDA graphs are in step.md" in text
    findings = [line for line in text.splitlines() if line.startswith("* ")]
    assert ("* **SSAM against SAM**: slower than SAM in 1 of the 2 SSAM configurations measured beside a SAM row; "
            "faster only in resnet18_cifar SSAM-D 50% exact (1.80x SGD against SAM's 1.97x).") in findings
    assert ("* **SSAM against SAM** (steps replayed from CUDA graphs): slower than SAM in 0 of the 2 SSAM "
            "configurations measured beside a SAM row; faster only in resnet18_cifar SSAM-F 50% dense (1.20x SGD "
            "against SAM's 1.50x), resnet18_cifar SSAM-D 50% exact (1.10x SGD against SAM's 1.50x).") in findings
    # no exact/dense pair of one optimizer in either launch: none made across launches either
    assert not any("exact against dense" in line for line in findings)
    data["rows"].append(graph(dict(dense, optimizer="SSAM-D"), 1.0))  # SSAM-D dense, replayed: its pair
    (folder / "step.json").write_text(json.dumps(data))
    text = update_readme.render(text, str(tmp_path))
    assert "* **exact against dense** (steps replayed from CUDA graphs) (same mask, element-wise): slower in 1 of 1 " \
           "pairs, at 1.10x dense's step time." in text
    assert text.count("exact against dense") == 1


def test_readme_results_section_is_up_to_date():
    assert update_readme.main(["--check"]) == 0


def test_summary_quotes_timings_only_from_a_gpu():
    def row(contender, optimizer, sparsity, timed_ratio, counted):
        return dict(model="m", contender=contender, optimizer=optimizer, sparsity=sparsity, step_vs_sgd=timed_ratio,
                    counted_flops_vs_sgd=counted, paper_flops_vs_sgd=1.65 if sparsity else 2.0)

    results = {"step": [row("sgd", "SGD", None, 1.0, 1.0), row("sam", "SAM", None, 1.9, 2.0),
                        row("ssam-f 50% dense", "SSAM-F", "50%", 1.7, 2.0),
                        row("ssam-f 50% exact", "SSAM-F", "50%", 1.8, 1.6)],
               "masks": [dict(model="m", update="u", speedup=30.0, meets_target=True)]}
    gpu = {r["what"]: r["figure"] for r in cli.summarize(results, timed=True)}
    assert gpu == {"m sam": "1.90x SGD", "m ssam-f 50% dense (best)": "1.70x SGD", "m u": "30.0x official"}
    cpu = {r["what"]: r["figure"] for r in cli.summarize(results, timed=False)}
    assert cpu == {"m sam": "2.00x SGD FLOPs (counted, not timed)",
                   "m ssam-f 50% exact (best)": "1.60x SGD FLOPs (counted, not timed)"}


def test_budget_structure_rows_compare_every_structure_with_the_top_k():
    rows = bench_budget.structure_rows("tiny_convnet", bench_step.QUICK_WORKLOADS["tiny_convnet"], 8)
    by = {(r["sparsity"], r["structure"]): r for r in rows}
    assert len(rows) == 3 * len(bench_budget.SETTINGS) + 1  # top-k, tensor, budget; 2:4 at 50% only
    for (sparsity, structure), r in by.items():
        s = float(sparsity.rstrip("%")) / 100
        if structure.startswith("unstructured"):
            assert r["fisher_mass_vs_topk"] == pytest.approx(1.0) and r["cosine_vs_topk"] == pytest.approx(1.0)
        else:
            assert 0.0 <= r["fisher_mass_vs_topk"] <= 1.0 + 1e-9 and -1e-9 <= r["cosine_vs_topk"] <= 1.0 + 1e-9
        if structure != "2:4":
            assert r["density"] <= 1 - s + 1e-9
        if structure == "budget":  # within the paper's column, by the cost model torch's counter checks
            assert r["step_flops_vs_sgd"] <= r["paper_flops_vs_sgd"] + 1e-12
    assert ("50%", "2:4") in by and ("90%", "2:4") not in by


def test_budget_accuracy_runs_count_their_step_flops():
    runs = bench_budget.ACCURACY_RUNS
    assert bench_budget.step_flops(runs["SGD"]) == 1.0
    assert bench_budget.step_flops(runs["SAM"]) == pytest.approx(2.0, abs=1e-12)
    assert bench_budget.step_flops(runs["SAM, ascent on 50% of the batch"]) == pytest.approx(1.5, abs=1e-12)
    assert bench_budget.step_flops(runs["SSAM-F 90% budget, exact"]) <= 1.36 + 1e-12
    assert bench_budget.step_flops(runs["SSAM-D 90% budget, exact"]) <= 1.36 + 1e-12


def test_commit_stamp_comes_from_the_projects_own_repository(tmp_path, monkeypatch):
    """A copy of the project without its ``.git`` inside another repository (as on the first
    GPU machine) stamps "unknown", not the enclosing repository's commit, unless SSAM_COMMIT
    names it."""
    import subprocess

    from ssam_bench.common import git_commit

    monkeypatch.delenv("SSAM_COMMIT", raising=False)

    def git(cwd, *args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                              capture_output=True, text=True).stdout.strip()

    outer = tmp_path / "outer"
    (outer / "copy").mkdir(parents=True)
    git(outer, "init", "-q")
    (outer / "f").write_text("x")
    git(outer, "add", "f")
    git(outer, "commit", "-q", "-m", "outer")
    assert git_commit(str(outer)) == git(outer, "rev-parse", "--short", "HEAD")
    assert git_commit(str(outer / "copy")) == "unknown"
    assert git_commit(str(tmp_path / "nowhere")) == "unknown"
    git(outer / "copy", "init", "-q")  # the copy's own repository, one commit, then a change
    (outer / "copy" / "g").write_text("y")
    git(outer / "copy", "add", "g")
    git(outer / "copy", "commit", "-q", "-m", "own")
    assert git_commit(str(outer / "copy")) == git(outer / "copy", "rev-parse", "--short", "HEAD")
    (outer / "copy" / "g").write_text("z")
    assert git_commit(str(outer / "copy")).endswith("-dirty")
    monkeypatch.setenv("SSAM_COMMIT", "abc1234")
    assert git_commit(str(tmp_path / "nowhere")) == "abc1234"


GPU_CHECK = __import__("pathlib").Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
# a step's line: the timeout it runs under, the one it declares, whether it is optional
GPU_CHECK_STEP = r"^== (\S+) \(timeout (\d+) s of (\d+) s declared(, optional)?\)"


def test_gpu_check_parts_each_fit_one_device_slot(tmp_path):
    """Every part of benchmarks/gpu_check.sh is bounded by its steps' timeouts at 8 minutes (a
    device command may run 10, a session has 15 in all), and --help names each part. The dry run
    lowers a timeout to the budget left, so the sum of what it prints always fits: the required
    steps' declared timeouts must fit on their own, none of them capped."""
    import re
    import subprocess

    script = GPU_CHECK
    help_text = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, check=True).stdout
    parts = re.search(r'^parts="([^"]+)"', script.read_text(), re.M).group(1).split()
    assert {"tests", "step-resnet18", "step-large", "step-24", "ops", "masks"} <= set(parts)
    for part in parts:
        assert re.search(rf"^  {re.escape(part)}\s", help_text, re.M), f"--help does not describe {part}"
        dry = subprocess.run(["bash", str(script), part, str(tmp_path / part)], capture_output=True, text=True,
                             env={**__import__("os").environ, "GPU_CHECK_DRY_RUN": "1"}, check=True).stdout
        steps = re.findall(GPU_CHECK_STEP, dry, re.M)
        limits = [int(limit) for _, limit, _, _ in steps]
        assert len(limits) >= (1 if part == "build" else 2) and sum(limits) <= 8 * 60, \
            f"{part}: steps {limits} may take {sum(limits)} s"
        required = [(name, int(limit), int(declared)) for name, limit, declared, optional in steps if not optional]
        assert sum(declared for _, _, declared in required) <= 8 * 60, f"{part}: required steps {required}"
        assert all(limit == declared for _, limit, declared in required), f"{part}: a required step capped: {required}"
        assert "SKIPPED" not in dry, dry
        # a device run returns at most 8 files: one log per step (optional ones too) and results.tgz
        logs = len(re.findall(r"^== \S+ (\(timeout|not run)", dry, re.M))
        assert logs + 1 <= 8, f"{part}: {logs} logs and the results archive"
    bad = subprocess.run(["bash", str(script), "no-such-part", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown part" in bad.stderr
    # `first`: the time left after its required steps goes to its optional ones, said to be optional
    dry = subprocess.run(["bash", str(script), "first", str(tmp_path / "first")], capture_output=True, text=True,
                         env={**__import__("os").environ, "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_BUDGET_S": "700"},
                         check=True).stdout
    assert [(name, optional) for name, _, _, optional in re.findall(GPU_CHECK_STEP, dry, re.M)][-2:] == [
        ("first-perturb", ", optional"), ("first-step-gpt2", ", optional")]


def _fake_bin(tmp_path, **scripts):
    """A folder of stand-in commands (name -> bash body), to put first on PATH."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


def test_gpu_check_says_the_commit_stamp_and_warns_when_unknown(tmp_path):
    """A part starts with the commit its results will be stamped with (ssam_bench's rule), and a
    loud warning where that is "unknown" (a copy without .git, SSAM_COMMIT unset)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "SSAM_COMMIT"}
    env["GPU_CHECK_DRY_RUN"] = "1"

    def first_lines(**extra):
        out = subprocess.run(["bash", str(GPU_CHECK), "build", str(tmp_path / "log")], capture_output=True, text=True,
                             env={**env, **extra}, check=True).stdout
        return out[:out.index("== build (")]

    given = first_lines(SSAM_COMMIT="abc1234")
    assert given == "== build: results stamped commit abc1234\n"
    # no git repository to read (as on the device machine's copy): git fails
    nogit = _fake_bin(tmp_path, git="exit 128")
    unknown = first_lines(PATH=f"{nogit}:{env['PATH']}")
    assert unknown.startswith("== build: results stamped commit unknown\n")
    assert "WARNING" in unknown and "SSAM_COMMIT=<stamp> in its command" in unknown and "benchmarks/stamp.py" in unknown


def test_gpu_check_limits_omp_threads_to_the_pytest_commands(tmp_path):
    """OMP_NUM_THREADS=2 is for pytest -n 8's workers: the benchmarks (their CPU-side official
    baselines) run with every core. A real run of `first` with python3 standing in records each
    command's OMP_NUM_THREADS."""
    import os
    import subprocess

    record = tmp_path / "record"
    fake = _fake_bin(tmp_path, python3=f'echo "OMP=${{OMP_NUM_THREADS-unset}} $*" >> {record}')
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GPU_CHECK_DRY_RUN")}
    run = subprocess.run(["bash", str(GPU_CHECK), "first", str(tmp_path / "log")], capture_output=True, text=True,
                         env={**env, "PATH": f"{fake}:{env['PATH']}", "SSAM_COMMIT": "abc1234"}, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = record.read_text().splitlines()
    tests = [line for line in lines if "-m pytest" in line]
    benches = [line for line in lines if "-m ssam_bench." in line]
    assert len(tests) == 1 and len(benches) == 5, lines  # (the optional ones ran: the stand-ins take no time)
    assert tests[0].startswith("OMP=2 ") and all(line.startswith("OMP=unset ") for line in benches), lines


def test_the_whole_suite_on_a_gpu_says_how_to_split_it():
    p = cli.parser()
    cuda = torch.device("cuda")
    assert "gpu_check.sh" in cli.split_note("all", p.parse_args([]), cuda)
    assert cli.split_note("all", p.parse_args(["--quick"]), cuda) is None
    assert cli.split_note("step", p.parse_args(["step"]), cuda) is None
    assert cli.split_note("all", p.parse_args([]), CPU) is None


def test_results_of_parts_merge_by_model(tmp_path):
    """Step rows written by separate runs (one GPU slot each) add up to one table: a run
    replaces the rows of the models it measured and keeps the others, each row stamped with the
    run that measured it; results of another device are not mixed in."""
    from ssam_bench.common import merge_rows, runs_note, write_results

    first = {"device": "GPU A", "commit": "aaa", "date": "2026-01-01T00:00:00Z"}
    write_results("step", first, [{"model": "m1", "x": 1}, {"model": "m2", "x": 2}], "", str(tmp_path))
    second = {"device": "GPU A", "commit": "bbb", "date": "2026-01-02T00:00:00Z"}
    rows = merge_rows(str(tmp_path / "step.json"), [{"model": "m2", "x": 20}, {"model": "m3", "x": 30}], second, "model")
    assert [(r["model"], r["x"], r["commit"]) for r in rows] == [("m1", 1, "aaa"), ("m2", 20, "bbb"), ("m3", 30, "bbb")]
    assert "2 runs" in runs_note(rows) and "commit aaa" in runs_note(rows)
    other = {"device": "GPU B", "commit": "ccc", "date": "2026-01-03T00:00:00Z"}
    rows = merge_rows(str(tmp_path / "step.json"), [{"model": "m3", "x": 3}], other, "model")
    assert [(r["model"], r["commit"]) for r in rows] == [("m3", "ccc")] and runs_note(rows) == ""
    # keyed by several columns (step: model and contender), a part replaces only the rows it measured
    third = {"device": "GPU B", "commit": "ddd", "date": "2026-01-04T00:00:00Z"}
    write_results("step", other, [{"model": "m3", "c": "sgd", "x": 1}, {"model": "m3", "c": "sam", "x": 2}], "",
                  str(tmp_path))
    rows = merge_rows(str(tmp_path / "step.json"), [{"model": "m3", "c": "sgd", "x": 10}], third, ("model", "c"))
    assert [(r["c"], r["x"], r["commit"]) for r in rows] == [("sam", 2, "ccc"), ("sgd", 10, "ddd")]
    assert merge_rows(str(tmp_path / "none.json"), [{"model": "m"}], other, "model") == [
        {"model": "m", "commit": "ccc", "date": "2026-01-03T00:00:00Z"}]


def test_perturb_rows_measured_otherwise_are_not_merged_beside_this_runs(tmp_path):
    """A perturb run keeps an earlier run's rows of the lists it did not measure only where they
    were measured as its own (sectors counted, cold L2): rows of 4344f0b counted kept entries in
    a warm L2, and beside new rows their GB/s would mean another thing under one header."""
    from ssam_bench import bench_perturb
    from ssam_bench.common import merge_rows, write_results

    old = {"device": "GPU A", "commit": "aaa", "date": "2026-01-01T00:00:00Z"}
    same = {"weight_writes_counted": "32-byte sectors", "timing": bench_perturb.TIMING}
    write_results("perturb", old, [{"params": "mlp-1M", "dtype": "float32", "gbps": 9.0},
                                   {"params": "resnet18", "dtype": "float32", "gbps": 8.0, **same}], "", str(tmp_path))
    new = {"device": "GPU A", "commit": "bbb", "date": "2026-01-02T00:00:00Z"}
    rows = merge_rows(str(tmp_path / "perturb.json"), [{"params": "vit-b", "dtype": "float32", "gbps": 7.0, **same}],
                      new, bench_perturb.MERGE_ON, bench_perturb.comparable)
    assert [(r["params"], r["commit"]) for r in rows] == [("resnet18", "aaa"), ("vit-b", "bbb")]
    # the 2:4 table likewise: its "fastest GEMM alone" was the tuning's pick before (per call, host included)
    from ssam_bench import bench_ascent_linear

    key = dict(dtype="bfloat16", product="dW mvue")
    write_results("ascent_linear", old, [dict(key, layer="qkv", tokens=8192, fastest_speedup=2.5),
                                         dict(key, layer="qkv", tokens=16384, fastest_speedup=1.1,
                                              fastest_of=bench_ascent_linear.FASTEST_OF)], "", str(tmp_path))
    rows = merge_rows(str(tmp_path / "ascent_linear.json"), [dict(key, layer="mlp_fc1", tokens=8192)], new,
                      bench_ascent_linear.MERGE_ON, bench_ascent_linear.comparable)
    assert [(r["layer"], r["tokens"]) for r in rows] == [("qkv", 16384), ("mlp_fc1", 8192)]


def test_every_results_table_says_what_its_columns_mean():
    """Each table a benchmark writes has a legend line: its columns and which way is better."""
    import pathlib
    import re

    from ssam_bench.common import LEGENDS

    root = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
    names = set()
    for path in root.glob("*.py"):
        names |= set(re.findall(r'report\(\s*"(\w+)"', path.read_text()))
    names |= {"ops", "perturb", "topk_mask", "ascent_linear"}  # reported under a variable name
    assert names and names <= set(LEGENDS), sorted(names - set(LEGENDS))
    assert all("better" in LEGENDS[n] or n in ("flops",) for n in names)


def test_the_step_profile_says_where_each_contenders_time_goes(capsys):
    """profile_step on the tiny convnet (CPU): one block per contender with its wall time, the
    op (kernel) time and count per step, the top ops, and the host ops; labelled a CPU run."""
    from ssam_bench import profile_step

    assert profile_step.main(["--quick", "--top", "4", "--contenders", "sgd", "ssam-f 50% exact budget"]) == 0
    out = capsys.readouterr().out
    assert "# tiny_convnet, batch 16, cpu (CPU run: not GPU figures)" in out
    blocks = [b for b in out.split("=== ")[1:]]
    assert [b.split(":")[0] for b in blocks] == ["sgd", "ssam-f 50% exact budget"]
    for block in blocks:
        lines = block.strip().splitlines()
        assert re.match(r".*: wall [\d.]+ ms/step, CPU op \(no GPU here\) time [\d.]+ ms/step, \d+ aten ops/step$",
                        lines[0])
        assert len([line for line in lines if re.match(r"\s+[\d.]+ ms\s+x\s+[\d.]+\s+aten::", line)]) == 4
        assert lines[-1].startswith("  top host ops (self ms/step): ")
    assert "Optimizer.step#SSAMF.step" in blocks[1] and "SSAMF" not in blocks[0]


@pytest.mark.parametrize("first_run,expect_rc,reran", [
    ('kill -SEGV $$', 3, True),  # a crash: rerun without the planned path, the step still fails
    ('echo "RuntimeError: CUDA error: an illegal memory access was encountered"; exit 1', 3, True),  # sticky
    ('echo "ValueError: no such model"; exit 1', 1, False),  # an ordinary failure: no rerun
    ('echo fine', 0, False),
])
def test_gpu_check_reruns_a_crashed_2_4_benchmark_on_torchs_cusparselt_path(first_run, expect_rc, reran):
    """gpu_check's unplanned_after_crash: a 2:4 benchmark that crashes (a signal, or a CUDA error
    in its output) runs again with SSAM_CUSPARSELT_PLANNED=0 so its table lands, and the step
    still fails (3); other failures and successes pass through."""
    import pathlib
    import re
    import subprocess

    script = (pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh").read_text()
    function = re.search(r"^unplanned_after_crash\(\) \{.*?^\}", script, re.M | re.S).group(0)
    command = f'if [ -n "${{SSAM_CUSPARSELT_PLANNED:-}}" ]; then echo "rerun with $SSAM_CUSPARSELT_PLANNED"; ' \
              f'exit 0; fi; {first_run}'
    out = subprocess.run(["bash", "-c", f'{function}\nunplanned_after_crash bash -c \'{command}\'; echo "rc=$?"'],
                         capture_output=True, text=True, env={k: v for k, v in __import__("os").environ.items()
                                                              if k != "SSAM_CUSPARSELT_PLANNED"}).stdout
    assert f"rc={expect_rc}" in out, out
    assert ("rerun with 0" in out) == reran and ("CRASH" in out) == reran, out


def test_plot_of_a_folder_without_results_fails(tmp_path):
    from ssam_bench import plots

    why = "no step.json or ops.json" if plots.have_matplotlib() else "matplotlib is not installed"
    with pytest.raises(SystemExit, match=why):
        cli.main(["plot", str(tmp_path)])


def test_compile_table_is_written_from_the_tiers_reports(tmp_path):
    """``compile_kernels --table-only`` writes the committed table from the compile tier's
    reports (one per triton version), compiling nothing; options that would compile are refused."""
    from ssam_bench import compile_kernels

    row = dict(kernel="_k_kernel", config="float32 BLOCK=1024", target="sm_90", regs=32, spill_stores=0,
               spill_loads=0, shared=0, loads={"16": 2}, stores={"16": 1}, mma=None, uses_dot=False)
    paths = []
    for version in ("3.9.0", "3.6.0"):
        report = dict(triton=version, torch="2.13.0", commit="abc1234", launches=1, recorded=1, seconds=1.0, jobs=2,
                      not_compiled=[], rows=[row])
        paths.append(tmp_path / f"r{version}.json")
        paths[-1].write_text(json.dumps(report))
    md = tmp_path / "compile.md"
    assert compile_kernels.main(["--table-only", "--merge", str(paths[0]), "--merge", str(paths[1]),
                                 "--md", str(md)]) == 0
    text = md.read_text()
    assert "## triton 3.9.0" in text and "## triton 3.6.0" in text
    assert text.count("| _k_kernel | float32 BLOCK=1024 | sm_90 | 32 | 0/0 | 0 | 16B×2 | 16B×1 | - |") == 2
    with pytest.raises(SystemExit) as exit_info:
        compile_kernels.main(["--table-only", "--merge", str(paths[0]), "--md", str(md), "--json", str(tmp_path / "j")])
    assert exit_info.value.code == 2
