"""FP32 ONNX backbone -> INT8 Q/DQ ONNX backbone with ONNX Runtime's static quantization.

Explicit quantization (QuantizeLinear/DequantizeLinear pairs carrying the scales) is the INT8 path
TensorRT keeps (its implicit calibrators are deprecated since 10.1, gone in 11), and the same file
runs on ONNX Runtime's CPU kernels. onnx and onnxruntime.quantization are imported where used, so
the CLI can read the options below on a device without onnx.

Two targets, because the two runtimes take different INT8 forms:
- ``tensorrt``: symmetric signed INT8 activations and weights, the only form TensorRT builds. ONNX
  Runtime runs it too, but on x86 as DequantizeLinear -> FP32 kernel -> QuantizeLinear, slower
  than FP32.
- ``onnxruntime``: asymmetric unsigned activations (UINT8, zero point free) with signed weights,
  which ONNX Runtime fuses into integer kernels (QLinearConv and the like) on x86 and ARM. The
  zero point also spends all 256 levels on a ReLU6 output's 0..6 instead of half of them.
Weights are per output channel by default, since depthwise MobileNet layers lose accuracy with one
scale per tensor.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pah_edge.options import option
from pah_edge.errors import ConfigError

METHODS = ("entropy", "percentile", "minmax")
DEFAULT_METHOD = "entropy"
# A calibration run's defaults (`calibrate_bundle`), here so the CLI reads them without importing it.
DEFAULT_SAMPLES = 512
DEFAULT_MAX_DROP = 1.0  # accuracy points
TARGETS = ("tensorrt", "onnxruntime")
# Layers whose inputs carry the model's full dynamic range (raw pixels in, features out).
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def default_target() -> str:
    """``tensorrt`` where TensorRT is installed (a Jetson), else ``onnxruntime``."""
    import importlib.util

    return "tensorrt" if importlib.util.find_spec("tensorrt") is not None else "onnxruntime"


@dataclass(frozen=True, kw_only=True)
class QuantizeOptions:
    """How ``int8_onnx_from_fp32`` quantizes; recorded in the bundle's calibration.json."""

    target: str = option("auto", f"INT8 form for {' or '.join(TARGETS)} (TensorRT needs signed activations; ONNX "
                         "Runtime CPU is fast only with unsigned ones); auto: tensorrt where it is installed.")
    method: str = option(DEFAULT_METHOD, f"Activation ranges: {', '.join(METHODS)}.")
    per_channel: bool = option(True, "One weight scale per output channel or per tensor.", "--per-channel/--per-tensor")
    # The stem sees raw pixels through only 3 input channels and costs a few % of the time, yet in INT8
    # it caused most of efficientnet_lite0's feature error (docs/benchmarks.md, INT8 calibration).
    fp32_first: bool = option(True, "Keep the first Conv (raw pixels in) in FP32.", "--fp32-first/--int8-first")
    fp32_last: bool = option(False, "Keep the last Conv/Gemm (features out) in FP32.", "--fp32-last/--int8-last")
    exclude: tuple[str, ...] = option((), "Keep this node in FP32 (repeatable; the report names the most sensitive).",
                                      "--exclude")
    # x86 CPUs without VNNI multiply INT8 with VPMADDUBSW, whose 16-bit pair sums saturate on
    # full-range weights (per-channel scales make every channel full range); 7 bits cost ~nothing.
    reduce_range: bool = option(True, "7-bit weights: no INT8 overflow on x86 CPUs without VNNI.",
                                "--reduce-range/--full-range")
    percentile: float = 99.999  # of |activation| kept in range by the percentile method

    def __post_init__(self) -> None:
        if self.target == "auto":
            object.__setattr__(self, "target", default_target())
        if self.target not in TARGETS:
            raise ConfigError(f"unknown --target {self.target!r}; choose one of: {', '.join(TARGETS)}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if not 50 < self.percentile <= 100:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile!r}")

    @property
    def symmetric_activations(self) -> bool:
        return self.target == "tensorrt"

    def to_dict(self) -> dict:
        return {"target": self.target, "method": self.method, "per_channel": self.per_channel,
                "fp32_first": self.fp32_first, "fp32_last": self.fp32_last, "exclude": list(self.exclude),
                "reduce_range": self.reduce_range,
                "percentile": self.percentile if self.method == "percentile" else None,
                "weights": "int8 symmetric", "format": "QDQ",
                "activations": "int8 symmetric" if self.symmetric_activations else "uint8 asymmetric"}


@contextlib.contextmanager
def _root_log_level(level: int):
    root = logging.getLogger()
    old = root.level
    root.setLevel(max(level, old))
    try:
        yield
    finally:
        root.setLevel(old)


def prepare_for_quantization(fp32_path: Path, out_path: Path) -> Path:
    """Shape inference and ONNX Runtime's graph optimisations (BatchNorm folding and the like) first.

    Quantizing the optimised graph puts Q/DQ pairs where the runtime's fused kernels expect them.
    """
    from onnxruntime.quantization import quant_pre_process

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # its INFO steps are noise here
    # ONNX's own shape inference covers a backbone whose only dynamic dim is the batch; the symbolic
    # one lives in onnxruntime.tools, which imports torch wherever torch is installed.
    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    return out_path


