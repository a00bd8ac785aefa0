"""A new task's images on the device: scan ``FOLDER/<class>/*``, then stream preprocessed batches.

Class folders are read in sorted order; names starting with '.' are ignored, and so are files that
are not .png/.jpg/.jpeg/.bmp (case-insensitive; counted, one warning). Images are decoded one batch
at a time, never all at once, with the bundle's own preprocessing record.

Unreadable images (corrupt, truncated, not really an image, or above the 50-megapixel limit of
``load_image``) are skipped, not fatal: the stream records them in ``skipped`` and
:func:`warn_skipped` reports them in one warning that counts them and names up to 3. A class left
without any readable image is a DataError (:func:`check_no_class_empty`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pah_edge.folders import folder_files, subfolders
from pah_edge.errors import DataError
from pah_edge.preprocess import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, Preprocess, frame_image, load_image, to_input

log = logging.getLogger("pah_edge")

_MAX_NAMED = 3  # skipped files named in a warning
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

    def labelled(self) -> list[tuple[Path, int]]:
        """(file, class index) for every image, class by class."""
        return [(path, label) for label, paths in enumerate(self.files) for path in paths]


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
    """Preprocessed batches of ``items`` ([(file, label)]), decoded ``batch_size`` images at a time.

    Iterating yields ``(inputs, positions)``: float32 [B, 3, S, S] network input and the int64
    indices into ``items`` of the images it holds. Unreadable files are left out of the batches and
    listed in ``skipped`` as (file, reason).
    """

    def __init__(self, items: list[tuple[Path, int]], preprocess: Preprocess, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.items, self.preprocess, self.batch_size = items, preprocess, batch_size
        self.skipped: list[tuple[Path, str]] = []

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self.items), self.batch_size):
            images, positions = [], []
            for position in range(start, min(start + self.batch_size, len(self.items))):
                path = self.items[position][0]
                try:
                    images.append(load_image(path, self.preprocess))
                except DataError as exc:
                    self.skipped.append((path, str(exc)))
                    continue
                positions.append(position)
            if images:
                yield to_input(np.stack(images), self.preprocess), np.asarray(positions, np.int64)


class FrameStream:
    """Preprocessed batches of in-memory ``frames`` (see ``frame_image``), as `BatchStream` gives of files.

    Each frame is resized only when its batch comes up. Nothing is skipped: ``skipped`` stays empty,
    and a bad frame raises FrameError (check them all first with ``check_frame``).
    """

    def __init__(self, frames: Sequence[np.ndarray], preprocess: Preprocess, batch_size: int, *, bgr: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.frames, self.preprocess, self.batch_size, self.bgr = frames, preprocess, batch_size, bgr
        self.skipped: list[tuple[Path, str]] = []

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self.frames), self.batch_size):
            stop = min(start + self.batch_size, len(self.frames))
            images = np.stack([frame_image(self.frames[i], self.preprocess, bgr=self.bgr) for i in range(start, stop)])
            yield to_input(images, self.preprocess), np.arange(start, stop, dtype=np.int64)


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
