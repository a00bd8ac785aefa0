"""The workstation's images of a run's tasks as features for the bundle's task-free statistics.

Export calls this for a fresh bundle; ``pah-edge task-stats --checkpoint RUN_DIR`` for a bundle
exported before the statistics existed. Features come from the bundle's FP32 ONNX backbone.
"""

from __future__ import annotations

from pathlib import Path

from pah_edge.bundle import Bundle, unique_task_names
from pah_edge.workstation.checkpoint import CHECKPOINT_NAME, load_checkpoint
from pah_edge.workstation.config import RunConfig
from pah_edge.device.bundle_runners import backbone_runner
from pah_edge.device.task_stats import TaskFeatures, features_of_arrays
from pah_edge.errors import CheckpointError, ConfigError
from pah_edge.preprocess import Preprocess
from pah_edge.progress import progress_bar
from pah_edge.task_free import STATS_PER_CLASS
from pah_edge.workstation.data.splits import MIN_PER_CLASS
from pah_edge.workstation.trainer import load_tasks


def check_stats_per_class(per_class: int) -> None:
    """ConfigError naming --stats-per-class unless the run's data can be split with it (before any work)."""
    if per_class < MIN_PER_CLASS:  # the run's data is split into train, val and test per class
        raise ConfigError(f"--stats-per-class must be at least {MIN_PER_CLASS}, got {per_class}")


def run_task_features(bundle: Bundle, cfg: RunConfig, preprocess: Preprocess, *,
                      per_class: int = STATS_PER_CLASS, progress: bool = True) -> list[TaskFeatures]:
    """Features of the run's train images (statistics) and val images (threshold) for each of its
    tasks that ``bundle`` registers as a workstation task (matched by name)."""
    registered = {r.name for r in bundle.tasks() if r.source == "workstation"}
    loaded = load_tasks(cfg, preprocess, per_class)
    # Named as export named them: two folders whose names clean up alike stay two tasks.
    tasks = [(name, t) for name, t in zip(unique_task_names([t.name for t in loaded]), loaded) if name in registered]
    result = []
    with backbone_runner(bundle, "onnxruntime", "fp32") as runner, \
            progress_bar(progress, "statistics", sum(len(t.train) + len(t.val) for _, t in tasks)) as advance:
        for name, task in tasks:
            fit = features_of_arrays(runner, task.train.images, bundle)
            held_out = features_of_arrays(runner, task.val.images, bundle)
            advance(len(task.train) + len(task.val))
            result.append(TaskFeatures(name, fit, task.train.labels, held_out))
    return result


def checkpoint_task_features(bundle: Bundle, checkpoint: Path, *, per_class: int = STATS_PER_CLASS,
                             progress: bool = True) -> list[TaskFeatures]:
    """:func:`run_task_features` for the run at ``checkpoint`` (run directory or its checkpoint.pt)."""
    check_stats_per_class(per_class)
    path = Path(checkpoint)
    path = path / CHECKPOINT_NAME if path.is_dir() else path
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {checkpoint}: pass the run directory the bundle was exported from")
    state = load_checkpoint(path)
    return run_task_features(bundle, RunConfig.from_dict(state["config"]), Preprocess.from_dict(state["preprocess"]),
                             per_class=per_class, progress=progress)
