"""Tasks from a folder of the user's images.

Two layouts: ROOT/<class>/<images> is one task named after ROOT; ROOT/<task>/<class>/<images>
is several tasks in sorted folder order. Classes are in sorted folder order too. Names starting
with '.' are ignored, and so are files that are not .png/.jpg/.jpeg/.bmp.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from pah_edge.workstation.data.splits import ClassSplit, check_options, cut, make_task, shuffled, split_sizes
from pah_edge.workstation.data.tasks import Task
from pah_edge.errors import DataError
from pah_edge.folders import class_rng, folder_files, subfolders
from pah_edge.preprocess import IMAGE_SUFFIXES, Preprocess, load_image

log = logging.getLogger("pah_edge")

_LAYOUTS = "ROOT/<class>/<images> (one task) or ROOT/<task>/<class>/<images> (several tasks)"
_MAX_NAMED = 3  # unreadable files named in the warning


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    preprocess: Preprocess,
    limit_per_class: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> list[Task]:
    """Tasks from an image folder, each class split into train/val/test by `seed`.

    Per class, files are shuffled, cut to `limit_per_class`, then split into test
    (round(test_fraction * n)), val (round(val_fraction * n)) and train (the rest), each at
    least one image. Unreadable images are skipped with one warning per task.
    """
    check_options(seed=seed, limit_per_class=limit_per_class, val_fraction=val_fraction, test_fraction=test_fraction)
    return [
        _load_task(name, folder, preprocess, limit_per_class, seed, val_fraction, test_fraction)
        for name, folder in _find_tasks(Path(root))
    ]


def _find_tasks(root: Path) -> list[tuple[str, Path]]:
    """(task name, task folder) pairs in the layout `root` uses."""
    if not root.exists():
        raise DataError(f"image folder {root} does not exist: pass a folder laid out as {_LAYOUTS}")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder: pass a folder laid out as {_LAYOUTS}")
    children = subfolders(root)
    if not children:
        raise DataError(f"image folder {root} has no subfolders: lay it out as {_LAYOUTS}")
    has_images = {f: bool(folder_files(f)[0]) for f in children}
    class_like = [f for f in children if has_images[f]]
    task_like = [f for f in children if not has_images[f] and subfolders(f)]
    if class_like and task_like:
        raise DataError(
            f"{root} mixes class folders holding images ({class_like[0].name}) with task folders holding"
            f" class folders ({task_like[0].name}): use either {_LAYOUTS}"
        )
    if task_like:
        return [(f.name, f) for f in children]
    return [(root.resolve().name, root)]


def _load_task(
    name: str,
    folder: Path,
    pre: Preprocess,
    limit_per_class: int | None,
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> Task:
    classes = subfolders(folder)
    if len(classes) < 2:
        found = f"1 class ({classes[0].name})" if classes else "no class folders"
        raise DataError(f"task {name!r} has {found}; a task needs at least 2 class folders")
    per_class: list[ClassSplit] = []
    unreadable: list[Path] = []
    ignored = 0
    for class_folder in classes:
        images, others = folder_files(class_folder)
        ignored += len(others)
        if not images:
            raise DataError(
                f"no images found in {class_folder}: put {'/'.join(IMAGE_SUFFIXES)} files in it or remove the folder"
            )
        where = f"class {class_folder.name!r} in task {name!r}"
        # Too few files fails here, before any decoding.
        split_sizes(len(images), val_fraction=val_fraction, test_fraction=test_fraction, where=where)
        chosen = shuffled(images, class_rng(seed, name, class_folder.name), limit_per_class)
        decoded = []
        for path in chosen:
            try:
                decoded.append(load_image(path, pre))
            except DataError:
                unreadable.append(path)
        if len(decoded) < len(chosen):
            where += " (after skipping unreadable images)"
        sizes = split_sizes(len(decoded), val_fraction=val_fraction, test_fraction=test_fraction, where=where)
        test, val, train = cut(np.stack(decoded), sizes)
        per_class.append((train, val, test))
    _warn_skipped(name, unreadable, ignored)
    return make_task(name, [c.name for c in classes], per_class)


def _warn_skipped(task: str, unreadable: list[Path], ignored: int) -> None:
    """One warning per task for everything it left out."""
    parts = []
    if unreadable:
        named = ", ".join(f"{p.parent.name}/{p.name}" for p in unreadable[:_MAX_NAMED])
        more = ", ..." if len(unreadable) > _MAX_NAMED else ""
        parts.append(f"skipped {len(unreadable)} unreadable image(s) in task {task!r} ({named}{more})")
    if ignored:
        parts.append(f"ignored {ignored} non-image file(s) in task {task!r} (only {'/'.join(IMAGE_SUFFIXES)} are read)")
    if parts:
        log.warning("; ".join(parts))
