"""The step-ratio table: the paper's Tables 1-3 (FLOPs relative to SGD) beside what a step
really costs.

For SGD, SAM, SSAM-F and SSAM-D at sparsity 50/80/90/95/98/99% and 2:4, in each
``ascent_backward`` mode, and the compute-aware ``"budget"`` mask (SSAM-F's from the
Fisher, SSAM-D's random rows) with the exact backward at every unstructured sparsity
(``... exact budget``; at 95% and above with the ascent pass on half the batch,
``ascent_fraction=0.5``: the paper's column is below a full-batch ascent forward there), on
CIFAR ResNet-18 (batch 128),
WideResNet-28-10 (batch 128), ResNet-50 (batch 64, 224x224), ViT-S/16 (batch 64) and the 12
blocks of GPT-2 small (2k, 8k and 16k tokens). Per contender:

* ``step / SGD``: median time of ``zero_grad(); step(closure)`` (SGD: forward, backward,
  ``step()`` of ``torch.optim.SGD(fused=True)``, torch's fastest SGD, as SAM's second step
  fuses its update too; rows without ``sgd_baseline`` in the JSON, measured before it, used
  ``foreach=True``) over an SGD step measured in the same interleaved loop (CUDA events); the
  closure runs the pass at ``w + e`` inside ``ssam.frozen_batchnorm_stats``, the README's
  recipe (BatchNorm's statistics move once a step, as in SGD, and that pass launches no
  statistics updates);
* ``counted FLOPs / SGD``: ``FlopCounterMode`` over one step as it runs here (a cuSPARSELt
  product counts half the dense one; the exact mode's masked weight gradient counts the rows
  that hold a masked entry, whichever backend runs it);
* ``ops / SGD``: the dispatcher ops of that step that run work on the device (each launches at
  least one kernel on a GPU; views and bare allocations left out), counted in the same pass:
  where a GPU waits for its host, the step's time follows these more than its FLOPs;
* the paper's FLOPs column (SAM 2x; SSAM 1.65x at 50% and 2:4 ... 1.30x at 99%);
* peak memory of the contender alone (model, gradients, optimizer state, activations).

``--graphs captured`` times every contender, SGD included, a second way: the whole step
captured once in a CUDA graph after a warm-up and replayed (the ``launch`` column), so the
ratio is the GPU's work alone, without the host's launches. On a GPU fast enough to wait for
its host (ResNet-18 at batch 128 on an H200: an SGD step's 480 kernels ran for 5.9 ms of a
10 ms step), the eager ratio counts launches and the captured one the work. Each captured
contender is timed against the replayed SGD (interleaved) as it comes and its graph let go, so
one step's graph memory lives at a time beside SGD's. A contender whose capture fails says why
in its row; an MVUE mode's row says its draws are fixed at capture (the seed is drawn on the host).

Inputs are synthetic (random images and labels, random hidden states with a squared-output
loss), so only the timing means anything; on a GPU every model runs under bf16 autocast, and
the convolutional networks (their weights and images) in ``channels_last``, the layout cuDNN's
convolutions take without converting (the ``layout`` column).
Masks are fixed while timing: SSAM-F's from the empirical Fisher on 128 samples, SSAM-D's
its random initial one. Mask updates are measured by ``ssam-bench masks``. Attention
projections inside ``nn.MultiheadAttention`` (ViT) keep dense autograd; convolutions are
reached by ``exact`` only (row-sparse weight gradient), the other sparse ascent modes reach
``nn.Linear`` layers only.

Without a GPU the real models are only FLOP-counted (batch 2, GPT-2 at 2 x 128 tokens; ratios
are batch-independent up to attention's share), and the timing runs on tiny models,
labelled CPU.

    python -m ssam_bench.bench_step                       # everything (GPU: several minutes)
    python -m ssam_bench.bench_step --models resnet18_cifar --sparsities 0.5 2:4
    python -m ssam_bench.bench_step --quick               # tiny models, 3 sparsities
    python -m ssam_bench.bench_step --models resnet18_cifar --graphs eager captured   # (CUDA)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import ssam
import ssam.ssamf as ssamf_module
from ssam.budget import measure_costs
from ssam.models import DigitsNet, GPTStack, ViT, gpt2_small_stack, resnet18_cifar, resnet50, vit_small
from ssam.models import wide_resnet28_10
from ssam_bench.common import SGD_BASELINE, SGD_BASELINE_ROW, baseline_sgd, interleaved_samples, report, results_dir, standalone_main
from ssam_kernels import ASCENT_MODES

PAPER_SSAM = {"0.5": 1.65, "0.8": 1.44, "0.9": 1.36, "0.95": 1.33, "0.98": 1.31, "0.99": 1.30, "2:4": 1.65}
SPARSITIES = tuple(PAPER_SSAM)
GRAPHS = ("eager", "captured")
QUICK_SPARSITIES = ("0.5", "0.99", "2:4")
OPTIMIZERS = ("sgd", "sam", "ssam-f", "ssam-d")
# modes run by default: a 2:4 mask is the layout the sparse-tensor-core modes need
DEFAULT_MODES = {"2:4": ASCENT_MODES}
DEFAULT_UNSTRUCTURED_MODES = ("dense", "exact")
# the compute-aware mask ("budget") with the exact backward, per sparsity with its
# ascent_fraction: at 95% and above the paper's column is below the cost of a full-batch
# ascent forward, so the ascent pass there runs on half the batch
BUDGET_SPARSITIES = {"0.5": 1.0, "0.8": 1.0, "0.9": 1.0, "0.95": 0.5, "0.98": 0.5, "0.99": 0.5}


@dataclass(frozen=True)
class Workload:
    """A model and its synthetic batch. ``inputs(batch, gen, device)`` -> (x, y); ``loss(out, y)``."""

    build: Callable[[], torch.nn.Module]
    batch: int
    inputs: Callable[[int, torch.Generator, torch.device], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    count_batch: int  # batch for FLOP counting without a GPU
    fisher_chunk: int = 32
    description: str = ""
    convolutional: bool = False  # on a GPU: model and images channels_last, as cuDNN prefers

    def layout(self, device: torch.device) -> str | None:
        """The memory layout of the model's convolutions and images on ``device`` (None: not
        a convolutional network)."""
        if not self.convolutional:
            return None
        return "channels_last" if device.type == "cuda" else "NCHW"


def _images(shape, classes):
    def make(batch, gen, device):
        x = torch.randn(batch, *shape, generator=gen, device=device)
        return x, torch.randint(0, classes, (batch,), generator=gen, device=device)
    return make


def _tokens(seq, dim):
    def make(batch, gen, device):  # one "sample" is a sequence
        return torch.randn(batch, seq, dim, generator=gen, device=device), torch.zeros(batch, dtype=torch.long, device=device)
    return make


def _cross_entropy(out, y):
    return F.cross_entropy(out.float(), y)


def _squared_output(out, y):  # synthetic regression target: drive the hidden states to 0
    return out.float().square().mean()


def _gpt(seq: int, batch: int, description: str) -> Workload:
    return Workload(gpt2_small_stack, batch, _tokens(seq, 768), _squared_output, count_batch=1, fisher_chunk=4,
                    description=description)


WORKLOADS = {
    "resnet18_cifar": Workload(resnet18_cifar, 128, _images((3, 32, 32), 10), _cross_entropy, 2,
                               description="ResNet-18 (CIFAR stem), batch 128, 32x32", convolutional=True),
    "wrn28_10": Workload(wide_resnet28_10, 128, _images((3, 32, 32), 10), _cross_entropy, 2, 16,
                         description="WideResNet-28-10, batch 128, 32x32", convolutional=True),
    "resnet50": Workload(resnet50, 64, _images((3, 224, 224), 1000), _cross_entropy, 2, 8,
                         description="ResNet-50, batch 64, 224x224", convolutional=True),
    "vit_s16": Workload(vit_small, 64, _images((3, 224, 224), 1000), _cross_entropy, 2, 8,
                        description="ViT-S/16, batch 64, 224x224"),
    "gpt2_small_2k": _gpt(1024, 2, "GPT-2 small blocks, 2 x 1024 tokens"),
    "gpt2_small_8k": _gpt(1024, 8, "GPT-2 small blocks, 8 x 1024 tokens"),
    "gpt2_small_16k": _gpt(1024, 16, "GPT-2 small blocks, 16 x 1024 tokens"),
}
# without a GPU the GPT-2 stack is counted at 128 tokens (one entry is enough: same model)
CPU_COUNT_GPT = _gpt(128, 2, "GPT-2 small blocks, 2 x 128 tokens (counting: a sub-batch ascent needs 2)")
QUICK_WORKLOADS = {
    "tiny_convnet": Workload(DigitsNet, 16, _images((1, 8, 8), 10), _cross_entropy, 16,
                             description="digits conv net, batch 16, 8x8", convolutional=True),
    "tiny_vit": Workload(lambda: ViT(32, 8, 64, 2, 2, 10), 8, _images((3, 32, 32), 10), _cross_entropy, 8,
                         description="ViT dim 64 depth 2, batch 8, 32x32"),
    "tiny_gpt": Workload(lambda: GPTStack(64, 2, 2), 2, _tokens(128, 64), _squared_output, 2,
                         description="GPT blocks dim 64 depth 2, 2 x 128 tokens"),
}


@dataclass(frozen=True)
class Contender:
    optimizer: str  # one of OPTIMIZERS
    sparsity: str | None = None  # a SPARSITIES key
    mode: str | None = None
    budget: bool = False  # structure="budget" (with mode "exact")
    ascent_fraction: float = 1.0
    captured: bool = False  # timed as the replay of a CUDA graph of the whole step

    @property
    def name(self) -> str:
        graph = " graph" if self.captured else ""
        if self.sparsity is None:
            return self.optimizer + graph
        return f"{self.optimizer} {_sparsity_label(self.sparsity)} {self.mode}" + (" budget" if self.budget else "") + (
            f" ascent {self.ascent_fraction:.0%}" if self.ascent_fraction < 1.0 else "") + graph

    @property
    def sgd(self) -> "Contender":
        """The SGD step this contender is compared with: timed the same way (eager or replayed)."""
        return Contender("sgd", captured=self.captured)

    @property
    def mode_label(self) -> str | None:
        if self.mode is None:
            return None
        return self.mode + (", budget mask" if self.budget else "") + (
            f", ascent on {self.ascent_fraction:.0%} of the batch" if self.ascent_fraction < 1.0 else "")

    @property
    def paper(self) -> float:
        return {"sgd": 1.0, "sam": 2.0}.get(self.optimizer) or PAPER_SSAM[self.sparsity]


def _sparsity_label(s: str) -> str:
    return s if ":" in s else f"{float(s):.0%}"


def contenders(optimizers, sparsities, modes, graphs=("eager",)) -> list[Contender]:
    """SGD first (the denominator), then SAM, then SSAM-F/-D per sparsity and mode. ``modes``
    None: the default grid (every mode at 2:4, dense and exact elsewhere). Where "exact" runs
    at a sparsity of BUDGET_SPARSITIES, the optimizer also runs with the "budget" structure.
    ``graphs``: "eager" and/or "captured"; each gives the whole list, its own SGD first."""
    out = []
    for graph in graphs:
        captured = graph == "captured"
        out += [Contender("sgd", captured=captured)] + (
            [Contender("sam", captured=captured)] if "sam" in optimizers else [])
        for opt in ("ssam-f", "ssam-d"):
            if opt not in optimizers:
                continue
            for s in sparsities:
                for mode in modes or DEFAULT_MODES.get(s, DEFAULT_UNSTRUCTURED_MODES):
                    out.append(Contender(opt, s, mode, captured=captured))
                    if mode == "exact" and s in BUDGET_SPARSITIES:
                        out.append(Contender(opt, s, mode, budget=True, ascent_fraction=BUDGET_SPARSITIES[s],
                                             captured=captured))
    return out


def build_optimizer(c: Contender, model, workload: Workload, device, fisher_samples: int):
    base = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
    if c.optimizer == "sgd":
        return baseline_sgd(model.parameters(), **base)
    if c.optimizer == "sam":
        return ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **base)
    nm = ":" in c.sparsity
    # implicit runs on sparse tensor cores only with 2:4 groups along W's output dim
    structure = ("2:4:out" if c.mode == "implicit" else "2:4") if nm else "budget" if c.budget else "unstructured"
    common = dict(rho=0.05, sparsity=None if nm else float(c.sparsity), structure=structure,
                  norm="masked" if c.mode == "exact" else "full", ascent_backward=c.mode, seed=0,
                  ascent_fraction=c.ascent_fraction, **base)
    if c.optimizer == "ssam-d":
        if c.budget:  # SSAM-D does not see the model: its costs come from one sample
            sample, _ = workload.inputs(1, torch.Generator(device=device).manual_seed(1), device)
            common["ascent_costs"] = measure_costs(model, list(model.parameters()), sample)
        return ssam.SSAMD(model.parameters(), torch.optim.SGD, drop_rate=0.5, T_end=10, **common)
    opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, num_samples=fisher_samples, update_freq=1,
                     fisher_chunk_size=workload.fisher_chunk, **common)
    gen = torch.Generator(device=device).manual_seed(1)
    opt.update_mask(model, [workload.inputs(fisher_samples, gen, device)], loss_fn=workload.loss)
    return opt


@contextlib.contextmanager
def fisher_once():
    """SSAM-F's Fisher scores computed once for all of a workload's contenders: each starts
    from the same freshly seeded model and draws the same samples with the same seed, so their
    scores are the same (and this benchmark times steps, not mask updates: ``masks`` does).
    Each contender gets its own copy (the selection may work in place)."""
    original, memo = ssamf_module.empirical_fisher, []

    def cached(*args, **kwargs):
        if not memo:
            memo.append(original(*args, **kwargs))
        return [f.clone() for f in memo[0]]

    def nbytes() -> int:  # what the kept scores hold on the device (not a contender's memory)
        return sum(f.numel() * f.element_size() for f in memo[0]) if memo else 0

    ssamf_module.empirical_fisher = cached
    try:
        yield nbytes
    finally:
        ssamf_module.empirical_fisher = original


def make_step(model, opt, x, y, loss_fn, autocast: bool, captured: bool = False) -> Callable[[], None]:
    sam = isinstance(opt, ssam.SAM)

    def closure():
        xb, yb = opt.batch(x, y) if sam else (x, y)  # the ascent pass may take a part
        # (a graph replays autocast's casts of the weights only without autocast's cache)
        # the README's recipe: BatchNorm's statistics move once a step, from the pass at w
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast, cache_enabled=not captured), \
                ssam.frozen_batchnorm_stats(model, enabled=sam and opt.perturbed):
            loss = loss_fn(model(xb), yb)
        loss.backward()
        return loss

    def step():
        opt.zero_grad(set_to_none=True)
        if sam:
            opt.step(closure)  # runs the ascent pass itself, in its ascent_backward mode
        else:
            closure()
            opt.step()

    return step


def capture_step(step: Callable[[], None], device: torch.device, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``step`` (a whole step: both passes and the optimizer's), made the way
    torch's whole-network capture is: ``warmup`` steps on a side stream (the optimizer's plan,
    its buffers and tables, cuDNN's and Triton's choices), then the capture on that stream (which
    runs nothing). The step sets the gradients to None first, so those it makes come from the
    graph's memory pool."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        step()
    return graph


def _first_line(exc: BaseException, limit: int = 100) -> str:
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


class _Replay:
    """Replays a captured step; holds what the graph writes (model, optimizer, inputs: the
    graph holds their addresses, not references)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, step: Callable[[], None]):
        self.graph, self.step = graph, step

    def __call__(self) -> None:
        self.graph.replay()


