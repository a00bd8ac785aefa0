"""The deployable bundle: exported graphs, the preprocessing record, and a registry of learned tasks.

Layout of a bundle directory::

    manifest.json          immutable after export: shapes, preprocessing, SHA-256 of every graph
    backbone.onnx          images [N, 3, S, S] -> features [N, D]
    generator.onnx         prototypes [C, c, s, s] -> head [C, D]
    learner_step.onnx      (prototypes, features, labels) -> (loss, grad w.r.t. prototypes)
    report.json            the export's parity report
    tasks/registry.json    mutable: one entry per task (name, class names, file, SHA-256, ...)
    tasks/<name>.npz       key "prototypes": float32 [C, c, s, s]
    tasks/<name>.stats.npz the task's feature statistics for task-free prediction (pah_edge.task_free)
    task_free.<sha>.npz    the shared task-free state (centring mean, scatter, novelty threshold)
    task_free.json         names that file and its SHA-256; written after it
    engines/               TensorRT engines <graph>.<precision>.engine; device-specific, so not hashed in the manifest
    backbone.int8.onnx     optional, from `pah-edge calibrate`: the backbone with Q/DQ INT8 nodes
    calibration.json       its record (settings, accuracy report, SHA-256); written after the model
    calibration.rejected.json  the report of the latest calibration that failed --max-drop (no model)

The file names and paths are ``pah_edge.bundle_layout``'s (``Bundle.layout``). Imports numpy,
never torch: the device reads and extends bundles with this module. Every write is
atomic (``pah_edge.atomic``); a task's file is written before the registry entry that names it, so
a crash leaves at worst an unreferenced file, never an entry without its file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import re
import dataclasses
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pah_edge.atomic import (atomic_write_bytes, atomic_write_json, fsync_dir, is_temporary, json_bytes, staged,
                             storage_error)
from pah_edge.bundle_layout import (CALIBRATION_NAME, INT8_BACKBONE_NAME, MANIFEST_NAME, REGISTRY_PATH, TASKS_DIR,
                                    BundleLayout)
from pah_edge.errors import PahEdgeError, StorageError
from pah_edge.preprocess import Preprocess
from pah_edge.task_free import SharedStats, TaskStats

BUNDLE_FORMAT = "pah-edge-bundle"
BUNDLE_FORMAT_VERSION = 1
REGISTRY_FORMAT_VERSION = 1
TASK_SOURCES = ("workstation", "device")
PROTOTYPES_KEY = "prototypes"
# How long a change to a bundle's tasks or INT8 model waits (s) for another process holding the lock:
# learn-task takes minutes on a small device, and a second one should queue rather than fail.
LOCK_WAIT_S = 600.0
_TASK_FREE_FIX = "write it again with `pah-edge task-stats {bundle} --images DIR` (or re-export the bundle)"

log = logging.getLogger("pah_edge")

_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_MAX_NAME = 64


class BundleError(PahEdgeError):
    """A bundle is missing, incompatible, corrupt, or a task operation on it is invalid."""


def validate_task_name(name: str) -> str:
    """Return ``name`` if it is a safe task name (also used as a file name), else raise BundleError."""
    rule = f"1 to {_MAX_NAME} characters of A-Z a-z 0-9 . _ -, not starting with '.'"
    if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME or not _NAME_CHARS.fullmatch(name) \
            or name.startswith("."):
        raise BundleError(f"invalid task name {name!r}: use {rule}")
    return name


def task_name_from(text: str) -> str:
    """A valid task name made from free text (e.g. a folder name): bad characters become '_'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")[:_MAX_NAME]
    return name or "task"


