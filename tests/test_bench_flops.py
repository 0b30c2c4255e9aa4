import json
import pytest

from ssam_bench import bench_flops

pytestmark = pytest.mark.cpu


def test_counts_sam_twice_sgd_and_writes_table(tmp_path):
    assert bench_flops.main(["--quick", "--models", "vit_tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "flops.json").read_text())
    rows = {(r["opt"], r["sparsity"]): r for r in data["rows"]}
    assert rows[("sam", 0.0)]["ratio"] == pytest.approx(2.0, abs=1e-9)
    for s in (0.5, 0.99):
        row = rows[("ssam (reference, dense ascent)", s)]
        assert row["ratio"] == pytest.approx(2.0, abs=1e-9)  # dense ascent backward: SAM's FLOPs
        assert row["paper"] == bench_flops.PAPER_SSAM[s]
        f = row["forward_fraction"]
        assert 0.25 < f < 0.4 and row["paper_model"] == pytest.approx(1 + f + (1 - s) * (1 - f))
    assert "counted on CPU" in data["meta"]["note"] and data["meta"]["kind"] == "cpu"
    assert "| vit_tiny |" in (tmp_path / "flops.md").read_text()


def test_quick_without_out_leaves_the_results_folder_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_flops, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(bench_flops.tempfile, "tempdir", str(tmp_path))
    assert bench_flops.main(["--quick", "--models", "vit_tiny"]) == 0
    assert not (tmp_path / "results").exists()
    written = [f for f in tmp_path.glob("ssam-bench-flops-quick-*/flops.json")]
    assert len(written) == 1 and str(written[0]) in capsys.readouterr().out
