"""``pah-edge bench``: latency, throughput and memory of a bundle's components across runtimes and precisions.

For each component (backbone; head generation; learner step; end-to-end prediction of one image
file; learn-task on a 10-class task) and each runtime x precision x batch: p50/p90/p99 latency in
ms over every timed iteration after a warm-up, throughput in items/s at the median, the process's
peak RSS while the row ran (MB) and, on TensorRT, the GPU memory in use (MB). Rows of other runtimes
carry their speed-up over PyTorch eager measured in the same run, when torch and the bundle's
source checkpoint are here. What cannot run here is listed under ``skipped`` with the reason.

Torch is imported only when the torch runtime is asked for and installed; the user's bundle is never
written (learn-task and prediction run in a scratch copy).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

from pah_edge.atomic import atomic_write_json
from pah_edge.bundle import Bundle
from pah_edge.device.bench_components import (COMPONENTS, LEARN_TASK_RUNS, PREDICTION, Context, Skipped,
                                              component_precisions, pair_with_torch, skip)
from pah_edge.device.bench_config import RUNTIMES, BenchConfig
from pah_edge.device.bench_inputs import DEFAULT_CLASSES, IMAGES_PER_CLASS, prepare_inputs, scratch_bundle
from pah_edge.device.runtimes import EngineMismatchError, ReferenceRunners, RuntimeUnavailable, available_runtimes
from pah_edge.errors import ConfigError, PahEdgeError
from pah_edge.machine import machine_info, reset_peak_rss
from pah_edge.report import Report, aligned

log = logging.getLogger("pah_edge")



@dataclass(frozen=True, kw_only=True)
class BenchReport(Report):
    """``results``: one row per component, runtime, precision and batch (see the module docstring);
    ``skipped``: what could not run here, each with its ``reason``."""

    machine: dict
    settings: dict
    results: list[dict]
    skipped: list[dict]

    def lines(self) -> list[str]:
        rows = table_rows(self.results)
        skipped = [(s, ", ".join(f"{k} {s[k]}" for k in ("precision", "batch") if s[k] is not None))
                   for s in self.skipped]
        return [machine_line(self.machine), *aligned(rows, right=range(3, len(rows[0]) - 1)),
                *(f"skipped {s['component']} on {s['runtime']}{f' ({where})' if where else ''}: {s['reason']}"
                  for s, where in skipped)]


def run_bench(bundle_path: str | Path, config: BenchConfig | None = None, *, json_path: Path | None = None,
              plot_path: Path | None = None, reference: ReferenceRunners | None = None) -> BenchReport:
    """Measure, then write ``json_path`` (the report's `to_dict`) and ``plot_path`` (atomically) if given.

    ``reference``: the PyTorch runners of a bundle (``pah_edge.export.torch_runner.torch_runners``, on
    the workstation side) for the ``torch`` runtime; without it that runtime is skipped.

    PahEdgeError if the bundle is missing, --plot lacks matplotlib, or nothing could be measured.
    """
    config = config or BenchConfig()
    if plot_path is not None:
        _require_matplotlib()  # before minutes of measuring, not after
    bundle = Bundle.open(bundle_path)
    classes = bundle.fixed_num_classes or DEFAULT_CLASSES
    status = available_runtimes()
    rows: list[dict] = []
    skipped: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pah-edge-bench-") as work:
        inputs = prepare_inputs(bundle.preprocess, config.images, Path(work), classes=classes)
        ctx = Context(bundle=bundle, scratch=scratch_bundle(bundle, Path(work), inputs, classes=classes), inputs=inputs,
                      classes=classes, warmup=config.warmup, iterations=config.iterations, batches=config.batches,
                      threads=config.threads, rss_per_row=reset_peak_rss())
        for runtime in config.runtimes:
            problem = status[runtime] or (_start_torch(ctx, reference, config.threads) if runtime == "torch" else None)
            if problem is not None:
                skipped.append(skip("all", runtime, None, problem))
                continue
            _run_runtime(ctx, runtime, config.precisions, rows, skipped)
        if ctx.torch:
            log.info("timing ONNX Runtime and PyTorch eager backbones again, taking turns, for their ratio")
            pair_with_torch(ctx, rows)
    if not rows:
        reasons = "; ".join(f"{s['component']} on {s['runtime']}: {s['reason']}" for s in skipped)
        raise PahEdgeError(f"nothing could be measured here ({reasons})")
    add_ratios(rows)
    report = BenchReport(machine=machine_info(), settings=_settings(bundle, config, inputs.source, classes,
                                                                    ctx.rss_per_row), results=rows, skipped=skipped)
    if json_path is not None:
        atomic_write_json(json_path, report.to_dict())
    if plot_path is not None:
        from pah_edge.device.bench_plot import plot_latency_vs_batch  # needs matplotlib

        plot_latency_vs_batch(rows, plot_path)
    return report


def _run_runtime(ctx: Context, runtime: str, precisions: tuple[str, ...], rows: list, skipped: list) -> None:
    for component, run in COMPONENTS.items():
        for precision in component_precisions(component, runtime, precisions):
            try:
                for item in run(ctx, runtime, precision):
                    if "reason" in item:
                        skipped.append(item)
                    else:
                        rows.append(item)
                        log.info("%s", row_line(item))
            except Skipped as exc:
                skipped.append(skip(component, runtime, precision, str(exc)))
            except (RuntimeUnavailable, EngineMismatchError) as exc:  # e.g. an engine built for another GPU
                skipped.append(skip(component, runtime, precision, str(exc)))


def _start_torch(ctx: Context, reference: ReferenceRunners | None, threads: int | None) -> str | None:
    """Load the PyTorch reference runners into ``ctx``; why they cannot run, or None."""
    if reference is None:
        return ("the PyTorch reference was not given: it is on the workstation side (`pah-edge bench` "
                "passes it; pip install 'pah-edge[train]')")
    try:
        runners, why_not = reference(ctx.bundle, threads)
    except (ImportError, OSError) as exc:  # installed but broken, e.g. CUDA libraries that do not match
        return f"torch is installed but cannot be imported ({exc})"
    if runners is None:
        return why_not
    ctx.torch = runners
    return None


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib, or leave out --plot") from None


def add_ratios(rows: list[dict]) -> None:
    """Set ``speedup_vs_torch`` on every row: the median of the paired rounds where ``pair_with_torch``
    measured them, else PyTorch eager FP32 p50 of the same component and batch / this p50 (None
    without one); ``overhead_vs_backbone`` on predict-e2e and predict-frame rows: the median of their
    paired rounds (predict / bare backbone - 1, taking turns), else this p50 / the backbone row's at
    batch 1 - 1; and ``overhead_vs_task_given`` on predict-task-free rows (paired with task-given predict)."""
    by_key = {(r["component"], r["runtime"], r["precision"], r["batch"]): r for r in rows}
    for row in rows:
        eager = by_key.get((row["component"], "torch", "fp32", row["batch"]))
        paired = row.get("speedup_vs_torch_paired")
        row["speedup_vs_torch"] = (paired["median"] if paired else
                                   eager["p50_ms"] / row["p50_ms"] if eager and eager is not row else None)
        if row["component"] in PREDICTION:
            bare = by_key.get(("backbone", row["runtime"], row["precision"], 1))
            paired = row.get("overhead_vs_backbone_paired")
            sequential = row["p50_ms"] / bare.get("wall_p50_ms", bare["p50_ms"]) - 1 if bare else None
            row["overhead_vs_backbone"] = paired["median"] if paired else sequential
        if row["component"] == "predict-task-free":
            row["overhead_vs_task_given"] = row["overhead_vs_task_given_paired"]["median"]


def row_line(row: dict) -> str:
    """``backbone on onnxruntime fp32, batch 1: p50 6.02 ms, p99 7.10 ms, 166 items/s, RSS 130 MB``."""
    return (f"{row['component']} on {row['runtime']} {row['precision']}, batch {row['batch']}: "
            f"p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, {row['throughput_ips']:.0f} items/s, "
            f"RSS {row['rss_mb']:.0f} MB")


def machine_line(machine: dict) -> str:
    """``AMD EPYC 7B13, 2 cores, no GPU; onnxruntime 1.32.0, tensorrt -, torch 2.14.1``."""
    versions = machine.get("versions", {})
    libs = ", ".join(f"{lib} {versions.get(lib, '-')}" for lib in RUNTIMES)
    return f"{machine['cpu']}, {machine['cores']} cores, {machine.get('gpu') or 'no GPU'}; {libs}"


def table_rows(rows: list[dict]) -> list[tuple[str, ...]]:
    """Header and one tuple of cells per row, for an aligned text table (numbers from column 3 on)."""
    gpu = any("device_mem_mb" in r for r in rows)
    header = ("component", "runtime", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s", "RSS MB",
              *(("GPU MB",) if gpu else ()), "cv", "vs torch", "note")
    lines = [header]
    for r in rows:
        gpu_cell = (f"{r['device_mem_mb']:.0f}" if "device_mem_mb" in r else "-",) if gpu else ()
        speedup = "-" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.1f}x"
        overhead, given = r.get("overhead_vs_backbone"), r.get("overhead_vs_task_given")
        note = (f"{100 * overhead:+.0f}% vs backbone" if overhead is not None else
                f"{100 * given:+.0f}% vs task given" if given is not None else "")
        lines.append((r["component"], r["runtime"], r["precision"], str(r["batch"]), f"{r['p50_ms']:.2f}",
                      f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['throughput_ips']:.1f}", f"{r['rss_mb']:.0f}",
                      *gpu_cell, f"{r['cv']:.2f}", speedup, note))
    return lines


def _settings(bundle: Bundle, config: BenchConfig, source: str, classes: int, rss_per_row: bool) -> dict:
    scope = ("the process's peak while the row ran (high-water mark reset before each row)" if rss_per_row
             else "the process's peak since it started (this OS cannot reset it)")
    # JSON-shaped (lists, strings), so the report equals the file it is written to.
    return {**{k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
               for k, v in asdict(config).items()},
            "bundle": str(bundle.path), "backbone": bundle.manifest.get("backbone"),
            "image_size": bundle.preprocess.image_size, "inputs": source, "classes": classes,
            "learn_task_images": classes * IMAGES_PER_CLASS,
            "learn_task_runs": min(config.iterations, LEARN_TASK_RUNS), "rss_mb": scope,
            "date": date.today().isoformat()}
