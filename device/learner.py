"""On-device learning of a new task: only its prototypes, with the backbone and generator frozen.

    minimise over P_new:  CE( B(x) @ H(P_new)^T , y )  (+ a pull to the start, see prototype_fit)

Features ``B(x)`` do not depend on ``P_new``, so they are computed once (forward-only, on the
fastest runtime here) and cached. The prototypes start at the class-mean classifier (linear
generators) or the class-mean thumbnails (others), and Adam fits them with the gradient that
``learner_step.onnx`` computes: first without the validation images, to report an honest
validation accuracy, then on every image for the stored task. Old tasks, ``B`` and ``H`` are never
written: zero forgetting by construction. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pah_edge.bundle import LOCK_WAIT_S, Bundle, task_name_from, validate_task_name
from pah_edge.folders import class_rng
from pah_edge.generators import generator_kind
from pah_edge.device.bundle_runners import backbone_runner, generator_runner
from pah_edge.device.images import (BATCHES_AHEAD, BatchStream, ClassFolders, check_no_class_empty, frame_stream,
                                    scan_class_folders, warn_ignored, warn_skipped)
from pah_edge.device.prototype_fit import FitResult, PrototypeObjective, fit_prototypes
from pah_edge.device.prototype_init import LinearHeads, class_mean_head, initial_prototypes, thumbnails
from pah_edge.device.runtimes import Runner, create_runner
from pah_edge.errors import ConfigError, DataError, FrameError
from pah_edge.machine import current_rss_mb, peak_rss_mb, release_freed_memory
from pah_edge.preprocess import Preprocess, check_frame
from pah_edge.progress import progress_bar
from pah_edge.report import Report, percent
from pah_edge.task_free import task_stats

log = logging.getLogger("pah_edge")

MAX_BATCH = 64
# Bytes per image of a batch: its float32 input x this, for the runtime's activations and arena
# (fitted on EfficientNet-Lite0 at 224 px, where the arena grows faster than the batch: docs/benchmarks.md,
# "learn-task's budget", as are the two constants below).
ACTIVATION_FACTOR = 36
SLACK_MB = 32  # while features are extracted: decoded images, Python's own growth
# Once the backbone is released, the task-free statistics' work: an N x D float64 array's worth and
# this many min(N, D)^2 float64 arrays (the Gram matrix, its eigen-decomposition's copy, workspace and
# vectors; fitted with 100 to 1,990 images).
STATS_COPIES = 3
# ... and the rest after the backbone: the bundle's shared statistics, a linear generator's basis heads,
# the fit's runtime arenas and arrays.
FIT_MB = 64
UNBOUNDED_BATCH_MB = 75  # a batch's share without a budget (6 images at 224 px)


def batch_size_for(budget_mb: float | None, image_size: int, *, in_use_mb: float = 0.0, kept_mb: float | None = None,
                   images: int = 0, feature_dim: int = 0) -> int:
    """Images per backbone batch that keep the process's peak RSS within ``budget_mb`` MB.

    Two stages must fit. Extracting features: what the process holds with its models loaded
    (``in_use_mb``: Python, the runtimes and their models), the features of ``images`` images, then
    each image's input and activations. Then, with the backbone released: what the process keeps
    (``kept_mb``; None: the backbone is not released), the features, the statistics and the fit.
    1 to 64; ConfigError naming the minimum when not even one image fits. None (an application's own
    process, whose memory is not learn-task's to bound): batches of about ``UNBOUNDED_BATCH_MB``.
    """
    # Its float32 input times the activation factor, plus the batches read ahead: input and uint8 images.
    per_image = 3 * image_size * image_size * (4 * ACTIVATION_FACTOR + BATCHES_AHEAD * (4 + 1)) / 2**20
    if budget_mb is None:
        return min(max(int(UNBOUNDED_BATCH_MB / per_image), 1), MAX_BATCH)
    check_budget(budget_mb)
    features = 4 * images * feature_dim / 2**20
    extracting = in_use_mb + features + SLACK_MB
    stats = (8 * images * feature_dim + STATS_COPIES * 8 * min(images, feature_dim) ** 2) / 2**20
    after = (in_use_mb if kept_mb is None else kept_mb) + features + stats + FIT_MB
    batch = int((budget_mb - extracting) / per_image)
    if batch < 1 or budget_mb < after:
        minimum = np.ceil(max(extracting + per_image, after))
        raise ConfigError(f"--budget-mb {budget_mb:g} is below what learning {images} images at {image_size} px "
                          f"needs here: pass --budget-mb {minimum:.0f} or more (extracting features: {in_use_mb:.0f} "
                          f"MB for Python, the runtime and its models, {features + SLACK_MB:.0f} MB for features and "
                          f"slack, {per_image:.0f} MB per image of a batch; then {after:.0f} MB for the statistics and "
                          "the fit, the backbone released)")
    return min(batch, MAX_BATCH)


def check_budget(budget_mb: float | None) -> None:
    """ConfigError unless ``budget_mb`` is None or a positive, finite number of MB."""
    if budget_mb is not None and not 0 < budget_mb < float("inf"):
        raise ConfigError(f"--budget-mb is a positive number of MB, got {budget_mb!r}")


def split_train_val(labels: np.ndarray, class_names, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices into ``labels``; per class val = round(f * n), at least 1 when n >= 2.

    The draw depends only on the seed and the class's own name, as in the workstation's splits.
    """
    train, val = [], []
    for label, name in enumerate(class_names):
        members = np.flatnonzero(labels == label)
        n = len(members)
        # A val image when there are 2, and every class keeps a training image.
        n_val = min(max(round(val_fraction * n), 1), n - 1) if val_fraction > 0 and n >= 2 else 0
        order = class_rng(seed, name).permutation(members)
        val.append(order[:n_val])
        train.append(order[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


@dataclass
class Features:
    """What one pass over the images leaves: features [N, D], labels [N], init thumbnails [N, c, s, s]
    (None when the generator starts from class-mean features instead)."""

    features: np.ndarray
    labels: np.ndarray
    thumbs: np.ndarray | None
    skipped: list
    seconds: float


def extract_features(runner: Runner, stream: BatchStream, labels: np.ndarray, bundle: Bundle,
                     progress: bool) -> Features:
    """Run every image of ``stream`` (labels [N]) through the backbone once; keep float32 features (and
    init thumbnails)."""
    channels, size = bundle.prototype_shape[0], bundle.prototype_shape[1]
    features = np.empty((len(labels), bundle.feature_dim), np.float32)
    keep_thumbs = not _starts_from_features(bundle)
    thumbs = np.empty((len(labels), channels, size, size), np.float32) if keep_thumbs else None
    read = np.zeros(len(labels), bool)
    start = time.perf_counter()
    with progress_bar(progress, "features", len(labels)) as advance:
        for inputs, positions in stream:
            features[positions] = runner.infer({"images": inputs})["features"]
            if keep_thumbs:
                thumbs[positions] = thumbnails(inputs, channels, size)
            read[positions] = True
            advance(len(positions))
    seconds = time.perf_counter() - start
    return Features(features[read], labels[read], thumbs[read] if keep_thumbs else None, stream.skipped, seconds)


@dataclass(frozen=True)
class NewTask:
    """A new task's labelled images, from a folder or from arrays; nothing is decoded yet."""

    class_names: tuple[str, ...]
    labels: np.ndarray  # int64 [N]: index into class_names per image
    stream: Callable[[Preprocess, int], BatchStream]  # (preprocessing, batch size) -> batches
    origin: str  # where the images come from, for messages
    default_name: str | None = None
    folders: ClassFolders | None = None  # from a folder: its ignored files, and which files a class lost

    @classmethod
    def from_folder(cls, folder: str | Path) -> NewTask:
        """``folder/<class>/<images>``; DataError if it cannot make a task."""
        folders = scan_class_folders(folder)
        files = folders.paths()
        return cls(folders.class_names, folders.labels(), lambda pre, batch: BatchStream(files, pre, batch),
                   str(folders.root),
                   task_name_from(folders.root.resolve().name), folders)

    @classmethod
    def from_arrays(cls, images: Sequence[np.ndarray], labels: Sequence, *, bgr: bool = False) -> NewTask:
        """Frames (uint8 [H, W, 3] RGB, or BGR with ``bgr``, or [H, W] gray) with one label each.

        Labels are class names (str) or class numbers (int, named by their digits); classes are ordered
        by name as class folders are ("10" before "2"), and images are taken class by class in their
        given order. Every frame is checked here (FrameError), none is resized.
        """
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels: give one label per image")
        for i, image in enumerate(images):
            try:
                check_frame(image)
            except FrameError as exc:
                raise FrameError(f"image {i}: {exc}") from None
        class_names, indices = _classes_of(labels)
        # Class by class, as a folder is read: the fit's sums run in the same order, so the same images
        # give the same task to the bit however the classes were interleaved.
        order = np.argsort(indices, kind="stable")
        grouped = [images[i] for i in order]
        return cls(class_names, indices[order], lambda pre, batch: frame_stream(grouped, pre, batch, bgr=bgr),
                   "the arrays")


def _classes_of(labels: Sequence) -> tuple[tuple[str, ...], np.ndarray]:
    """(class names, int64 class index per label) of labels that are all names (str) or all numbers (int)."""
    values = list(labels)
    if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        values = [str(int(v)) for v in values]  # a class number is the name of its folder
    if all(isinstance(v, str) for v in values):
        order = sorted(set(values))  # as class folders sort: by name, so "10" before "2"
    else:
        raise DataError("labels must be all class names (str) or all class numbers (int): "
                        "convert them, e.g. [str(label) for label in labels]")
    if len(order) < 2:
        raise DataError(f"the labels name {len(order)} class(es); a task needs at least 2 classes")
    index = {value: i for i, value in enumerate(order)}
    return tuple(order), np.asarray([index[v] for v in values], np.int64)


def accuracy(heads: np.ndarray, features: np.ndarray, labels: np.ndarray) -> float | None:
    """Fraction of ``features`` whose largest logit ``features @ heads.T`` is their label; None if empty."""
    if len(labels) == 0:
        return None
    return float(np.mean(np.argmax(features @ heads.T, axis=1) == labels))


@dataclass(frozen=True, kw_only=True)
class LearnReport(Report):
    """What `learn` learned: ``images`` {train, val}; ``skipped`` (unreadable images); ``ignored_files``;
    ``train_accuracy`` (final fit, all images) and ``val_accuracy`` (the fit without the validation
    images; None without them); ``initial_loss`` / ``final_loss`` (cross-entropy of the final fit);
    ``steps``, ``converged``; ``runtime``, ``precision``, ``batch_size``; ``feature_images_per_s``
    (decoding included); ``feature_seconds``, ``optimise_seconds``, ``wall_seconds`` (s);
    ``peak_rss_mb`` (MB); ``bytes_stored`` (prototypes), ``stats_bytes_stored`` (task-free statistics;
    0 for a bundle without them) and ``file``."""

    name: str
    classes: list[str]
    images: dict[str, int]
    skipped: int
    ignored_files: int
    train_accuracy: float
    val_accuracy: float | None
    initial_loss: float
    final_loss: float
    steps: int
    converged: bool
    runtime: str
    precision: str
    batch_size: int
    feature_images_per_s: float | None
    feature_seconds: float
    optimise_seconds: float
    wall_seconds: float
    peak_rss_mb: float
    bytes_stored: int
    stats_bytes_stored: int
    file: str

    def lines(self) -> list[str]:
        """``learned 'digits': 10 classes, 800 train / 200 val images, train 97.1% val 93.0%, ...``."""
        return [f"learned {self.name!r}: {len(self.classes)} classes, {self.images['train']} train / "
                f"{self.images['val']} val images, train {percent(self.train_accuracy)} val {percent(self.val_accuracy)}, "
                f"{self.feature_images_per_s or 0:.0f} img/s features, {self.wall_seconds:.1f} s wall, "
                f"peak RSS {self.peak_rss_mb:.0f} MB, {self.bytes_stored:,} bytes of prototypes + "
                f"{self.stats_bytes_stored:,} of task-free statistics stored"]


def learn_task(bundle: Bundle, folder: str | Path, *, name: str | None = None, **options) -> LearnReport:
    """Learn the task in ``folder`` (``<class>/<images>``) into ``bundle``; returns the report.

    ``name`` defaults to the folder's name. Unreadable images are skipped with one warning; a class
    left without any is a DataError. ``options``: see `learn`.
    """
    return learn(bundle, lambda: NewTask.from_folder(folder), name=name, **options)


def learn_task_arrays(bundle: Bundle, images: Sequence[np.ndarray], labels: Sequence, *, name: str,
                      bgr: bool = False, **options) -> LearnReport:
    """Learn a task from in-memory frames with one label each (see `NewTask.from_arrays`); returns the report.

    The same images in the same order within each class give the same task as `learn_task` on a
    folder holding them as PNG or BMP files (a JPEG file is decoded at reduced scale: ``load_image``).
    ``options``: see `learn`.
    """
    return learn(bundle, lambda: NewTask.from_arrays(images, labels, bgr=bgr), name=name, **options)


def learn(bundle: Bundle, new_task: Callable[[], NewTask], *, name: str | None = None, budget_mb: float | None = None,
          runtime: str = "auto", precision: str = "fp32", replace: bool = False, val_fraction: float = 0.2,
          max_steps: int = 200, lr: float = 0.5, weight: float = 0.01, patience: int = 25, seed: int = 0,
          progress: bool = True, lock_wait_s: float | None = LOCK_WAIT_S, backbone: Runner | None = None) -> LearnReport:
    """Learn the task that ``new_task()`` describes into ``bundle``; returns the report.

    Everything that can be checked is checked before any image is decoded: the options, then
    ``new_task()`` (scanning the folder, checking the frames). The bundle's lock is
    held from the name check to the registration (another learn-task waits up to ``lock_wait_s``
    s), and nothing is written before the final registration, so an interrupted run leaves the
    bundle as it was. ``budget_mb``: the process's peak RSS in MB, which sizes the backbone batch
    (None: no bound, for an application's own process; see `batch_size_for`). ``precision`` int8 computes the
    features with the calibrated INT8 backbone (`pah-edge calibrate`); the task records it, and
    prediction uses that backbone for it by default.
    ``backbone``: an active backbone runner to use instead of starting one (``runtime`` and
    ``precision`` must describe it). ``lr``, ``weight``, ``patience``, ``max_steps``: see
    ``prototype_fit.fit_prototypes``.
    """
    wall = time.perf_counter()
    _check_options(val_fraction=val_fraction, max_steps=max_steps, lr=lr, weight=weight, patience=patience)
    task = new_task()
    name = validate_task_name(name) if name is not None else task.default_name
    bundle.check_class_count(len(task.class_names), task.origin)
    check_budget(budget_mb)  # before any model loads; whether it is enough is known once they are loaded
    with ExitStack() as stack:
        # Runners are activated before the lock: a missing engine or runtime fails with the bundle untouched.
        heads_of = stack.enter_context(generator_runner(bundle))
        # The step graph is tiny: one thread beats a pool's hand-offs.
        objective = PrototypeObjective(
            stack.enter_context(create_runner("onnxruntime-cpu", bundle.graph_path("learner_step"), threads=1)))
        # The budget is the process's peak RSS, all of it: measured once the models are loaded (building a
        # session leaves freed memory behind, given back first), and without the backbone, which is released
        # once the features are extracted unless the caller lent it.
        release_freed_memory()
        kept_mb = current_rss_mb() if backbone is None else None  # a lent backbone stays loaded
        own_backbone = stack.enter_context(ExitStack())
        if backbone is None:
            backbone = own_backbone.enter_context(backbone_runner(bundle, runtime, precision))
        release_freed_memory()
        batch = batch_size_for(budget_mb, bundle.preprocess.image_size, in_use_mb=current_rss_mb(), kept_mb=kept_mb,
                               images=len(task.labels), feature_dim=bundle.feature_dim)
        batch = min(batch, backbone.max_batch or batch)
        stack.enter_context(bundle.lock(lock_wait_s))
        bundle.check_name_free(name, replace=replace)
        if task.folders is not None:
            warn_ignored(task.folders)
        log.info("extracting features of %d images on %s, batch %d", len(task.labels), backbone.name, batch)
        extracted = extract_features(backbone, task.stream(bundle.preprocess, batch), task.labels, bundle, progress)
        own_backbone.close()  # its weights and arena make room for the statistics and the fit
        release_freed_memory()
        if task.folders is not None:
            check_no_class_empty(task.folders, extracted.labels, extracted.skipped)  # its error names the skipped files
        warn_skipped(extracted.skipped, len(task.labels))
        # Before the fit, whose arrays and arenas would otherwise sit under the statistics' work.
        stats = _task_free_stats(bundle, extracted, len(task.class_names))
        release_freed_memory()  # the statistics' temporaries, off the fit's peak

        train, val = split_train_val(extracted.labels, task.class_names, val_fraction, seed)
        everything = np.arange(len(extracted.labels))
        start, coordinates = _starting_point(bundle, heads_of, extracted, len(task.class_names))
        with progress_bar(progress, "prototypes", max_steps * (2 if len(val) else 1)) as advance:
            def fit(indices, warm=None) -> FitResult:
                return fit_prototypes(objective, start(indices), extracted.features[indices], extracted.labels[indices],
                                      max_steps=max_steps, lr=lr, weight=weight, patience=patience, seed=seed,
                                      coordinates=coordinates, warm=warm, advance=advance)
            held_out = fit(train) if len(val) else None
            # Most images are shared: the held-out fit is a close start for the final one.
            result = fit(everything, warm=held_out.prototypes if held_out is not None else None)

        def accuracy_of(prototypes, indices):
            return accuracy(heads_of.infer({"prototypes": prototypes})["head"], extracted.features[indices],
                            extracted.labels[indices])

        train_acc = accuracy_of(result.prototypes, everything)
        val_acc = accuracy_of(held_out.prototypes, val) if held_out is not None else None
        record = bundle.add_task(name=name, class_names=task.class_names, prototypes=result.prototypes,
                                 images_seen=len(extracted.labels), source="device", replace=replace,
                                 accuracy=val_acc if val_acc is not None else train_acc,
                                 stats=stats,
                                 precision=precision)
    return LearnReport(
        name=name,
        classes=list(task.class_names),
        images={"train": int(len(train)), "val": int(len(val))},
        skipped=len(extracted.skipped),
        ignored_files=task.folders.ignored if task.folders is not None else 0,
        train_accuracy=train_acc,
        val_accuracy=val_acc,
        initial_loss=result.initial_loss,
        final_loss=result.final_loss,
        steps=result.steps,
        converged=result.converged,
        runtime=backbone.name,  # a closed runner keeps its name
        precision=precision,
        batch_size=batch,
        feature_images_per_s=len(extracted.labels) / extracted.seconds if extracted.seconds > 0 else None,
        feature_seconds=extracted.seconds,
        optimise_seconds=result.seconds + (held_out.seconds if held_out is not None else 0.0),
        wall_seconds=time.perf_counter() - wall,
        peak_rss_mb=peak_rss_mb(),
        bytes_stored=record.bytes,
        stats_bytes_stored=(bundle.path / record.stats_file).stat().st_size if record.stats_file else 0,
        file=record.file,
    )


def _task_free_stats(bundle: Bundle, extracted: Features, classes: int):
    """The task's statistics for task-free prediction, or None (with a warning) for a bundle without them."""
    if bundle.shared_stats() is None:
        log.warning("%s has no task-free statistics, so this task is only predicted with --task; add them with "
                    "`pah-edge task-stats %s --images DIR`", bundle.path, bundle.path)
        return None
    return task_stats(extracted.features, extracted.labels, classes)


def _starting_point(bundle: Bundle, generator: Runner, extracted: Features, classes: int):
    """(``start(indices)`` -> float32 [C, c, s, s] that a fit on those images starts from, the fit's
    coordinates: see ``fit_prototypes``)."""
    shape = bundle.prototype_shape
    if not _starts_from_features(bundle):
        return lambda indices: initial_prototypes(extracted.thumbs[indices], extracted.labels[indices], classes), None
    # A linear generator's head of the k-th unit prototype is its k-th basis head.
    units = np.eye(int(np.prod(shape)), dtype=np.float32).reshape(-1, *shape)
    linear = LinearHeads(generator.infer({"prototypes": units})["head"], shape)

    def start(indices):
        return linear.prototypes_for(class_mean_head(extracted.features[indices], extracted.labels[indices], classes))

    return start, linear


def _starts_from_features(bundle: Bundle) -> bool:
    """Linear generators start from the class-mean classifier; the others from class-mean thumbnails."""
    return generator_kind(bundle.generator_kind).linear


def _check_options(*, val_fraction: float, max_steps: int, lr: float, weight: float, patience: int) -> None:
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction is a fraction in [0, 1), got {val_fraction!r}")
    whole = all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in (max_steps, patience))
    if not whole or max_steps < 1 or patience < 1:
        raise ConfigError(f"max_steps and patience must be whole numbers >= 1, got {max_steps!r} and {patience!r}")
    if not 0 < lr < math.inf:
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}")
    if not 0 <= weight < math.inf:
        raise ConfigError(f"weight must be a finite number, 0 or more, got {weight!r}")
