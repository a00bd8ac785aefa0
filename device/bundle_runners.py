"""A bundle's graphs as runners: the backbone on the fastest usable runtime, the generator on the CPU.

Never imports torch. The runners are returned inactive; use them as context managers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pah_edge.bundle import Bundle
from pah_edge.device.runtimes import Runner, RuntimeUnavailable, create_runner, pick_runtime, sidecar_path
from pah_edge.errors import ConfigError, PahEdgeError

log = logging.getLogger("pah_edge")

# What a user may ask for; "torch" is a reference runtime for checks, not for devices.
DEVICE_RUNTIMES = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu")
# When several engines are built, the fastest one wins (INT8 exists only after a deliberate calibration).
ENGINE_PRECISIONS = ("int8", "fp16", "fp32")


def backbone_engine(bundle: Bundle) -> Path | None:
    """``engines/backbone.<precision>.engine`` of the fastest precision built, or None."""
    engines = bundle.path / "engines"
    return next((e for p in ENGINE_PRECISIONS if (e := engines / f"backbone.{p}.engine").is_file()), None)


def backbone_runner(bundle: Bundle, runtime: str = "auto") -> Runner:
    """A runner for images [N, 3, S, S] -> features [N, D].

    ``auto``: the bundle's TensorRT engine when TensorRT works here and an engine is built, else ONNX
    Runtime on CUDA, else on the CPU. ``tensorrt`` without a built engine is an error naming the fix.
    """
    if runtime not in DEVICE_RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}: choose one of {', '.join(DEVICE_RUNTIMES)}")
    kind, skipped = pick_runtime(runtime)
    for reason in skipped:
        log.debug("runtime skipped: %s", reason)
    if kind == "tensorrt":
        engine = backbone_engine(bundle)
        if engine is not None:
            return create_runner("tensorrt", engine)
        fix = f"build one with `pah-edge build-engine {bundle.path}`"
        if runtime == "tensorrt":
            raise PahEdgeError(f"no TensorRT engine in {bundle.path / 'engines'}: {fix}, or pass --runtime onnxruntime")
        log.info("no TensorRT engine in %s, using ONNX Runtime (%s for speed)", bundle.path / "engines", fix)
        kind = _best_onnxruntime()
    return create_runner(kind, bundle.graph_path("backbone"))


def generator_runner(bundle: Bundle) -> Runner:
    """A runner for prototypes [C, c, s, s] -> head [C, D]."""
    # A head is generated once per task from a few prototypes: the CPU is fast enough, and GPU memory
    # (shared with the CPU on a Jetson) stays with the backbone.
    return create_runner("onnxruntime-cpu", bundle.graph_path("generator"))


def max_batch(runner: Runner) -> int | None:
    """The largest batch ``runner`` accepts: a TensorRT engine's profile maximum; None means any."""
    engine = getattr(runner, "engine_path", None)
    if engine is None:
        return None
    try:
        return int(json.loads(sidecar_path(engine).read_text())["profile"]["max"][0])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return 1  # an engine without a readable profile record: the one batch size every profile takes


def features(runner: Runner, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Backbone features float32 [N, D] of normalised images [N, 3, S, S], ``batch_size`` at a time."""
    limit = max_batch(runner)
    step = max(1, min(batch_size, limit) if limit else batch_size)
    parts = [runner.infer({"images": images[i : i + step]})["features"] for i in range(0, len(images), step)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def _best_onnxruntime() -> str:
    try:
        return pick_runtime("onnxruntime-cuda")[0]
    except RuntimeUnavailable:
        return pick_runtime("onnxruntime-cpu")[0]
