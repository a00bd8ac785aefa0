"""Runtimes behind one runner interface: ONNX Runtime, TensorRT and a PyTorch reference.

``create_runner(kind, path)`` builds one; ``pick_runtime()`` says which is usable here. Importing
this package imports neither torch nor tensorrt: each runner imports its library on use. The
PyTorch reference belongs to the workstation side (``pah_edge.export.torch_runner``), which
registers it here when imported (``register_runner``, ``register_reference``): the device side
never imports it.
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
    "Runner",
    "RuntimeInputError",
    "RuntimeUnavailable",
    "available_runtimes",
    "check_feeds",
    "create_runner",
    "engine_compatibility_problem",
    "format_spec",
    "pick_runtime",
    "reference_runners",
    "register_reference",
    "register_runner",
]

# "onnxruntime" lets the session pick the best provider; the suffixed kinds pin one.
_ORT_PROVIDERS = {
    "onnxruntime": None,
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-cpu": ["CPUExecutionProvider"],
}
KINDS = (*_ORT_PROVIDERS, "tensorrt", "torch")
NO_CUDA_EP = "this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)"
NOT_REGISTERED = ("the PyTorch reference was not loaded: it is on the workstation side "
                  "(import pah_edge.export.torch_runner; pip install 'pah-edge[train]')")
# kind -> runner class, and kind -> provider of a bundle's reference runners: filled by the workstation side.
_RUNNERS: dict[str, Callable[..., Runner]] = {}
_REFERENCES: dict[str, Callable[..., tuple[dict[str, Runner] | None, str | None]]] = {}


def register_runner(kind: str, runner: Callable[..., Runner]) -> None:
    """Let ``create_runner(kind, **kw)`` return ``runner(**kw)``; another runner for a kind is an error."""
    _register(_RUNNERS, kind, runner)


def register_reference(kind: str, provider: Callable[..., tuple[dict[str, Runner] | None, str | None]]) -> None:
    """Register ``provider(bundle, threads)``: ({graph: inactive runner}, None) of the bundle's graphs
    on runtime ``kind``, or (None, why not); ``reference_runners`` calls it."""
    _register(_REFERENCES, kind, provider)


def reference_runners(kind: str, bundle, threads: int | None = None) -> tuple[dict[str, Runner] | None, str | None]:
    """({graph: inactive runner}, None) of ``bundle``'s graphs on the registered reference ``kind``,
    or (None, why not). ``threads``: the runtime's intra-op threads (None: its default)."""
    provider = _REFERENCES.get(kind)
    if provider is None:
        return None, NOT_REGISTERED
    return provider(bundle, threads)


def _register(table: dict, kind: str, value) -> None:
    if table.get(kind, value) is not value:
        raise ValueError(f"runtime {kind!r} is registered already, as {table[kind]!r}")
    table[kind] = value


def create_runner(kind: str, model_path=None, **kw) -> Runner:
    """A runner of ``kind`` for ``model_path`` (ONNX file or TensorRT engine).

    ``torch`` (once registered) takes ``module=``, ``input_names=``, ``output_names=`` instead of a path.
    """
    if kind in _ORT_PROVIDERS:
        from pah_edge.device.runtimes.onnxruntime import OnnxRuntimeRunner

        if _ORT_PROVIDERS[kind] is not None:
            kw.setdefault("providers", _ORT_PROVIDERS[kind])
        return OnnxRuntimeRunner(model_path, **kw)
    if kind == "tensorrt":
        from pah_edge.device.runtimes.tensorrt import TensorRTRunner

        return TensorRTRunner(model_path, **kw)
    if kind in _RUNNERS:
        return _RUNNERS[kind](**kw)
    if kind == "torch":
        raise RuntimeUnavailable(NOT_REGISTERED)
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
