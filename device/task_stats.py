"""Write a bundle's task-free statistics from labelled images of its tasks (``pah-edge task-stats``).

Export calls :func:`install_task_free` with the workstation's images; ``pah-edge task-stats --images``
adds the statistics to a bundle exported before they existed, from ``DIR/<task>/<class>/*``. Features
come from the bundle's FP32 ONNX backbone, the one ``predict`` uses by default. Never imports torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pah_edge.bundle import Bundle, BundleError
from pah_edge.device.bundle_runners import backbone_runner, features
from pah_edge.device.images import BatchStream, check_no_class_empty, scan_class_folders, warn_skipped
from pah_edge.device.runtimes import Runner
from pah_edge.errors import DataError
from pah_edge.folders import subfolders
from pah_edge.preprocess import to_input
from pah_edge.progress import progress_bar
from pah_edge.report import Report
from pah_edge.task_free import TaskFreeRule, UNKNOWN_RATE, with_threshold, workstation_stats

log = logging.getLogger("pah_edge")

BATCH = 32
HELD_OUT_FRACTION = 0.2  # of each class's folder images, for the novelty threshold only


@dataclass
class TaskFeatures:
    """A registered task's features: ``fit`` [N, D] with ``labels`` [N], ``held_out`` [M, D] (threshold)."""

    name: str
    fit: np.ndarray
    labels: np.ndarray
    held_out: np.ndarray


@dataclass(frozen=True, kw_only=True)
class TaskFreeReport(Report):
    """The task-free statistics `install_task_free` wrote: from ``images`` images of ``tasks``, and the
    novelty ``threshold`` that calls ``unknown_rate`` (a fraction) of ``held_out_images`` unknown."""

    images: int
    held_out_images: int
    threshold: float
    unknown_rate: float
    tasks: list[str]

    def lines(self) -> list[str]:
        """``task-free statistics for a, b from 2400 images; novelty threshold 1.234 calls 5 % of ...``."""
        return [f"task-free statistics for {', '.join(self.tasks)} from {self.images} images; novelty threshold "
                f"{self.threshold:.3f} calls {100 * self.unknown_rate:.0f} % of {self.held_out_images} held-out "
                "images unknown"]


def install_task_free(bundle: Bundle, tasks: list[TaskFeatures], *, unknown_rate: float = UNKNOWN_RATE,
                      shown_path: Path | None = None) -> TaskFreeReport:
    """Fit the shared state and every given task's statistics; write them into ``bundle``.

    The novelty threshold is the one that calls ``unknown_rate`` of the held-out images unknown. The
    caller holds the bundle's lock (or owns the bundle, as export does, building it in a temporary
    folder: ``shown_path`` is the bundle's path in messages). DataError when a task left out keeps its
    statistics in the shared state (its scatter would be lost), or too few images are given.
    """
    _check_none_depends_on_the_old_state(bundle, {t.name for t in tasks})
    held_out = np.concatenate([t.held_out for t in tasks])
    if not len(held_out):
        raise DataError("no image is left to set the novelty threshold on: give at least 3 images in some class "
                        "(20 % of a class's images, at least one when it has 2, are held out for it; 2 more show "
                        "how the class varies)")
    classes = [len(bundle.task(t.name).class_names) for t in tasks]
    shared, stats = workstation_stats([(t.fit, t.labels, c) for t, c in zip(tasks, classes)])
    if not np.trace(shared.scatter) > 0:  # every class fitted on one image: no covariance to invert
        raise DataError("the images show no variation within a class: give at least 3 images in some class "
                        "(2 to measure how it varies, 1 held out for the novelty threshold)")
    rule = TaskFreeRule(shared, list(zip([t.name for t in tasks], stats)))
    shared = with_threshold(shared, rule.scores(held_out)[1], unknown_rate)
    bundle.write_shared_stats(shared)
    for task, task_stats in zip(tasks, stats):
        bundle.set_task_stats(task.name, task_stats)
    left_out = [r.name for r in bundle.tasks() if r.stats_file is None]
    if left_out:
        log.warning("task(s) %s have no task-free statistics and stay out of task-free prediction: give their "
                    "images, with those of %s, as DIR/<task>/<class>/* to `pah-edge task-stats %s --images DIR`",
                    ", ".join(left_out), ", ".join(t.name for t in tasks), shown_path or bundle.path)
    return TaskFreeReport(images=int(shared.count), held_out_images=len(held_out), threshold=shared.threshold,
                          unknown_rate=unknown_rate, tasks=[t.name for t in tasks])


