"""PNG figures of a training run: its accuracy matrix and learned prototypes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pah_edge.figures import plt, save_png


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
    # A row holds the tasks trained so far: "after" its last (all of them at once for joint training).
    ax.set_yticks(range(n_rows), [f"after {task_names[len(row) - 1]}" for row in acc])
    ax.set_xlabel("tested on")
    ax.set_title("test accuracy (%)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    save_png(fig, path)


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
    save_png(fig, path)
