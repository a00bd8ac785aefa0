"""A new task's images on the device: scan ``FOLDER/<class>/*``, then stream preprocessed batches.

Class folders are read in sorted order; names starting with '.' are ignored, and so are files that
are not .png/.jpg/.jpeg/.bmp (case-insensitive; counted, one warning). Images are decoded a batch at
a time with the bundle's own preprocessing record, on a thread that keeps ahead of the backbone.

Unreadable images (corrupt, truncated, not really an image, or above the 50-megapixel limit of
``load_image``) are skipped, not fatal: the stream records them in ``skipped`` and
:func:`warn_skipped` reports them in one warning that counts them and names up to 3. A class left
without any readable image is a DataError (:func:`check_no_class_empty`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pah_edge.device.frame_pipeline import prepared_ahead
from pah_edge.errors import DataError
from pah_edge.folders import folder_files, subfolders
from pah_edge.preprocess import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, Preprocess, frame_image, load_image, to_input

log = logging.getLogger("pah_edge")

_MAX_NAMED = 3  # skipped files named in a warning
# Batches a BatchStream holds beyond the one the caller is running: one waiting, one being read.
BATCHES_AHEAD = 2
_LAYOUT = "FOLDER/<class>/<images>"


@dataclass(frozen=True)
class ClassFolders:
    """A task's image files: ``files[i]`` holds class ``class_names[i]``'s images, sorted."""

    root: Path
    class_names: tuple[str, ...]
    files: tuple[tuple[Path, ...], ...]
    ignored: int  # files that are not images, left out

    @property
    def num_images(self) -> int:
        return sum(len(f) for f in self.files)

    def paths(self) -> list[Path]:
        """Every image file, class by class."""
        return [path for paths in self.files for path in paths]

    def labels(self) -> np.ndarray:
        """int64 class index of each of `paths`."""
        return np.repeat(np.arange(len(self.files), dtype=np.int64), [len(paths) for paths in self.files])


def scan_class_folders(folder: str | Path) -> ClassFolders:
    """The class folders and image files under ``folder``; DataError if it cannot make a task.

    Needs at least 2 class folders, each with at least one image file. Nothing is decoded here.
    """
    root = Path(folder)
    if not root.exists():
        raise DataError(f"image folder {root} does not exist: pass a folder laid out as {_LAYOUT}")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder: pass a folder laid out as {_LAYOUT}")
    classes = subfolders(root)
    if len(classes) < 2:
        found = f"1 class folder ({classes[0].name})" if classes else "no class folders"
        raise DataError(f"{root} has {found}; a task needs at least 2 class folders, laid out as {_LAYOUT}")
    files, ignored = [], 0
    for class_folder in classes:
        images, others = folder_files(class_folder)
        if not images:
            raise DataError(
                f"no images found in {class_folder}: put {'/'.join(IMAGE_SUFFIXES)} files in it or remove the folder"
            )
        files.append(tuple(images))
        ignored += len(others)
    return ClassFolders(root, tuple(c.name for c in classes), tuple(files), ignored)


def warn_ignored(folders: ClassFolders) -> None:
    if folders.ignored:
        log.warning("ignored %d non-image file(s) in %s (only %s are read)", folders.ignored, folders.root,
                    "/".join(IMAGE_SUFFIXES))


class BatchStream:
    """Preprocessed batches of ``items``, ``batch_size`` images at a time, never all at once.

    Iterating yields ``(inputs, positions)``: float32 [B, 3, S, S] network input and the int64
    indices into ``items`` of the images it holds. The next batch is decoded on a thread while the
    caller runs the backbone on this one (``BATCHES_AHEAD`` at most; a single batch is read at once).

    ``load(item)`` gives an item's uint8 [S, S, 3] image; by default items are image files, decoded
    with ``load_image``. An item whose load raises DataError (an unreadable file) is left out of the
    batches and listed in ``skipped`` as (item, reason); any other error is raised.
    """

    def __init__(self, items: Sequence, preprocess: Preprocess, batch_size: int,
                 load: Callable[[Any], np.ndarray] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.items, self.preprocess, self.batch_size = items, preprocess, batch_size
        self.load = load or (lambda file: load_image(file, preprocess))
        self.skipped: list[tuple[Any, str]] = []

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        starts = range(0, len(self.items), self.batch_size)
        if len(starts) <= 1:  # no backbone call to overlap: a thread would only add its start (0.4 ms a file)
            batches = (self._batch(start) for start in starts)
        else:
            batches = prepared_ahead(starts, self._batch, depth=BATCHES_AHEAD - 1)
        with closing(batches):
            for batch in batches:
                if batch is not None:
                    yield batch

    def _batch(self, start: int) -> tuple[np.ndarray, np.ndarray] | None:
        images, positions = [], []
        for position in range(start, min(start + self.batch_size, len(self.items))):
            item = self.items[position]
            try:
                images.append(self.load(item))
            except DataError as exc:
                self.skipped.append((item, str(exc)))
                continue
            positions.append(position)
        return (to_input(np.stack(images), self.preprocess), np.asarray(positions, np.int64)) if images else None


def frame_stream(frames: Sequence[np.ndarray], preprocess: Preprocess, batch_size: int, *,
                 bgr: bool = False) -> BatchStream:
    """Batches of in-memory ``frames`` (see ``frame_image``), as `BatchStream` gives of files. Nothing
    is skipped: a bad frame raises FrameError (check them all first with ``check_frame``)."""
    return BatchStream(frames, preprocess, batch_size, load=lambda frame: frame_image(frame, preprocess, bgr=bgr))


def describe_skipped(skipped: list[tuple[Path, str]]) -> str:
    """``3 unreadable image(s) (a/1.png, b/2.png, ...)``: the count and up to 3 names."""
    named = ", ".join(f"{p.parent.name}/{p.name}" for p, _ in skipped[:_MAX_NAMED])
    more = ", ..." if len(skipped) > _MAX_NAMED else ""
    return f"{len(skipped)} unreadable image(s) ({named}{more})"


_WHY = f"corrupt, not an image, or above {MAX_IMAGE_PIXELS / 1e6:g} megapixels"


def warn_skipped(skipped: list[tuple[Path, str]], total: int) -> None:
    """One warning for every image a stream of ``total`` images skipped."""
    if skipped:
        log.warning("skipped %s of %d: %s; replace or remove them", describe_skipped(skipped), total, _WHY)


def check_no_class_empty(folders: ClassFolders, labels: np.ndarray, skipped: list[tuple[Path, str]]) -> None:
    """DataError naming the first class that has no readable image among ``labels`` (of read images)."""
    counts = np.bincount(labels, minlength=len(folders.class_names))
    for label in np.flatnonzero(counts == 0):
        folder = folders.root / folders.class_names[label]
        lost = [s for s in skipped if s[0].parent == folder]
        raise DataError(f"class {folders.class_names[label]!r} has no readable image left: skipped "
                        f"{describe_skipped(lost)}, {_WHY}; add readable {'/'.join(IMAGE_SUFFIXES)} files to {folder} "
                        "or remove the folder")
