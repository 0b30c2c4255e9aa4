"""Dense vs 2:4-sparse GEMMs of the ascent backward, per layer shape, with the sparsify+compress
cost counted.

For each linear layer ``[out, in]`` at ``T`` tokens, the three products the ascent modes make
sparse (``A`` is the 2:4 operand, its contraction dim is the 2:4 one):

* ``dW`` (``mvue``):   ``MVUE(dYᵀ) [out, T] @ X [T, in]``
* ``dX`` (``mvue_dx``): ``MVUE(dY) [T, out] @ W [out, in]``
* ``dX`` (``implicit``): ``(W ⊙ M)ᵀ [in, out] @ dYᵀ [out, T]``

Each row: the dense GEMM, the cuSPARSELt GEMM on an already compressed operand in its tuned
configuration (:func:`ssam_kernels.sparse_gemm.tune`: through torch's ``_cslt_*`` ops, which
make cuSPARSELt's plan on every call, and through the extension's kept plans ("planned"); on
each, cuSPARSELt's default and searched algorithm, each with and without ``transpose_result``;
every configuration tried is listed with its rate against dense), and the sparse path as the
backward pays for it (MVUE draw or masking, compression on the configuration's path, GEMM), as
median GPU times (the GPU kept busy while the host launches each call, so a call's host work,
such as torch's per-call cuSPARSELt plan, is not in them: the tuning's trials, listed per
configuration, are per call, host included) and dense-equivalent TFLOP/s (``2 m n k`` over the
time), beside the dense bf16 matmul rate measured in the same run. Shapes: ViT-B/16 and GPT-2-small layers
(d = 768, MLP 3072, QKV 2304) at 8k-32k tokens.

    python -m ssam_bench.bench_ascent_linear            # bf16 and fp16, 8k/16k/32k tokens
    python -m ssam_bench.bench_ascent_linear --quick    # one shape (on a CPU: dense only, labelled CPU)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys

import torch

from ssam_bench.common import CONDITIONS, OUT_HELP, interleaved_medians, matmul_ceiling, quick_out, report, results_dir

import ssam_kernels as sk
from ssam_kernels.sparse_gemm import (compress, cslt_mm, cusparselt_unsupported, planned_unavailable, tune, tuned_config,
                                      tuned_configs)

# (name, in, out): the distinct linear shapes of ViT-B/16 and GPT-2 small (both d = 768)
LAYERS = [("qkv", 768, 2304), ("attn_out", 768, 768), ("mlp_fc1", 768, 3072), ("mlp_fc2", 3072, 768)]
TOKENS = [8192, 16384, 32768]


def products(layer_in: int, layer_out: int, tokens: int, device, dtype, gen):
    """(name, dense A, B, make-sparse-A) for the three products of the module docstring."""
    x = torch.randn(tokens, layer_in, device=device, dtype=dtype)
    w = torch.randn(layer_out, layer_in, device=device, dtype=dtype)
    dy = torch.randn(tokens, layer_out, device=device, dtype=dtype)
    mask = sk.nm_mask(torch.randn(layer_in, layer_out, device=device, generator=gen), 2, 4)  # 2:4 along out of W
    dyt = dy.t().contiguous()
    wt = w.t().contiguous()
    return [
        ("dW mvue", dyt, x, lambda: sk.mvue24(dyt, seed=1)),
        ("dX mvue_dx", dy, w, lambda: sk.mvue24(dy, seed=2)),
        ("dX implicit", wt, dy.t(), lambda: wt * mask),
    ]


def gpu_kernel(config) -> tuple:
    """What the GPU runs for a configuration: its algorithm, split-k, mode and result layout
    (the path, torch's ``_cslt`` ops or the kept plans, is host work)."""
    return config.alg_id, config.split_k, config.split_k_mode, config.transpose_result


def bench(layer, tokens, device, dtype, reps, ceiling, gen) -> list[dict]:
    name, layer_in, layer_out = layer
    rows = []
    for product, a, b, sparsify in products(layer_in, layer_out, tokens, device, dtype, gen):
        m, k = a.shape
        n = b.shape[1]
        flops = 2 * m * n * k
        a24 = sparsify()
        why = cusparselt_unsupported(a24, b)
        fns = {"dense": lambda: a @ b}
        trials, best = {}, None
        if why is None:
            trials = tune(a24, b)  # every configuration tried, timed once; the fastest kept
            best = tuned_config(a24, b)  # (fastest with its path's compression: what auto runs)
            packed = compress(a24, best)
            fns["sparse gemm"] = lambda: cslt_mm(packed, b, best)
            fns["sparse + sparsify + compress"] = lambda: cslt_mm(compress(sparsify(), best), b, best)
            # every configuration's GEMM alone, timed here beside dense with the GPU's time alone:
            # the tuning's trials are per call, host included (torch's path makes a cuSPARSELt
            # plan per call, ~0.8 ms), so their fastest is not the fastest kernel. One per kernel
            # the GPU runs (torch's and the planned path's alike run one configuration's kernel)
            alone = {gpu_kernel(best): best}
            for config in tuned_configs(a24, b).values():
                alone.setdefault(gpu_kernel(config), config)
            for config in alone.values():
                if config != best:
                    fns[config] = (lambda p, c: lambda: cslt_mm(p, b, c))(compress(a24, config), config)
        times = interleaved_medians(fns, device, warmup=3, reps=reps, busy=True)  # the GPU's time alone
        row = dict(layer=name, shape=f"{layer_out}x{layer_in}", tokens=tokens, dtype=str(dtype).split(".")[-1],
                   product=product, gemm_mnk=f"{m}x{n}x{k}", dense_ms=times["dense"] * 1e3,
                   dense_tflops=flops / times["dense"] / 1e12, ceiling_tflops=ceiling / 1e12,
                   sparse_ms=None, sparse_tflops=None, speedup=None, total_ms=None, speedup_total=None,
                   config=None, fastest_speedup=None, fastest_config=None, configs=None, note=why or "",
                   timed="GPU alone" if device.type == "cuda" else "CPU, per call", fastest_of=FASTEST_OF)
        if why is None:
            sparse, total = times["sparse gemm"], times["sparse + sparsify + compress"]
            # each configuration's GEMM against the dense one timed beside it (2x: the sparse
            # tensor cores' peak over dense)
            tried = {label: trials["dense"] / ms for label, ms in trials.items()
                     if label not in ("dense", "compress", "planned compress")}
            fastest = min(alone.values(), key=lambda c: sparse if c == best else times[c])
            fastest_ms = sparse if fastest == best else times[fastest]
            row.update(sparse_ms=sparse * 1e3, sparse_tflops=flops / sparse / 1e12, speedup=times["dense"] / sparse,
                       total_ms=total * 1e3, speedup_total=times["dense"] / total, config=best.label(),
                       fastest_speedup=times["dense"] / fastest_ms, fastest_config=fastest.label(),
                       configs=", ".join(f"{label} {x:.2f}x" for label, x in tried.items()))
            if times["dense"] / total < 1:
                row["note"] = "sparse path slower than dense: auto runs dense here"
        rows.append(row)
    return rows


COLUMNS = [("layer", "layer", ""), ("shape", "W", ""), ("tokens", "tokens", "d"), ("dtype", "dtype", ""),
           ("product", "product", ""), ("dense_ms", "dense ms", ".3f"), ("dense_tflops", "dense TFLOP/s", ".0f"),
           ("sparse_ms", "2:4 GEMM ms", ".3f"), ("speedup", "x dense", ".2f"), ("total_ms", "2:4 + sparsify/compress ms", ".3f"),
           ("speedup_total", "x dense (all in)", ".2f"), ("config", "config", ""),
           ("fastest_speedup", "fastest GEMM alone x dense", ".2f"), ("fastest_config", "its config", ""),
           ("configs", "each config tried (x dense, per call, host included; 2x is the peak)", ""), ("timed", "timed", ""),
           ("note", "note", "")]


def work_items(quick: bool) -> list[tuple[torch.dtype, tuple, int]]:
    """(dtype, layer, tokens) in run order: what the targets name first (bf16, the MLP shapes,
    the most tokens), so a run cut short by its time limit has measured those."""
    if quick:
        return [(torch.bfloat16, LAYERS[2], 1024)]
    mlp_first = LAYERS[2:] + LAYERS[:2]
    return [(dtype, layer, t) for dtype in (torch.bfloat16, torch.float16) for layer in mlp_first
            for t in sorted(TOKENS, reverse=True)]


def run(args, device, checkpoint=None) -> tuple[list[dict], dict, str]:
    """The rows in table order. ``checkpoint(rows, meta)``, where given, is called after each
    (dtype, layer, tokens) with what is measured so far."""
    gen = torch.Generator(device=device).manual_seed(0)
    reps = 3 if args.quick else 20
    rows, ceilings = [], {}
    meta = {"cusparselt": torch.backends.cusparselt.is_available(),
            "planned_cusparselt": planned_unavailable() or "available"}
    layer_order = {name: i for i, (name, _, _) in enumerate(LAYERS)}
    dtype_order = {"bfloat16": 0, "float16": 1}
    for dtype, layer, t in work_items(args.quick):
        if str(dtype) not in ceilings:
            ceilings[str(dtype)] = matmul_ceiling(device, dtype, 1024 if args.quick else 8192)
        rows += bench(layer, t, device, dtype, reps, ceilings[str(dtype)], gen)
        rows.sort(key=lambda r: (dtype_order.get(r["dtype"], 2), layer_order[r["layer"]], r["tokens"]))
        meta["matmul_ceiling_tflops"] = {k: v / 1e12 for k, v in ceilings.items()}
        if checkpoint is not None:
            checkpoint(rows, meta)
    return rows, meta, ""


TITLE = "Ascent-backward GEMMs: dense vs 2:4 sparse"
# a row's identity: a run cut short (or cut on purpose, gpu_check's `first`) replaces only the rows
# it measured in the results file
MERGE_ON = ("dtype", "layer", "tokens", "product")
FASTEST_OF = "every kernel, GPU alone"  # what "fastest GEMM alone" was chosen from


def comparable(row: dict) -> bool:
    """An earlier row measured as this run's are (before 2026-12-08 the fastest GEMM was the
    tuning's pick, per call with host work): kept beside them in a merged table, else dropped."""
    return row.get("fastest_of") == FASTEST_OF


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one layer at 1024 tokens, bf16, few repetitions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help=OUT_HELP)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.out = quick_out(args.quick, args.out, device)
    CONDITIONS.reset()

    def checkpoint(rows, meta):  # written as it goes: a run stopped by a time limit keeps its rows
        with contextlib.redirect_stdout(io.StringIO()):
            report("ascent_linear", TITLE + " (partial: the run goes on)", rows, COLUMNS, device, args.out,
                   meta_extra=meta, merge_on=MERGE_ON, comparable=comparable)

    rows, meta, note = run(args, device, checkpoint if results_dir(device, args.out) else None)
    report("ascent_linear", TITLE, rows, COLUMNS, device, args.out, meta_extra=meta, note=note, merge_on=MERGE_ON,
           comparable=comparable)
    return 0


if __name__ == "__main__":
    sys.exit(main())
