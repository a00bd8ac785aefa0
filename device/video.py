"""Frames from a video file or a camera through OpenCV (``pip install 'pah-edge[camera]'``), predicted one by one.

OpenCV is imported only here, on first use: the rest of the device side runs without it. Never
imports torch.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from pah_edge.errors import ConfigError, DataError, PahEdgeError


def _cv2(option: str):
    # OpenCV's own warnings (a camera index it cannot open, ...) would come before our one-line error.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    try:
        import cv2
    except ImportError as exc:
        raise PahEdgeError(f"{option} needs OpenCV: pip install 'pah-edge[camera]' (opencv-python-headless); "
                           f"importing cv2 failed: {exc}") from None
    return cv2


def open_source(*, video: Path | None = None, camera: int | None = None) -> Any:
    """An opened ``cv2.VideoCapture`` of ``video`` (a file) or ``camera`` (an index); PahEdgeError naming
    the fix when it cannot be opened."""
    if (video is None) == (camera is None):
        raise ConfigError("give one of --video FILE and --camera INDEX")
    cv2 = _cv2("--video" if video is not None else "--camera")
    if video is not None:
        if not Path(video).is_file():
            raise DataError(f"no video file {video}: check the path")
        capture = cv2.VideoCapture(str(video))
        fix = f"cannot open video {video}: give a file OpenCV can decode (e.g. .mp4, .avi)"
    else:
        capture = cv2.VideoCapture(camera)
        fix = (f"cannot open camera {camera}: check that it is connected and not in use by another program, "
               "or give another --camera INDEX")
    if not capture.isOpened():
        capture.release()
        raise DataError(fix)
    return capture


def frames(capture: Any, *, every: int = 1, live: bool = False) -> Iterator[tuple[int, float, np.ndarray]]:
    """(frame index from 0, time in ms, BGR uint8 [H, W, 3]) of every ``every``-th frame until the source ends.

    Time: a file's frames at index / fps (its own timeline); a ``live`` camera's, ms since the first read.
    Skipped frames are only grabbed, never converted.
    """
    cv2 = _cv2("--video")
    fps = capture.get(cv2.CAP_PROP_FPS) if not live else 0.0
    start = time.perf_counter()
    index = 0
    while True:
        if index % every == 0:
            ok, frame = capture.read()
            if not ok:
                return
            # Containers without a frame rate fall back on the position the decoder reports.
            ms = (time.perf_counter() - start) * 1e3 if live else (
                index * 1e3 / fps if fps > 0 else capture.get(cv2.CAP_PROP_POS_MSEC))
            yield index, ms, frame
        elif not capture.grab():
            return
        index += 1


def predict_frames(bundle: Path, *, video: Path | None, camera: int | None, every: int = 1,
                   max_frames: int | None = None, task: str | None = None,
                   **device_options) -> Iterator[dict[str, Any]]:
    """``{frame, time_ms, task, label, confidence, novelty, known}`` per predicted frame of ``video``
    or ``camera`` (see `frames`), up to ``max_frames``; ``device_options`` go to `Device`."""
    from pah_edge.device.api import Device

    # Before the source opens and the bundle loads: frames() is a generator, checked only when read.
    if every < 1:
        raise ConfigError(f"--every must be 1 or more, got {every}")
    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"--max-frames must be 1 or more, got {max_frames}")
    capture = open_source(video=video, camera=camera)  # first: no OpenCV or no source fails in a moment
    read: deque[tuple[int, float]] = deque()  # (index, ms) of the frames handed to the stream, in order

    def pixels() -> Iterator[np.ndarray]:
        for index, ms, frame in frames(capture, every=every, live=camera is not None):
            read.append((index, ms))
            yield frame

    try:
        with Device(bundle, **device_options) as dev:
            # The stream reads and resizes the next frame while the backbone runs this one; an unknown
            # --task fails before the first frame is read.
            with closing(dev.predict_stream(pixels(), task=task, bgr=True)) as predictions:
                for count, prediction in enumerate(predictions, 1):
                    index, ms = read.popleft()
                    yield {"frame": index, "time_ms": round(ms, 3), **prediction.to_dict()}
                    if count == max_frames:
                        return
    finally:
        capture.release()
