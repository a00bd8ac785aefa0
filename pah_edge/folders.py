"""Reading image folders and drawing from them, shared by the workstation's datasets and the device.

Torch-free core: ``pah_edge.workstation.data`` (training) and ``device``/``calibration`` both build on it, so
the device side never imports the workstation's dataset loaders.
"""

from __future__ import annotations

import numbers
import os
import zlib
from pathlib import Path

import numpy as np

from pah_edge.preprocess import IMAGE_SUFFIXES


def subfolders(folder: Path) -> list[Path]:
    """The visible subfolders of ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) directly in ``folder``, visible ones only, sorted."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]


def images_under(folder: Path) -> list[Path]:
    """Every visible image file under ``folder``, recursively, in sorted order (hidden folders skipped)."""
    files = []
    # followlinks=False (the default): a symlink loop cannot recurse forever.
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root, n) for n in sorted(names)
                  if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return files


def class_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """Generator for one class: its draws depend only on the seed and its own keys (names or labels),
    so adding or renaming other classes or tasks leaves them unchanged."""
    entropy = [int(k) if isinstance(k, numbers.Integral) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng([int(seed), *entropy])