def counted_flops(fn) -> int:
    return counted(fn)[0]


# ops that launch no kernel: allocations, and the profiler's record_function markers that
# torch.optim's step() enters (views are told apart by their schema)
_NO_KERNEL = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
                        "_record_function_enter", "_record_function_enter_new", "_record_function_exit"})


class _OpCounter(TorchDispatchMode):
    """Counts the dispatcher ops of a call that run work on the device: each launches at least
    one kernel on a GPU (views and bare allocations left out)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.__name__.split(".")[0] not in _NO_KERNEL:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def counted(fn) -> tuple[int, int]:
    """(FLOPs, ops) of one call of ``fn``: ``FlopCounterMode``'s total (the sparse GEMMs count
    half of 2 m n k: ``ssam_kernels.sparse_gemm`` registers their formula) and
    :class:`_OpCounter`'s."""
    with FlopCounterMode(display=False) as counter, _OpCounter() as ops:
        fn()
    return counter.get_total_flops(), ops.ops


def bench_workload(name: str, workload: Workload, specs: list[Contender], device, reps: int, timed: bool,
                   batch: int, progress=None, checkpoint=None) -> list[dict]:
    """Rows for one workload. ``timed`` False: FLOP counts only. ``checkpoint(rows)``, where
    given, gets the eager contenders' rows once they are timed, before the captured ones: the
    eager steps, the table's headline, are kept should a time limit cut the captures short."""
    cuda = device.type == "cuda"
    layout = workload.layout(device)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(0)
    x, y = workload.inputs(batch, gen, device)
    x = x.contiguous(memory_format=memory_format)
    fisher_samples = 128 if cuda else 4
    rows: dict[str, dict] = {}
    # captured steps are timed as they come, each against the replayed SGD, and let go: each
    # graph holds a whole step's memory for as long as it lives
    sgd_replay, paired, samples = None, {}, {}
    with fisher_once() as fisher_nbytes:
        def prepare(c: Contender):
            """The contender's row (its FLOPs, ops and, after its warm steps, peak memory) and
            its step, warm."""
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
            torch.manual_seed(0)
            model = workload.build().to(device, memory_format=memory_format)
            kept = fisher_nbytes()
            opt = build_optimizer(c, model, workload, device, fisher_samples)
            if cuda:  # the peak from here on: steps, not the one-off Fisher of SSAM-F's mask
                base += fisher_nbytes() - kept  # (the scores kept for the next contenders, where made now)
                torch.cuda.reset_peak_memory_stats(device)
            step = make_step(model, opt, x, y, workload.loss, autocast=cuda, captured=c.captured)
            launch = "eager"
            if c.captured:  # (an MVUE seed is drawn on the host: the capture keeps the one it saw)
                launch = "CUDA graph" + (", MVUE draws fixed at capture" if c.mode in ("mvue", "mvue_dx") else "")
            row = dict(model=name, batch=batch, layout=layout, launch=launch,
                       optimizer=c.optimizer.upper(),
                       sparsity=c.sparsity and _sparsity_label(c.sparsity),
                       mode=c.mode_label, contender=c.name, step_ms=None, step_vs_sgd=None, counted_gflop=None,
                       counted_flops_vs_sgd=None, paper_flops_vs_sgd=c.paper, peak_gib=None, timed=timed,
                       sgd_baseline=SGD_BASELINE_ROW)
            step()  # warm: the optimizer's state and plan, Triton's compiles, sparse_mm_24's GEMM choice
            if timed:
                step()
            flops, row["ops"] = counted(step)  # (a warm step's ops: a first step's make the state)
            row["counted_gflop"] = flops / 1e9
            return row, step, opt, base if cuda else 0

        def finish(c: Contender, row: dict, opt, base: int) -> None:
            if timed and cuda:
                torch.cuda.synchronize(device)
                row["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
            if not c.captured or c.optimizer != "sgd":  # (the SGD graph writes its gradients: kept)
                opt.zero_grad(set_to_none=True)
            rows[c.name] = row
            if progress is not None:
                progress.update(1)

        steps = {}
        for c in [c for c in specs if not c.captured]:
            row, step, opt, base = prepare(c)
            if timed:
                steps[c.name] = step
            finish(c, row, opt, base)
            del row, step, opt
        if steps:  # every eager step in one interleaved loop, then let go
            samples.update(interleaved_samples(steps, device, warmup=3, reps=reps))
            _fill_times(specs, rows, samples, paired, captured=False)
            _ratios(specs, rows)
            if checkpoint is not None and any(c.captured for c in specs):
                checkpoint([rows[c.name] for c in specs if c.name in rows])
        steps.clear()
        for c in [c for c in specs if c.captured]:
            row, step, opt, base = prepare(c)
            if timed:
                try:
                    replay = _Replay(capture_step(step, device), step)
                except RuntimeError as exc:  # reported in its row; the other contenders go on
                    row["launch"] = f"CUDA graph: capture failed: {_first_line(exc)}"
                    replay = None
                if c.optimizer == "sgd":
                    sgd_replay = replay
                elif replay is not None and sgd_replay is not None:
                    pair = interleaved_samples({"sgd": sgd_replay, "mine": replay}, device, warmup=3, reps=reps)
                    paired[c.name] = (pair["mine"], pair["sgd"])
                del replay
            finish(c, row, opt, base)
            del row, step, opt
        sgd_replay = None
    if paired:  # the replayed SGD: every round it ran beside a captured contender
        samples[Contender("sgd", captured=True).name] = [t for _, s in paired.values() for t in s]
    _fill_times(specs, rows, samples, paired, captured=True)
    _ratios(specs, rows)
    return [rows[c.name] for c in specs]


def _ratios(specs: list[Contender], rows: dict[str, dict]) -> None:
    """Counted FLOPs and ops over SGD's (an SGD counted already: eager and captured count alike)."""
    sgd = next(rows[c.name] for c in specs if c.optimizer == "sgd" and c.name in rows)
    for row in rows.values():
        row["counted_flops_vs_sgd"] = row["counted_gflop"] / sgd["counted_gflop"]
        row["ops_vs_sgd"] = row["ops"] / sgd["ops"]


def _fill_times(specs: list[Contender], rows: dict[str, dict], samples: dict, paired: dict, captured: bool) -> None:
    """The timings of the rows of the captured contenders (``captured``) or of the eager ones: a
    captured contender against the SGD rounds it ran beside, the others against theirs."""
    for c in specs:
        if c.captured != captured or c.name not in rows:
            continue
        row = rows[c.name]
        mine, sgd_samples = paired.get(c.name) or (samples.get(c.name), samples.get(c.sgd.name))
        if mine is None or sgd_samples is None:  # its capture or SGD's failed
            continue
        row["step_ms"] = statistics.median(mine) * 1e3
        row["sgd_ms"] = statistics.median(sgd_samples) * 1e3  # (its own: a merged table holds several runs)
        row["step_vs_sgd"] = statistics.median(mine) / statistics.median(sgd_samples)
        # the spread of the ratio, round by round (a contender and SGD timed side by side)
        q1, _, q3 = statistics.quantiles([t / s for t, s in zip(mine, sgd_samples)], n=4)
        row["step_vs_sgd_iqr"] = q3 - q1


COLUMNS = [("model", "model", ""), ("batch", "batch", "d"), ("layout", "layout", ""), ("launch", "launch", ""),
           ("optimizer", "optimizer", ""),
           ("sparsity", "sparsity", ""),
           ("mode", "ascent_backward", ""), ("step_ms", "step ms", ".2f"), ("sgd_ms", "its SGD ms", ".2f"), ("step_vs_sgd", "step / SGD", ".3f"),
           ("step_vs_sgd_iqr", "IQR", ".3f"),
           ("counted_flops_vs_sgd", "counted FLOPs / SGD", ".3f"), ("ops_vs_sgd", "ops / SGD", ".2f"),
           ("paper_flops_vs_sgd", "paper FLOPs / SGD", ".2f"),
           ("peak_gib", "peak GiB", ".2f"), ("sgd_baseline", "SGD", "")]


def plan(args, device) -> list[tuple[str, Workload, bool, int]]:
    """(name, workload, timed, batch) in run order. Without a GPU the real models are only
    FLOP-counted (at a small batch) and the tiny ones are timed."""
    cuda = device.type == "cuda"
    names = args.models or (list(QUICK_WORKLOADS) if args.quick else list(WORKLOADS))
    out, counted_gpt = [], False
    for n in names:
        if n in QUICK_WORKLOADS:
            out.append((n, QUICK_WORKLOADS[n], True, QUICK_WORKLOADS[n].batch))
        elif args.quick:
            raise ValueError(f"--models {n}: --quick runs only the tiny workloads ({', '.join(QUICK_WORKLOADS)})")
        elif cuda:
            out.append((n, WORKLOADS[n], True, WORKLOADS[n].batch))
        elif not n.startswith("gpt2"):
            out.append((n, WORKLOADS[n], False, WORKLOADS[n].count_batch))
        elif not counted_gpt:  # one count covers the GPT-2 token counts: same model
            out.append(("gpt2_small_128tok", CPU_COUNT_GPT, False, CPU_COUNT_GPT.batch))
            counted_gpt = True
    if not cuda and not any(timed for _, _, timed, _ in out):
        out += [(n, w, True, w.batch) for n, w in QUICK_WORKLOADS.items()]
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", choices=list(WORKLOADS) + list(QUICK_WORKLOADS), default=None,
                   help="workloads (default: all; --quick: the tiny ones)")
    p.add_argument("--sparsities", nargs="+", choices=SPARSITIES, default=None,
                   help=f"default: all ({' '.join(SPARSITIES)}); --quick: {' '.join(QUICK_SPARSITIES)}")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS[1:], default=list(OPTIMIZERS[1:]),
                   help="SGD always runs: it is the denominator")
    p.add_argument("--modes", nargs="+", choices=ASCENT_MODES, default=None,
                   help="ascent_backward modes at every sparsity (default: all five at 2:4, dense and exact elsewhere)")
    p.add_argument("--graphs", nargs="+", choices=GRAPHS, default=["eager"],
                   help="how steps launch: eager (default), and/or captured: every step, SGD's too, replayed "
                        "from a CUDA graph (the GPU's time without the host's launches; CUDA only)")


