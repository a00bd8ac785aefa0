"""Prediction on the device: images -> backbone features -> logits against each task's generated head.

Never imports torch. A task's head ``H(P_t)`` [C, D] is generated once per task and cached; logits
are ``features @ head.T`` and the confidence is their softmax, as in training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from pah_edge.bundle import Bundle, BundleError, TaskRecord
from pah_edge.device.bundle_runners import backbone_runner, features, generator_runner
from pah_edge.device.images import BatchStream, describe_skipped, warn_skipped
from pah_edge.errors import ConfigError, DataError
from pah_edge.preprocess import IMAGE_SUFFIXES

log = logging.getLogger("pah_edge")


def image_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; folders walked recursively for .png/.jpg/.jpeg/.bmp, sorted, hidden entries skipped.

    A path that does not exist raises DataError. A named file is taken whatever its suffix: the
    user asked for it, and decoding decides.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += _walk(path)
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"no file or folder {path}: check the path")
    return found


def _walk(folder: Path) -> list[Path]:
    files = []
    # followlinks=False (the default): a symlink loop cannot recurse forever.
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root, n) for n in sorted(names)
                  if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return files


def check_task_choice(task: str | None, any_task: bool) -> None:
    """ConfigError when both a task and ``any_task`` are given."""
    if task is not None and any_task:
        raise ConfigError("give --task NAME or --any-task, not both")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits [N, C], shifted by the row maximum so exp cannot overflow."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Predictor:
    """Predicts classes of images with a bundle's tasks; use as ``with Predictor(bundle) as p:``.

    runtime: auto, tensorrt, onnxruntime, onnxruntime-cuda or onnxruntime-cpu (for the backbone;
    the generator always runs on the CPU, once per task). precision: fp32 or int8 (the calibrated
    backbone from `pah-edge calibrate`).
    """

    def __init__(self, bundle: Bundle, *, runtime: str = "auto", precision: str = "fp32"):
        self.bundle = bundle
        self.backbone = backbone_runner(bundle, runtime, precision)
        self.generator = generator_runner(bundle)
        self.heads: dict[str, np.ndarray] = {}  # task name -> head float32 [C, D]
        self._head_sources: dict[str, str] = {}  # task name -> SHA-256 of the prototypes it came from

    def __enter__(self) -> Predictor:
        with ExitStack() as stack:  # a backbone that fails to start releases the generator again
            stack.enter_context(self.generator)
            stack.enter_context(self.backbone)
            self._runners = stack.pop_all()
        log.info("backbone on %s", self.backbone.name)
        return self

    def __exit__(self, *exc) -> None:
        self._runners.close()

    def head(self, record: TaskRecord) -> np.ndarray:
        """The task's head float32 [C, D], generated from its prototypes on first use."""
        # A task re-learned under the same name has new prototypes: regenerate, never serve a stale head.
        if self._head_sources.get(record.name) != record.sha256:
            prototypes = self.bundle.load_prototypes(record.name)
            self.heads[record.name] = self.generator.infer({"prototypes": prototypes})["head"].astype(np.float32)
            self._head_sources[record.name] = record.sha256
        return self.heads[record.name]

    def choose_tasks(self, task: str | None = None, any_task: bool = False) -> list[TaskRecord]:
        """The tasks a prediction scores: ``task``, all of them (``any_task``), or the default task.

        The default is the only task, else the most recently created one (the later-registered on a
        tie); the log says which.
        """
        check_task_choice(task, any_task)
        records = self.bundle.tasks()
        if not records:
            raise BundleError(f"{self.bundle.path} has no tasks: learn one with "
                              f"`pah-edge learn-task FOLDER --bundle {self.bundle.path}`")
        if task is not None:
            return [self.bundle.task(task)]
        if any_task:
            return records
        if len(records) == 1:
            return records
        newest = max(enumerate(records), key=lambda item: (item[1].created, item[0]))[1]
        log.info("using task %r, the newest of %d (pass --task NAME or --any-task to choose)",
                 newest.name, len(records))
        return [newest]

    def predict(self, paths: Sequence[str | os.PathLike[str]], *, task: str | None = None, any_task: bool = False,
                batch_size: int = 32) -> list[dict]:
        """One ``{"path", "task", "label", "confidence"}`` per readable image, in file order.

        label is the class (folder) name the task was learned from; confidence is its softmax
        probability in [0, 1]. ``any_task`` scores every task and keeps the (task, class) of highest
        confidence: a simple max-confidence rule, biased towards tasks with fewer classes (a 2-class
        task's softmax never drops below 0.5). Unreadable images are skipped with one warning; if
        none is readable, DataError.
        """
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        records = self.choose_tasks(task, any_task)
        files = image_files(paths)
        if not files:
            shown = ", ".join(map(str, paths))
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {shown}: "
                            "give image files or folders holding them")
        heads = [self.head(r) for r in records]
        stream = BatchStream([(file, 0) for file in files], self.bundle.preprocess, batch_size)
        results: list[dict] = []
        for inputs, positions in stream:
            feats = features(self.backbone, inputs, batch_size)
            results += _best_classes(feats, [files[i] for i in positions], records, heads)
        warn_skipped(stream.skipped, len(files))
        if not results:
            raise DataError(f"none of the {len(files)} image(s) could be read: {describe_skipped(stream.skipped)}; "
                            "replace them or give other images")
        return results


def _best_classes(feats: np.ndarray, files: list[Path], records: list[TaskRecord],
                  heads: list[np.ndarray]) -> list[dict]:
    """Per image the (task, class) of highest softmax confidence; the first task wins a tie."""
    probs = [softmax(feats @ head.T) for head in heads]
    labels = np.stack([p.argmax(axis=1) for p in probs], axis=1)  # [N, T]
    confidences = np.stack([p.max(axis=1) for p in probs], axis=1)  # [N, T]
    best_task = confidences.argmax(axis=1)
    results = []
    for i, file in enumerate(files):
        t = best_task[i]
        results.append({"path": str(file), "task": records[t].name, "label": records[t].class_names[labels[i, t]],
                        "confidence": float(confidences[i, t])})
    return results
