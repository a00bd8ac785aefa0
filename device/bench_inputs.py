"""What ``pah-edge bench`` feeds the components: real images from ``--images DIR`` or synthetic ones.

Everything is written into a scratch folder the benchmark owns (a private copy of the bundle, the
image file that end-to-end prediction decodes, the class folders that learn-task reads), so the
user's bundle is never written. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from pah_edge.bundle import Bundle
from pah_edge.device.bundle_runners import backbone_runner
from pah_edge.device.predict import image_files
from pah_edge.device.task_stats import features_of_arrays
from pah_edge.errors import DataError
from pah_edge.preprocess import IMAGE_SUFFIXES, Preprocess, load_image, to_input
from pah_edge.task_free import task_stats

IMAGES_PER_CLASS = 8  # of the synthetic learn-task task: 10 classes x 8 images, like a quick on-site capture
DEFAULT_CLASSES = 10
FRAME_SIZE = (640, 480)  # px, width x height: the synthetic end-to-end image is a VGA camera frame
BENCH_TASK = "bench"  # the task end-to-end prediction scores, registered in the scratch copy only


@dataclass(frozen=True)
class Inputs:
    """pool: uint8 [P, S, S, 3] decoded and resized images that network batches cycle through;
    frame: the image file end-to-end prediction reads; learn_folder: ``<class>/<n>.png`` for learn-task."""

    pool: np.ndarray
    frame: Path
    learn_folder: Path
    source: str  # "synthetic" or the --images folder

    @cached_property
    def frame_pixels(self) -> np.ndarray:
        """``frame`` decoded once, as the RGB uint8 [H, W, 3] frame an application would hand over."""
        with Image.open(self.frame) as image:
            return np.asarray(image.convert("RGB"))

    def batch(self, size: int, preprocess: Preprocess) -> np.ndarray:
        """Network input float32 [size, 3, S, S]: the pool's images in order, repeated as needed."""
        return to_input(self.pool[np.arange(size) % len(self.pool)], preprocess)


def synthetic_images(count: int, height: int, width: int, *, classes: int, seed: int = 0) -> np.ndarray:
    """uint8 [count, height, width, 3]: smooth random colour fields plus pixel noise.

    Image i leans towards colour ``i % classes``, so a task labelled that way is learnable and
    learn-task's early stopping behaves as on real data rather than on pure noise.
    """
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (classes, 1, 1, 3))
    out = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        coarse = ((rng.integers(0, 256, (4, 4, 3)) + palette[i % classes]) // 2).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), np.float32)
        out[i] = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255)
    return out


def prepare_inputs(preprocess: Preprocess, images: Path | None, work: Path, *, classes: int) -> Inputs:
    """The pool, end-to-end image and learn-task folder under ``work``, from ``images`` or synthetic.

    Real images: the first ``classes`` x 8 readable files of the folder (recursively), assigned to
    classes in turn (their labels are unknown; only the timing counts). DataError if none is readable.
    """
    size, count = preprocess.image_size, classes * IMAGES_PER_CLASS
    if images is None:
        pool = synthetic_images(count, size, size, classes=classes)
        frame = work / "frame.jpg"
        Image.fromarray(synthetic_images(1, FRAME_SIZE[1], FRAME_SIZE[0], classes=1, seed=1)[0]).save(frame, quality=90)
        source = "synthetic"
    else:
        pool, frame = _read_images(images, preprocess, count)
        source = str(images)
    folder = work / "learn-task"
    for j, (image, label) in enumerate(zip(*learn_task_images(pool, classes))):
        path = folder / f"class{label:02d}" / f"{j:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    return Inputs(pool, frame, folder, source)


def learn_task_images(pool: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, int labels) of the learn-task folder: the pool cycled to IMAGES_PER_CLASS per
    class, image j in class j % classes."""
    order = np.arange(classes * IMAGES_PER_CLASS)
    return pool[order % len(pool)], order % classes


def _read_images(folder: Path, preprocess: Preprocess, count: int) -> tuple[np.ndarray, Path]:
    """(up to ``count`` decoded images uint8 [P, S, S, 3], the first readable file)."""
    if not folder.is_dir():
        raise DataError(f"--images {folder} is not a folder: give a folder of {'/'.join(IMAGE_SUFFIXES)} files")
    decoded, first = [], None
    for path in image_files([folder]):
        try:
            decoded.append(load_image(path, preprocess))
        except DataError:
            continue  # an unreadable file is simply not timed
        first = first or path
        if len(decoded) == count:
            break
    if not decoded:
        raise DataError(f"no readable images ({', '.join(IMAGE_SUFFIXES)}) in {folder}: give a folder holding some")
    return np.stack(decoded), first


def scratch_bundle(bundle: Bundle, work: Path, inputs: Inputs, *, classes: int) -> Bundle:
    """A private copy of ``bundle`` in ``work`` with task ``bench`` (random prototypes, ``classes`` classes;
    task-free statistics from the features of ``inputs.pool`` when the bundle has the shared state).

    learn-task registers tasks and takes the bundle's lock, and prediction needs a task: both happen
    in the copy, so the user's bundle stays byte-identical.
    """
    scratch = bundle.scratch_copy(work / "bundle")
    prototypes = 0.1 * np.random.default_rng(0).standard_normal((classes, *scratch.prototype_shape))
    stats = None
    if scratch.shared_stats() is not None:  # task-free prediction then covers this task as it does any other
        images, labels = learn_task_images(inputs.pool, classes)
        with backbone_runner(scratch, "onnxruntime-cpu", "fp32") as runner:
            features = features_of_arrays(runner, images, scratch)
        stats = task_stats(features, labels, classes)
    scratch.add_task(name=BENCH_TASK, class_names=[f"class{i:02d}" for i in range(classes)], prototypes=prototypes,
                     images_seen=0, accuracy=None, source="device", replace=True, stats=stats)
    return scratch
