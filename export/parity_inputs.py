"""The inputs that export and ``pah-edge verify`` push through every runtime, made with numpy alone.

Seeded, so the export report and a later ``verify`` see the same numbers: random normalised images,
real images from a folder (or, without one, the tasks' prototypes upsampled to input images),
every task's prototypes plus random prototype sets of several class counts, and random labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pah_edge.errors import DataError
from pah_edge.folders import images_under
from pah_edge.preprocess import IMAGE_SUFFIXES, Preprocess, load_image, to_input

SEED = 0
RANDOM_BATCH = 4  # random images per check
MAX_FOLDER_IMAGES = 16  # real images per check, first in sorted path order
RANDOM_CLASS_COUNTS = (3, 12)  # prototype sets beyond the tasks' own: C is dynamic in the graphs

Inputs = list[tuple[str, np.ndarray]]  # (what it is, array): one batch per entry


def random_images(image_size: int, *, n: int = RANDOM_BATCH, seed: int = SEED) -> np.ndarray:
    """float32 [n, 3, S, S] standard-normal images: the range of ImageNet-normalised pixels."""
    return np.random.default_rng(seed).standard_normal((n, 3, image_size, image_size), dtype=np.float32)


def folder_images(folder: Path, preprocess: Preprocess, *, limit: int = MAX_FOLDER_IMAGES) -> np.ndarray:
    """Up to ``limit`` images found recursively in ``folder``, preprocessed: float32 [n, 3, S, S]."""
    if not folder.is_dir():
        raise DataError(f"--images {folder} is not a folder; give a folder of .png/.jpg images")
    files = images_under(folder)[:limit]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}; give a folder that holds some")
    return to_input(np.stack([load_image(f, preprocess) for f in files]), preprocess)


def prototype_images(prototypes: np.ndarray, image_size: int) -> np.ndarray:
    """Prototypes [C, c, s, s] bilinearly resized to input images float32 [C, 3, S, S] (gray repeated)."""
    resized = np.stack([
        np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(channel, np.float32))
                             .resize((image_size, image_size), Image.Resampling.BILINEAR)) for channel in proto])
        for proto in prototypes
    ])
    return np.ascontiguousarray(np.repeat(resized, 3, axis=1) if resized.shape[1] == 1 else resized, np.float32)


def backbone_inputs(preprocess: Preprocess, task_prototypes: Inputs, images: Path | None) -> Inputs:
    """Random images, then real images from ``images`` or else each task's prototypes as images."""
    size = preprocess.image_size
    batches = [(f"{RANDOM_BATCH} random images", random_images(size))]
    if images is not None:
        real = folder_images(images, preprocess)
        batches.append((f"{len(real)} images from {images}", real))
    else:
        batches += [(f"prototypes of task {name} as images", prototype_images(p, size)) for name, p in task_prototypes]
    return batches


def prototype_sets(task_prototypes: Inputs, shape: tuple[int, ...], fixed_num_classes: int | None) -> Inputs:
    """Each task's prototypes, then random sets of 3 and 12 classes (of the fixed count for task-mlp)."""
    counts = RANDOM_CLASS_COUNTS if fixed_num_classes is None else (fixed_num_classes,)
    rng = np.random.default_rng(SEED + 1)
    randoms = [(f"random {c}-class prototypes", rng.standard_normal((c, *shape), dtype=np.float32)) for c in counts]
    return [(f"task {name}", np.asarray(p, np.float32)) for name, p in task_prototypes] + randoms


def random_labels(n: int, num_classes: int, *, seed: int = SEED) -> np.ndarray:
    """int64 [n] labels in [0, num_classes), every class present when n allows."""
    rng = np.random.default_rng(seed + num_classes)
    labels = np.arange(n, dtype=np.int64) % num_classes
    return rng.permutation(labels)


def learner_step_inputs(proto_sets: list[np.ndarray], features: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """(prototypes, features, labels) per prototype set; each set sees 3 fewer feature rows than the last,
    so the check covers several batch sizes N as well as class counts C."""
    batches = []
    for i, prototypes in enumerate(proto_sets):
        n = max(1, len(features) - 3 * i)
        batches.append((prototypes, features[:n], random_labels(n, len(prototypes))))
    return batches
