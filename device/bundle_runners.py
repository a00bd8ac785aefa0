"""A bundle's graphs as runners: the backbone on the fastest usable runtime, the generator on the CPU.

Never imports torch. The runners are returned inactive; use them as context managers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pah_edge.bundle import Bundle
from pah_edge.bundle_layout import BACKBONE_MODELS, ENGINES_FOR_MODEL
from pah_edge.device.runtimes import Runner, RuntimeUnavailable, create_runner, pick_runtime
from pah_edge.errors import ConfigError, PahEdgeError

log = logging.getLogger("pah_edge")

# What a user may ask for; "torch" is a reference runtime for checks, not for devices.
DEVICE_RUNTIMES = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu")


def backbone_engine(bundle: Bundle, model: str = "fp32") -> Path | None:
    """The fastest TensorRT engine built for the backbone ``model`` (fp32 or int8), or None."""
    return next((e for p in ENGINES_FOR_MODEL[model] if (e := bundle.layout.engine(p)).is_file()), None)


def backbone_runner(bundle: Bundle, runtime: str = "auto", model: str = "fp32") -> Runner:
    """A runner for images [N, 3, S, S] -> features [N, D].

    ``auto``: the bundle's TensorRT engine when TensorRT works here and an engine is built, else ONNX
    Runtime on CUDA, else on the CPU. ``tensorrt`` without a built engine is an error naming the fix.
    ``model`` int8 runs ``backbone.int8.onnx`` (or its engine), which `pah-edge calibrate` must have
    installed; fp32 runs the exported float backbone (or its FP16/FP32 engine). INT8 changes the
    features, so it is never picked behind the user's back, even when its engine is built.
    """
    if runtime not in DEVICE_RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}: choose one of {', '.join(DEVICE_RUNTIMES)}")
    if model not in BACKBONE_MODELS:
        raise ConfigError(f"unknown precision {model!r}: choose one of {', '.join(BACKBONE_MODELS)}")
    graph = bundle.graph_path("backbone") if model == "fp32" else _int8_model(bundle)
    kind, skipped = pick_runtime(runtime)
    for reason in skipped:
        log.debug("runtime skipped: %s", reason)
    if kind == "tensorrt":
        engine = backbone_engine(bundle, model)
        if engine is not None:
            return create_runner("tensorrt", engine)
        flag = " --precision int8" if model == "int8" else ""
        fix = f"build one with `pah-edge build-engine {bundle.path}{flag}`"
        if runtime == "tensorrt":
            raise PahEdgeError(f"no {model} TensorRT engine in {bundle.layout.engines_dir}: {fix}, "
                               "or pass --runtime onnxruntime")
        log.info("no %s TensorRT engine in %s, using ONNX Runtime (%s for speed)", model,
                 bundle.layout.engines_dir, fix)
        kind = _best_onnxruntime()
    return create_runner(kind, graph)


def _int8_model(bundle: Bundle) -> Path:
    model = bundle.int8_backbone_path()
    if model is None:
        rejected = bundle.layout.calibration_rejected.is_file()
        why = "its last calibration lost more accuracy than --max-drop" if rejected else "it has no INT8 backbone"
        raise PahEdgeError(f"--precision int8: {bundle.path} has no usable INT8 model ({why}); run "
                           f"`pah-edge calibrate {bundle.path} --images DIR`, or use --precision fp32")
    return model


def generator_runner(bundle: Bundle) -> Runner:
    """A runner for prototypes [C, c, s, s] -> head [C, D]."""
    # A head is generated once per task from a few prototypes: the CPU is fast enough, and GPU memory
    # (shared with the CPU on a Jetson) stays with the backbone.
    return create_runner("onnxruntime-cpu", bundle.graph_path("generator"))


def features(runner: Runner, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Backbone features float32 [N, D] of normalised images [N, 3, S, S], ``batch_size`` at a time."""
    limit = runner.max_batch
    step = max(1, min(batch_size, limit) if limit else batch_size)
    parts = [runner.infer({"images": images[i : i + step]})["features"] for i in range(0, len(images), step)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def _best_onnxruntime() -> str:
    try:
        return pick_runtime("onnxruntime-cuda")[0]
    except RuntimeUnavailable:
        return pick_runtime("onnxruntime-cpu")[0]
