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

from pah_edge.errors import PahEdgeError

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
    """Print a PahEdgeError as one line and exit 1; anything else is a bug and keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PahEdgeError as exc:
            # escape: a message quoting `pip install 'pah-edge[tensorrt]'` must not lose "[tensorrt]" as markup
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


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
    pretrained: bool = typer.Option(False, "--pretrained", help="Start from ImageNet weights (torchvision cache or download)."),
    weights: Optional[Path] = typer.Option(None, help="Local backbone state dict to start from."),
    generator: str = typer.Option("classwise", help="Hypernetwork: classwise (any class count), task-mlp (the paper's), linear-head."),
    prototype_size: int = typer.Option(16, help="Prototype side in px."),
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
    typer.echo(f"average accuracy {100 * metrics['average_accuracy']:.2f}%  forgetting {100 * metrics['forgetting']:.2f}%  "
               f"BWT {100 * metrics['bwt']:+.2f}%  -> {out / 'metrics.json'}")


ENGINE_PRECISIONS = ("fp16", "fp32", "int8")


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
):
    """Export a trained run as a bundle: ONNX graphs checked against PyTorch, manifest, task registry."""
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
                           backbone=backbone)
    _print_export_report(report)
    if engine is not None:
        from pah_edge.export.tensorrt_build import build_engines

        for path in build_engines(out, precision=engine):
            typer.echo(f"engine -> {path}")


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
    if not report["ok"]:
        failed = sorted({f"{r['graph']} on {r['runtime']}" for r in report["rows"] if not r["ok"]})
        err_console.print(f"[bold red]error:[/] {', '.join(failed)} beyond tolerance; re-export the bundle "
                          "or rebuild its engines", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _tolerance_text(tolerance: dict) -> str:
    return " ".join(f"{kind}<{limit:.0e}" for kind, limit in tolerance.items() if limit is not None)


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
        table.add_column(column, justify="right" if column.endswith("err") else "left")
    for row in report["rows"]:
        table.add_row(row["graph"], row["runtime"], row["output"], f"{row['abs']:.1e}", f"{row['rel']:.1e}",
                      _tolerance_text(row["tolerance"]), "yes" if row["ok"] else "NO")
    if report["rows"]:
        Console().print(table)
    else:
        typer.echo("nothing to compare: only ONNX Runtime is available here (hashes verified)")


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
        message = exc.format_message()
        if not message:  # bare `pah-edge`: the help text was the answer
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        hint = f"{ctx.command_path} --help" if ctx else "pah-edge --help"
        err_console.print(f"[bold red]error:[/] {message}; see `{hint}`", highlight=False, soft_wrap=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
