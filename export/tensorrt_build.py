"""TensorRT engines from a bundle's ONNX backbone, built on the device that will run them.

Engines are specific to a GPU model and TensorRT version, so bundles ship ONNX and the device builds
``<bundle>/engines/backbone.<precision>.engine`` plus a JSON build record (``.engine.json``) that
the TensorRT runner checks before loading. Only the backbone gets an engine: it is where the time
goes (milliseconds per image), while the generator and learner-step graphs are a few small matmuls
whose class dimension changes with every task learned. An engine for them would need a profile per
class range and rebuilds as classes grow, to save microseconds; they stay on ONNX Runtime.

Precision, across TensorRT versions:
- TensorRT 10 (JetPack 6): weakly typed network; ``fp16`` sets the FP16 builder flag.
- TensorRT 11+: networks are strongly typed and the FP16/INT8 flags are gone, so ``fp16`` parses an
  FP16 copy of the ONNX (onnxconverter-common, float32 inputs and outputs kept).
- ``int8`` only comes from the explicitly quantized (Q/DQ) ``backbone.int8.onnx`` that
  ``pah-edge calibrate`` writes: no implicit calibrator (deprecated in 10.1, removed in 11).
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from pathlib import Path

from pah_edge.atomic import atomic_write_bytes, atomic_write_json
from pah_edge.bundle import Bundle
from pah_edge.bundle_layout import ENGINE_PRECISIONS, TIMING_CACHE_NAME, BundleLayout, engine_record
from pah_edge.device.runtimes.tensorrt import gpu_identity, load_tensorrt
from pah_edge.errors import PahEdgeError

DEFAULT_PRECISION = "fp16"
DEFAULT_BATCHES = (1, 8, 32)  # the optimisation profile: min, opt, max
DEFAULT_WORKSPACE_MB = 1024


class TensorRTBuildError(PahEdgeError):
    """An engine cannot be built from this bundle or model; the message names the fix."""


def check_precision(precision: str, option: str = "precision") -> None:
    """TensorRTBuildError unless ``precision`` is an engine precision; ``option`` names it in the message."""
    if precision not in ENGINE_PRECISIONS:
        raise TensorRTBuildError(f"unknown {option} {precision!r}: choose one of {', '.join(ENGINE_PRECISIONS)}")


def backbone_onnx(bundle_dir: Path, precision: str) -> Path:
    """The bundle's ONNX backbone that a ``precision`` engine is built from."""
    layout = BundleLayout(bundle_dir)
    bundle_dir = layout.root
    if precision == "int8":
        path = layout.int8_backbone
        if not path.is_file():
            raise TensorRTBuildError(
                f"no INT8 model in {bundle_dir}: run `pah-edge calibrate {bundle_dir} --images DIR` first"
            )
        if layout.manifest.is_file():
            # BundleError unless its record vouches for the file.
            target = Bundle.open(bundle_dir, verify=False).int8_target()
            if target not in (None, "tensorrt"):
                raise TensorRTBuildError(
                    f"{path.name} in {bundle_dir} was calibrated for {target} (unsigned activations, which TensorRT "
                    f"cannot build): run `pah-edge calibrate {bundle_dir} --images DIR --target tensorrt`"
                )
        return path
    path = layout.graph("backbone")
    if not path.is_file():
        raise TensorRTBuildError(f"no {path.name} in {bundle_dir}: export a bundle there with `pah-edge export`")
    return path


def build_engines(
    bundle_dir: Path, *, precision: str = DEFAULT_PRECISION, batches=DEFAULT_BATCHES,
    workspace_mb: int = DEFAULT_WORKSPACE_MB
) -> list[Path]:
    """Build the backbone engine for ``precision`` over batch sizes ``(min, opt, max)``; returns its path.

    The engine goes to ``BundleLayout.engine``; reuses (and updates) the bundle's timing cache
    (``engines/timing.cache``), which makes rebuilds much faster.
    """
    check_precision(precision)
    onnx_path = backbone_onnx(bundle_dir, precision)
    if len(batches) != 3:
        raise TensorRTBuildError(f"batches must be (min, opt, max); got {tuple(batches)}")
    layout = BundleLayout(bundle_dir)
    engine_path = layout.engine(precision)
    low, opt, high = batches
    engine_from_onnx(
        onnx_path,
        engine_path,
        precision=precision,
        min_batch=low,
        opt_batch=opt,
        max_batch=high,
        workspace_mb=workspace_mb,
        timing_cache=layout.timing_cache,
    )
    return [engine_path]


