"""The ``pah-edge`` command line: each command parses its options, calls one library function and
renders the typed result that it returns (`pah_edge.report`). The workstation's commands are here,
the device's in `pah_edge.cli_device`; both register on `pah_edge.cli_support.app`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pah_edge.blas_threads  # noqa: F401  (first: before anything loads numpy)
import typer

from pah_edge.calibration.quantize import DEFAULT_MAX_DROP, DEFAULT_SAMPLES, QuantizeOptions
from pah_edge.cli_support import (BUNDLE_ARGUMENT, JSON_OPTION, PROGRESS_OPTION, app, config_options, print_error,
                                  run_app, show, user_errors)
from pah_edge.workstation.config import DataConfig, ModelConfig, TrainConfig
from pah_edge.demo import DEFAULT_EPOCHS, DEFAULT_LIMIT_PER_CLASS
from pah_edge.device.bench_config import BenchConfig
from pah_edge.errors import ConfigError
from pah_edge.export.onnx_export import OPSET
from pah_edge.export.tensorrt_build import DEFAULT_BATCHES, DEFAULT_PRECISION, DEFAULT_WORKSPACE_MB
from pah_edge.task_free import STATS_PER_CLASS

@app.callback()
def _root() -> None:
    """On-device continual learning with Prototype-Augmented Hypernetworks."""


@app.command()
@user_errors
@config_options(data=DataConfig, model=ModelConfig, train=TrainConfig)
def train(data: DataConfig, model: ModelConfig, train: TrainConfig,
          out: Path = typer.Option(Path("runs/latest"), help="Run directory for checkpoint, metrics and plots."),
          resume: bool = typer.Option(False, "--resume", help="Continue the run in --out after its last finished task."),
          progress: bool = PROGRESS_OPTION):
    """Train a PAH on a sequence of tasks and write checkpoint, metrics.json and plots to --out."""
    from pah_edge.workstation.config import RunConfig
    from pah_edge.workstation.trainer import run_training

    metrics = run_training(RunConfig(data=data, model=model, train=train), out, resume=resume, show_progress=progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here; one summary is enough
        typer.echo(f"average accuracy {100 * metrics['average_accuracy']:.2f}%  forgetting {100 * metrics['forgetting']:.2f}%  "
                   f"BWT {100 * metrics['bwt']:+.2f}%  -> {out / 'metrics.json'}")


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("demo"), help="Folder for the run, the bundle, the images and summary.json."),
    epochs: int = typer.Option(DEFAULT_EPOCHS, help="Epochs per task of the base training."),
    limit_per_class: int = typer.Option(DEFAULT_LIMIT_PER_CLASS, help="Images per class and split of the base training."),
    force: bool = typer.Option(False, "--force", help="Replace the outputs of an earlier demo in --out."),
    progress: bool = PROGRESS_OPTION,
):
    """The main job end to end, offline on the CPU: train, export, learn a new task as a device does, predict."""
    from pah_edge.demo import run_demo

    show(run_demo(out, epochs=epochs, limit_per_class=limit_per_class, force=force, progress=progress))


@app.command()
@user_errors
def export(
    backbone: Optional[str] = typer.Option(None, help="Export the newest run of this backbone under --runs-dir (optional with --checkpoint)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Run directory or its checkpoint.pt (default: newest run of --backbone)."),
    runs_dir: Path = typer.Option(Path("runs"), help="Where to look for runs when --checkpoint is not given."),
    out: Path = typer.Option(Path("bundle"), help="Bundle directory to write."),
    opset: int = typer.Option(OPSET, help=f"ONNX opset ({OPSET} or newer)."),
    simplify: bool = typer.Option(True, "--simplify/--no-simplify", help="Simplify graphs with onnxslim when installed (kept only if parity holds)."),
    images: Optional[Path] = typer.Option(None, help="Folder of images; its first 16 join the parity check."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle in --out (and its tasks)."),
    engine: Optional[str] = typer.Option(None, help="Also build a TensorRT engine: fp16 or fp32 (needs TensorRT and a GPU; int8: calibrate first, then build-engine)."),
    stats_per_class: int = typer.Option(STATS_PER_CLASS, help="Images per class of the run's data for the task-free statistics."),
):
    """Export a trained run as a bundle: ONNX graphs checked against PyTorch, manifest, task registry, task-free statistics."""
    from pah_edge.workstation.backbones import canonical_backbone_name
    from pah_edge.export.bundle_writer import export_bundle, newest_run

    if checkpoint is None:
        if backbone is None:
            raise ConfigError("give --backbone NAME (exports its newest run under --runs-dir) or --checkpoint RUN_DIR")
        checkpoint = newest_run(runs_dir, backbone)
        typer.echo(f"using {checkpoint}, the newest {canonical_backbone_name(backbone)} run")
    show(export_bundle(checkpoint, out, opset=opset, simplify=simplify, images=images, force=force, backbone=backbone,
                       stats_per_class=stats_per_class, engine=engine, progress=True))


@app.command()
@user_errors
@config_options(options=QuantizeOptions)
def calibrate(
    options: QuantizeOptions,
    bundle: Path = BUNDLE_ARGUMENT,
    images: Path = typer.Option(..., help="Calibration images: DIR/<class>/* (classes sampled evenly) or DIR/*."),
    samples: int = typer.Option(DEFAULT_SAMPLES, help="Calibration images to use; fewer readable ones is an error."),
    eval_dir: Optional[Path] = typer.Option(None, "--eval", help="Held-out labelled images per task: EVAL/<task>/<class>/*."),
    new_task: Optional[Path] = typer.Option(None, help="FOLDER/<class>/*: learn it with FP32 and INT8 features and compare."),
    max_drop: float = typer.Option(DEFAULT_MAX_DROP, help="Largest accuracy loss in points on any --eval task that still installs INT8."),
    latency_runs: int = typer.Option(10, help="Timed ONNX Runtime calls per model and batch size (1 and 32)."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime threads for the timing (default: one per core)."),
    as_json: bool = JSON_OPTION,
    progress: bool = PROGRESS_OPTION,
):
    """INT8 post-training calibration: write backbone.int8.onnx (Q/DQ) and report its cost against FP32."""
    from pah_edge.calibration.calibrate import calibrate_bundle

    report = calibrate_bundle(bundle, images, options=options, samples=samples, eval_dir=eval_dir, new_task=new_task,
                              max_drop=max_drop, latency_runs=latency_runs, threads=threads, progress=progress)
    show(report, as_json, bundle)
    if not report.passed:
        print_error(report.rejection(bundle))
        raise typer.Exit(1)


@app.command("build-engine")
@user_errors
def build_engine(
    bundle: Path = BUNDLE_ARGUMENT,
    precision: str = typer.Option(DEFAULT_PRECISION, help="fp16, fp32, or int8 (needs `pah-edge calibrate` first)."),
    batch: str = typer.Option(",".join(map(str, DEFAULT_BATCHES)), help="Batch-size profile min,opt,max."),
    workspace_mb: int = typer.Option(DEFAULT_WORKSPACE_MB, help="TensorRT builder workspace limit in MB."),
):
    """Compile the bundle's backbone into a TensorRT engine for this GPU (run it on the target device)."""
    from pah_edge.export.tensorrt_build import build_engines
    from pah_edge.options import whole_numbers

    paths = build_engines(bundle, precision=precision, batches=whole_numbers(batch, "--batch"), workspace_mb=workspace_mb)
    typer.echo("\n".join(f"engine -> {path}" for path in paths))


