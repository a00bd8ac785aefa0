"""Where everything lives in a bundle directory, and what its graphs take and give.

The one place that knows the bundle's file names: :class:`BundleLayout` (paths from a directory,
usable before a bundle is complete, as export and build-engine need) and :data:`GRAPH_SPECS` (each
graph's file, tensor names, symbolic shapes, dtypes and FP32 parity tolerances). ``pah_edge.bundle``
reads and extends bundles through it; export, verify, build-engine, calibration, the runners and
bench ask it rather than spell a path. Imports nothing beyond the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
TASKS_DIR = "tasks"
REGISTRY_PATH = f"{TASKS_DIR}/registry.json"
LOCK_NAME = ".lock"
INT8_BACKBONE_NAME = "backbone.int8.onnx"
CALIBRATION_NAME = "calibration.json"
CALIBRATION_REJECTED_NAME = "calibration.rejected.json"  # the report of a calibration that failed --max-drop
TASK_FREE_RECORD = "task_free.json"
ENGINES_DIR = "engines"
ENGINE_SUFFIX = ".engine"
TIMING_CACHE_NAME = "timing.cache"

# "Precision" means two things, kept apart here. A backbone model is which ONNX backbone computes the
# features: the exported float one or the calibrated INT8 one (tasks record it: it changes features).
# An engine precision is how TensorRT compiles one of them; an FP16 or FP32 engine runs the float model.
BACKBONE_MODELS = ("fp32", "int8")
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
ENGINES_FOR_MODEL = {"fp32": ("fp16", "fp32"), "int8": ("int8",)}  # fastest first


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``dims`` are symbols resolved per bundle (see ``GraphSpec.shapes``):
    N images, C classes of a task, S image side (px), D feature dim, c/s prototype channels/side."""

    name: str
    dims: tuple[str | int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class GraphSpec:
    """An exported ONNX graph: its file in the bundle, inputs and outputs in order, and the FP32
    parity contract (worst ``abs`` error, or ``rel`` to the output's largest magnitude; with both,
    either suffices) that export and `pah-edge verify` hold every runtime to."""

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    abs_tolerance: float | None = None
    rel_tolerance: float | None = None

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def manifest_entry(self, sizes: dict[str, int | None]) -> dict:
        """The manifest's record of this graph: file, and {name: shape} of its inputs and outputs with
        each symbol replaced from ``sizes`` (None: dynamic)."""
        def shapes(tensors: tuple[TensorSpec, ...]) -> dict[str, list]:
            return {t.name: [sizes[d] if isinstance(d, str) else d for d in t.dims] for t in tensors}
        return {"file": self.file, "inputs": shapes(self.inputs), "outputs": shapes(self.outputs)}

    def dynamic_axes(self, dynamic: set[str]) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s dynamic_axes: every dim whose symbol is in ``dynamic``, per tensor."""
        return {t.name: {i: d for i, d in enumerate(t.dims) if d in dynamic} for t in (*self.inputs, *self.outputs)}


_IMAGES = TensorSpec("images", ("N", 3, "S", "S"))
_FEATURES = TensorSpec("features", ("N", "D"))
_PROTOTYPES = TensorSpec("prototypes", ("C", "c", "s", "s"))
GRAPH_SPECS: dict[str, GraphSpec] = {spec.name: spec for spec in (
    GraphSpec("backbone", "backbone.onnx", (_IMAGES,), (_FEATURES,), abs_tolerance=1e-4, rel_tolerance=1e-4),
    GraphSpec("generator", "generator.onnx", (_PROTOTYPES,), (TensorSpec("head", ("C", "D")),), abs_tolerance=1e-5),
    GraphSpec("learner_step", "learner_step.onnx", (_PROTOTYPES, _FEATURES, TensorSpec("labels", ("N",), "int64")),
              (TensorSpec("loss", ()), TensorSpec("grad", _PROTOTYPES.dims)), rel_tolerance=1e-4),
)}


def engine_graph_and_precision(engine: str | Path) -> tuple[str, str]:
    """(graph, precision) of an engine file ``<graph>.<precision>.engine``; precision "" when the name has none."""
    graph, _, precision = Path(engine).name.removesuffix(ENGINE_SUFFIX).partition(".")
    return graph, precision


def engine_record(engine: str | Path) -> Path:
    """``backbone.fp16.engine`` -> ``backbone.fp16.engine.json``: the engine's build record."""
    return Path(f"{engine}.json")


def _path(relative: str, doc: str) -> property:
    """A property: ``relative`` below the layout's root."""
    return property(lambda layout: layout.root / relative, doc=doc)


@dataclass(frozen=True)
class BundleLayout:
    """The paths of a bundle rooted at ``root``; nothing is read or checked, so the exporter can
    ask before the bundle exists. See ``pah_edge.bundle`` for what each file holds."""

    root: Path

    manifest = _path(MANIFEST_NAME, "Immutable after export: shapes, preprocessing, SHA-256 of every graph.")
    report = _path(REPORT_NAME, "The export's parity report.")
    tasks_dir = _path(TASKS_DIR, "Each task's prototypes and statistics, and the registry.")
    registry = _path(REGISTRY_PATH, "The task registry (mutable, written under the lock).")
    lock = _path(LOCK_NAME, "The file ``Bundle.lock`` holds a flock on.")
    task_free_record = _path(TASK_FREE_RECORD, "Names the shared task-free state's file and its SHA-256.")
    int8_backbone = _path(INT8_BACKBONE_NAME, "The calibrated INT8 backbone (Q/DQ ONNX); valid only with a "
                                              "passing calibration record.")
    calibration_record = _path(CALIBRATION_NAME, "The installed INT8 model's calibration record.")
    calibration_rejected = _path(CALIBRATION_REJECTED_NAME, "The report of the latest calibration that failed.")
    engines_dir = _path(ENGINES_DIR, "TensorRT engines: device-specific, so not hashed in the manifest.")
    timing_cache = _path(f"{ENGINES_DIR}/{TIMING_CACHE_NAME}", "TensorRT's timing cache, shared by every "
                                                               "engine build of this bundle.")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def graph(self, name: str) -> Path:
        """Where export writes graph ``name`` (a reader asks the manifest: ``Bundle.graph_path``)."""
        return self.root / GRAPH_SPECS[name].file

    def engine(self, precision: str, graph: str = "backbone") -> Path:
        """``engines/<graph>.<precision>.engine``, built or not."""
        return self.engines_dir / f"{graph}.{precision}{ENGINE_SUFFIX}"

    def task_free_state(self, sha256: str) -> Path:
        """``task_free.<sha>.npz``: the shared task-free state, named by its content's SHA-256."""
        return self.root / f"task_free.{sha256[:12]}.npz"

    def task_free_states(self) -> list[Path]:
        """Every shared task-free state file present, the current one and any a crash left."""
        return sorted(self.root.glob("task_free.*.npz"))

    def engine_files(self, precision: str, graph: str = "backbone") -> tuple[Path, Path]:
        """The engine of ``precision`` and its build record, built or not."""
        engine = self.engine(precision, graph)
        return engine, engine_record(engine)

    def built_engines(self) -> list[Path]:
        """The engine files in ``engines/``, sorted by name."""
        return sorted(self.engines_dir.glob(f"*{ENGINE_SUFFIX}"))

    @classmethod
    def of_engine(cls, engine: str | Path) -> BundleLayout | None:
        """The layout whose ``engines/`` holds ``engine``, or None for an engine elsewhere."""
        parent = Path(engine).parent
        return cls(parent.parent) if parent.name == ENGINES_DIR else None
