"""The runner interface every runtime implements, and the feed check they share.

A runner is activated (session, engine or CUDA context created), called with ``infer`` any number of
times, then deactivated; ``with runner:`` does both. The base class validates feeds against
``input_specs`` and times each call, so every runtime reports latency the same way.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import numpy as np

from pah_edge.errors import PahEdgeError

# shape None: any shape; a dim None: dynamic.
Spec = tuple[tuple[int | None, ...] | None, np.dtype]


class RuntimeInputError(PahEdgeError):
    """The feeds do not match the model's inputs (names, rank, static dims or dtype)."""


class RuntimeUnavailable(PahEdgeError):
    """The runtime's library or the GPU it needs is missing on this machine."""


class EngineMismatchError(PahEdgeError):
    """A TensorRT engine was built for another GPU or TensorRT version (or cannot be loaded)."""


class Runner(ABC):
    """Runs one model: ``activate`` -> ``infer``... -> ``deactivate`` (or ``with runner:``).

    ``last_infer_ms`` is the wall time of the latest ``infer`` call in ms, validation excluded.
    ``max_batch`` is the largest batch ``infer`` accepts (None: any).
    """

    name: str = "runner"
    max_batch: int | None = None

    def __init__(self) -> None:
        self.is_active = False
        self.last_infer_ms: float | None = None

    def activate(self) -> None:
        if not self.is_active:
            self._activate()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            try:
                self._deactivate()
            finally:
                self.is_active = False

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on ``feeds`` ({input name: array}); returns {output name: array}."""
        self._require_active()
        check_feeds(self.input_specs(), feeds)
        start = time.perf_counter()
        outputs = self._infer(feeds)
        self.last_infer_ms = (time.perf_counter() - start) * 1e3
        return outputs

    def _require_active(self) -> None:
        if not self.is_active:
            # Calling a runner that was never activated is a programming error, not a user error.
            raise RuntimeError(f"{self.name} runner is not active: use `with runner:` or call activate() first")

    @abstractmethod
    def input_specs(self) -> dict[str, Spec]:
        """{input name: (shape with None for dynamic dims, dtype)}, in the model's input order."""

    @abstractmethod
    def output_names(self) -> list[str]:
        """Output names in the model's order."""

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _deactivate(self) -> None: ...

    @abstractmethod
    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def format_spec(shape: tuple[int | None, ...] | None, dtype) -> str:
    """``float32[?, 3, 32, 32]``: ``?`` is a dynamic dim; ``float32[...]`` means any shape."""
    dims = "..." if shape is None else ", ".join("?" if d is None else str(d) for d in shape)
    return f"{np.dtype(dtype).name}[{dims}]"


def _format_feed(array) -> str:
    if isinstance(array, np.ndarray):
        return format_spec(array.shape, array.dtype)
    return type(array).__name__


def _format_all(items: dict) -> str:
    return ", ".join(f"{name}: {text}" for name, text in items.items()) or "nothing"


def check_feeds(specs: dict[str, Spec], feeds: dict[str, np.ndarray]) -> None:
    """Raise RuntimeInputError unless ``feeds`` match ``specs`` exactly; nothing is cast silently.

    Runs before every inference: the messages are formatted only for a mismatch.
    """
    def given() -> str:
        return _format_all({n: _format_feed(a) for n, a in feeds.items()})

    if feeds.keys() != specs.keys():
        expected = _format_all({n: format_spec(*s) for n, s in specs.items()})
        raise RuntimeInputError(f"the model expects inputs {expected}; got {given()}")
    for name, (shape, dtype) in specs.items():
        array = feeds[name]
        if not isinstance(array, np.ndarray):
            raise RuntimeInputError(f"input {name} must be a numpy array {format_spec(shape, dtype)}; got {given()}")
        if array.dtype != np.dtype(dtype):
            raise RuntimeInputError(
                f"input {name} expects {format_spec(shape, dtype)}; got {_format_feed(array)} (cast it with .astype)"
            )
        if shape is None:
            continue
        if array.ndim != len(shape) or any(d is not None and d != a for d, a in zip(shape, array.shape)):
            raise RuntimeInputError(f"input {name} expects {format_spec(shape, dtype)}; got {_format_feed(array)}")
