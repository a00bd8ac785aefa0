"""Shared rules that turn per-class image lists into tasks: seeding, limits and split sizes."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from pah_edge.workstation.data.tasks import ImageSet, Task
from pah_edge.errors import ConfigError, DataError

# Per class: (train, val, test) images, each uint8 [n, S, S, 3].
ClassSplit = tuple[np.ndarray, np.ndarray, np.ndarray]


MIN_PER_CLASS = 3  # images per class: one each for train, val and test


def check_options(*, seed: int, limit_per_class: int | None, val_fraction: float, test_fraction: float) -> None:
    """Raise ConfigError for options no dataset can satisfy."""
    if not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed must be a whole number >= 0, got {seed!r}")
    if limit_per_class is not None and (not isinstance(limit_per_class, numbers.Integral)
                                        or limit_per_class < MIN_PER_CLASS):
        raise ConfigError(f"limit_per_class must be at least {MIN_PER_CLASS} (one train, val and test image per "
                          f"class), got {limit_per_class!r}")
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {fraction!r}")
    if val_fraction + test_fraction >= 1:
        total = val_fraction + test_fraction
        raise ConfigError(f"val_fraction + test_fraction must be below 1 to leave training images, got {total:g}")


def shuffled(items: Sequence | np.ndarray, rng: np.random.Generator, limit: int | None) -> np.ndarray:
    """Items in random order, at most `limit` of them."""
    return rng.permutation(np.asarray(items))[:limit]


def split_sizes(n: int, *, val_fraction: float, test_fraction: float | None, where: str) -> tuple[int, int, int]:
    """(test, val, train) counts for a class of n images; test_fraction None: no test carve-out
    (the dataset has an official test set). Each part gets at least one image."""
    parts = "train, val" if test_fraction is None else "train, val, test"
    needed = len(parts.split(", "))
    if n < needed:
        raise DataError(f"{where} has {n} images; need at least {needed} ({parts})")
    n_test = 0 if test_fraction is None else max(1, round(test_fraction * n))
    n_val = max(1, round(val_fraction * n))
    # Rounding both up can leave no training image: give back from the larger part.
    while n - n_test - n_val < 1:
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n_test, n_val, n - n_test - n_val


def cut(items: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Consecutive pieces of `items` with the given sizes."""
    return np.split(items, np.cumsum(sizes)[:-1])


def make_task(name: str, class_names: list[str], per_class: list[ClassSplit]) -> Task:
    """Task whose labels are the positions in class_names (0..C-1)."""
    sets = []
    for split in range(3):
        parts = [splits[split] for splits in per_class]
        labels = np.concatenate([np.full(len(p), label, np.int64) for label, p in enumerate(parts)])
        sets.append(ImageSet(images=np.concatenate(parts), labels=labels))
    train, val, test = sets
    return Task(name=name, class_names=list(class_names), train=train, val=val, test=test)