def weighted_nodes(model_path: Path) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes in graph (topological) order."""
    import onnx

    return [node.name for node in onnx.load(str(model_path)).graph.node if node.op_type in WEIGHTED_OPS]


def _excluded_nodes(model_path: Path, options: QuantizeOptions) -> list[str]:
    """The nodes to keep in FP32, in graph order; ConfigError for a name the graph lacks."""
    import onnx

    names = [node.name for node in onnx.load(str(model_path)).graph.node]
    unknown = sorted(set(options.exclude) - set(names))
    if unknown:
        raise ConfigError(f"--exclude {', '.join(unknown)}: no such node in the backbone; use the node names the "
                          "calibration report lists")
    weighted = weighted_nodes(model_path)
    wanted = set(options.exclude) | set(weighted[:1] if options.fp32_first else ()) | set(
        weighted[-1:] if options.fp32_last else ())
    return [name for name in names if name in wanted]


def narrow_clipped_ranges(model_path: Path, ranges) -> list[str]:
    """Give the input of each Relu/Clip its output's range where the activation is its only reader.

    With symmetric INT8 activations ONNX Runtime keeps Relu/Clip as nodes and quantizes their input
    with its own, pre-activation range, which folded BatchNorm can make hundreds of times wider than
    what survives the clip: efficientnet_lite0's stem convolution lost half its signal to rounding
    that way (feature cosine 0.39). Whatever lies outside the output's range is clipped by the
    activation anyway, so the narrower range loses nothing; it is what ONNX Runtime does for
    asymmetric activations by removing the node, and TensorRT by fusing Conv + ReLU. Returns the
    tensors changed.
    """
    import onnx

    graph = onnx.load(str(model_path)).graph
    readers = Counter(name for node in graph.node for name in node.input)
    outputs = {o.name for o in graph.output}
    changed = []
    for node in graph.node:
        source, result = node.input[0] if node.input else "", node.output[0]
        if (node.op_type in ("Relu", "Clip") and readers[source] == 1 and source not in outputs
                and source in ranges and result in ranges):
            ranges[source] = ranges[result]
            changed.append(source)
    return changed


def calibrate_ranges(model_path: Path, reader, method: str, work_dir: Path, *, percentile: float, symmetric: bool):
    """Activation ranges (ONNX Runtime ``TensorsData``) of every float tensor over ``reader``'s images.

    ``collect_data`` runs once per batch of the reader: histograms (entropy, percentile) and min/max
    merge across calls, so memory holds one batch's activations (see ``ImageFolderReader``).
    """
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    calibration_method = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy,
                          "minmax": CalibrationMethod.MinMax}[method]
    # Symmetric ranges where a signed INT8 tensor has its zero point at 0.
    options = {"symmetric": symmetric, **({"percentile": percentile} if method == "percentile" else {})}
    calibrator = create_calibrator(model_path, augmented_model_path=str(work_dir / "augmented.onnx"),
                                   calibrate_method=calibration_method, providers=["CPUExecutionProvider"],
                                   extra_options=options)
    # The histogram collector prints a line per call on stdout, which carries the report.
    with contextlib.redirect_stdout(io.StringIO()):
        while not reader.done:
            calibrator.collect_data(reader)
        return calibrator.compute_data()


def int8_onnx_from_fp32(fp32_path: Path, out_path: Path, reader, options: QuantizeOptions, work_dir: Path) -> dict:
    """Write the Q/DQ INT8 model of ``fp32_path`` to ``out_path``; returns what was done.

    ``work_dir`` receives the prepared and augmented models. Returns ``{"prepared": path of the
    optimised FP32 graph the Q/DQ model was made from (its tensor names match), "excluded": nodes
    kept in FP32, "samples": calibration images}``.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    prepared = prepare_for_quantization(fp32_path, work_dir / "prepared.onnx")
    excluded = _excluded_nodes(prepared, options)
    symmetric = options.symmetric_activations
    ranges = calibrate_ranges(prepared, reader, options.method, work_dir, percentile=options.percentile,
                              symmetric=symmetric)
    if symmetric:  # asymmetric activations fold Relu/Clip into the quantization themselves
        narrow_clipped_ranges(prepared, ranges)
    cache = work_dir / "ranges.json"  # quantize_static takes precomputed ranges only from a file
    save_tensors_data(ranges, cache)
    with _root_log_level(logging.WARNING):  # ONNX Runtime logs a line per rescaled channel on the root logger
        quantize_static(str(prepared), str(out_path), calibration_data_reader=None, calibration_cache_path=cache,
                        quant_format=QuantFormat.QDQ, per_channel=options.per_channel,
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, reduce_range=options.reduce_range, nodes_to_exclude=excluded,
                        calibrate_method=ranges.calibration_method,
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    return {"prepared": prepared, "excluded": excluded, "samples": reader.delivered}
