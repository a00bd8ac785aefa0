"""Prediction on the device: images -> backbone features -> (task, class), novelty and known.

Never imports torch. Without a task, one discriminant over every class of every task picks the
(task, class) and scores novelty (``pah_edge.task_free``); a task whose statistics are missing or
corrupt is left out with one warning. With ``task``, that task's generated head ``H(P_t)`` [C, D]
(generated once and cached) gives logits ``features @ head.T`` and the confidence is their softmax,
as in training; novelty is then measured against that task's classes.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pah_edge.bundle import Bundle, BundleError, TaskRecord
from pah_edge.bundle_layout import BACKBONE_MODELS
from pah_edge.device.bundle_runners import backbone_runner, features, generator_runner
from pah_edge.device.images import BatchStream, describe_skipped, warn_skipped
from pah_edge.device.runtimes import Runner
from pah_edge.errors import ConfigError, DataError, PahEdgeError
from pah_edge.folders import images_under
from pah_edge.preprocess import IMAGE_SUFFIXES, to_input
from pah_edge.task_free import SharedStats, TaskFreeRule

log = logging.getLogger("pah_edge")
# What predicting a task on another backbone than it was learned on cost: INT8-learned digits
# predicted on FP32 features (issue 13's measurement; docs/benchmarks.md, "Faults").
PRECISION_RISK = "4 points measured on 5 digit classes"


def image_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; folders walked recursively for .png/.jpg/.jpeg/.bmp, sorted, hidden entries skipped.

    A path that does not exist raises DataError. A named file is taken whatever its suffix: the
    user asked for it, and decoding decides.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += images_under(path)
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"no file or folder {path}: check the path")
    return found


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits [N, C], shifted by the row maximum so exp cannot overflow."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Predictor:
    """Predicts classes of images with a bundle's tasks; use as ``with Predictor(bundle) as p:``.

    runtime: auto, tensorrt, onnxruntime, onnxruntime-cuda or onnxruntime-cpu (for the backbone;
    the generator always runs on the CPU, once per task). precision: auto (each task on the backbone
    it was learned on; task-free on FP32 unless every task was learned on INT8), fp32 or int8 (the
    calibrated backbone from `pah-edge calibrate`) for every task. A task predicted on another
    backbone than it was learned on gets one warning with the measured risk.
    """

    def __init__(self, bundle: Bundle, *, runtime: str = "auto", precision: str = "auto"):
        if precision not in ("auto", *BACKBONE_MODELS):
            raise ConfigError(f"unknown precision {precision!r}: choose auto, {', '.join(BACKBONE_MODELS)}")
        self.bundle, self.runtime, self.precision = bundle, runtime, precision
        self.backbone = backbone_runner(bundle, runtime, "fp32" if precision == "auto" else precision)
        self._int8: Runner | None = None  # precision auto: started for the first task learned on INT8
        self._int8_failed = False  # its start failed once: not tried (and the model not hashed) per frame
        self._int8_sha256: str | None = None
        self._warned: set[tuple[str, str]] = set()  # (task, warning) already given
        self.generator = generator_runner(bundle)
        self._heads: dict[str, tuple[TaskRecord, np.ndarray]] = {}  # task name -> (entry, head [C, D])
        self._rule: _CachedRule | None = None

    def __enter__(self) -> Predictor:
        with ExitStack() as stack:  # a backbone that fails to start releases the generator again
            stack.enter_context(self.generator)
            stack.enter_context(self.backbone)
            self._runners = stack.pop_all()
        log.info("backbone on %s", self.backbone.name)
        return self

    def __exit__(self, *exc) -> None:
        self._runners.close()
        # The INT8 runner closed with the others: a restart starts it again when a task needs it.
        self._int8, self._int8_failed, self._int8_sha256 = None, False, None

    def backbone_for(self, task: str | None = None) -> Runner:
        """The backbone ``task`` (None: task-free over every task) is predicted on; see the class."""
        records = [self.bundle.task(task)] if task is not None else self.bundle.tasks()
        learned = {r.name: r.precision or "fp32" for r in records}
        if task is not None:
            wanted = learned[task]
        else:  # one backbone answers for every task
            wanted = "int8" if learned and set(learned.values()) == {"int8"} else "fp32"
        runner = self._int8_backbone() if self.precision == "auto" and wanted == "int8" else self.backbone
        used = self.precision if self.precision != "auto" else "int8" if runner is self._int8 else "fp32"
        for record in records:
            if learned[record.name] != used:
                if self.precision != "auto":
                    fix = f"leave out --precision {self.precision} to predict it as learned"
                elif used != wanted:
                    fix = (f"install the INT8 model again with `pah-edge calibrate {self.bundle.path}` and learn the "
                           "task again")
                else:
                    fix = "task-free prediction runs one backbone for every task: learn it again with --precision fp32"
                self._warn_once(record.name, f"task {record.name!r} was learned on the {learned[record.name]} "
                                f"backbone and is predicted on {used} features: expect lower accuracy "
                                f"({PRECISION_RISK}); {fix}")
            elif used == "int8" and record.backbone_sha256 not in (None, self._int8_sha()):
                self._warn_once(record.name, f"task {record.name!r} was learned on an INT8 model that `pah-edge "
                                "calibrate` has since replaced: expect lower accuracy; learn it again")
        return runner

    def _int8_backbone(self) -> Runner:
        """The INT8 backbone, started on first use; the FP32 one when none is installed (the caller warns)."""
        if self._int8 is None and not self._int8_failed:
            try:
                self._int8 = self._runners.enter_context(backbone_runner(self.bundle, self.runtime, "int8"))
            except PahEdgeError as exc:
                log.debug("no INT8 backbone: %s", exc)
                self._int8_failed = True
        return self._int8 if self._int8 is not None else self.backbone

    def _int8_sha(self) -> str | None:
        """SHA-256 of the INT8 model, hashed once: the file stays what the runner loaded (a new
        calibration installs a new file, which this Predictor does not run)."""
        if self._int8_sha256 is None:
            self._int8_sha256 = self.bundle.backbone_sha256("int8")
        return self._int8_sha256

    def _warn_once(self, task: str, message: str) -> None:
        if (task, message) not in self._warned:
            self._warned.add((task, message))
            log.warning("%s", message)

    def head(self, record: TaskRecord) -> np.ndarray:
        """The task's head float32 [C, D], generated from its prototypes on first use."""
        return self.task_head(record.name)[1]

    def task_head(self, name: str) -> tuple[TaskRecord, np.ndarray]:
        """(the task's registry entry, its head float32 [C, D]) as of now: a task re-learned under the
        same name, here or by another process, gets its new head and its new class names together."""
        cached = self._heads.get(name)
        if cached is None or cached[0] != self.bundle.task(name):
            record, prototypes = self.bundle.load_task(name)
            cached = self._heads[name] = (record, self.generator.infer({"prototypes": prototypes})["head"]
                                          .astype(np.float32))
        return cached

    def rule(self, *, warn: bool = True) -> TaskFreeRule | None:
        """The task-free rule over every task with readable statistics; None for a bundle without the
        shared state or without a task whose statistics are usable.

        Built again only when the tasks or their statistics change (a D x D inverse), whichever task
        a call asks for. A task whose statistics or prototypes are missing
        or corrupt is left out, with one warning the first time ``warn`` is true.
        """
        shared = self.bundle.shared_stats()
        if shared is None:
            return None
        records = self.bundle.tasks()
        key = tuple((r.name, r.stats_sha256) for r in records)
        if self._rule is None or self._rule.key != key or self._rule.shared is not shared:
            usable, problems = [], []
            for record in records:
                try:
                    self.bundle.load_prototypes(record.name)  # a task whose own files fail answers nothing
                    usable.append((record, self.bundle.load_task_stats(record)))
                except BundleError as exc:
                    problems.append(f"task {record.name!r} is left out of task-free prediction: {exc}")
            if problems and self.bundle.tasks() != records:  # changed by another process while read: read again
                return self.rule(warn=warn)
            self._rule = _CachedRule(key, shared, TaskFreeRule(shared, usable) if usable else None, problems)
        if warn and not self._rule.warned:
            for problem in self._rule.problems:
                log.warning("%s", problem)
            self._rule.warned = True
        return self._rule.rule

    def _task_free_rule(self) -> TaskFreeRule:
        """:meth:`rule`, or a BundleError naming the fix when there is none."""
        rule = self.rule()
        if rule is not None:  # the usual case: the registry and statistics are read once, by rule()
            return rule
        if not self.bundle.tasks():
            raise BundleError(f"{self.bundle.path} has no tasks: learn one with "
                              f"`pah-edge learn-task FOLDER --bundle {self.bundle.path}`")
        if self.bundle.shared_stats() is None:
            raise BundleError(f"{self.bundle.path} has no task-free statistics (exported before they existed): add "
                              f"them with `pah-edge task-stats {self.bundle.path} --checkpoint RUN_DIR` (or --images "
                              "DIR), or pass --task NAME")
        raise BundleError(f"no task of {self.bundle.path} has usable task-free statistics; add them with "
                          f"`pah-edge task-stats {self.bundle.path} --images DIR`, or pass --task NAME")

    def predict(self, paths: Sequence[str | os.PathLike[str]], *, task: str | None = None, batch_size: int = 32,
                novelty_threshold: float | None = None) -> list[dict]:
        """One ``{"path", "task", "label", "confidence", "novelty", "known"}`` per readable image, in file order.

        Without ``task``: the (task, class) of highest posterior over every task's classes; label is
        the class (folder) name, confidence its posterior in [0, 1]. novelty is the squared
        Mahalanobis distance to the nearest class mean per feature dimension (higher = less like
        anything learned); known = novelty <= the threshold (the bundle's, or ``novelty_threshold``),
        and an unknown image has task and label None. With ``task``: that task's generated head
        decides label and confidence (its softmax probability), as in training; novelty is measured
        against that task's classes (under the covariance of every task, so it moves as the bundle
        learns; label and confidence do not) and known only informs (None without statistics). Unreadable
        images are skipped with one warning; if none is readable, DataError.
        """
        _check_batch_size(batch_size)
        answer = self.answerer(task, novelty_threshold, batch_size)
        files = image_files(paths)
        if not files:
            shown = ", ".join(map(str, paths))
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {shown}: "
                            "give image files or folders holding them")
        stream = BatchStream(files, self.bundle.preprocess, batch_size)
        results: list[dict] = []
        for inputs, positions in stream:
            results += [{"path": str(files[i]), **a} for i, a in zip(positions, answer(inputs))]
        warn_skipped(stream.skipped, len(files))
        if not results:
            raise DataError(f"none of the {len(files)} image(s) could be read: {describe_skipped(stream.skipped)}; "
                            "replace them or give other images")
        return results

    def predict_images(self, images: np.ndarray, *, task: str | None = None, batch_size: int = 32,
                       novelty_threshold: float | None = None) -> list[dict]:
        """One ``{"task", "label", "confidence", "novelty", "known"}`` per image of uint8 [N, S, S, 3] RGB
        (``load_image`` or ``frame_image`` output), as `predict` answers for files."""
        _check_batch_size(batch_size)
        answer = self.answerer(task, novelty_threshold, batch_size)
        results: list[dict] = []
        for start in range(0, len(images), batch_size):
            results += answer(to_input(images[start:start + batch_size], self.bundle.preprocess))
        return results

    def answerer(self, task: str | None = None, novelty_threshold: float | None = None,
                 batch_size: int = 32) -> Callable[[np.ndarray], list[dict]]:
        """network input float32 [N, 3, S, S] -> N answers ``{"task", "label", "confidence", "novelty",
        "known"}``, through the backbone ``batch_size`` images at a time.

        Resolves the task, its head, the threshold and the backbone once per call of `predict`, not per batch.
        """
        rule = self._task_free_rule() if task is None else self.rule(warn=False)
        threshold = novelty_threshold if novelty_threshold is not None else (
            rule.shared.threshold if rule is not None else None)
        if task is None:
            answer = functools.partial(_task_free, rule=rule, threshold=threshold)
        else:
            record, head = self.task_head(task)
            answer = functools.partial(_task_given, record=record, head=head, rule=rule, threshold=threshold)
        backbone = self.backbone_for(task)
        return lambda inputs: answer(features(backbone, inputs, batch_size))


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")


