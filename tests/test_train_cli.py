import re
import subprocess
import sys

import pytest
import torch

from ssam.train import main, parse_args

pytestmark = pytest.mark.cpu


@pytest.mark.parametrize("opt,extra", [("sgd", []), ("sam", []), ("ssamf", ["--structure", "2:4"]),
                                       ("ssamd", ["--sparsity", "0.8"]), ("ssamd", ["--structure", "tensor"])])
def test_one_epoch_each_optimizer(opt, extra, capsys):
    assert main(["--opt", opt, "--epochs", "1", "--quiet", *extra]) == 0
    out = capsys.readouterr().out
    acc = float(re.search(r"test accuracy\s+([\d.]+)%", out).group(1))
    assert 30.0 < acc <= 100.0  # one epoch on digits is far above chance (10%)
    assert re.search(r"mean step time\s+[\d.]+ ms \(cpu\)", out)
    density = re.search(r"mask density\s+(\S+)", out).group(1)
    if opt == "ssamd" and extra == ["--sparsity", "0.8"]:
        assert abs(float(density) - 0.2) < 1e-3
    if opt == "sgd":
        assert density == "-" and "backend" not in out
    else:
        assert re.search(r"ssam_kernels backend (torch|ext|triton)", out)


def test_default_run_learns(capsys):
    assert main(["--quiet"]) == 0  # the README's main job: SSAM-F, 10 epochs
    out = capsys.readouterr().out
    assert float(re.search(r"test accuracy\s+([\d.]+)%", out).group(1)) > 90.0
    assert "ssamf" in out and re.search(r"mask density\s+0\.5000", out)


@pytest.mark.parametrize("mode", ["exact", "mvue"])
def test_ascent_backward_modes_train_the_mlp(mode, capsys):
    argv = ["--opt", "ssamf", "--model", "mlp", "--norm", "masked", "--ascent-backward", mode, "--epochs", "2", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"ascent backward {mode}" in out
    assert float(re.search(r"test accuracy\s+([\d.]+)%", out).group(1)) > 50.0


def test_bad_arguments_exit_with_usage():
    for argv in (["--structure", "2-4"], ["--opt", "adam"], ["--epochs", "0"], ["--opt", "sam", "--ascent-backward", "mvue"],
                 ["--ascent-backward", "sparse"], ["--model", "resnet"], ["--opt", "sgd", "--ascent-fraction", "0.5"],
                 ["--opt", "sam", "--structure", "2:4"], ["--opt", "sgd", "--sparsity", "0.9"],
                 ["--opt", "sam", "--norm", "masked"], ["--device", "mps"], ["--device", "meta"],
                 ["--device", "nonsense"], ["--opt", "ssamf", "--drop-rate", "0.3"], ["--opt", "ssamd", "--num-samples", "8"],
                 ["--opt", "sam", "--update-freq", "2"], ["--opt", "sgd", "--rho", "0.1"]) + ((["--device", "cuda"],) if not torch.cuda.is_available() else ()):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2


def test_inconsistent_sparsity_is_a_clean_error(capsys):
    assert main(["--opt", "ssamf", "--structure", "1:4", "--sparsity", "0.5", "--epochs", "1", "--quiet"]) == 2
    assert "implies sparsity 0.75" in capsys.readouterr().err
    assert main(["--opt", "ssamd", "--ascent-backward", "exact", "--epochs", "1", "--quiet"]) == 2
    assert "needs norm='masked'" in capsys.readouterr().err
    assert main(["--opt", "sam", "--ascent-fraction", "1.5", "--epochs", "1", "--quiet"]) == 2
    assert "ascent_fraction must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("opt", ["sam", "ssamf", "ssamd"])
def test_sub_batch_ascent_trains(opt, capsys):
    assert main(["--opt", opt, "--ascent-fraction", "0.25", "--epochs", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"test accuracy\s+([\d.]+)%", out).group(1)) > 80.0


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "ssam.train", "--help"], capture_output=True, text=True, check=True)
    assert "--structure" in out.stdout and "--sparsity" in out.stdout


def test_ssamd_budget_structure_trains(capsys):
    argv = ["--opt", "ssamd", "--structure", "budget", "--norm", "masked", "--ascent-backward", "exact",
            "--sparsity", "0.9", "--epochs", "2", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"test accuracy\s+([\d.]+)%", out).group(1)) > 80.0
    assert 0.0 < float(re.search(r"mask density\s+(\S+)", out).group(1)) <= 0.1


def test_device_rule_names_what_torch_sees(monkeypatch):
    """ssam-train and ssam-bench share the rule: an out-of-range cuda:N is a message too."""
    from ssam.train import parse_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert parse_device("cuda:0") == torch.device("cuda:0")
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="torch sees 1 CUDA device"):
        parse_device("cuda:3")
    with pytest.raises(SystemExit) as exc:
        parse_args(["--device", "cuda:3"])
    assert exc.value.code == 2


@pytest.mark.parametrize("opt", ["sgd", "sam", "ssamf"])
def test_batchnorm_statistics_move_once_a_step(opt, monkeypatch):
    """The training loop runs the pass at w + e inside frozen_batchnorm_stats (the README's
    recipe): every BatchNorm counts each batch once, as under SGD."""
    import ssam.train as train

    built = []
    monkeypatch.setitem(train.MODELS, "convnet", lambda: built.append(train.DigitsNet()) or built[-1])
    args = parse_args(["--opt", opt, "--epochs", "1", "--quiet"])
    assert main(["--opt", opt, "--epochs", "1", "--quiet"]) == 0
    train_set, _ = train.load_digits(args.seed)
    steps = -(-len(train_set) // args.batch_size)
    bns = [m for m in built[0].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(int(m.num_batches_tracked) == steps and m.track_running_stats for m in bns)
