"""Runtimes behind one runner interface: ONNX Runtime, TensorRT and a PyTorch reference.

``create_runner(kind, path)`` builds one; ``pick_runtime()`` says which is usable here. Importing
this package imports neither torch nor tensorrt: each runner imports its library on use.
"""

from __future__ import annotations

import importlib.util

from pah_edge.device.runtimes.base import (
    EngineMismatchError,
    Runner,
    RuntimeInputError,
    RuntimeUnavailable,
    check_feeds,
    format_spec,
)
from pah_edge.device.runtimes.tensorrt import engine_compatibility_problem, sidecar_path, tensorrt_problem
from pah_edge.errors import PahEdgeError

__all__ = [
    "EngineMismatchError",
    "Runner",
    "RuntimeInputError",
    "RuntimeUnavailable",
    "available_runtimes",
    "check_feeds",
    "create_runner",
    "engine_compatibility_problem",
    "format_spec",
    "pick_runtime",
    "sidecar_path",
]

# "onnxruntime" lets the session pick the best provider; the suffixed kinds pin one.
_ORT_PROVIDERS = {
    "onnxruntime": None,
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-cpu": ["CPUExecutionProvider"],
}
KINDS = (*_ORT_PROVIDERS, "tensorrt", "torch")
NO_CUDA_EP = "this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)"


def create_runner(kind: str, model_path=None, **kw) -> Runner:
    """A runner of ``kind`` for ``model_path`` (ONNX file or TensorRT engine).

    ``torch`` takes ``module=``, ``input_names=``, ``output_names=`` instead of a path.
    """
    if kind in _ORT_PROVIDERS:
        from pah_edge.device.runtimes.onnxruntime import OnnxRuntimeRunner

        if _ORT_PROVIDERS[kind] is not None:
            kw.setdefault("providers", _ORT_PROVIDERS[kind])
        return OnnxRuntimeRunner(model_path, **kw)
    if kind == "tensorrt":
        from pah_edge.device.runtimes.tensorrt import TensorRTRunner

        return TensorRTRunner(model_path, **kw)
    if kind == "torch":
        from pah_edge.export.torch_runner import TorchRunner  # workstation side: it needs torch

        return TorchRunner(**kw)
    raise PahEdgeError(f"unknown runtime {kind!r}: choose one of {', '.join(KINDS)}")


def available_runtimes() -> dict[str, str | None]:
    """{kind: None if usable here, else the reason it is not}."""
    ort = None if importlib.util.find_spec("onnxruntime") else "onnxruntime is not installed: pip install onnxruntime"
    torch = None if importlib.util.find_spec("torch") else "torch is not installed: pip install 'pah-edge[train]'"
    return {"tensorrt": tensorrt_problem(), "onnxruntime": ort, "torch": torch}


def _has_cuda_ep() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def pick_runtime(preferred: str = "auto") -> tuple[str, list[str]]:
    """(kind for ``create_runner``, why faster runtimes were skipped).

    ``auto`` tries tensorrt, then onnxruntime-cuda, then onnxruntime-cpu; any other kind is
    checked and returned as is, or refused with RuntimeUnavailable.
    """
    if preferred != "auto" and preferred not in KINDS:
        raise PahEdgeError(f"unknown runtime {preferred!r}: choose auto or one of {', '.join(KINDS)}")
    status = available_runtimes()
    if preferred != "auto":
        base = "onnxruntime" if preferred in _ORT_PROVIDERS else preferred
        if status[base] is not None:
            raise RuntimeUnavailable(status[base])
        if preferred == "onnxruntime-cuda" and not _has_cuda_ep():
            raise RuntimeUnavailable(NO_CUDA_EP)
        return preferred, []
    if status["tensorrt"] is None:
        return "tensorrt", []
    skipped = [f"tensorrt: {status['tensorrt']}"]
    if status["onnxruntime"] is not None:
        raise RuntimeUnavailable(f"no runtime is usable here: {status['onnxruntime']}")
    if _has_cuda_ep():
        return "onnxruntime-cuda", skipped
    return "onnxruntime-cpu", [*skipped, f"onnxruntime-cuda: {NO_CUDA_EP}"]