def run(args, device, progress_factory=None) -> list[dict]:
    """The rows of every workload. Where the run writes (``args.out``, or results/<device>/ on a
    GPU), each workload's rows are written (merged) as soon as it is measured, and its eager
    contenders' before its captures: a run stopped by its time limit keeps what it measured."""
    sparsities = args.sparsities or (QUICK_SPARSITIES if args.quick else SPARSITIES)
    graphs = getattr(args, "graphs", None) or ["eager"]
    if "captured" in graphs and device.type != "cuda":
        raise ValueError(f"--graphs captured needs a CUDA device (CUDA graphs), not {device}")
    specs = contenders(set(args.optimizers), sparsities, args.modes, graphs)
    runs = plan(args, device)
    reps = 5 if args.quick else 20
    bar = progress_factory(total=len(specs) * len(runs), desc="step") if progress_factory else None
    rows = []
    out = getattr(args, "out", None)
    def write_quietly(part):  # (printed once, by the caller's write, at the end)
        with contextlib.redirect_stdout(io.StringIO()):
            write(part, device, out, partial=True)

    save = write_quietly if results_dir(device, out) else None
    for name, workload, timed, batch in runs:
        rows += bench_workload(name, workload, specs, device, reps, timed, batch, bar,
                               save and (lambda timed_rows: save(rows + timed_rows)))
        if save is not None:
            save(rows)
    if bar is not None:
        bar.close()
    return rows


def write(rows, device, out, partial: bool = False) -> dict:
    cuda = device.type == "cuda"
    # merged by contender: a part that measures some of a model's contenders keeps the others'
    return report("step", "Step time and FLOPs relative to SGD" + (" (partial: the run goes on)" if partial else ""),
                  rows, COLUMNS, device, out,
                  merge_on=("model", "contender"), meta_extra=dict(sgd_baseline=SGD_BASELINE),
                  note=" (synthetic inputs" + (", bf16 autocast)" if cuda else
                                                "; real models FLOP-counted only, tiny models timed)"))


def main(argv=None) -> int:
    return standalone_main(__doc__, add_arguments, run, write, argv, quick_help="tiny models, 3 sparsities, few repetitions")


if __name__ == "__main__":
    sys.exit(main())
