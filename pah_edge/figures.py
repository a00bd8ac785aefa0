"""Matplotlib, headless, and writing a figure as a PNG atomically: shared by the training run's plots
(``pah_edge.workstation.plots``) and `pah-edge bench --plot` (``device/bench_plot.py``). Imports matplotlib."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from pah_edge.atomic import atomic_write_bytes  # noqa: E402

__all__ = ["plt", "save_png"]


def save_png(fig, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` as a PNG (110 dpi, atomically) and close it."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
