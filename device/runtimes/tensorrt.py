"""TensorRT runner (TensorRT 10+ tensor API, pycuda for memory and streams).

An engine only runs on the GPU model and TensorRT version it was built with, so the builder writes
a JSON sidecar ``<engine>.json`` recording both, and the runner refuses a mismatch with a one-line
fix instead of TensorRT's deserialisation error. tensorrt and pycuda are imported on activation
only: importing this module needs neither.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from pah_edge.bundle_layout import BundleLayout, engine_graph_and_precision, engine_record
from pah_edge.device.runtimes.base import EngineMismatchError, Runner, RuntimeInputError, RuntimeUnavailable, Spec
from pah_edge.errors import PahEdgeError

TENSORRT_MISSING = (
    "TensorRT is not installed: pip install 'pah-edge[tensorrt]' on a machine with an NVIDIA GPU "
    "(JetPack ships TensorRT)"
)
PYCUDA_MISSING = "pycuda is not installed: pip install 'pah-edge[tensorrt]' on a machine with an NVIDIA GPU"


def load_tensorrt():
    """Import and return ``(tensorrt, pycuda.driver)`` with CUDA initialised and a GPU present.

    Raises RuntimeUnavailable naming what is missing.
    """
    if importlib.util.find_spec("tensorrt") is None:
        raise RuntimeUnavailable(TENSORRT_MISSING)
    if importlib.util.find_spec("pycuda") is None:
        raise RuntimeUnavailable(PYCUDA_MISSING)
    try:
        import pycuda.driver as cuda
    except (ImportError, OSError) as exc:  # pycuda links libcuda: no driver, no import
        raise RuntimeUnavailable(f"pycuda cannot load the NVIDIA driver ({exc}): install the NVIDIA driver") from exc
    try:
        cuda.init()
        count = cuda.Device.count()
    except cuda.Error as exc:
        raise RuntimeUnavailable(f"no usable NVIDIA GPU: CUDA says {exc}") from exc
    if count == 0:
        raise RuntimeUnavailable("no NVIDIA GPU found: CUDA reports 0 devices")
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeUnavailable(f"{TENSORRT_MISSING}; importing it failed: {exc}") from exc
    return trt, cuda


def tensorrt_problem() -> str | None:
    """Why TensorRT cannot run here, or None if it can."""
    try:
        load_tensorrt()
    except RuntimeUnavailable as exc:
        return str(exc)
    return None


def gpu_identity(cuda) -> tuple[str, str]:
    """(name, compute capability such as ``"8.7"``) of GPU 0."""
    device = cuda.Device(0)
    major, minor = device.compute_capability()
    return device.name(), f"{major}.{minor}"




def build_command(engine_path, precision: str | None = None) -> str:
    """The CLI call that (re)builds ``engine_path`` (a bundle's backbone engine), in backticks.

    ``precision`` defaults to the one the file name says, else fp16.
    """
    layout = BundleLayout.of_engine(engine_path)
    bundle = layout.root if layout is not None else "BUNDLE"
    precision = precision or engine_graph_and_precision(engine_path)[1] or "fp16"
    return f"`pah-edge build-engine {bundle} --precision {precision}`"


def engine_compatibility_problem(
    sidecar: dict, *, tensorrt_version: str, gpu_name: str, compute_capability: str
) -> str | None:
    """What makes an engine with this sidecar unusable here (``"built with ..."``), or None if nothing.

    TensorRT versions must match exactly: engines are not portable across TensorRT releases.
    """
    problems = []
    built_version = sidecar.get("tensorrt_version")
    if built_version != tensorrt_version:
        problems.append(f"built with TensorRT {built_version}, this machine has {tensorrt_version}")
    built_gpu, built_cc = sidecar.get("gpu_name"), str(sidecar.get("compute_capability"))
    if built_gpu != gpu_name or built_cc != compute_capability:
        problems.append(
            f"built on {built_gpu} (compute {built_cc}), this machine has {gpu_name} (compute {compute_capability})"
        )
    return "; ".join(problems) or None


def _profile_max_batch(sidecar: dict | None) -> int:
    try:
        return int(sidecar["profile"]["max"][0])
    except (ValueError, KeyError, TypeError, IndexError):
        return 1


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine on GPU 0.

    ``last_infer_ms`` includes host<->device copies; ``last_gpu_ms`` is the engine execution alone
    (CUDA events), in ms. With ``check_sidecar`` the engine's ``.json`` build record must exist and
    match this machine's GPU and TensorRT version. ``max_batch`` is the record's profile maximum,
    read once (1, the batch every profile takes, without a readable one).
    """

    name = "tensorrt"

    def __init__(self, engine_path, *, check_sidecar: bool = True) -> None:
        super().__init__()
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            command = build_command(self.engine_path)
            raise PahEdgeError(f"no TensorRT engine at {self.engine_path}: build it with {command}")
        record = engine_record(self.engine_path)
        self.sidecar: dict | None = json.loads(record.read_text()) if record.is_file() else None
        self.check_sidecar = check_sidecar
        if check_sidecar and self.sidecar is None:
            raise EngineMismatchError(
                f"{self.engine_path} has no build record {record.name}, so its GPU and TensorRT version are unknown: "
                f"rebuild it with {build_command(self.engine_path)}"
            )
        self.max_batch = _profile_max_batch(self.sidecar)
        self.last_gpu_ms: float | None = None
        self._cuda = None
        self._cuda_context = None
        self._logger = self._trt_runtime = self._engine = self._context = None
        self._stream = self._start = self._end = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._dtypes: dict[str, np.dtype] = {}
        self._buffers: dict[str, tuple[np.ndarray, object]] = {}  # name -> (pinned host, device allocation)

    def _hint(self) -> str:
        return f"rebuild it with {build_command(self.engine_path, (self.sidecar or {}).get('precision'))}"

    def _activate(self) -> None:
        trt, cuda = load_tensorrt()
        if self.check_sidecar:
            gpu_name, capability = gpu_identity(cuda)
            problem = engine_compatibility_problem(
                self.sidecar, tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability
            )
            if problem:
                raise EngineMismatchError(f"{self.engine_path} was {problem}: {self._hint()}")
        self._cuda = cuda
        # The primary context is the one the CUDA runtime (and so TensorRT) uses: sharing it avoids a
        # second context's memory on a 4-8 GB Jetson.
        self._cuda_context = cuda.Device(0).retain_primary_context()
        self._cuda_context.push()
        try:
            self._load_engine(trt, cuda)
        except BaseException:
            self._release()
            raise

    def _load_engine(self, trt, cuda) -> None:
        self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime and engine
        self._trt_runtime = trt.Runtime(self._logger)
        self._engine = self._trt_runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise EngineMismatchError(f"TensorRT cannot load {self.engine_path} (see its log above): {self._hint()}")
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        self._start, self._end = cuda.Event(), cuda.Event()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}

    def _deactivate(self) -> None:
        self._release()

    def _release(self) -> None:
        # TensorRT objects and CUDA memory are freed while our context is still current, then popped.
        for host, device in self._buffers.values():
            device.free()
            host.base.free()
        self._buffers = {}
        self._context = self._engine = self._trt_runtime = self._logger = None
        self._stream = self._start = self._end = None
        if self._cuda_context is not None:
            self._cuda.Context.pop()
            self._cuda_context.detach()
            self._cuda_context = None

    def input_specs(self) -> dict[str, Spec]:
        self._require_active()
        return {
            n: (tuple(None if d < 0 else int(d) for d in self._engine.get_tensor_shape(n)), self._dtypes[n])
            for n in self._inputs
        }

    def output_names(self) -> list[str]:
        self._require_active()
        return list(self._outputs)

    def _buffer(self, name: str, shape: tuple[int, ...]):
        """Pinned host view of ``shape`` and its device allocation, grown (never shrunk) on demand."""
        dtype = self._dtypes[name]
        count = int(np.prod(shape, dtype=np.int64))
        host, device = self._buffers.get(name, (None, None))
        if host is None or host.size < count:
            if host is not None:
                device.free()
                host.base.free()
            host = self._cuda.pagelocked_empty(max(count, 1), dtype)
            device = self._cuda.mem_alloc(max(count, 1) * dtype.itemsize)
            self._buffers[name] = (host, device)
        return host[:count].reshape(shape), device

    def _profile_text(self, name: str) -> str:
        low, _, high = self._engine.get_tensor_profile_shape(name, 0)
        return f"min {list(low)} .. max {list(high)}"

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, context, stream = self._cuda, self._context, self._stream
        for name in self._inputs:
            array = feeds[name]
            if not context.set_input_shape(name, array.shape):
                raise RuntimeInputError(
                    f"input {name} has shape {list(array.shape)}, outside the engine's profile "
                    f"{self._profile_text(name)}: split the batch, or rebuild the engine for larger batches"
                )
            host, device = self._buffer(name, array.shape)
            np.copyto(host, array)
            cuda.memcpy_htod_async(device, host, stream)
            context.set_tensor_address(name, int(device))
        outputs = {}
        for name in self._outputs:
            host, device = self._buffer(name, tuple(context.get_tensor_shape(name)))
            context.set_tensor_address(name, int(device))
            outputs[name] = (host, device)
        self._start.record(stream)
        ok = context.execute_async_v3(stream.handle)
        self._end.record(stream)
        if ok:
            for host, device in outputs.values():
                cuda.memcpy_dtoh_async(host, device, stream)
        stream.synchronize()  # also on failure: the input copies still read our buffers
        if not ok:
            raise RuntimeError(f"TensorRT failed to execute {self.engine_path} (see its log above)")
        self.last_gpu_ms = self._start.time_till(self._end)
        # Copies: the pinned buffers are reused by the next call.
        return {name: host.copy() for name, (host, _) in outputs.items()}
