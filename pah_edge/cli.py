"""The ``pah-edge`` command line: thin commands that validate, then call one library function."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

import pah_edge.blas_threads  # noqa: F401  (first: before anything loads numpy)
from pah_edge.atomic import STORAGE_ERRNOS, storage_error
from pah_edge.demo import DEFAULT_EPOCHS, DEFAULT_LIMIT_PER_CLASS
from pah_edge.errors import PahEdgeError
from pah_edge.task_free import STATS_PER_CLASS

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """On-device continual learning with Prototype-Augmented Hypernetworks."""


def user_errors(command):
    """Print a PahEdgeError, or a storage fault from a write outside the bundle's own (a scratch copy,
    a library's file), as one line and exit 1; anything else is a bug and keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PahEdgeError as exc:
            _print_error(exc)
        except OSError as exc:
            if exc.errno not in STORAGE_ERRNOS:
                raise
            _print_error(storage_error(exc, Path(exc.filename or "a file")))
        raise typer.Exit(1)

    return wrapper


def _print_error(exc: Exception) -> None:
    # escape: a message quoting `pip install 'pah-edge[tensorrt]'` must not lose "[tensorrt]" as markup
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def train(
    folder: Optional[Path] = typer.Argument(None, help="ImageFolder root: ROOT/<task>/<class>/* or ROOT/<class>/*."),
    benchmark: Optional[str] = typer.Option(None, help="Built-in benchmark: split-fashion-mnist, mnist-5k, split-cifar100, tiny-imagenet."),
    data_dir: Optional[Path] = typer.Option(None, help="Where the benchmark's files are (default: its standard place)."),
    tasks: Optional[int] = typer.Option(None, "--tasks", help="Number of tasks (benchmarks)."),
    classes_per_task: Optional[int] = typer.Option(None, help="Classes per task (benchmarks)."),
    limit_per_class: Optional[int] = typer.Option(None, help="Use at most N images per class and split (quick runs)."),
    download: bool = typer.Option(False, "--download", help="Download the benchmark's archive if it is missing."),
    backbone: str = typer.Option("mobilenet_v3_small", help="mobilenet_v3_small, mobilenet_v3_large (alias mobilenet_v3), mobilenet_v2, resnet18, efficientnet_lite0, tiny_cnn."),
    image_size: Optional[int] = typer.Option(None, help="Input size in px (default: 32 for 28-32 px benchmarks, 64 otherwise)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Start from ImageNet weights: installed for efficientnet_lite0; torchvision backbones need their file in the torch hub cache (never downloaded)."),
    weights: Optional[Path] = typer.Option(None, help="Local backbone state dict to start from."),
    generator: str = typer.Option("classwise-linear", help="Hypernetwork: classwise-linear (any class count; best for learning on the device), classwise (adds an MLP), task-mlp (the paper's), linear-head."),
    prototype_size: Optional[int] = typer.Option(None, help="Prototype side in px (default: the largest with channels x side^2 <= D/2)."),
    prototype_channels: int = typer.Option(1, help="Prototype channels: 1 or 3."),
    prototype_init: str = typer.Option("mean", help="mean (class-mean images, the paper's) or random."),
    hidden_dim: Optional[int] = typer.Option(None, help="Generator hidden width (default 256 classwise, 16 task-mlp)."),
    method: str = typer.Option("pah", help="pah, finetune (no distillation), lwf (stored heads), joint (upper bound)."),
    epochs: int = typer.Option(15, help="Epochs per task."),
    batch_size: int = typer.Option(64, help="Global batch size (split across torchrun processes)."),
    lr: float = typer.Option(1e-3, help="Learning rate of hypernetwork and prototypes."),
    backbone_lr: float = typer.Option(1e-4, help="Learning rate of the backbone."),
    stability: float = typer.Option(0.5, help="Weight of logit distillation on earlier tasks."),
    seed: int = typer.Option(0, help="Seed for splits, initialisation and shuffling."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda, cuda:N."),
    out: Path = typer.Option(Path("runs/latest"), help="Run directory for checkpoint, metrics and plots."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out after its last finished task."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """Train a PAH on a sequence of tasks and write checkpoint, metrics.json and plots to --out."""
    from pah_edge.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from pah_edge.trainer import run_training

    cfg = RunConfig(
        data=DataConfig(benchmark=benchmark, folder=str(folder) if folder else None,
                        data_dir=str(data_dir) if data_dir else None, num_tasks=tasks,
                        classes_per_task=classes_per_task, limit_per_class=limit_per_class, download=download),
        model=ModelConfig(backbone=backbone, image_size=image_size, pretrained=pretrained,
                          weights=str(weights) if weights else None, generator=generator, hidden_dim=hidden_dim,
                          prototype_channels=prototype_channels, prototype_size=prototype_size,
                          prototype_init=prototype_init),
        train=TrainConfig(method=method, epochs=epochs, batch_size=batch_size, lr=lr, backbone_lr=backbone_lr,
                          stability=stability, seed=seed, device=device),
    )
    metrics = run_training(cfg, out, resume=resume, show_progress=progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here; one summary is enough
        typer.echo(f"average accuracy {100 * metrics['average_accuracy']:.2f}%  forgetting {100 * metrics['forgetting']:.2f}%  "
                   f"BWT {100 * metrics['bwt']:+.2f}%  -> {out / 'metrics.json'}")


PRECISION_HELP = "Backbone: fp32, or int8 (the model `pah-edge calibrate` installed); the task records it."
PREDICT_PRECISION_HELP = ("Backbone: auto (each task on the one it was learned on), or fp32 / int8 for every task "
                          "(a task learned on the other gets a warning).")


@app.command("learn-task")
@user_errors
def learn_task(
    folder: Path = typer.Argument(..., help="The new task's images: FOLDER/<class>/*.png|jpg|jpeg|bmp, 2 classes or more."),
    bundle: Path = typer.Option(Path("bundle"), help="Bundle directory written by `pah-edge export`."),
    name: Optional[str] = typer.Option(None, help="Task name (default: the folder's name)."),
    budget_mb: float = typer.Option(300, help="Peak memory of this process in MB (Python, runtime, models, features, batches); sizes the backbone batch, and a budget below the minimum is refused naming it."),
    runtime: str = typer.Option("auto", help="auto (TensorRT engine if built, else ONNX Runtime), tensorrt, onnxruntime."),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    replace: bool = typer.Option(False, "--replace", help="Overwrite a task of the same name."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object (and nothing else) on stdout."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars (on stderr)."),
):
    """Learn a new task on this device: only its prototypes; old tasks stay bit-identical."""
    import json

    from pah_edge.device.api import Device
    from pah_edge.device.learner import summary_line

    # Not started with `with`: learning starts its own backbone after checking the folder and options.
    dev = Device(bundle, runtime=runtime, precision=precision)
    report = dev.learn_task(folder, name=name, replace=replace, budget_mb=budget_mb, progress=progress).report
    typer.echo(json.dumps(report) if as_json else summary_line(report))


ENGINE_PRECISIONS = ("fp16", "fp32", "int8")


@app.command()
@user_errors
def predict(
    images: Optional[list[Path]] = typer.Argument(None, help="Image files or folders (searched recursively)."),
    bundle: Path = typer.Option(Path("bundle"), help="Bundle directory written by `pah-edge export`."),
    task: Optional[str] = typer.Option(None, help="Only this task's classes, with its generated head (default: every task)."),
    any_task: bool = typer.Option(False, "--any-task", help="Every task (the default; kept as an alias)."),
    novelty_threshold: Optional[float] = typer.Option(None, help="Novelty above which an image is unknown (default: the bundle's)."),
    runtime: str = typer.Option("auto", help="auto (TensorRT engine if built, else ONNX Runtime), tensorrt, onnxruntime."),
    precision: str = typer.Option("auto", help=PREDICT_PRECISION_HELP),
    batch_size: int = typer.Option(32, help="Images per backbone call."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON list of {path, task, label, confidence, novelty, known}."),
    video: Optional[Path] = typer.Option(None, help="Predict a video file's frames instead: one JSON line per frame (needs pah-edge[camera])."),
    camera: Optional[int] = typer.Option(None, help="Predict a camera's frames (OpenCV index, e.g. 0) until it stops or Ctrl-C: one JSON line per frame."),
    every: int = typer.Option(1, help="--video/--camera: predict every N-th frame only."),
    max_frames: Optional[int] = typer.Option(None, help="--video/--camera: stop after this many predicted frames."),
):
    """Predict each image's task and class over every task, or say it is unknown: `path  task/label  confidence  novelty`.

    With --video or --camera: one JSON line per frame, {frame, time_ms, task, label, confidence, novelty, known}.
    """
    import json

    from pah_edge.device.api import Device
    from pah_edge.errors import ConfigError

    if task is not None and any_task:
        raise ConfigError("give --task NAME or --any-task, not both")
    sources = [name for name, given in (("IMAGES", bool(images)), ("--video", video is not None),
                                        ("--camera", camera is not None)) if given]
    if len(sources) != 1:
        raise ConfigError(f"give one of IMAGE_OR_DIR..., --video FILE and --camera INDEX, not {' and '.join(sources)}"
                          if sources else "give image files or folders, --video FILE or --camera INDEX")
    if images:
        with Device(bundle, runtime=runtime, precision=precision, novelty_threshold=novelty_threshold) as dev:
            results = [p.to_dict() for p in dev.predict_files(images, task=task, batch_size=batch_size)]
        if as_json:
            typer.echo(json.dumps(results, indent=2))
        else:
            for line in _prediction_lines(results):
                typer.echo(line)
        return
    _predict_frames(bundle, video=video, camera=camera, every=every, max_frames=max_frames, task=task,
                    runtime=runtime, precision=precision, novelty_threshold=novelty_threshold)


def _predict_frames(bundle: Path, *, video: Optional[Path], camera: Optional[int], every: int,
                    max_frames: Optional[int], task: Optional[str], **device_options) -> None:
    """One JSON line per predicted frame, flushed at once so a pipe sees each as it comes."""
    import json

    from pah_edge.device.api import Device
    from pah_edge.device.video import frames, open_source
    from pah_edge.errors import ConfigError

    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"--max-frames must be 1 or more, got {max_frames}")
    capture = open_source(video=video, camera=camera)  # first: no OpenCV or no source fails in a moment
    try:
        with Device(bundle, **device_options) as dev:
            dev.predict_batch([], task=task)  # an unknown --task fails before the first frame is read
            for count, (index, ms, frame) in enumerate(frames(capture, every=every, live=camera is not None), 1):
                answer = dev.predict(frame, task=task, bgr=True).to_dict()
                print(json.dumps({"frame": index, "time_ms": round(ms, 3), **answer}), flush=True)
                if count == max_frames:
                    break
    finally:
        capture.release()


def _prediction_lines(results: list[dict]) -> list[str]:
    """``path  task/label  97.1%  novelty 0.52`` (or ``unknown``) per result, columns aligned."""
    def answer(r):
        return "unknown" if r["known"] is False and r["task"] is None else f"{r['task']}/{r['label']}"

    def novelty(r):
        return "" if r["novelty"] is None else f"novelty {r['novelty']:.2f}" + (" (unknown)" if r["known"] is False
                                                                                and r["task"] is not None else "")
    return _aligned([(r["path"], answer(r), f"{100 * r['confidence']:.1f}%", novelty(r)) for r in results], right={2})


def _aligned(rows: list[tuple[str, ...]], right: set[int] = frozenset()) -> list[str]:
    """Rows as lines of columns two spaces apart, never wrapped (logs and pipes read them line by line)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in rows]


tasks_app = typer.Typer(help="List a bundle's tasks; `remove` or `rename` one.", no_args_is_help=False)
app.add_typer(tasks_app, name="tasks")
BUNDLE_HELP = "Bundle directory written by `pah-edge export`."
# A subcommand's own --bundle wins; without it, `tasks --bundle B remove NAME` means B, not ./bundle.
SUB_BUNDLE_OPTION = typer.Option(None, "--bundle", help=f"{BUNDLE_HELP} (default: the --bundle given to `tasks`, else ./bundle)")


@tasks_app.callback(invoke_without_command=True)
@user_errors
def tasks_list(
    ctx: typer.Context,
    bundle: Path = typer.Option(Path("bundle"), help=BUNDLE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the registry entries as one JSON list."),
):
    """List a bundle's tasks: classes, images seen, accuracy, created, size, source."""
    if ctx.invoked_subcommand is not None:
        return
    import json

    from pah_edge.bundle import Bundle

    records = Bundle.open(bundle, verify=False).tasks()  # listing reads the registry only
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records], indent=2))
    elif not records:
        typer.echo(f"no tasks in {bundle}: learn one with `pah-edge learn-task FOLDER --bundle {bundle}`")
    else:
        _print_tasks(records)