@dataclass
class _CachedRule:
    """The task-free rule (None: no usable statistics), the tasks, statistics and shared state it was
    built from, and the tasks it had to leave out."""

    key: tuple
    shared: SharedStats
    rule: TaskFreeRule | None
    problems: list[str]
    warned: bool = False


def _task_free(feats: np.ndarray, rule: TaskFreeRule, threshold: float | None) -> list[dict]:
    scores, novelty = rule.scores(feats)
    posterior = softmax(scores)
    best = posterior.argmax(axis=1)
    results = []
    for i in range(len(feats)):
        known = _known(novelty[i], threshold)
        record = rule.tasks[rule.task_of[best[i]]]
        results.append({"task": record.name if known is not False else None,
                        "label": record.class_names[rule.class_of[best[i]]] if known is not False else None,
                        "confidence": float(posterior[i, best[i]]), "novelty": float(novelty[i]), "known": known})
    return results


def _task_given(feats: np.ndarray, record: TaskRecord, head: np.ndarray, rule: TaskFreeRule | None,
                threshold: float | None) -> list[dict]:
    probs = softmax(feats @ head.T)
    index = next((t for t, r in enumerate(rule.tasks) if r.name == record.name), None) if rule else None
    novelty = rule.scores(feats, task=index)[1] if index is not None else [None] * len(feats)
    return [{"task": record.name, "label": record.class_names[probs[i].argmax()],
             "confidence": float(probs[i].max()), "novelty": None if novelty[i] is None else float(novelty[i]),
             "known": _known(novelty[i], threshold)} for i in range(len(feats))]


def _known(novelty: float | None, threshold: float | None) -> bool | None:
    """novelty <= threshold; None when either is unknown (no statistics, no threshold: everything is known)."""
    if novelty is None:
        return None
    return True if threshold is None else bool(novelty <= threshold)