def _check_none_depends_on_the_old_state(bundle: Bundle, given: set[str]) -> None:
    """DataError naming the tasks outside ``given`` whose within-class scatter lives only in the shared
    state (statistics written by export or task-stats: class means without a factor), which a new
    shared state would drop. Tasks learned on the device carry their own and stay as they are."""
    dependent = []
    for record in bundle.tasks():
        if record.name in given or record.stats_file is None:
            continue
        try:
            if not len(bundle.load_task_stats(record).factor):
                dependent.append(record.name)
        except BundleError:
            continue  # unreadable statistics already leave the task out of task-free prediction
    if dependent:
        raise DataError(f"task(s) {', '.join(dependent)} would lose their task-free statistics: their within-class "
                        "scatter lives in the shared state this rebuilds from the tasks given; give their images "
                        "too, as DIR/<task>/<class>/*")


def features_of_arrays(runner: Runner, images_uint8: np.ndarray, bundle: Bundle) -> np.ndarray:
    """Features [N, D] of uint8 NHWC images already at the bundle's input size."""
    parts = [features(runner, to_input(images_uint8[i:i + BATCH], bundle.preprocess), BATCH)
             for i in range(0, len(images_uint8), BATCH)]
    return np.concatenate(parts) if parts else np.zeros((0, bundle.feature_dim), np.float32)


def task_features_from_folder(bundle: Bundle, folder: str | Path, *, progress: bool = True) -> list[TaskFeatures]:
    """Features of ``folder/<task>/<class>/*`` for each registered task found there, class folders
    named as the task's classes; 20 % of each class (at least one image when it has 2) are held out."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"--images {root} is not a folder: give DIR/<task>/<class>/* for the bundle's tasks")
    registered = {r.name: r for r in bundle.tasks()}
    found = [p for p in subfolders(root) if p.name in registered]
    if not found:
        raise DataError(f"{root} has no folder named after a task of {bundle.path} "
                        f"({', '.join(registered) or 'none'}): lay it out as DIR/<task>/<class>/*")
    scans = [scan_class_folders(p) for p in found]
    for scan in scans:
        expected = registered[scan.root.name].class_names
        if scan.class_names != expected:
            raise DataError(f"{scan.root} holds classes {', '.join(scan.class_names)}, task {scan.root.name!r} has "
                            f"{', '.join(expected)}: give one folder per class of the task, named as the class")
    result = []
    with backbone_runner(bundle, "onnxruntime", "fp32") as runner, \
            progress_bar(progress, "features", sum(s.num_images for s in scans)) as advance:
        for scan in scans:
            labels = scan.labels()
            feats = np.zeros((len(labels), bundle.feature_dim), np.float32)
            read = np.zeros(len(labels), bool)
            stream = BatchStream(scan.paths(), bundle.preprocess, BATCH)
            for inputs, positions in stream:
                feats[positions], read[positions] = features(runner, inputs, BATCH), True
                advance(len(positions))
            check_no_class_empty(scan, labels[read], stream.skipped)
            warn_skipped(stream.skipped, len(labels))
            held = _held_out(labels, read, len(scan.class_names))
            fit = read & ~held
            result.append(TaskFeatures(scan.root.name, feats[fit], labels[fit], feats[held]))
    return result


def _held_out(labels: np.ndarray, read: np.ndarray, classes: int) -> np.ndarray:
    """Mask of the held-out images: per class round(20 %) of the readable ones, never the last one."""
    held = np.zeros(len(labels), bool)
    for label in range(classes):
        members = np.flatnonzero((labels == label) & read)
        n = min(max(round(HELD_OUT_FRACTION * len(members)), 1), len(members) - 1)
        held[np.random.default_rng(label).permutation(members)[:max(n, 0)]] = True
    return held
