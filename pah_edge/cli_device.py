"""The commands a device runs, registered on `pah_edge.cli_support.app`: learn-task, predict, tasks and
task-stats. Like `pah_edge.cli`, each parses its options, calls the library and renders the result."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pah_edge.cli_support import (BUNDLE_ARGUMENT, BUNDLE_HELP, BUNDLE_OPTION, JSON_OPTION, PROGRESS_OPTION, app,
                                  show, user_errors)
from pah_edge.errors import ConfigError
from pah_edge.task_free import STATS_PER_CLASS

tasks_app = typer.Typer(help="List a bundle's tasks; `remove` or `rename` one.", no_args_is_help=False)
app.add_typer(tasks_app, name="tasks")
# A subcommand's own --bundle wins; without it, `tasks --bundle B remove NAME` means B, not ./bundle.
SUB_BUNDLE_OPTION = typer.Option(None, "--bundle", help=f"{BUNDLE_HELP} (default: the --bundle given to `tasks`, else ./bundle)")
RUNTIME_OPTION = typer.Option("auto", help="auto (TensorRT engine if built, else ONNX Runtime), tensorrt, onnxruntime.")


@app.command("learn-task")
@user_errors
def learn_task(
    folder: Path = typer.Argument(..., help="The new task's images: FOLDER/<class>/*.png|jpg|jpeg|bmp, 2 classes or more."),
    bundle: Path = BUNDLE_OPTION,
    name: Optional[str] = typer.Option(None, help="Task name (default: the folder's name)."),
    budget_mb: float = typer.Option(300, help="Peak memory of this process in MB (Python, runtime, models, features, batches; then the statistics and the fit, the backbone released); sizes the backbone batch, and a budget below the minimum is refused naming it."),
    runtime: str = RUNTIME_OPTION,
    precision: str = typer.Option("fp32", help="Backbone: fp32, or int8 (the model `pah-edge calibrate` installed); the task records it."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite a task of the same name."),
    as_json: bool = JSON_OPTION,
    progress: bool = PROGRESS_OPTION,
):
    """Learn a new task on this device: only its prototypes; old tasks stay bit-identical."""
    from pah_edge.device.api import Device

    # Not started with `with`: learning starts its own backbone after checking the folder and options.
    dev = Device(bundle, runtime=runtime, precision=precision)
    show(dev.learn_task(folder, name=name, replace=replace, budget_mb=budget_mb, progress=progress), as_json)


@app.command()
@user_errors
def predict(
    images: Optional[list[Path]] = typer.Argument(None, help="Image files or folders (searched recursively)."),
    bundle: Path = BUNDLE_OPTION,
    task: Optional[str] = typer.Option(None, help="Only this task's classes, with its generated head (default: every task)."),
    any_task: bool = typer.Option(False, "--any-task", help="Every task (the default; kept as an alias)."),
    novelty_threshold: Optional[float] = typer.Option(None, help="Novelty above which an image is unknown (default: the bundle's)."),
    runtime: str = RUNTIME_OPTION,
    precision: str = typer.Option("auto", help="Backbone: auto (each task on the one it was learned on), or fp32 / int8 for every task (a task learned on the other gets a warning)."),
    batch_size: int = typer.Option(32, help="Images per backbone call (files; frames of --video/--camera go one by one)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON list of {path, task, label, confidence, novelty, known}."),
    video: Optional[Path] = typer.Option(None, help="Predict a video file's frames instead: one JSON line per frame (needs pah-edge\\[camera])."),
    camera: Optional[int] = typer.Option(None, help="Predict a camera's frames (OpenCV index, e.g. 0) until it stops or Ctrl-C: one JSON line per frame."),
    every: int = typer.Option(1, help="--video/--camera: predict every N-th frame only."),
    max_frames: Optional[int] = typer.Option(None, help="--video/--camera: stop after this many predicted frames."),
):
    """Predict each image's task and class over every task, or say it is unknown: `path  task/label  confidence  novelty`.

    With --video or --camera: one JSON line per frame, {frame, time_ms, task, label, confidence, novelty, known}.
    """
    import json

    from pah_edge.device.api import Device
    from pah_edge.device.listing import prediction_lines
    from pah_edge.device.video import predict_frames

    if task is not None and any_task:
        raise ConfigError("give --task NAME or --any-task, not both")
    sources = [name for name, given in (("IMAGES", bool(images)), ("--video", video is not None),
                                        ("--camera", camera is not None)) if given]
    if len(sources) != 1:
        raise ConfigError(f"give one of IMAGE_OR_DIR..., --video FILE and --camera INDEX, not {' and '.join(sources)}"
                          if sources else "give image files or folders, --video FILE or --camera INDEX")
    options = {"runtime": runtime, "precision": precision, "novelty_threshold": novelty_threshold}
    if not images:
        for line in predict_frames(bundle, video=video, camera=camera, every=every, max_frames=max_frames, task=task,
                                   **options):
            print(json.dumps(line), flush=True)  # at once: a pipe sees each frame as it comes
        return
    with Device(bundle, **options) as dev:
        results = [p.to_dict() for p in dev.predict_files(images, task=task, batch_size=batch_size)]
    typer.echo(json.dumps(results, indent=2) if as_json else "\n".join(prediction_lines(results)))


@tasks_app.callback(invoke_without_command=True)
@user_errors
def tasks_list(ctx: typer.Context, bundle: Path = BUNDLE_OPTION,
               as_json: bool = typer.Option(False, "--json", help="Print the registry entries as one JSON list.")):
    """List a bundle's tasks: classes, images seen, accuracy, created, size, source."""
    if ctx.invoked_subcommand is not None:
        return
    import json

    from pah_edge.bundle import Bundle
    from pah_edge.device.listing import task_lines

    records = Bundle.open(bundle, verify=False).tasks()  # listing reads the registry only
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records], indent=2))
    else:
        typer.echo("\n".join(task_lines(records)) if records else
                   f"no tasks in {bundle}: learn one with `pah-edge learn-task FOLDER --bundle {bundle}`")