@tasks_app.command("remove")
@user_errors
def tasks_remove(ctx: typer.Context, name: str = typer.Argument(..., help="Task to remove."),
                 bundle: Optional[Path] = SUB_BUNDLE_OPTION):
    """Unregister a task and delete its prototypes file."""
    path = _change_tasks(ctx, bundle, lambda opened: opened.remove_task(name))
    typer.echo(f"removed task {name!r} from {path}")


@tasks_app.command("rename")
@user_errors
def tasks_rename(ctx: typer.Context, old: str = typer.Argument(..., help="Current task name."),
                 new: str = typer.Argument(..., help="New task name (A-Z a-z 0-9 . _ -)."),
                 bundle: Optional[Path] = SUB_BUNDLE_OPTION):
    """Rename a task; its prototypes are unchanged."""
    path = _change_tasks(ctx, bundle, lambda opened: opened.rename_task(old, new))
    typer.echo(f"renamed task {old!r} to {new!r} in {path}")


def _change_tasks(ctx: typer.Context, bundle: Optional[Path], change) -> Path:
    """Apply ``change(Bundle)`` under the bundle's lock, awaited as long as learn-task awaits it."""
    from pah_edge.bundle import Bundle
    from pah_edge.device.learner import LOCK_WAIT_S

    path = bundle if bundle is not None else ctx.parent.params["bundle"]
    opened = Bundle.open(path, verify=False)  # the registry only: graph hashes do not matter here
    with opened.lock(LOCK_WAIT_S):
        change(opened)
    return path


