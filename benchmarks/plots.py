"""Plots of committed results: step time ratio vs sparsity against the paper's FLOPs column,
and each op's fraction of the device's ceiling. matplotlib is optional here (GPU machines
may lack it): without it nothing is drawn and the caller is told how to draw later."""

from __future__ import annotations

import json
import os

PAPER_CURVE = "1 + 0.3 + 0.7 (1 - s)"


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _sparsity_value(label: str) -> float:
    return 0.5 if label == "2:4" else float(label.rstrip("%")) / 100


def plot_step(rows: list[dict], meta: dict, path: str) -> bool:
    """One panel per model: measured step/SGD (or, untimed, counted FLOPs/SGD) of each SSAM
    contender vs sparsity, SAM as a level, and the paper's curve."""
    plt = _matplotlib()
    if plt is None:
        return False
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    grid = [0.5, 0.8, 0.9, 0.95, 0.98, 0.99]
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        timed = all(r.get("step_vs_sgd") is not None for r in mine)
        key = "step_vs_sgd" if timed else "counted_flops_vs_sgd"
        ax.plot(grid, [1.3 + 0.7 * (1 - s) for s in grid], "k--", label=f"paper {PAPER_CURVE}")
        for r in mine:
            if r["optimizer"] == "SAM":
                ax.axhline(r[key], color="grey", lw=1, label="SAM")
        curves: dict[str, list[tuple[float, float]]] = {}
        for r in mine:
            if r["sparsity"] is None:
                continue
            name = f"{r['optimizer']} {r['mode']}" + (" 2:4" if r["sparsity"] == "2:4" else "")
            curves.setdefault(name, []).append((_sparsity_value(r["sparsity"]), r[key]))
        for name, points in curves.items():
            points.sort()
            style = "s" if name.endswith("2:4") else "o-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, ms=4, label=name)
        ax.axhline(1.0, color="black", lw=0.5)
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("step time / SGD" if timed else "counted FLOPs / SGD")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7)
    fig.suptitle(f"SSAM step cost vs sparsity: {meta.get('device', '?')}, {meta.get('date', '?')[:10]}", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_ops(rows: list[dict], meta: dict, path: str) -> bool:
    """Horizontal bars: each (op, config, impl)'s fraction of its ceiling (copy bandwidth for
    memory-bound ops, dense matmul rate for GEMMs)."""
    plt = _matplotlib()
    if plt is None:
        return False
    bars = []
    for r in rows:
        frac = r.get("copy_fraction") if r.get("copy_fraction") is not None else r.get("matmul_fraction")
        if frac is not None:
            kind = "BW" if r.get("copy_fraction") is not None else "matmul"
            bars.append((f"{r['op']} {r['config']} [{r['impl']}] ({kind})", frac))
    fig, ax = plt.subplots(figsize=(9, 0.22 * len(bars) + 1.2))
    ax.barh(range(len(bars)), [b[1] for b in bars])
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=6)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", lw=0.5)
    ax.set_xlabel("fraction of the measured ceiling (copy bandwidth or dense matmul rate)")
    ax.set_title(f"Ops vs ceilings: {meta.get('device', '?')}, {meta.get('date', '?')[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


PLOTS = {"step": plot_step, "ops": plot_ops}


def plot_dir(directory: str) -> list[str]:
    """Draw every plot whose results file is in ``directory``; returns the images written."""
    written = []
    for name, draw in PLOTS.items():
        source = os.path.join(directory, f"{name}.json")
        if not os.path.exists(source):
            continue
        with open(source) as f:
            data = json.load(f)
        extra = os.path.join(directory, "perturb.json")
        if name == "ops" and os.path.exists(extra):  # the perturbation cycle has its own table
            with open(extra) as f:
                data["rows"] += [dict(r, op="norm+perturb+restore", config=r["params"]) for r in json.load(f)["rows"]]
        target = os.path.join(directory, f"{name}.png")
        if draw(data["rows"], data["meta"], target):
            written.append(target)
    return written


def have_matplotlib() -> bool:
    return _matplotlib() is not None
