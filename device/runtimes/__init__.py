"""Runtimes behind one runner interface: ONNX Runtime and TensorRT.

``create_runner(kind, path)`` builds one; ``pick_runtime()`` says which is usable here. Importing
this package imports neither torch nor tensorrt: each runner imports its library on use. The
PyTorch reference, on the same interface, belongs to the workstation side
(``pah_edge.export.torch_runner``); whoever wants it (``verify``, ``bench``) hands it in.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from pah_edge.device.runtimes.base import (
    EngineMismatchError,
    Runner,
    RuntimeInputError,
    RuntimeUnavailable,
    check_feeds,
    format_spec,
)
from pah_edge.device.runtimes.tensorrt import engine_compatibility_problem, tensorrt_problem
from pah_edge.errors import PahEdgeError

__all__ = [
    "EngineMismatchError",
    "ReferenceRunners",
    "Runner",
    "RuntimeInputError",
    "RuntimeUnavailable",
    "available_runtimes",
    "check_feeds",
    "create_runner",
    "engine_compatibility_problem",
    "format_spec",
    "pick_runtime",
]

# "onnxruntime" lets the session pick the best provider; the suffixed kinds pin one.
_ORT_PROVIDERS = {
    "onnxruntime": None,
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-cpu": ["CPUExecutionProvider"],
}
KINDS = (*_ORT_PROVIDERS, "tensorrt")
NO_CUDA_EP = "this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)"
# ({graph: inactive runner}, None) of a bundle's graphs on a reference runtime, or (None, why not), given
# the bundle and the intra-op threads (None: the runtime's default): `pah_edge.export.torch_runner.torch_runners`.
ReferenceRunners = Callable[..., tuple[dict[str, Runner] | None, str | None]]


def create_runner(kind: str, model_path=None, **kw) -> Runner:
    """A runner of ``kind`` (one of ``KINDS``) for ``model_path`` (ONNX file or TensorRT engine)."""
    if kind in _ORT_PROVIDERS:
        from pah_edge.device.runtimes.onnxruntime import OnnxRuntimeRunner

        if _ORT_PROVIDERS[kind] is not None:
            kw.setdefault("providers", _ORT_PROVIDERS[kind])
        return OnnxRuntimeRunner(model_path, **kw)
    if kind == "tensorrt":
        from pah_edge.device.runtimes.tensorrt import TensorRTRunner

        return TensorRTRunner(model_path, **kw)
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