def _print_tasks(records) -> None:
    rows = [("task", "classes", "images", "accuracy", "created (UTC)", "bytes", "source")]
    for r in records:
        names = ", ".join(r.class_names[:3]) + (", ..." if len(r.class_names) > 3 else "")
        accuracy = "-" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"
        rows.append((r.name, f"{len(r.class_names)} ({names})", str(r.images_seen), accuracy,
                     r.created.replace("T", " ").removesuffix("Z")[:16], str(r.bytes), r.source))
    for line in _aligned(rows, right={2, 3, 5}):
        typer.echo(line)


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("demo"), help="Folder for the run, the bundle, the images and summary.json."),
    epochs: int = typer.Option(DEFAULT_EPOCHS, help="Epochs per task of the base training."),
    limit_per_class: int = typer.Option(DEFAULT_LIMIT_PER_CLASS, help="Images per class and split of the base training."),
    force: bool = typer.Option(False, "--force", help="Replace the outputs of an earlier demo in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """The main job end to end, offline on the CPU: train, export, learn a new task as a device does, predict."""
    from pah_edge.demo import run_demo

    summary = run_demo(out, epochs=epochs, limit_per_class=limit_per_class, force=force, progress=progress)
    _print_demo_summary(summary, out)


def _print_demo_summary(s: dict, out: Path) -> None:
    def pct(fraction) -> str:
        return "n/a" if fraction is None else f"{100 * fraction:.1f}%"

    def held(key: str) -> str:
        return f"{pct(s['held_out'][key]['accuracy'])} of {s['held_out'][key]['images']}"

    base, new = s["base"], s["new_task"]
    lines = [
        f"base PAH ({base['backbone']}, {base['weights']}, {base['image_size']} px; {base['tasks']} "
        f"Split-Fashion-MNIST tasks): average accuracy {pct(base['average_accuracy'])}, "
        f"forgetting {pct(base['forgetting'])}",
        f"export: parity with PyTorch OK (worst absolute error {max(s['export']['worst_abs_error'].values()):.1e})",
        f"new task {new['name']!r} learned as on a device ({new['runtime']}, prototypes only): {new['classes']} "
        f"classes from {sum(new['images'].values())} images in {new['wall_seconds']:.1f} s, "
        f"train {pct(new['train_accuracy'])}, val {pct(new['val_accuracy'])}; stored "
        f"{(new['bytes_stored'] + new['stats_bytes_stored']) / 1024:.0f} KB "
        f"({new['bytes_stored'] / 1024:.0f} KB prototypes, {new['stats_bytes_stored'] / 1024:.0f} KB task-free statistics)",
        f"old tasks unchanged: {'yes' if s['old_tasks_unchanged'] else 'NO'}",
        f"held-out digits, --task {new['name']}: {held('digits_with_task')} "
        f"(nearest class mean on the same features: {held('digits_nearest_class_mean')})",
        f"held-out clothes, their task given: {held('fashion_with_task')}",
        f"task-free (no task given, over all {s['base']['tasks'] + 1} tasks): digits {held('digits_task_free')}, "
        f"clothes {held('fashion_task_free')}; called unknown: digits {pct(s['unknown_rate']['digits'])}, "
        f"clothes {pct(s['unknown_rate']['fashion'])}",
        "examples (task-free):",
        *(f"  {line}" for line in _prediction_lines(s["examples"])),
        "seconds per stage: " + ", ".join(f"{stage} {sec:.1f}" for stage, sec in s["seconds"].items()),
        f"summary -> {out / 'summary.json'}",
    ]
    for line in lines:
        typer.echo(line)


@app.command()
@user_errors
def export(
    backbone: Optional[str] = typer.Option(None, help="Export the newest run of this backbone under --runs-dir (optional with --checkpoint)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Run directory or its checkpoint.pt (default: newest run of --backbone)."),
    runs_dir: Path = typer.Option(Path("runs"), help="Where to look for runs when --checkpoint is not given."),
    out: Path = typer.Option(Path("bundle"), help="Bundle directory to write."),
    opset: int = typer.Option(17, help="ONNX opset (17 or newer)."),
    simplify: bool = typer.Option(True, "--simplify/--no-simplify", help="Simplify graphs with onnxslim when installed (kept only if parity holds)."),
    images: Optional[Path] = typer.Option(None, help="Folder of images; its first 16 join the parity check."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle in --out (and its tasks)."),
    engine: Optional[str] = typer.Option(None, help="Also build a TensorRT engine: fp16, fp32 or int8 (needs TensorRT and a GPU)."),
    stats_per_class: int = typer.Option(STATS_PER_CLASS, help="Images per class of the run's data for the task-free statistics."),
):
    """Export a trained run as a bundle: ONNX graphs checked against PyTorch, manifest, task registry, task-free statistics."""
    from pah_edge.errors import ConfigError

    if engine is not None and engine not in ENGINE_PRECISIONS:
        raise ConfigError(f"unknown --engine {engine!r}; choose one of: {', '.join(ENGINE_PRECISIONS)}")
    if engine is not None:
        from pah_edge.device.runtimes.tensorrt import tensorrt_problem

        problem = tensorrt_problem()  # before the export, not after it
        if problem is not None:
            raise PahEdgeError(f"--engine needs TensorRT here: {problem}; or export without --engine")
    from pah_edge.export.bundle_writer import export_bundle, newest_run

    if checkpoint is None:
        if backbone is None:
            raise ConfigError("give --backbone NAME (exports its newest run under --runs-dir) or --checkpoint RUN_DIR")
        from pah_edge.backbones import canonical_backbone_name

        checkpoint = newest_run(runs_dir, backbone)
        typer.echo(f"using {checkpoint}, the newest {canonical_backbone_name(backbone)} run")
    report = export_bundle(checkpoint, out, opset=opset, simplify=simplify, images=images, force=force,
                           backbone=backbone, stats_per_class=stats_per_class, progress=True)
    _print_export_report(report)
    if engine is not None:
        from pah_edge.export.tensorrt_build import build_engines

        for path in build_engines(out, precision=engine):
            typer.echo(f"engine -> {path}")


@app.command("task-stats")
@user_errors
def task_stats(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `pah-edge export`."),
    checkpoint: Optional[Path] = typer.Option(None, help="The run the bundle was exported from: its data gives the workstation tasks' statistics (needs pah-edge[train])."),
    images: Optional[Path] = typer.Option(None, help="Labelled images of the bundle's tasks: DIR/<task>/<class>/*."),
    stats_per_class: int = typer.Option(STATS_PER_CLASS, help="With --checkpoint: images per class of the run's data."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars (on stderr)."),
):
    """Add task-free statistics (and the novelty threshold) to a bundle exported before they existed."""
    from pah_edge.bundle import Bundle
    from pah_edge.device.learner import LOCK_WAIT_S
    from pah_edge.device.task_stats import install_task_free, task_features_from_folder
    from pah_edge.errors import ConfigError

    if (checkpoint is None) == (images is None):
        raise ConfigError("give --checkpoint RUN_DIR (the run the bundle came from) or --images DIR/<task>/<class>/*")
    opened = Bundle.open(bundle)
    if checkpoint is not None:
        from pah_edge.export.task_free_data import checkpoint_task_features

        features = checkpoint_task_features(opened, checkpoint, per_class=stats_per_class, progress=progress)
    else:
        features = task_features_from_folder(opened, images, progress=progress)
    with opened.lock(LOCK_WAIT_S):
        report = install_task_free(opened, features)
    typer.echo(f"task-free statistics for {', '.join(report['tasks'])} from {report['images']} images; novelty "
               f"threshold {report['threshold']:.3f} calls {100 * report['unknown_rate']:.0f} % of "
               f"{report['held_out_images']} held-out images unknown")


from pah_edge.calibration.calibrate import DEFAULT_MAX_DROP, DEFAULT_SAMPLES  # noqa: E402 (light: no onnx)
from pah_edge.calibration.quantize import DEFAULT_METHOD, METHODS, TARGETS  # noqa: E402


@app.command()
@user_errors
def calibrate(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `pah-edge export`."),
    images: Path = typer.Option(..., help="Calibration images: DIR/<class>/* (classes sampled evenly) or DIR/*."),
    samples: int = typer.Option(DEFAULT_SAMPLES, help="Calibration images to use; fewer readable ones is an error."),
    target: str = typer.Option("auto", help=f"INT8 form for {' or '.join(TARGETS)} (TensorRT needs signed activations; "
                               "ONNX Runtime CPU is fast only with unsigned ones); auto: tensorrt where it is installed."),
    method: str = typer.Option(DEFAULT_METHOD, help=f"Activation ranges: {', '.join(METHODS)}."),
    per_channel: bool = typer.Option(True, "--per-channel/--per-tensor", help="One weight scale per output channel or per tensor."),
    fp32_first: bool = typer.Option(True, "--fp32-first/--int8-first", help="Keep the first Conv (raw pixels in) in FP32."),
    fp32_last: bool = typer.Option(False, "--fp32-last/--int8-last", help="Keep the last Conv/Gemm (features out) in FP32."),
    exclude: list[str] = typer.Option([], "--exclude", help="Keep this node in FP32 (repeatable; the report names the most sensitive)."),
    reduce_range: bool = typer.Option(True, "--reduce-range/--full-range", help="7-bit weights: no INT8 overflow on x86 CPUs without VNNI."),
    eval_dir: Optional[Path] = typer.Option(None, "--eval", help="Held-out labelled images per task: EVAL/<task>/<class>/*."),
    new_task: Optional[Path] = typer.Option(None, help="FOLDER/<class>/*: learn it with FP32 and INT8 features and compare."),
    max_drop: float = typer.Option(DEFAULT_MAX_DROP, help="Largest accuracy loss in points on any --eval task that still installs INT8."),
    latency_runs: int = typer.Option(10, help="Timed ONNX Runtime calls per model and batch size (1 and 32)."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime threads for the timing (default: one per core)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object on stdout."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (on stderr)."),
):
    """INT8 post-training calibration: write backbone.int8.onnx (Q/DQ) and report its cost against FP32."""
    import json

    from pah_edge.calibration.calibrate import calibrate_bundle
    from pah_edge.calibration.quantize import QuantizeOptions, default_target

    options = QuantizeOptions(target=default_target() if target == "auto" else target, method=method,
                              per_channel=per_channel, fp32_first=fp32_first, fp32_last=fp32_last, exclude=tuple(exclude),
                              reduce_range=reduce_range)
    report = calibrate_bundle(bundle, images, options=options, samples=samples, eval_dir=eval_dir, new_task=new_task,
                              max_drop=max_drop, latency_runs=latency_runs, threads=threads, progress=progress)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_calibration_report(report, bundle)
    if not report["passed"]:
        err_console.print(f"[bold red]error:[/] INT8 loses {report['worst_drop_points']:.2f} points, more than --max-drop "
                          f"{max_drop:g}; not installed, FP32 stays the default (report in "
                          f"{escape(str(bundle / 'calibration.rejected.json'))}). Try --fp32-last, --exclude NODE, another "
                          "--method or more --samples", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _print_calibration_report(r: dict, bundle: Path) -> None:
    from rich.table import Table

    def pct(fraction) -> str:
        return "-" if fraction is None else f"{100 * fraction:.1f}"

    options = r["options"]
    channels = "per-channel" if options["per_channel"] else "per-tensor"
    table = Table(title=f"INT8 (for {options['target']}) vs FP32: {options['method']}, {channels}"
                        f", {options['samples']} calibration images")
    for column in ("task", "images", "FP32 %", "INT8 %", "drop", "agree %", "cosine"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for t in r["tasks"]:
        if not t["evaluated"]:
            table.add_row(t["task"], "not evaluated", "", "", "", "", "")
            continue
        drop = 100 * (t["fp32_accuracy"] - t["int8_accuracy"])
        table.add_row(t["task"], str(t["images"]), pct(t["fp32_accuracy"]), pct(t["int8_accuracy"]), f"{drop:+.1f}",
                      pct(t["agreement"]), f"{t['cosine_mean']:.4f}")
    new = r["new_task"]
    if new is not None:
        fp32, int8 = new["fp32"]["val_accuracy"], new["int8"]["val_accuracy"]
        table.add_row(f"new: {Path(new['folder']).name} (val)", str(new["images"]["val"]), pct(fp32), pct(int8),
                      "" if None in (fp32, int8) else f"{100 * (fp32 - int8):+.1f}", "", "")
    Console().print(table)
    lat, size = r["latency_ms"], r["size_mb"]
    lines = [
        "nodes adding the most error (||INT8 - FP32|| / ||FP32|| added, then accumulated; --exclude NODE keeps one FP32):",
        *(f"  {l['op']:<10} {l['node']}{''.join(f' (with {v})' for v in l.get('via', []))}  "
          f"+{l['added_error']:.3f} -> {l['rel_error']:.3f}" for l in r["layers"]),
        f"size: FP32 {size['fp32']:.2f} MB, INT8 {size['int8']:.2f} MB",
        *(f"ONNX Runtime CPU, batch {b}: FP32 {lat['fp32'][b]:.2f} ms, INT8 {lat['int8'][b]:.2f} ms "
          f"({r['speedup'][b]:.2f}x)" for b in lat["fp32"]),
        f"excluded from INT8: {', '.join(r['excluded_nodes']) or 'none'}",
    ]
    if not r["accuracy_checked"]:
        lines.append("accuracy not checked: no --eval images of registered tasks; --max-drop could not apply")
    if r["passed"]:
        lines.append(f"INT8 -> {bundle / r['file']} (use it with --precision int8; record in {bundle / 'calibration.json'})")
    for line in lines:
        typer.echo(line)


@app.command("build-engine")
@user_errors
def build_engine(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `pah-edge export`."),
    precision: str = typer.Option("fp16", help="fp16, fp32, or int8 (needs `pah-edge calibrate` first)."),
    batch: str = typer.Option("1,8,32", help="Batch-size profile min,opt,max."),
    workspace_mb: int = typer.Option(1024, help="TensorRT builder workspace limit in MB."),
):
    """Compile the bundle's backbone into a TensorRT engine for this GPU (run it on the target device)."""
    from pah_edge.errors import ConfigError
    from pah_edge.export.tensorrt_build import build_engines

    try:
        batches = tuple(int(b) for b in batch.split(","))
    except ValueError:
        raise ConfigError(f"--batch takes three integers min,opt,max such as 1,8,32; got {batch!r}") from None
    for path in build_engines(bundle, precision=precision, batches=batches, workspace_mb=workspace_mb):
        typer.echo(f"engine -> {path}")


@app.command()
@user_errors
def verify(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `pah-edge export`."),
    images: Optional[Path] = typer.Option(None, help="Folder of images; its first 16 join the comparison."),
):
    """Check a bundle's hashes and compare ONNX Runtime, PyTorch and TensorRT on the same inputs."""
    from pah_edge.export.verify import verify_bundle

    report = verify_bundle(bundle, images=images)
    _print_verify_report(report)
    failed = sorted({f"{r['graph']} on {r['runtime']}" for r in report["rows"] if not r["ok"]})
    if failed:
        err_console.print(f"[bold red]error:[/] {', '.join(failed)} beyond tolerance; re-export the bundle "
                          "or rebuild its engines", highlight=False, soft_wrap=True)
    broken = [name for name, state in report["tasks"].items() if not state["usable"]]
    if broken:
        err_console.print(f"[bold red]error:[/] task(s) {', '.join(broken)} unavailable (see above); learn them "
                          "again or remove them with `pah-edge tasks remove NAME`", highlight=False, soft_wrap=True)
    if not report["ok"]:
        raise typer.Exit(1)


def _tolerance_text(tolerance: dict) -> str:
    return " or ".join(f"{kind}<{limit:.0e}" for kind, limit in tolerance.items() if limit is not None)


def _print_export_report(report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{report['backbone']} + {report['generator']['kind']} generator, opset {report['opset']}")
    for column in ("graph", "MB", "output", "abs err", "rel err", "limit", "onnxslim"):
        table.add_column(column, justify="right" if column in ("MB", "abs err", "rel err") else "left")
    for name, graph in report["graphs"].items():
        for i, (output, err) in enumerate(graph["errors"].items()):
            first = i == 0
            table.add_row(name if first else "", f"{graph['size_mb']:.2f}" if first else "", output,
                          f"{err['abs']:.1e}", f"{err['rel']:.1e}", _tolerance_text(graph["tolerance"]),
                          graph["simplified"] if first else "")
    Console().print(table)
    if report["note"]:
        typer.echo(f"note: {report['note']}")
    typer.echo(f"tasks: {', '.join(report['tasks']) or 'none'}")
    typer.echo(f"bundle -> {report['bundle']}")


def _print_verify_report(report: dict) -> None:
    from rich.table import Table

    for runtime, state in report["runtimes"].items():
        typer.echo(f"{runtime}: {state}")
    table = Table(title=f"{report['bundle']}: worst errors vs {report['reference']}")
    for column in ("graph", "runtime", "output", "abs err", "rel err", "limit", "ok"):
        table.add_column(column, justify="right" if column.endswith("err") else "left",
                         no_wrap=column != "limit")  # names stay whole; the limit text may wrap
    for row in report["rows"]:
        table.add_row(row["graph"], row["runtime"], row["output"], f"{row['abs']:.1e}", f"{row['rel']:.1e}",
                      _tolerance_text(row["tolerance"]), "yes" if row["ok"] else "NO")
    if report["rows"]:
        Console().print(table)
    else:
        typer.echo("nothing to compare: only ONNX Runtime is available here (hashes verified)")
    for name, state in report["tasks"].items():
        typer.echo(f"task {name}: {_task_state_text(state)}")


def _task_state_text(state: dict) -> str:
    if not state["usable"]:
        return f"UNAVAILABLE: {state['problem']}"
    if state["task_free"]:
        return "ok"
    return f"task given only: {state['problem'] or 'the bundle has no task-free statistics'}"


@app.command()
@user_errors
def bench(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `pah-edge export` (never written by bench)."),
    runtime: str = typer.Option("all", help="all, or some of onnxruntime,tensorrt,torch (torch: PyTorch eager, the reference)."),
    precision: str = typer.Option("fp32,fp16,int8", help="Backbone precisions: fp32 (backbone.onnx), fp16 (TensorRT engine), int8 (backbone.int8.onnx or engine)."),
    batch: str = typer.Option("1,8,32", help="Batch sizes of the backbone and learner step."),
    iterations: int = typer.Option(50, help="Timed iterations per row (learn-task: at most 5 runs)."),
    warmup: int = typer.Option(10, help="Untimed iterations before them (learn-task: at most 1)."),
    images: Optional[Path] = typer.Option(None, help="Folder of real images to time on (default: synthetic images)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads of ONNX Runtime and torch (default: each runtime's own)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write {machine, settings, results, skipped} to this file."),
    plot: Optional[Path] = typer.Option(None, help="Draw latency vs batch per runtime to this PNG (needs matplotlib)."),
):
    """Latency (p50/p90/p99 ms), throughput and memory of each component per runtime, precision and batch."""
    from pah_edge.device.bench import BenchConfig, run_bench

    config = BenchConfig.from_options(runtime=runtime, precision=precision, batch=batch, iterations=iterations,
                                      warmup=warmup, images=images, threads=threads)
    _print_bench(run_bench(bundle, config, json_path=json_out, plot_path=plot), json_out)


def _print_bench(report: dict, json_out: Optional[Path]) -> None:
    from pah_edge.device.bench import machine_line, table_rows

    typer.echo(machine_line(report["machine"]))
    rows = table_rows(report["results"])
    for line in _aligned(rows, right=set(range(3, len(rows[0]) - 1))):
        typer.echo(line)
    for s in report["skipped"]:
        where = ", ".join(f"{k} {s[k]}" for k in ("precision", "batch") if s[k] is not None)
        typer.echo(f"skipped {s['component']} on {s['runtime']}{f' ({where})' if where else ''}: {s['reason']}")
    if json_out is not None:
        typer.echo(f"results -> {json_out}")


def _setup_logging() -> None:
    """INFO from rank 0 only; Rich formatting on a terminal, plain unwrapped lines in logs and pipes."""
    rank = os.environ.get("RANK", "0")
    if err_console.is_terminal:
        handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
        fmt = "%(message)s"
    else:
        handler, fmt = logging.StreamHandler(), "%(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING, format=fmt, handlers=[handler])


def main() -> None:
    """Console entry point: every user error, usage errors included, is one line and exit code 1."""
    _setup_logging()
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        code = 1
    except Exception as exc:
        # Typer vendors Click's UsageError (exit code 2); match it by shape, not by a private import.
        if getattr(exc, "exit_code", None) != 2 or not hasattr(exc, "format_message"):
            raise
        message = exc.format_message().rstrip(".")
        if not message:  # bare `pah-edge`: the help text was the answer
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        hint = f"{ctx.command_path} --help" if ctx else "pah-edge --help"
        err_console.print(f"[bold red]error:[/] {message}; see `{hint}`", highlight=False, soft_wrap=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
