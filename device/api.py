"""The Python API for an application loop: ``Device`` predicts frames and files, learns and manages tasks.

    from pah_edge import Device
    with Device("bundle") as dev:
        p = dev.predict(frame)          # uint8 H x W x 3 RGB (bgr=True for OpenCV's BGR)
        print(p.task, p.label, p.confidence, p.novelty, p.known)

Frames go through the same resize and normalisation as image files (``pah_edge.preprocess``) and the
same answers as `pah-edge predict` (``Predictor``), which is built on this class. Never imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pah_edge.bundle import Bundle, TaskRecord
from pah_edge.device.frame_pipeline import prepared_ahead
from pah_edge.device.learner import LearnReport, learn_task, learn_task_arrays
from pah_edge.device.predict import Predictor
from pah_edge.preprocess import frame_image, load_image, to_input

ImageLike = np.ndarray | str | os.PathLike  # a frame (uint8 H x W x 3 or H x W) or an image file's path


@dataclass(frozen=True)
class Prediction:
    """One image's answer. task and label are None when the image is unknown (task-free only).

    confidence: posterior (task-free) or softmax probability (task given), 0..1. novelty: squared
    Mahalanobis distance to the nearest class mean per feature dimension (None without statistics).
    known: novelty <= the threshold (None without statistics). path: the file, None for a frame.
    """

    task: str | None
    label: str | None
    confidence: float
    novelty: float | None
    known: bool | None
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{path, task, label, confidence, novelty, known}`` (path only for files), JSON-ready."""
        fields = asdict(self)
        path = fields.pop("path")
        return fields if path is None else {"path": path, **fields}