def unique_task_names(texts: list[str]) -> list[str]:
    """Task names for a run's tasks, in order: ``task_name_from`` each, and a name already taken (two
    folders that differ only in characters a name cannot hold) suffixed with the task's index."""
    names: list[str] = []
    for i, text in enumerate(texts):
        name = task_name_from(text)
        while name in names:
            name = f"{name[:60]}-{i}"
        names.append(name)
    return names


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def utc_now() -> str:
    """ISO-8601 UTC timestamp to the second, e.g. 2025-01-31T12:00:00Z."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class TaskRecord:
    """One registry entry. ``accuracy`` is a fraction in [0, 1] or None; ``bytes`` is the npz size."""

    name: str
    class_names: tuple[str, ...]
    file: str  # relative to the bundle root, e.g. "tasks/cats.npz"
    sha256: str
    images_seen: int
    accuracy: float | None
    created: str
    bytes: int
    source: str  # "workstation" (exported) or "device" (learned on the device)
    stats_file: str | None = None  # the task-free statistics; None for tasks registered before they existed
    stats_sha256: str | None = None
    # The backbone its prototypes and statistics were fitted on: "fp32" or "int8" (None: fp32, as
    # exported and as every task was before this was recorded) and that model file's SHA-256.
    precision: str | None = None
    backbone_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskRecord:
        try:
            # The registry is user-editable: a value of the wrong type is caught here, not deep in a command.
            wrong = [k for k in ("name", "file", "sha256", "created", "source") if not isinstance(d[k], str)]
            wrong += [k for k in ("stats_file", "stats_sha256", "precision", "backbone_sha256")
                      if not isinstance(d.get(k), (str, type(None)))]
            if not isinstance(d["class_names"], list) or not all(isinstance(c, str) for c in d["class_names"]):
                wrong.append("class_names")
            if not isinstance(d["accuracy"], (int, float, type(None))) or isinstance(d["accuracy"], bool):
                wrong.append("accuracy")
            if wrong:
                raise TypeError(f"wrong type of {', '.join(wrong)}")
            record = cls(name=d["name"], class_names=tuple(d["class_names"]), file=d["file"], sha256=d["sha256"],
                         images_seen=int(d["images_seen"]), accuracy=d["accuracy"], created=d["created"],
                         bytes=int(d["bytes"]), source=d["source"], stats_file=d.get("stats_file"),
                         stats_sha256=d.get("stats_sha256"), precision=d.get("precision"),
                         backbone_sha256=d.get("backbone_sha256"))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"a task entry in {REGISTRY_PATH} is malformed ({exc!r}); "
                              "restore the file or re-export the bundle") from None
        return record


class Bundle:
    """An exported bundle on disk. Open with :meth:`Bundle.open`; the manifest is read once."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.layout = BundleLayout(path)
        self.manifest = manifest
        self.preprocess = Preprocess.from_dict(manifest["preprocess"])
        self.feature_dim: int = int(manifest["feature_dim"])
        self.prototype_shape: tuple[int, int, int] = tuple(manifest["prototype_shape"])
        self.generator_kind: str = manifest["generator"]["kind"]
        # task-mlp generators take a fixed number of classes per task; None means any number >= 2.
        self.fixed_num_classes: int | None = manifest["generator"]["num_classes"]
        self.files: dict[str, str] = dict(manifest["files"])  # file name -> SHA-256
        self._registry_read: tuple[tuple[int, int, int], list[TaskRecord]] | None = None  # (stat key, records)
        self._shared_read: tuple[tuple[int, int, int], SharedStats] | None = None  # (stat key of the record, state)
        self._opened = _file_id(self.layout.manifest)  # which bundle this is: its manifest is never rewritten

    # --- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True) -> Bundle:
        """Read ``path``'s manifest; ``verify`` also checks every graph file against its SHA-256."""
        path = Path(path)
        manifest_path = BundleLayout(path).manifest
        if not manifest_path.is_file():
            what = "no bundle" if not path.exists() else "no manifest.json"
            raise BundleError(f"{what} at {path}: run `pah-edge export` first")
        manifest = _read_json(manifest_path, fix="re-export the bundle")
        _check_format(manifest, path)
        try:
            bundle = cls(path, manifest)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{manifest_path} lacks or mangles {exc}; re-export the bundle") from None
        if verify:
            bundle.verify_files()
        return bundle

    def verify_files(self) -> None:
        """Check every file listed in ``manifest["files"]`` against its recorded SHA-256."""
        for name, expected in self.files.items():
            file = self.path / name
            if not file.is_file():
                raise BundleError(f"{name} is missing from {self.path}; re-export the bundle")
            if sha256_file(file) != expected:
                raise BundleError(f"{name} does not match its SHA-256 in manifest.json (changed or corrupt); "
                                  "re-export the bundle")

    def graph_path(self, name: str) -> Path:
        """Path of the ONNX graph ``name`` (a key of ``GRAPH_SPECS``), as the manifest names it."""
        graphs = self.manifest["graphs"]
        if name not in graphs:
            raise BundleError(f"no graph {name!r} in {self.path}; choose one of: {', '.join(graphs)}")
        return self.path / graphs[name]["file"]

    def int8_backbone_path(self) -> Path | None:
        """``backbone.int8.onnx`` if a calibration that passed its --max-drop installed it, else None.

        The file is checked against the SHA-256 in calibration.json (BundleError on a mismatch, or
        for a model without its record, which an interrupted calibration leaves).
        """
        installed = self._installed_int8()
        return installed[0] if installed else None

    def backbone_sha256(self, precision: str) -> str | None:
        """SHA-256 of the backbone model of ``precision``: the exported FP32 graph, or the installed
        INT8 model (None when none is installed; BundleError when it fails its check)."""
        if precision == "int8":
            installed = self._installed_int8()
            return installed[1]["sha256"] if installed else None
        return self.files[self.manifest["graphs"]["backbone"]["file"]]

    def int8_target(self) -> str | None:
        """The runtime the installed INT8 model was calibrated for (``tensorrt`` or ``onnxruntime``), or None.

        Records from before the choice existed hold the TensorRT form (symmetric signed INT8).
        """
        installed = self._installed_int8()
        return installed[1].get("options", {}).get("target", "tensorrt") if installed else None

    def _installed_int8(self) -> tuple[Path, dict] | None:
        """(model, calibration record) of the installed INT8 model, checked as ``int8_backbone_path`` says."""
        model, record_path = self.layout.int8_backbone, self.layout.calibration_record
        fix = f"run `pah-edge calibrate {self.path} --images DIR` again"
        if not record_path.is_file():
            if model.is_file():
                raise BundleError(f"{INT8_BACKBONE_NAME} in {self.path} has no {CALIBRATION_NAME} (an interrupted "
                                  f"calibration?); {fix}")
            return None
        record = _read_json(record_path, fix=fix)
        if not isinstance(record, dict) or not record.get("passed"):
            return None
        if not model.is_file():
            raise BundleError(f"{INT8_BACKBONE_NAME} is missing from {self.path}; {fix}")
        if sha256_file(model) != record.get("sha256"):
            raise BundleError(f"{INT8_BACKBONE_NAME} does not match its SHA-256 in {CALIBRATION_NAME} (changed or "
                              f"corrupt); {fix}")
        return model, record

    def install_int8(self, model: Path, record: dict[str, Any]) -> None:
        """Install the INT8 backbone ``model`` (copied) with its calibration ``record``, which must hold
        ``passed`` and the model's ``sha256``. Hold :meth:`lock` on a bundle others use.

        Both files are written aside first, so a full disk fails with the bundle as it was. Then the
        old record goes, and the model and the new record take their names: a crash between those
        renames leaves a model without its record, which nothing runs. Last go a stale rejection
        report and the INT8 engines built from the old model."""
        layout = self.layout
        written: list[Path] = []
        try:
            for path, data in ((layout.int8_backbone, Path(model).read_bytes()),
                               (layout.calibration_record, json_bytes(record))):
                written.append(staged(path, data))
            layout.calibration_record.unlink(missing_ok=True)
            os.replace(written[0], layout.int8_backbone)
            os.replace(written[1], layout.calibration_record)
            fsync_dir(self.path)
        except BaseException as exc:
            for tmp in written:  # a renamed one is gone from here already
                tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):  # renames need no space: failing storage, or a read-only folder
                raise storage_error(exc, layout.int8_backbone) from None
            raise
        for stale in (layout.calibration_rejected, *layout.engine_files("int8")):
            self._unlink_quietly(stale)

    def reject_int8(self, record: dict[str, Any]) -> None:
        """Keep the report of a calibration that failed its --max-drop; an installed INT8 model stays."""
        atomic_write_json(self.layout.calibration_rejected, record)

    def scratch_copy(self, dest: str | os.PathLike, *, engines: bool = True, int8: bool = True) -> Bundle:
        """A private copy of this bundle at ``dest`` (which must not exist), to change freely.

        The lock file never travels (the copy has its own). ``engines=False`` leaves out the TensorRT
        engines (device-specific and large); ``int8=False`` the INT8 model and both calibration
        records. The copy is opened without hashing its graphs again: they are this bundle's.
        """
        layout = self.layout
        left_out = {layout.lock, *(() if engines else (layout.engines_dir,)),
                    *(() if int8 else (layout.int8_backbone, layout.calibration_record, layout.calibration_rejected))}
        shutil.copytree(self.path, dest, ignore=lambda folder, names: [n for n in names if Path(folder, n) in left_out])
        return Bundle.open(dest, verify=False)

    @contextlib.contextmanager
    def lock(self, wait_s: float | None = LOCK_WAIT_S):
        """Hold the bundle's exclusive lock (`folder_lock`) while changing its tasks.

        Once held, task files no registry entry names (a crash between a task's file and its entry
        leaves one) and interrupted atomic writes are deleted, so whoever calls ``add_task`` on a bundle
        that other processes use must hold this lock.
        """
        with folder_lock(self.layout, wait_s):
            # A bundle replaced since it was opened (`export --force`) is another model: what this
            # process computed with the old one must not land in it.
            if _file_id(self.layout.manifest) != self._opened:
                raise BundleError(f"{self.path} was replaced (by `pah-edge export --force`?) after this command "
                                  "opened it; run the command again (in Python: open it again)")
            self._remove_orphans()
            yield self

    # --- the task registry -------------------------------------------------------------------------

    def tasks(self) -> list[TaskRecord]:
        """Registered tasks in registration order (an absent registry means none).

        Parsed again only when the registry file changed (``_file_id``): a camera loop that predicts
        frame by frame pays one stat per call, not a JSON parse. Every write replaces the file by
        rename, so a new registry is a new file.
        """
        registry = self.layout.registry
        key = _file_id(registry)
        if key is None:
            return []
        if self._registry_read is None or self._registry_read[0] != key:
            self._registry_read = (key, self._parse_registry(registry))
        return list(self._registry_read[1])

    def _parse_registry(self, registry: Path) -> list[TaskRecord]:
        data = _read_json(registry, fix="restore it or re-export the bundle")
        version = data.get("format_version") if isinstance(data, dict) else None
        if isinstance(version, int) and version > REGISTRY_FORMAT_VERSION:
            raise BundleError(f"{registry} has format {version}, newer than this pah-edge reads "
                              f"({REGISTRY_FORMAT_VERSION}); upgrade pah-edge")
        if version != REGISTRY_FORMAT_VERSION or not isinstance(data.get("tasks"), list):
            raise BundleError(f"{registry} is not a task registry this pah-edge reads; restore it or re-export the bundle")
        return [TaskRecord.from_dict(d) for d in data["tasks"]]

    def check_name_free(self, name: str, *, replace: bool = False) -> None:
        """BundleError if a task ``name`` is registered and ``replace`` does not allow overwriting it."""
        if not replace and any(r.name == name for r in self.tasks()):
            raise BundleError(f"task {name!r} already exists in {self.path}; pass --replace to overwrite it "
                              "or --name OTHER")

    def check_class_count(self, classes: int, origin: str = "the task") -> None:
        """BundleError unless a task of ``classes`` classes fits: at least 2, and exactly the task-mlp
        generator's count where it has one. ``origin`` says where the classes come from."""
        if classes < 2:
            raise BundleError(f"a task needs at least 2 classes, {origin} has {classes}")
        fixed = self.fixed_num_classes
        if fixed is not None and classes != fixed:
            raise BundleError(f"this bundle's task-mlp generator takes exactly {fixed} classes per task, {origin} has "
                              f"{classes}; give it {fixed} classes, or export a run trained with --generator "
                              "classwise-linear for any count")

    def task(self, name: str) -> TaskRecord:
        for record in self.tasks():
            if record.name == name:
                return record
        known = ", ".join(r.name for r in self.tasks()) or "none"
        raise BundleError(f"no task {name!r} in {self.path}; registered tasks: {known}")

    def load_prototypes(self, name: str) -> np.ndarray:
        """The task's prototypes, float32 [C, c, s, s], after checking the file's SHA-256 (see `load_task`)."""
        return self.load_task(name)[1]

    def load_task(self, name: str) -> tuple[TaskRecord, np.ndarray]:
        """(the task's registry entry, its prototypes float32 [C, c, s, s]), the file checked against
        that entry's SHA-256: the two always belong together.

        A task removed, renamed or replaced by another process while its file is read is looked up
        again: the new entry and prototypes, or BundleError "no task" (never a false report of corruption).
        """
        for _ in range(3):
            record = self.task(name)
            try:
                return record, self._load_prototypes(record)
            except BundleError:
                if self.task(name) == record:  # still registered as read: the file itself is missing or corrupt
                    raise
        record = self.task(name)
        return record, self._load_prototypes(record)

    def _load_prototypes(self, record: TaskRecord) -> np.ndarray:
        arrays = _load_checked_npz(self._task_file(record), record.sha256,
                                   f"learn task {record.name!r} again or re-export the bundle",
                                   shown=record.file, recorded_in=REGISTRY_PATH)
        prototypes = np.asarray(arrays[PROTOTYPES_KEY], dtype=np.float32)
        self._check_prototypes(prototypes, len(record.class_names))
        return prototypes

    def load_task_stats(self, record: TaskRecord) -> TaskStats:
        """The task's task-free statistics after checking their SHA-256; BundleError names the fix."""
        fix = f"add them again with `pah-edge task-stats {self.path} --images DIR` or learn task {record.name!r} again"
        if record.stats_file is None:
            raise BundleError(f"task {record.name!r} has no task-free statistics (registered before they existed); {fix}")
        file = self._task_file(record, record.stats_file)
        return TaskStats.from_npz(_load_checked_npz(file, record.stats_sha256, fix))

    def shared_stats(self) -> SharedStats | None:
        """The bundle's shared task-free state, or None for a bundle exported before it existed.

        Read and hashed again only when task_free.json changed (``_file_id``): a camera loop
        predicting frame by frame must not re-hash a D x D matrix (6.5 MB at D = 1280) per call.
        """
        key = _file_id(self.layout.task_free_record)
        if key is None:
            return None
        if self._shared_read is None or self._shared_read[0] != key:
            self._shared_read = (key, self._read_shared_stats())
        return self._shared_read[1]

    def _task_free_record(self) -> tuple[Path, str | None]:
        """(the shared state's file, its SHA-256) as task_free.json names them; BundleError naming the fix."""
        record_path = self.layout.task_free_record
        record = _read_json(record_path, fix=_TASK_FREE_FIX.format(bundle=self.path))
        if not isinstance(record, dict) or not isinstance(record.get("file"), str) or "/" in record["file"]:
            raise BundleError(f"{record_path} is not a task-free record; {_TASK_FREE_FIX.format(bundle=self.path)}")
        return self.path / record["file"], record.get("sha256")

    def _read_shared_stats(self) -> SharedStats:
        file, sha = self._task_free_record()
        fix = _TASK_FREE_FIX.format(bundle=self.path)
        try:
            return SharedStats.from_npz(_load_checked_npz(file, sha, fix))
        except (KeyError, ValueError) as exc:
            raise BundleError(f"{file.name} lacks {exc}; {fix}") from None

    def write_shared_stats(self, shared: SharedStats) -> None:
        """Install the shared task-free state: its content-named file first, then the record naming it."""
        data = shared.to_bytes()
        sha = hashlib.sha256(data).hexdigest()
        name = self.layout.task_free_state(sha).name
        atomic_write_bytes(self.path / name, data)
        atomic_write_json(self.layout.task_free_record, {"file": name, "sha256": sha, "created": utc_now(),
                                                          "images": shared.count, "threshold": shared.threshold,
                                                          "unknown_rate": shared.unknown_rate})
        for old in self.layout.task_free_states():
            if old.name != name:
                self._unlink_quietly(old)

    def set_task_stats(self, name: str, stats: TaskStats) -> TaskRecord:
        """Give a registered task (new) task-free statistics; its prototypes are untouched."""
        record = self.task(name)
        records = self.tasks()
        # A new file, never the one the registry names: a crash before the registry write leaves the
        # task with its old statistics.
        stats_file, stats_sha = self._write_stats(record.file, stats, taken=_files_of(records))
        updated = dataclasses.replace(record, stats_file=stats_file, stats_sha256=stats_sha)
        self._write_registry([updated if r.name == name else r for r in records])
        if record.stats_file not in (None, stats_file):
            self._unlink_quietly(self._task_file(record, record.stats_file))
        return updated

    def add_task(self, *, name: str, class_names, prototypes: np.ndarray, images_seen: int,
                 accuracy: float | None, source: str, replace: bool = False,
                 stats: TaskStats | None = None, precision: str | None = None) -> TaskRecord:
        """Store a task's prototypes (and task-free ``stats``) and register it; ``replace`` overwrites
        a task of the same name. ``precision``: the backbone the task was fitted on (recorded with
        that model's SHA-256; None: the exported FP32 one).

        The npz files are written (atomically) before the registry, so a crash in between leaves
        orphan files, never a registry entry without its files.
        """
        validate_task_name(name)
        class_names = tuple(str(c) for c in class_names)
        prototypes = np.ascontiguousarray(prototypes, dtype=np.float32)
        self._check_prototypes(prototypes, len(class_names))
        if source not in TASK_SOURCES:
            raise ValueError(f"source must be one of {TASK_SOURCES}, got {source!r}")
        if accuracy is not None and not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy is a fraction in [0, 1], got {accuracy!r}")
        self.check_name_free(name, replace=replace)
        records = self.tasks()
        old = next((r for r in records if r.name == name), None)
        buffer = io.BytesIO()
        np.savez(buffer, **{PROTOTYPES_KEY: prototypes})
        data = buffer.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        file = self._free_task_file(name, sha, taken={r.file for r in records})
        written = [file]
        try:
            atomic_write_bytes(self.path / file, data)
            stats_file, stats_sha = self._write_stats(file, stats, taken=_files_of(records) | {file}) \
                if stats is not None else (None, None)
            written.append(stats_file)
            record = TaskRecord(name=name, class_names=class_names, file=file, sha256=sha,
                                images_seen=int(images_seen), accuracy=None if accuracy is None else float(accuracy),
                                created=utc_now(), bytes=len(data), source=source, stats_file=stats_file,
                                stats_sha256=stats_sha, precision=precision,
                                backbone_sha256=self.backbone_sha256(precision) if precision else None)
            self._write_registry([record if r.name == name else r for r in records] if old else [*records, record])
        except StorageError:
            # The registry still names the old files only: what this call wrote goes, nothing else.
            for orphan in set(written) - _files_of(records) - {None}:
                self._unlink_quietly(self.path / orphan)
            raise
        if old is not None:
            for old_file in {old.file, old.stats_file} - {file, stats_file, None}:
                self._unlink_quietly(self.path / old_file)
        return record

    def remove_task(self, name: str) -> None:
        """Unregister a task, then delete its files (a crash in between leaves only orphan files)."""
        record = self.task(name)
        self._write_registry([r for r in self.tasks() if r.name != name])
        for file in (record.file, record.stats_file):
            if file is not None:
                self._unlink_quietly(self._task_file(record, file))

    def rename_task(self, old: str, new: str) -> None:
        """Rename a task in the registry; its file keeps its name (the registry maps names to files)."""
        validate_task_name(new)
        self.task(old)
        if new == old:
            return
        records = self.tasks()
        if any(r.name == new for r in records):
            raise BundleError(f"task {new!r} already exists in {self.path}; remove it first or choose another name")
        self._write_registry([dataclasses.replace(r, name=new) if r.name == old else r for r in records])

    # --- helpers -----------------------------------------------------------------------------------

    def _check_prototypes(self, prototypes: np.ndarray, num_class_names: int) -> None:
        shape = tuple(prototypes.shape)
        if prototypes.ndim != 4 or shape[1:] != self.prototype_shape:
            expected = ", ".join(map(str, self.prototype_shape))
            raise BundleError(f"prototypes have shape {list(shape)}, this bundle needs [C, {expected}]")
        classes = shape[0]
        self.check_class_count(classes)
        if classes != num_class_names:
            raise BundleError(f"{classes} prototypes but {num_class_names} class names; give one name per class")
        if not np.isfinite(prototypes).all():
            raise BundleError("prototypes contain NaN or infinity; learn the task again")

    def _write_stats(self, task_file: str, stats: TaskStats, *, taken: set) -> tuple[str, str]:
        """Write ``stats`` beside the task's prototypes file, under a name no file in ``taken`` (every
        file the registry names) has; (its path in the bundle, SHA-256)."""
        data = stats.to_bytes()
        sha = hashlib.sha256(data).hexdigest()
        stem = task_file.removesuffix(".npz")
        names = itertools.chain([f"{stem}.stats.npz", f"{stem}.stats.{sha[:12]}.npz"],
                                (f"{stem}.stats.{sha[:12]}.{i}.npz" for i in itertools.count(1)))
        file = next(f for f in names if f not in taken)
        atomic_write_bytes(self.path / file, data)
        return file, sha

    def _task_file(self, record: TaskRecord, file: str | None = None) -> Path:
        # The registry is user-editable: never follow a name out of tasks/.
        file = record.file if file is None else file
        relative = Path(file)
        if relative.parent != Path(TASKS_DIR) or relative.name in ("", ".", "..") or relative.is_absolute():
            raise BundleError(f"task {record.name!r} points outside tasks/ ({file!r}); "
                              "restore tasks/registry.json or re-export the bundle")
        return self.path / relative

    def _free_task_file(self, name: str, sha: str, *, taken: set[str]) -> str:
        """``tasks/<name>.npz`` unless that path exists (a replaced or renamed task still uses it)."""
        candidates = (f"{TASKS_DIR}/{name}.npz", f"{TASKS_DIR}/{name}.{sha[:12]}.npz")
        free = (c for c in candidates if c not in taken and not (self.path / c).exists())
        # The content-named file, if it exists, already holds these very bytes: rewriting it is harmless.
        return next(free, candidates[1])

    @staticmethod
    def _unlink_quietly(file: Path) -> None:
        """Delete a file nothing reads any more, after the change that retired it is committed: storage
        that refuses leaves it behind with a warning, and the change stands (orphans in ``tasks/`` and
        stale task-free states are swept again by the next holder of the lock)."""
        try:
            file.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not delete %s (%s); nothing reads it any more: delete it when the storage allows",
                        file, exc.strerror)

    def _remove_orphans(self) -> None:
        referenced = {self.path / f for f in _files_of(self.tasks())}
        orphans = [f for f in self.layout.tasks_dir.glob("*.npz") if f not in referenced]
        # A task-free state replaced by a write that crashed (or could not delete it) stays beside the
        # current one; without a readable record naming the current one, none is touched.
        try:
            current = self._task_free_record()[0] if self.layout.task_free_record.exists() else None
        except BundleError:
            current = None
        if current is not None:
            orphans += [f for f in self.layout.task_free_states() if f != current]
        # Interrupted atomic writes leave temporary files in the root too (calibrate, task-stats).
        orphans += [f for folder in (self.path, self.layout.tasks_dir) for f in folder.glob("*") if is_temporary(f)]
        for file in orphans:
            self._unlink_quietly(file)
            log.info("removed %s, left by an interrupted write", file)

    def _write_registry(self, records: list[TaskRecord]) -> None:
        atomic_write_json(self.layout.registry,
                          {"format_version": REGISTRY_FORMAT_VERSION, "tasks": [r.to_dict() for r in records]})


