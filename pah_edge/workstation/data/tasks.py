"""The continual-learning unit: a task is a few classes with train, val and test images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ImageSet:
    """Images of one split, grouped by class."""

    images: np.ndarray  # uint8 [N, S, S, 3] RGB, already resized by `resize_image`
    labels: np.ndarray  # int64 [N], task-local class index 0..C-1

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Task:
    """One task of a continual-learning sequence."""

    name: str
    class_names: list[str]  # index = task-local label
    train: ImageSet
    val: ImageSet
    test: ImageSet

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