class Device:
    """A bundle on this device. Use as ``with Device("bundle") as dev:``, or call `close` when done.

    runtime: auto (the TensorRT engine when built and TensorRT works, else ONNX Runtime), tensorrt,
    onnxruntime, onnxruntime-cuda or onnxruntime-cpu. precision: auto (predict each task on the
    backbone it was learned on; learn on FP32), fp32 or int8 (the calibrated backbone) for both.
    novelty_threshold: overrides the
    bundle's. The backbone starts on the first prediction (or on ``with``) and is shared with learning.
    """

    def __init__(self, bundle: str | os.PathLike | Bundle = "bundle", *, runtime: str = "auto", precision: str = "auto",
                 novelty_threshold: float | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.runtime, self.precision, self.novelty_threshold = runtime, precision, novelty_threshold
        self.predictor = Predictor(self.bundle, runtime=runtime, precision=precision)  # checks both options
        self._started = False

    def __enter__(self) -> Device:
        self._running()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the runtimes; a later prediction starts them again."""
        if self._started:
            self._started = False
            self.predictor.__exit__(None, None, None)

    def _running(self) -> Predictor:
        if not self._started:
            self.predictor.__enter__()
            self._started = True
        return self.predictor

    # --- prediction ------------------------------------------------------------------------------------

    def predict(self, image: ImageLike, *, task: str | None = None, bgr: bool = False) -> Prediction:
        """One frame (uint8 H x W x 3 RGB; BGR with ``bgr``; or H x W gray) or image file -> its Prediction.

        Without ``task``: over every task, and unknown images get task and label None. With ``task``:
        that task's classes only. A bad frame raises FrameError, an unreadable file DataError.
        """
        return self.predict_batch([image], task=task, bgr=bgr)[0]

    def predict_batch(self, images: Sequence[ImageLike], *, task: str | None = None, bgr: bool = False,
                      batch_size: int = 32) -> list[Prediction]:
        """Frames or file paths, mixed as you like -> one Prediction each, in order (see `predict`).

        Every image is resized before the first backbone call, so a bad one fails before any work. No
        images: [], after checking ``task`` (BundleError for an unknown one).
        """
        pre = self.bundle.preprocess
        paths, resized = zip(*(self._resized(image, bgr) for image in images)) if len(images) else ((), ())
        # No images still resolves the task: an unknown one fails here, before a camera loop starts.
        stacked = np.stack(resized) if resized else np.zeros((0, pre.image_size, pre.image_size, 3), np.uint8)
        answers = self._running().predict_images(stacked, task=task, batch_size=batch_size,
                                                 novelty_threshold=self.novelty_threshold)
        return [Prediction(**a, path=path) for a, path in zip(answers, paths)]

    def predict_stream(self, images: Iterable[ImageLike], *, task: str | None = None,
                       bgr: bool = False) -> Iterator[Prediction]:
        """Frames or paths one at a time, as a camera delivers them -> their Predictions, in order.

        The next image is resized on a thread while the backbone runs this one, so in a loop a frame
        costs little more than the backbone. An unknown ``task`` fails on the first ``next``, before
        any image is read; a bad frame raises FrameError when its turn comes. Close the iterator (or
        leave the ``for``) to stop early; ``images`` may be a generator reading a camera.
        """
        predictor = self._running()
        # Resolved once, before the first image is read: an unknown task fails at once, and the
        # stream answers with the tasks registered when it started.
        answer = predictor.answerer(task, self.novelty_threshold)

        def prepare(image: ImageLike) -> tuple[str | None, np.ndarray]:
            path, resized = self._resized(image, bgr)
            return path, to_input(resized[None], self.bundle.preprocess)

        with closing(prepared_ahead(images, prepare)) as ready:
            for path, batch in ready:
                (result,) = answer(batch)
                yield Prediction(**result, path=path)

    def _resized(self, image: ImageLike, bgr: bool) -> tuple[str | None, np.ndarray]:
        """(its path or None, uint8 [S, S, 3]) of a frame or an image file."""
        pre = self.bundle.preprocess
        if isinstance(image, (str, os.PathLike)):
            return os.fspath(image), load_image(os.fspath(image), pre)
        return None, frame_image(image, pre, bgr=bgr)

    def predict_files(self, paths: Sequence[str | os.PathLike], *, task: str | None = None,
                      batch_size: int = 32) -> list[Prediction]:
        """Image files and folders (walked recursively), as `pah-edge predict` reads them: unreadable
        images are skipped with one warning; DataError when none is readable."""
        answers = self._running().predict(paths, task=task, batch_size=batch_size,
                                          novelty_threshold=self.novelty_threshold)
        return [Prediction(**a) for a in answers]

    # --- learning and the task registry ----------------------------------------------------------------

    def learn_task(self, folder: str | os.PathLike, *, name: str | None = None, replace: bool = False,
                   **options) -> LearnReport:
        """Learn ``folder/<class>/<images>`` as a new task (``name`` defaults to the folder's name).

        ``options``: budget_mb, progress (default False here), ... (see ``pah_edge.device.learner.learn``).
        """
        return learn_task(self.bundle, Path(folder), name=name, replace=replace, **self._learn_options(options))

    def learn_task_arrays(self, images: Sequence[np.ndarray], labels: Sequence, *, name: str, bgr: bool = False,
                          replace: bool = False, **options) -> LearnReport:
        """Learn a new task from frames (as `predict` takes them) and one label each: class names (str)
        or numbers (int). The same images give the same task as `learn_task` on a folder of them as PNG
        or BMP files (JPEG files are decoded at reduced scale)."""
        return learn_task_arrays(self.bundle, images, labels, name=name, bgr=bgr, replace=replace,
                                 **self._learn_options(options))

    def _learn_options(self, options: dict) -> dict:
        # Learning uses this device's runtime and backbone (FP32 for precision auto); the task records
        # it, so it is predicted as it was learned. A started backbone is shared rather than loaded twice.
        own = "fp32" if self.precision == "auto" else self.precision
        precision = options.pop("precision", own)
        same = precision == own and options.get("runtime", self.runtime) == self.runtime
        shared = {"backbone": self.predictor.backbone} if self._started and same else {}
        return {"progress": False, "runtime": self.runtime, "precision": precision, **shared, **options}

    def tasks(self) -> list[TaskRecord]:
        """The registered tasks, in registration order."""
        return self.bundle.tasks()

    def remove_task(self, name: str) -> None:
        """Unregister a task and delete its files (waits for a running learn-task)."""
        with self.bundle.lock():
            self.bundle.remove_task(name)

    def rename_task(self, old: str, new: str) -> None:
        """Rename a task; its prototypes are unchanged (waits for a running learn-task)."""
        with self.bundle.lock():
            self.bundle.rename_task(old, new)
