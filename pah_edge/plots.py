"""PNG figures: a run's accuracy matrix and learned prototypes; `pah-edge bench` latencies."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from pah_edge.atomic import atomic_write_bytes  # noqa: E402


def plot_accuracy_matrix(acc: list[list[float]], task_names: list[str], path: Path) -> None:
    """Heatmap of ``acc[i][j]`` (row: after training task i, column: tested on task j), in percent."""
    n_rows, n_cols = len(acc), max(len(row) for row in acc)
    grid = np.full((n_rows, n_cols), np.nan)
    for i, row in enumerate(acc):
        grid[i, : len(row)] = 100 * np.asarray(row)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n_cols, 1.0 + 0.6 * n_rows))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if value < 60 else "black")
    ax.set_xticks(range(n_cols), task_names[:n_cols], rotation=45, ha="right")
    ax.set_yticks(range(n_rows), [f"after {name}" for name in task_names[:n_rows]])
    ax.set_xlabel("tested on")
    ax.set_title("test accuracy (%)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)


def plot_prototypes(prototypes: list[np.ndarray], task_names: list[str], class_names: list[list[str]],
                    path: Path) -> None:
    """Grid of prototype images ``[C, c, s, s]`` per task: one row per task, one column per class."""
    n_cols = max(len(p) for p in prototypes)
    fig, axes = plt.subplots(len(prototypes), n_cols, figsize=(1.1 * n_cols, 1.3 * len(prototypes)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (protos, names) in enumerate(zip(prototypes, class_names)):
        for j, proto in enumerate(protos):
            image = proto.transpose(1, 2, 0)
            lo, hi = image.min(), image.max()
            image = (image - lo) / (hi - lo + 1e-8)  # each prototype on its own contrast scale
            axes[i, j].imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray")
            axes[i, j].set_title(names[j][:12], fontsize=7)
        axes[i, 0].text(-0.3, 0.5, task_names[i], transform=axes[i, 0].transAxes, ha="right", va="center",
                        fontsize=8)
    fig.suptitle("learned prototypes")
    _save(fig, path)


def plot_latency_vs_batch(rows: list[dict], path: Path) -> None:
    """Median latency (ms, line) and p50..p99 (band) against batch, one line per runtime and precision,
    one panel per component timed at several batches (backbone, learner step); rows as `pah-edge bench`
    reports them."""
    components = [c for c in ("backbone", "learner-step") if any(r["component"] == c for r in rows)]
    fig, axes = plt.subplots(1, max(len(components), 1), figsize=(5.0 * max(len(components), 1), 3.8), squeeze=False)
    for ax, component in zip(axes[0], components):
        series: dict[str, list[dict]] = {}
        for r in rows:
            if r["component"] == component:
                series.setdefault(f"{r['runtime']} {r['precision']}", []).append(r)
        for label, points in series.items():
            points.sort(key=lambda r: r["batch"])
            batches = [r["batch"] for r in points]
            ax.plot(batches, [r["p50_ms"] for r in points], marker="o", label=label)
            ax.fill_between(batches, [r["p50_ms"] for r in points], [r["p99_ms"] for r in points], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["batch"] for r in rows if r["component"] == component}))
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 8, 32 rather than 2^0, 2^3, 2^5
        ax.set_xlabel("batch")
        ax.set_ylabel("latency (ms), p50 line, p50-p99 band")
        ax.set_title(component)
        ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
