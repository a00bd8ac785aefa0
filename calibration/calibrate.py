"""``pah-edge calibrate``: quantize a bundle's backbone to INT8, measure what it costs, install it if it passes.

The bundle changes only at the end, under its lock, with atomic writes:

- passed (every evaluated task loses at most ``max_drop`` points): ``Bundle.install_int8`` writes
  ``backbone.int8.onnx`` and calibration.json (the record, which holds the model's SHA-256).
- failed: only ``calibration.rejected.json`` (the report) is written; an INT8 model installed by an
  earlier calibration stays as it was, and FP32 remains what every command runs by default.

Bad input (no readable images, fewer than ``samples``, unknown eval folders) fails before the
bundle is touched. Imports onnx and onnxruntime, never torch.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pah_edge.bundle import LOCK_WAIT_S, Bundle, sha256_file, utc_now
from pah_edge.bundle_layout import BundleLayout
from pah_edge.calibration.evaluate import (EvalFolder, compare_tasks, eval_task_folders, layer_errors, paired_latency,
                                           size_mb)
from pah_edge.calibration.quantize import DEFAULT_MAX_DROP, DEFAULT_SAMPLES, QuantizeOptions, int8_onnx_from_fp32
from pah_edge.device.images import BatchStream, scan_class_folders, warn_skipped
from pah_edge.device.learner import learn_task
from pah_edge.errors import ConfigError, PahEdgeError
from pah_edge.machine import library_versions
from pah_edge.progress import progress_bar
from pah_edge.report import Report, aligned

log = logging.getLogger("pah_edge")

RECORD_FORMAT_VERSION = 1
LAYER_IMAGES = 8  # calibration images whose every activation is compared (all tensors of two graphs in memory)
LATENCY_BATCHES = (1, 32)
NEW_TASK_NAME = "int8-check"


@dataclass(frozen=True, kw_only=True)
class CalibrationReport(Report):
    """The calibration record (the content of calibration.json or calibration.rejected.json). ``tasks``:
    per task fp32/int8 accuracy, agreement, cosine; ``new_task``: a learned task's val accuracy with
    each backbone or None; ``layers``: the largest per-layer errors; ``size_mb`` (MB), ``latency_ms``
    (ms) and ``speedup`` per batch size; ``worst_drop_points`` (accuracy points) and ``passed``."""

    format_version: int
    file: str
    sha256: str
    fp32_sha256: str | None
    created: str
    options: dict
    excluded_nodes: list[str]
    max_drop_points: float
    worst_drop_points: float | None
    accuracy_checked: bool
    passed: bool
    tasks: list[dict]
    new_task: dict | None
    layers: list[dict]
    size_mb: dict[str, float]
    latency_ms: dict[str, dict[str, float]]
    latency_threads: int | None
    speedup: dict[str, float]
    versions: dict[str, str]

    def lines(self, bundle: Path) -> list[str]:
        """The comparison table, the most sensitive nodes, size and speed, and where the model went."""
        options = self.options
        channels = "per-channel" if options["per_channel"] else "per-tensor"
        rows = [("task", "images", "FP32 %", "INT8 %", "drop", "agree %", "cosine")]
        for t in self.tasks:
            rows.append((t["task"], str(t["images"]), _percent_cell(t["fp32_accuracy"]),
                         _percent_cell(t["int8_accuracy"]), f"{100 * (t['fp32_accuracy'] - t['int8_accuracy']):+.1f}",
                         _percent_cell(t["agreement"]), f"{t['cosine_mean']:.4f}") if t["evaluated"]
                        else (t["task"], "not evaluated", "", "", "", "", ""))
        if self.new_task is not None:
            fp32, int8 = self.new_task["fp32"]["val_accuracy"], self.new_task["int8"]["val_accuracy"]
            rows.append((f"new: {Path(self.new_task['folder']).name} (val)", str(self.new_task["images"]["val"]),
                         _percent_cell(fp32), _percent_cell(int8),
                         "" if None in (fp32, int8) else f"{100 * (fp32 - int8):+.1f}", "", ""))
        lat, size = self.latency_ms, self.size_mb
        lines = [
            f"INT8 (for {options['target']}) vs FP32: {options['method']}, {channels}, {options['samples']} "
            "calibration images:",
            *aligned(rows, right=range(1, 7)),
            "nodes adding the most error (||INT8 - FP32|| / ||FP32|| added, then accumulated; --exclude NODE keeps one FP32):",
            *(f"  {l['op']:<10} {l['node']}{''.join(f' (with {v})' for v in l.get('via', []))}  "
              f"+{l['added_error']:.3f} -> {l['rel_error']:.3f}" for l in self.layers),
            f"size: FP32 {size['fp32']:.2f} MB, INT8 {size['int8']:.2f} MB",
            *(f"ONNX Runtime CPU, batch {b}: FP32 {lat['fp32'][b]:.2f} ms, INT8 {lat['int8'][b]:.2f} ms "
              f"({self.speedup[b]:.2f}x)" for b in lat["fp32"]),
            f"excluded from INT8: {', '.join(self.excluded_nodes) or 'none'}",
        ]
        if not self.accuracy_checked:
            lines.append("accuracy not checked: no --eval images of registered tasks; --max-drop could not apply")
        if self.passed:
            lines.append(f"INT8 -> {BundleLayout(bundle).int8_backbone} (use it with --precision int8; record in "
                         f"{BundleLayout(bundle).calibration_record})")
        return lines

    def rejection(self, bundle: Path) -> str:
        """The error line of a calibration that lost more than ``max_drop_points``."""
        return (f"INT8 loses {self.worst_drop_points:.2f} points, more than --max-drop {self.max_drop_points:g}; not "
                f"installed, FP32 stays the default (report in {BundleLayout(bundle).calibration_rejected}). Try "
                "--fp32-last, --exclude NODE, another --method or more --samples")


def _percent_cell(fraction: float | None) -> str:
    """A cell of a column headed "%": ``97.1``, or ``-`` when not measured."""
    return "-" if fraction is None else f"{100 * fraction:.1f}"


def calibrate_bundle(bundle_dir: str | Path, images: str | Path, *, options: QuantizeOptions = QuantizeOptions(),
                     samples: int = DEFAULT_SAMPLES, eval_dir: str | Path | None = None,
                     new_task: str | Path | None = None, max_drop: float = DEFAULT_MAX_DROP, batch_size: int = 8,
                     seed: int = 0, latency_runs: int = 10, threads: int | None = None, progress: bool = True,
                     lock_wait_s: float | None = LOCK_WAIT_S) -> CalibrationReport:
    """Calibrate on ``samples`` images of ``images``, compare INT8 with FP32, and install it if it passes.

    eval_dir: held-out labelled images per registered task, ``EVAL/<task>/<class>/*``; tasks without
    a folder are reported as not evaluated, and with none evaluated the accuracy gate cannot fail
    (``accuracy_checked`` False). new_task: ``FOLDER/<class>/*`` learned twice as `learn-task` would,
    on a scratch copy of the bundle, with FP32 and with INT8 features. max_drop: the largest
    accuracy loss (points) on any evaluated task that still installs the model. latency_runs:
    timed calls per model and batch size (1 and 32) after 2 warm-up calls; threads: ONNX Runtime
    intra-op threads for them (None: its default, one per core).

    Returns the record, also written to calibration.json or calibration.rejected.json.
    """
    if not max_drop >= 0:
        raise ConfigError(f"--max-drop is a number of accuracy points >= 0, got {max_drop!r}")
    if samples < 1 or batch_size < 1 or latency_runs < 1:
        raise ConfigError(f"--samples, --latency-runs and batch_size must be >= 1, got {samples}, {latency_runs}, "
                          f"{batch_size}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1 (or left out for one per core); got {threads}")
    try:
        from pah_edge.calibration.reader import ImageFolderReader, calibration_files  # ORT quantization: onnx
    except ImportError as exc:
        raise PahEdgeError(f"pah-edge calibrate needs the onnx package ({exc}): "
                           "pip install 'pah-edge[calibrate]'") from None

    bundle = Bundle.open(bundle_dir)  # checks the FP32 graphs' hashes
    # Everything the user can get wrong is checked before minutes of work.
    files = calibration_files(images, samples, seed)
    eval_folders = eval_task_folders(bundle, Path(eval_dir) if eval_dir is not None else None)
    if new_task is not None:
        scan_class_folders(new_task)
    fp32_path = bundle.graph_path("backbone")

    with tempfile.TemporaryDirectory(prefix="pah-edge-calibrate-") as tmp:
        work = Path(tmp)
        int8_path = work / bundle.layout.int8_backbone.name
        with progress_bar(progress, "calibration images", samples) as advance:
            reader = ImageFolderReader(files, bundle.preprocess, samples=samples, batch_size=batch_size,
                                       on_images=advance)
            made = int8_onnx_from_fp32(fp32_path, int8_path, reader, options, work)
        warn_skipped(reader.skipped, len(files))
        measured = _compare(bundle, int8_path, made["prepared"], files, eval_folders, new_task, work,
                            latency_runs=latency_runs, threads=threads, excluded=made["excluded"])
        # Rounded: 0.9 - 0.89 is 1.0000000000000009 points in floating point, and must pass --max-drop 1.
        drops = [round(100 * (t["fp32_accuracy"] - t["int8_accuracy"]), 6) for t in measured["tasks"] if t["evaluated"]]
        record = CalibrationReport(
            format_version=RECORD_FORMAT_VERSION,
            file=bundle.layout.int8_backbone.name,
            sha256=sha256_file(int8_path),
            fp32_sha256=bundle.files.get(fp32_path.name),
            created=utc_now(),
            options={**options.to_dict(), "samples": made["samples"], "images": str(images), "seed": seed,
                     "batch_size": batch_size},
            excluded_nodes=made["excluded"],
            max_drop_points=max_drop,
            worst_drop_points=max(drops) if drops else None,
            accuracy_checked=bool(drops),
            passed=not drops or max(drops) <= max_drop,
            **measured,
            versions=library_versions(),
        )
        with bundle.lock(lock_wait_s):
            if record.passed:
                bundle.install_int8(int8_path, record.to_dict())
            else:
                bundle.reject_int8(record.to_dict())
    return record


def _compare(bundle: Bundle, int8_path: Path, prepared: Path, files: list[Path], eval_folders: dict[str, EvalFolder],
             new_task: str | Path | None, work: Path, *, latency_runs: int, threads: int | None,
             excluded: list[str]) -> dict:
    """The report's measurements: tasks, new_task, layers (the nodes not already ``excluded``), size_mb,
    latency_ms (and its threads), speedup (per batch, the median over the timed rounds of FP32 / INT8,
    the two taking turns call by call)."""
    fp32_path = bundle.graph_path("backbone")
    log.info("comparing INT8 with FP32 (%s)", ", ".join(eval_folders) or "no --eval tasks")
    tasks = compare_tasks(bundle, fp32_path, int8_path, eval_folders)
    new = _new_task_accuracy(bundle, new_task, int8_path, work) if new_task is not None else None
    first_images = next(iter(BatchStream(files, bundle.preprocess, LAYER_IMAGES)))[0]
    layers = layer_errors(prepared, int8_path, first_images, excluded=set(excluded))
    log.info("timing FP32 and INT8 on ONNX Runtime CPU, batch %s", " and ".join(map(str, LATENCY_BATCHES)))
    latency, speedup = {"fp32": {}, "int8": {}}, {}
    for b in LATENCY_BATCHES:
        medians, rounds = paired_latency({"fp32": fp32_path, "int8": int8_path}, bundle.preprocess.image_size, b,
                                         runs=latency_runs, threads=threads)
        for name, ms in medians.items():
            latency[name][str(b)] = ms
        speedup[str(b)] = float(np.median([r["fp32"] / r["int8"] for r in rounds]))
    return {"tasks": tasks, "new_task": new, "layers": layers,
            "size_mb": {"fp32": size_mb(fp32_path), "int8": size_mb(int8_path)},
            "latency_ms": latency, "latency_threads": threads, "speedup": speedup}


def _new_task_accuracy(bundle: Bundle, folder: str | Path, int8_path: Path, work: Path) -> dict:
    """learn-task on ``folder`` with FP32 and with INT8 features, in a scratch copy of the bundle.

    Accuracies are learn-task's own: ``val`` on its held-out 20 % (which also picks the early stop).
    """
    copy = bundle.scratch_copy(work / "bundle", engines=False, int8=False)
    copy.install_int8(int8_path, {"passed": True, "sha256": sha256_file(int8_path)})
    result = {"folder": str(folder)}
    for precision in ("fp32", "int8"):
        report = learn_task(copy, folder, name=NEW_TASK_NAME, runtime="onnxruntime-cpu", precision=precision,
                            replace=True, progress=False)
        result[precision] = {"train_accuracy": report.train_accuracy, "val_accuracy": report.val_accuracy}
        result["images"] = report.images
    return result
