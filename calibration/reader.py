"""Calibration images: a folder streamed as ``{input_name: float32 [B, 3, S, S]}`` batches.

The batch format is ONNX Runtime's ``CalibrationDataReader`` (``get_next``), which TensorRT's
calibrators take too. Images go through the bundle's own preprocessing record (``BatchStream``), a
batch at a time: memory holds a few batches of pixels (the one in use and ``BATCHES_AHEAD``), never
the folder.
"""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from pah_edge.folders import class_rng
from pah_edge.device.images import BatchStream, describe_skipped
from pah_edge.device.predict import image_files
from pah_edge.errors import DataError
from pah_edge.preprocess import IMAGE_SUFFIXES, Preprocess

_LAYOUT = "FOLDER/<class>/<images> (classes are sampled evenly) or FOLDER/<images>"


def calibration_files(folder: str | Path, samples: int, seed: int = 0) -> list[Path]:
    """Every image under ``folder`` (recursive), ordered so that any prefix samples the classes evenly.

    A class is an image's parent folder. Each class is shuffled by ``seed`` and the classes are taken
    in turn (round robin), so the first ``samples`` files hold ``samples / classes`` per class while
    the classes last; later files replace unreadable ones without unbalancing the draw much.
    DataError when ``folder`` is not a folder or holds fewer than ``samples`` image files.
    """
    root = Path(folder)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is a file, not a folder"
        raise DataError(f"calibration folder {root} {what}: pass --images laid out as {_LAYOUT}")
    files = image_files([root])
    if not files:
        raise DataError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) in {root}: put calibration images there, "
                        f"laid out as {_LAYOUT}")
    if len(files) < samples:
        raise DataError(f"{root} has {len(files)} images, fewer than --samples {samples}: add images "
                        f"or pass --samples {len(files)}")
    classes: dict[Path, list[Path]] = {}
    for file in files:
        classes.setdefault(file.parent, []).append(file)
    shuffled = [[members[i] for i in class_rng(seed, str(parent.relative_to(root))).permutation(len(members))]
                for parent, members in classes.items()]
    return [file for turn in zip_longest(*shuffled) for file in turn if file is not None]


class ImageFolderReader(CalibrationDataReader):
    """The first ``samples`` readable images of ``files``, ``batch_size`` at a time, as ONNX Runtime feeds.

    ``get_next`` returns None after every batch and resumes on the next call, so a calibrator's
    ``collect_data`` sees one batch per call (``while not reader.done``). Two reasons: ONNX Runtime's
    calibrators keep every batch's activations until ``collect_data`` returns (one batch bounds
    their memory), and its histogram collector stacks a call's batches into one array, which fails
    on batches of different sizes (the last one, or one that lost an unreadable image).
    ``on_images(n)`` is called with each batch's size (a progress bar). Running out of readable
    images before ``samples`` is a DataError naming the unreadable files.
    """

    def __init__(self, files: list[Path], preprocess: Preprocess, *, samples: int, batch_size: int = 8,
                 input_name: str = "images", on_images=None):
        if samples < 1 or batch_size < 1:
            raise ValueError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
        self.files, self.samples, self.input_name, self.on_images = files, samples, input_name, on_images
        self.delivered = 0  # images handed out so far
        self._pause = False
        self._stream = BatchStream(files, preprocess, batch_size)
        self._batches = iter(self._stream)
        self._position = {file: i for i, file in enumerate(files)}
        self._used = len(files)  # files up to this position were needed (all, until samples are reached)

    @property
    def done(self) -> bool:
        return self.delivered >= self.samples

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        """(file, reason) of every unreadable image met among the files calibration needed (the stream
        reads a batch or two ahead of them)."""
        return [(f, why) for f, why in self._stream.skipped if self._position[f] < self._used]

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.done or self._pause:
            self._pause = False
            return None
        batch = next(self._batches, None)
        if batch is None:
            self._fail()
        inputs, positions = batch[0][: self.samples - self.delivered], batch[1][: self.samples - self.delivered]
        self.delivered += len(inputs)
        if self.done:  # nothing more is needed: stop the stream reading ahead
            self._used = int(positions[-1]) + 1
            self._batches.close()
        self._pause = True
        if self.on_images is not None:
            self.on_images(len(inputs))
        return {self.input_name: inputs}

    def _fail(self):
        skipped = self.skipped
        if self.delivered == 0:
            raise DataError(f"none of the {len(self.files)} calibration image(s) could be read: "
                            f"{describe_skipped(skipped)}; replace them or pass another --images folder")
        raise DataError(f"only {self.delivered} of the {len(self.files)} calibration images are readable "
                        f"({describe_skipped(skipped)}), fewer than --samples {self.samples}: add images or pass "
                        f"--samples {self.delivered}")