@app.command()
@user_errors
def verify(
    bundle: Path = BUNDLE_ARGUMENT,
    images: Optional[Path] = typer.Option(None, help="Folder of images; its first 16 join the comparison."),
):
    """Check a bundle's hashes and compare ONNX Runtime, PyTorch and TensorRT on the same inputs."""
    from pah_edge.export.verify import verify_bundle

    report = verify_bundle(bundle, images=images)
    show(report)
    for problem in report.problems():
        print_error(problem)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@user_errors
def bench(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `pah-edge export` (never written by bench)."),
    runtime: str = typer.Option("all", help="all, or some of onnxruntime,tensorrt,torch (torch: PyTorch eager, the reference)."),
    precision: str = typer.Option(",".join(BenchConfig.precisions), help="Backbone precisions: fp32 (backbone.onnx), fp16 (TensorRT engine), int8 (backbone.int8.onnx or engine)."),
    batch: str = typer.Option(",".join(map(str, BenchConfig.batches)), help="Batch sizes of the backbone and learner step."),
    iterations: int = typer.Option(BenchConfig.iterations, help="Timed iterations per row (learn-task: at most 5 runs)."),
    warmup: int = typer.Option(BenchConfig.warmup, help="Untimed iterations before them (learn-task: at most 1)."),
    images: Optional[Path] = typer.Option(None, help="Folder of real images to time on (default: synthetic images)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads of ONNX Runtime and torch (default: each runtime's own)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write {machine, settings, results, skipped} to this file."),
    plot: Optional[Path] = typer.Option(None, help="Draw latency vs batch per runtime to this PNG (needs matplotlib)."),
):
    """Latency (p50/p90/p99 ms), throughput and memory of each component per runtime, precision and batch."""
    from pah_edge.device.bench import run_bench
    from pah_edge.export.torch_runner import torch_runners  # torch itself loads only if the torch rows run

    config = BenchConfig.from_options(runtime=runtime, precision=precision, batch=batch, iterations=iterations,
                                      warmup=warmup, images=images, threads=threads)
    show(run_bench(bundle, config, json_path=json_out, plot_path=plot, reference=torch_runners))
    if json_out is not None:
        typer.echo(f"results -> {json_out}")


# After the workstation's commands, so that `pah-edge --help` lists them in the order of the work.
import pah_edge.cli_device  # noqa: E402,F401  (registers the device's commands on `app`)


def main() -> None:
    """Console entry point (``pah-edge``)."""
    run_app(app)


if __name__ == "__main__":
    main()