def engine_from_onnx(
    onnx_path: Path,
    engine_path: Path,
    *,
    precision: str,
    min_batch: int = DEFAULT_BATCHES[0],
    opt_batch: int = DEFAULT_BATCHES[1],
    max_batch: int = DEFAULT_BATCHES[2],
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: Path | None = None,
) -> dict:
    """Build and write a TensorRT engine for ``onnx_path`` and its JSON build record; returns the record.

    The first input's batch dim must be dynamic; one optimization profile covers
    ``min_batch..max_batch`` (tuned for ``opt_batch``). ``workspace_mb`` caps TensorRT's scratch
    memory in MB. ``timing_cache`` defaults to ``timing.cache`` beside the engine. Nothing is
    written unless the build succeeds.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    check_precision(precision)
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise TensorRTBuildError(
            f"batch sizes must satisfy 1 <= min <= opt <= max; got {min_batch}, {opt_batch}, {max_batch}"
        )
    if workspace_mb <= 0:
        raise TensorRTBuildError(f"workspace must be a positive number of MB; got {workspace_mb}")
    if not onnx_path.is_file():
        raise TensorRTBuildError(f"no ONNX model at {onnx_path}: export a bundle with `pah-edge export`")
    timing_cache = Path(timing_cache) if timing_cache is not None else engine_path.parent / TIMING_CACHE_NAME
    trt, cuda = load_tensorrt()

    strongly_typed = int(trt.__version__.split(".")[0]) >= 11
    model = _fp16_onnx_bytes(onnx_path) if precision == "fp16" and strongly_typed else onnx_path.read_bytes()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    # The path lets the parser find weights stored as external data beside the model.
    if not parser.parse(model, str(onnx_path)):
        raise TensorRTBuildError(f"TensorRT cannot parse {onnx_path}: {_first_parser_error(parser)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    _set_precision_flags(trt, config, precision, strongly_typed)
    profile_record = _add_batch_profile(builder, config, network, onnx_path, (min_batch, opt_batch, max_batch))
    cache = _attach_timing_cache(config, timing_cache)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - start
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")

    gpu_name, capability = gpu_identity(cuda)
    record = {
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu_name,
        "compute_capability": capability,
        "precision": precision,
        "profile": profile_record,
        "build_seconds": round(build_seconds, 2),
        "onnx": onnx_path.name,
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "workspace_mb": workspace_mb,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # Drop the old record first: a crash between the two writes then leaves an engine without a
    # record (the runner refuses it) rather than a new engine described by the old record.
    engine_record(engine_path).unlink(missing_ok=True)
    atomic_write_bytes(engine_path, bytes(serialized))
    atomic_write_json(engine_record(engine_path), record)
    atomic_write_bytes(timing_cache, bytes(cache.serialize()))
    return record


def _first_parser_error(parser) -> str:
    if not parser.num_errors:
        return "no error reported (see the TensorRT log above)"
    error = parser.get_error(0)
    return " ".join(f"{error.desc()} (ONNX node {error.node()})".split())


def _fp16_onnx_bytes(onnx_path: Path) -> bytes:
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError as exc:
        raise TensorRTBuildError(
            "FP16 engines on TensorRT 11+ need an FP16 copy of the model: pip install onnx onnxconverter-common"
        ) from exc
    model = onnx.load(str(onnx_path))
    return float16.convert_float_to_float16(model, keep_io_types=True).SerializeToString()


def _network_flags(trt, strongly_typed: bool) -> int:
    # TensorRT 10 is always explicit-batch (flag 0); 11 is strongly typed by default, and the flag,
    # where it still exists, just says so.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if strongly_typed and flag is not None else 0


def _set_precision_flags(trt, config, precision: str, strongly_typed: bool) -> None:
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default on Ampere and newer (Orin included) and costs fp32 parity (~1e-3).
        config.clear_flag(trt.BuilderFlag.TF32)
    if strongly_typed:
        return  # the model's own types (FP16 copy, Q/DQ nodes) decide
    # TensorRT 10 only from here: 11 removed both flags (hasattr says so to tests/test_tensorrt_api.py too).
    if precision in ("fp16", "int8") and hasattr(trt.BuilderFlag, "FP16"):
        # For int8, FP16 serves the layers the Q/DQ model leaves unquantized.
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8" and hasattr(trt.BuilderFlag, "INT8"):
        # Q/DQ nodes carry the scales, so no calibrator is set.
        config.set_flag(trt.BuilderFlag.INT8)


def _add_batch_profile(builder, config, network, onnx_path: Path, batches: tuple[int, int, int]) -> dict:
    tensor = network.get_input(0)
    dims = list(tensor.shape)
    if not dims or dims[0] != -1:
        raise TensorRTBuildError(
            f"{onnx_path} input {tensor.name} has no dynamic batch dim (shape {dims}): "
            "re-export it with `pah-edge export`"
        )
    if any(d < 0 for d in dims[1:]):
        raise TensorRTBuildError(
            f"{onnx_path} input {tensor.name} has dynamic dims besides the batch (shape {dims}): "
            "re-export it with a fixed image size"
        )
    shapes = [[b, *dims[1:]] for b in batches]
    profile = builder.create_optimization_profile()
    profile.set_shape(tensor.name, *shapes)
    config.add_optimization_profile(profile)
    return {"input": tensor.name, "min": shapes[0], "opt": shapes[1], "max": shapes[2]}


def _attach_timing_cache(config, path: Path):
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
        attached = cache is not None and config.set_timing_cache(cache, False)
    except Exception:  # TensorRT raises its own types for an unreadable cache
        attached = False
    if not attached:
        # A cache from another TensorRT version or GPU (or a torn file) is only an optimisation:
        # start an empty one instead of failing the build.
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache
