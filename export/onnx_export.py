"""PyTorch -> ONNX, always the same sequence, and output parity between runtimes.

``onnx_from_torch``: eval mode -> ``torch.onnx.export`` (TorchScript exporter) -> ``onnx.checker`` ->
run in ONNX Runtime and compare with PyTorch against an explicit tolerance -> optionally simplify
with onnxslim and compare again (the simplified graph is kept only if it still passes).

``parity`` and ``Tolerance`` need only numpy, so ``pah-edge verify`` uses them where torch is absent;
torch, onnx and onnxruntime are imported by the functions that use them.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pah_edge.bundle_layout import GRAPH_SPECS
from pah_edge.errors import PahEdgeError

if TYPE_CHECKING:
    import torch


class ExportError(PahEdgeError):
    """An export cannot proceed or its graph disagrees with PyTorch beyond tolerance."""


@dataclass(frozen=True)
class Tolerance:
    """Worst allowed error of one output: ``abs`` = max |a - b|, ``rel`` = max |a - b| / max |b|.

    With both limits an output passes when either holds (like ``np.allclose``): FP32 kernels differ
    by a few ulps of the output's scale and long reductions (224 px) add up: ImageNet
    EfficientNet-Lite0 features differ by 1.6e-4 absolute at 2.8e-5 relative. A preprocessing or
    export bug shows as relative errors of 1e-2 and more.
    """

    abs: float | None = None
    rel: float | None = None

    def violations(self, errors: Mapping[str, Mapping[str, float]]) -> list[str]:
        """Human-readable violations, e.g. ``"features abs 3.1e-04 > 1e-04"``; empty when within."""
        limits = [(kind, limit) for kind, limit in (("abs", self.abs), ("rel", self.rel)) if limit is not None]
        found = []
        for output, err in errors.items():
            # `not <` also catches NaN
            missed = [f"{kind} {err[kind]:.2e} > {limit:.0e}" for kind, limit in limits if not err[kind] < limit]
            if limits and len(missed) == len(limits):
                found.append(f"{output} {' and '.join(missed)}")
        return found

    def to_dict(self) -> dict[str, float | None]:
        return {"abs": self.abs, "rel": self.rel}


def tolerance_text(tolerance: Mapping[str, float | None]) -> str:
    """A `Tolerance.to_dict()` as a report shows it: ``abs<1e-04 or rel<1e-05``."""
    return " or ".join(f"{kind}<{limit:.0e}" for kind, limit in tolerance.items() if limit is not None)


OPSET = 17  # the oldest ONNX opset a bundle's graphs may use, and the export's default
# The export's FP32 contract, per graph (the bundle's graph specs); `pah-edge verify` holds runtimes to it.
GRAPH_TOLERANCES = {name: Tolerance(abs=spec.abs_tolerance, rel=spec.rel_tolerance)
                    for name, spec in GRAPH_SPECS.items()}


def parity(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Worst absolute and relative error per output of ``actual`` against the reference ``expected``.

    rel is max |a - b| / max |b| (a relative error that stays meaningful where b crosses zero).
    """
    errors = {}
    for name, ref in expected.items():
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(actual[name], dtype=np.float64)
        if out.shape != ref.shape:
            raise ExportError(f"output {name} has shape {list(out.shape)}, expected {list(ref.shape)}")
        worst = float(np.max(np.abs(out - ref))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        errors[name] = {"abs": worst, "rel": worst / scale if scale > 0 else worst}
    return errors


def merge_worst(*results: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per output, the worst abs and rel over several ``parity`` results."""
    merged: dict[str, dict[str, float]] = {}
    for result in results:
        for name, err in result.items():
            into = merged.setdefault(name, {"abs": 0.0, "rel": 0.0})
            for kind in ("abs", "rel"):
                into[kind] = max(into[kind], err[kind]) if np.isfinite(err[kind]) else float("nan")
    return merged


@dataclass
class OnnxGraph:
    """What ``onnx_from_torch`` made: the file, its parity errors over all checked inputs, onnxslim's status."""

    path: Path
    errors: dict[str, dict[str, float]]
    simplified: str  # "applied", "off", "not installed", "no change" or "reverted: <why>"
    checked: int = 0  # input sets compared
    tracer_warnings: list[str] = field(default_factory=list)  # shapes the trace may have baked in


def onnx_from_torch(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: Path, *,
                    input_names: Sequence[str], output_names: Sequence[str],
                    dynamic_axes: Mapping[str, Mapping[int, str]], opset: int = OPSET,
                    tolerance: Tolerance, check_inputs: Sequence[Sequence[torch.Tensor]] = (),
                    simplify: bool = False) -> OnnxGraph:
    """Export ``module`` to ``path`` and prove it matches PyTorch on ``example_inputs`` + ``check_inputs``.

    Raises ExportError when the ONNX Runtime outputs exceed ``tolerance``. With ``simplify``, the
    onnxslim result replaces the file only if it passes the same check.
    """
    import onnx
    import torch

    if opset < OPSET:
        raise ExportError(f"opset {opset} is too old for pah-edge bundles: use --opset {OPSET} or newer")
    module = module.eval()
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(module, tuple(example_inputs), str(path), dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()}, do_constant_folding=True)
        except RuntimeError as exc:
            if "opset" not in str(exc).lower():
                raise
            raise ExportError(f"--opset {opset}: this torch cannot export it ({exc}); use an older one, "
                              f"{OPSET} at least") from None
    # The TorchScript exporter is chosen on purpose (its graphs keep HardSwish and dynamic axes), so
    # its deprecation notice is noise, as are its notes on strided slices left unfolded (EfficientNet-
    # Lite's padding: one per block); tracer warnings go into the result, and the parity check on
    # inputs of other sizes is what proves the trace holds for them.
    tracer_notes = sorted({str(w.message).split(". ")[0] for w in caught
                           if issubclass(w.category, torch.jit.TracerWarning)})
    for w in caught:
        unfolded_slice = str(w.message).startswith("Constant folding - Only steps=1")
        if not (unfolded_slice or issubclass(w.category, (torch.jit.TracerWarning, DeprecationWarning))):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    input_sets = [tuple(example_inputs), *map(tuple, check_inputs)]
    expected = [torch_outputs(module, inputs, output_names) for inputs in input_sets]
    feeds = [dict(zip(input_names, (t.numpy() for t in inputs))) for inputs in input_sets]

    errors = _compare(model.SerializeToString(), feeds, expected)
    violations = tolerance.violations(errors)
    if violations:
        raise ExportError(f"{path.name}: ONNX Runtime differs from PyTorch ({'; '.join(violations)}); "
                          "try another --opset, or report it with the checkpoint")
    status = "off"
    if simplify:
        status, slim_errors = _simplify(model, feeds, expected, tolerance, path)
        if status == "applied":
            errors = slim_errors
    return OnnxGraph(path=path, errors=errors, simplified=status, checked=len(input_sets), tracer_warnings=tracer_notes)


def torch_outputs(module: torch.nn.Module, inputs: Sequence[torch.Tensor],
                  output_names: Sequence[str]) -> dict[str, np.ndarray]:
    """``module(*inputs)`` as ``{output_name: float32 array}``."""
    import torch

    with torch.no_grad():
        outputs = module(*inputs)
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    return {name: out.detach().cpu().numpy() for name, out in zip(output_names, outputs)}


def ort_session(model: str | Path | bytes):
    """A CPU ONNX Runtime session for a graph file or serialised model."""
    import onnxruntime as ort

    model = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def ort_outputs(session, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


def _compare(model_bytes: bytes, feeds: list[dict[str, Any]], expected: list[dict[str, np.ndarray]]):
    session = ort_session(model_bytes)
    return merge_worst(*(parity(ort_outputs(session, f), e) for f, e in zip(feeds, expected)))


def _simplify(model, feeds, expected, tolerance: Tolerance, path: Path) -> tuple[str, dict]:
    """Try onnxslim; keep its graph only if checker and parity still pass. Returns (status, errors)."""
    if importlib.util.find_spec("onnxslim") is None:
        return "not installed", {}
    import onnx
    import onnxslim

    try:
        slim = onnxslim.slim(model)
        onnx.checker.check_model(slim, full_check=True)
        errors = _compare(slim.SerializeToString(), feeds, expected)
    except Exception as exc:  # onnxslim is best effort: any failure keeps the checked export
        return f"reverted: {type(exc).__name__}: {str(exc)[:120]}", {}
    violations = tolerance.violations(errors)
    if violations:
        return f"reverted: parity ({'; '.join(violations)})", {}
    if len(slim.graph.node) == len(model.graph.node):
        return "no change", {}
    onnx.save(slim, str(path))
    return "applied", errors