@contextlib.contextmanager
def folder_lock(layout: BundleLayout, wait_s: float | None = LOCK_WAIT_S):
    """Hold the exclusive flock on ``<bundle>/.lock``. A busy lock is logged and awaited up to ``wait_s``
    s (None: forever), then BundleError."""
    import fcntl  # POSIX; imported here so that reading a bundle works everywhere

    def acquired() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    try:
        # flock needs no write access: a lock file another user created (a device's service account)
        # still locks for everyone who may read it.
        fd = os.open(layout.lock, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        raise BundleError(f"cannot create {layout.lock} ({exc.strerror}); make {layout.root} writable") from None
    try:
        if not acquired():
            log.info("waiting for another pah-edge process to finish with %s", layout.root)
            deadline = None if wait_s is None else time.monotonic() + wait_s
            while not acquired():
                if deadline is not None and time.monotonic() >= deadline:
                    raise BundleError(f"{layout.root} is busy (another learn-task is running); "
                                      "try again when it finishes")
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the flock


def _file_id(path: Path) -> tuple[int, ...] | None:
    """(device, inode, mtime, size) of ``path``, which a file written anew never shares with the old
    one even where the inode number is reused; None when it is missing."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size


def _files_of(records: list[TaskRecord]) -> set[str]:
    """Every file the registry entries name: prototypes and statistics."""
    return {f for r in records for f in (r.file, r.stats_file) if f is not None}


def _load_checked_npz(file: Path, sha256: str | None, fix: str, *, shown: str | None = None,
                      recorded_in: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of ``file`` after checking its SHA-256 (recorded in ``recorded_in``); BundleError
    naming ``shown`` (default: the file's name) and ``fix`` if it is missing or corrupt."""
    shown = shown or file.name
    try:
        data = file.read_bytes()  # read once: another process may delete the file between two reads
    except OSError:
        raise BundleError(f"{shown} is missing from {file.parent}; {fix}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        where = f" in {recorded_in}" if recorded_in else ""
        raise BundleError(f"{shown} does not match its SHA-256{where} (changed or corrupt); {fix}")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _read_json(path: Path, *, fix: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is unreadable ({type(exc).__name__}); {fix}") from None


def _check_format(manifest: Any, path: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path / MANIFEST_NAME} is not a pah-edge bundle manifest; re-export with `pah-edge export`")
    version = manifest.get("format_version")
    if isinstance(version, int) and version > BUNDLE_FORMAT_VERSION:
        raise BundleError(f"bundle format {version} is newer than this pah-edge reads ({BUNDLE_FORMAT_VERSION}); "
                          "upgrade pah-edge")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"bundle format {version!r} is not supported (this pah-edge reads {BUNDLE_FORMAT_VERSION}); "
                          "re-export the bundle with `pah-edge export`")
