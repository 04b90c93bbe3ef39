"""The sweep's figure: accuracy against state floats per layer-head, one line per method (per seed the best of
its learning rates; the mean over seeds, a bar from the worst to the best seed). Needs matplotlib (the "examples" extra); without it, says so and skips."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def best_accuracies(runs: list[dict], label) -> dict[str, dict[int, list[float]]]:
    """{line name: {state floats: [per seed, the best accuracy over its learning rates]}}."""
    best = defaultdict(float)  # (label, state floats, seed) -> best accuracy over learning rates
    for run in runs:
        at = (label(run), run["state_floats"], run["config"]["seed"])
        best[at] = max(best[at], run["result"]["accuracy"])
    lines = defaultdict(lambda: defaultdict(list))
    for (name, floats, _seed), accuracy in best.items():
        lines[name][floats].append(accuracy)
    return lines


def plot(runs: list[dict], path: Path, label, title: str = "") -> bool:
    """Write the PNG of ``runs`` (records of the results JSON) to ``path``, lines named by ``label(run)``;
    False (and a message) where matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib, or the "
              "package's 'examples' extra)")  # fmt: skip
        return False
    if not runs:
        print("no runs to plot")
        return False
    lines = best_accuracies(runs, label)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, points in sorted(lines.items()):
        sizes = sorted(points)
        mean = [sum(points[s]) / len(points[s]) for s in sizes]
        spread = [[m - min(points[s]) for s, m in zip(sizes, mean)], [max(points[s]) - m for s, m in zip(sizes, mean)]]
        ax.errorbar(sizes, mean, yerr=spread, marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("state floats per layer-head (SWA: 2 W head_dim, BLA: 2 N head_dim)")
    ax.set_ylabel("accuracy on held-out queries")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title, fontsize=8, wrap=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    print(f"plot: {path}")
    return True
