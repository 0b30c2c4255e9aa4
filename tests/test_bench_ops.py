"""The op benchmarks run end to end (tiny sizes) and report what they claim to."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_perturb  # noqa: E402
import common  # noqa: E402
import bench_topk_mask  # noqa: E402

pytestmark = pytest.mark.cpu


def test_required_bytes():
    # 16 fp32 params, 8 kept: norm 64 + perturb (128 + 2 + 64) + restore (2 + 64)
    assert bench_perturb.required_bytes(16, 8, 4, 4) == 64 + 194 + 66


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
    import bench_ascent_linear

    assert bench_ascent_linear.main(["--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "CPU run: not a GPU figure" in out and "wrote" not in out
    for product in ("dW mvue", "dX mvue_dx", "dX implicit"):
        assert f"| {product} |" in out
    assert "cuSPARSELt runs on CUDA" in out  # the sparse columns say why they are empty


def test_bench_ascent_step_quick_cpu_counts_flops(capsys):
    import bench_ascent_step

    assert bench_ascent_step.main(["--quick", "--device", "cpu", "--models", "mlp_stack"]) == 0
    out = capsys.readouterr().out
    assert "CPU run: not a GPU figure" in out
    rows = {line.split("|")[2].strip(): line for line in out.splitlines() if line.startswith("| mlp_stack")}
    assert set(rows) == {"sgd", "sam", "ssam dense", "ssam exact", "ssam implicit", "ssam mvue", "ssam mvue_dx"}
    assert "| 2.000 | 2.00 |" in rows["sam"]  # counted vs paper FLOP ratio of SAM
    assert "| 1.65 |" in rows["ssam mvue"]
