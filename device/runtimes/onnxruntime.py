"""ONNX Runtime runner: CPU everywhere, CUDA or TensorRT execution providers where the build has them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pah_edge.device.runtimes.base import Runner, RuntimeUnavailable, Spec
from pah_edge.errors import PahEdgeError

# Fastest first; ONNX Runtime falls back along the list per node.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def default_providers(available: list[str]) -> list[str]:
    """The preferred providers this onnxruntime build offers, CPU always last."""
    return [p for p in PREFERRED_PROVIDERS if p in available or p == "CPUExecutionProvider"]


def provider_label(provider: str) -> str:
    """``CUDAExecutionProvider`` -> ``cuda``."""
    return provider.removesuffix("ExecutionProvider").lower()


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX model with onnxruntime; ``name`` is ``onnxruntime-<active provider>`` once active.

    ``threads`` sets intra-op threads (None: onnxruntime's default, one per core).
    """

    name = "onnxruntime"

    def __init__(self, model_path, *, providers: list[str] | None = None, threads: int | None = None) -> None:
        super().__init__()
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise PahEdgeError(f"no ONNX model at {self.model_path}: export the bundle first (`pah-edge export`)")
        self.providers = providers
        self.threads = threads
        self._session = None
        self._specs: dict[str, Spec] = {}
        self._outputs: list[str] = []

    def _activate(self) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = self.providers or default_providers(available)
        missing = [p for p in providers if p not in available]
        if missing:
            raise RuntimeUnavailable(
                f"this onnxruntime build lacks {', '.join(missing)} (it has {', '.join(available)}): "
                "install onnxruntime-gpu for CUDA/TensorRT, or leave providers unset"
            )
        options = ort.SessionOptions()
        # Between two inferences the device decodes, resizes and scores in Python and numpy; threads
        # left spinning for the next run take the cores from that work (docs/benchmarks.md, "Frames and
        # files at batch 1").
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types for bad models
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PahEdgeError(f"onnxruntime cannot load {self.model_path}: {first_line}") from exc
        self.name = f"onnxruntime-{provider_label(self._session.get_providers()[0])}"
        # Symbolic dims ("batch") and unknown ones both mean dynamic.
        self._specs = {
            i.name: (tuple(d if isinstance(d, int) else None for d in i.shape), np.dtype(_ORT_DTYPES[i.type]))
            for i in self._session.get_inputs()
        }
        self._outputs = [o.name for o in self._session.get_outputs()]

    def _deactivate(self) -> None:
        self._session = None

    def input_specs(self) -> dict[str, Spec]:
        self._require_active()
        return dict(self._specs)

    def output_names(self) -> list[str]:
        self._require_active()
        return list(self._outputs)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self._session.run(self._outputs, feeds)))