@tasks_app.command("remove")
@user_errors
def tasks_remove(ctx: typer.Context, name: str = typer.Argument(..., help="Task to remove."),
                 bundle: Optional[Path] = SUB_BUNDLE_OPTION):
    """Unregister a task and delete its prototypes file."""
    device, path = _registry(ctx, bundle)
    device.remove_task(name)
    typer.echo(f"removed task {name!r} from {path}")


@tasks_app.command("rename")
@user_errors
def tasks_rename(ctx: typer.Context, old: str = typer.Argument(..., help="Current task name."),
                 new: str = typer.Argument(..., help="New task name (A-Z a-z 0-9 . _ -)."),
                 bundle: Optional[Path] = SUB_BUNDLE_OPTION):
    """Rename a task; its prototypes are unchanged."""
    device, path = _registry(ctx, bundle)
    device.rename_task(old, new)
    typer.echo(f"renamed task {old!r} to {new!r} in {path}")


def _registry(ctx: typer.Context, bundle: Optional[Path]):
    """(A Device over the bundle's registry only, since graph hashes do not matter to it, its path)."""
    from pah_edge.bundle import Bundle
    from pah_edge.device.api import Device

    path = bundle if bundle is not None else ctx.parent.params["bundle"]
    return Device(Bundle.open(path, verify=False)), path


@app.command("task-stats")
@user_errors
def task_stats(
    bundle: Path = BUNDLE_ARGUMENT,
    checkpoint: Optional[Path] = typer.Option(None, help="The run the bundle was exported from: its data gives the workstation tasks' statistics (needs pah-edge[train])."),
    images: Optional[Path] = typer.Option(None, help="Labelled images of the bundle's tasks: DIR/<task>/<class>/*."),
    stats_per_class: int = typer.Option(STATS_PER_CLASS, help="With --checkpoint: images per class of the run's data."),
    progress: bool = PROGRESS_OPTION,
):
    """Add task-free statistics (and the novelty threshold) to a bundle exported before they existed."""
    from pah_edge.bundle import Bundle
    from pah_edge.device.task_stats import install_task_free, task_features_from_folder

    if (checkpoint is None) == (images is None):
        raise ConfigError("give --checkpoint RUN_DIR (the run the bundle came from) or --images DIR/<task>/<class>/*")
    opened = Bundle.open(bundle)
    if checkpoint is not None:
        from pah_edge.export.task_free_data import checkpoint_task_features

        features = checkpoint_task_features(opened, checkpoint, per_class=stats_per_class, progress=progress)
    else:
        features = task_features_from_folder(opened, images, progress=progress)
    with opened.lock():
        show(install_task_free(opened, features))
