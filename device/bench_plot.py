"""`pah-edge bench --plot`: latency against batch size as a PNG. Imports matplotlib (optional on a device)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.ticker import ScalarFormatter

from pah_edge.figures import plt, save_png


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
    save_png(fig, path)
