"""``pah-edge verify``: the same inputs through every runtime at hand, worst errors per graph and pair.

ONNX Runtime (CPU) always runs. PyTorch is the reference when torch is installed and the bundle's
source checkpoint is still where the export found it, unchanged; TensorRT runs each engine the
bundle holds when TensorRT and a GPU are present. Pairs are judged against the export's FP32
tolerances (``GRAPH_TOLERANCES``); FP16 and INT8 engines only against loose sanity bounds, since
reduced precision cannot meet FP32 numbers.

Imports no torch at module level: it runs on a device without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pah_edge.bundle import Bundle, BundleError
from pah_edge.bundle_layout import GRAPH_SPECS, engine_graph_and_precision
from pah_edge.device.runtimes import create_runner
from pah_edge.errors import PahEdgeError
from pah_edge.export.onnx_export import GRAPH_TOLERANCES, Tolerance, merge_worst, parity, tolerance_text
from pah_edge.export.parity_inputs import backbone_inputs, learner_step_inputs, prototype_sets
from pah_edge.export.torch_runner import torch_runners
from pah_edge.report import Report, aligned

# Not FP32 parity: bounds that only catch a broken engine (wrong input layout, overflow, bad scales).
REDUCED_PRECISION_TOLERANCES = {"fp16": Tolerance(rel=5e-2), "int8": Tolerance(rel=0.25)}


@dataclass(frozen=True, kw_only=True)
class VerifyReport(Report):
    """``rows``: one per graph, runtime and output: its worst "abs" and "rel" error against
    ``reference`` (torch, else onnxruntime), the "tolerance" and whether it is "ok"; ``runtimes``:
    "ok" or "skipped (reason)" per runtime; ``inputs``: batches per graph; ``tasks``: `task_states`;
    ``ok``: every row within and every task usable."""

    bundle: str
    inputs: dict[str, int]
    runtimes: dict[str, str]
    reference: str
    rows: list[dict]
    tasks: dict[str, dict]
    ok: bool

    def lines(self) -> list[str]:
        rows = [("graph", "runtime", "output", "abs err", "rel err", "limit", "ok")]
        rows += [(r["graph"], r["runtime"], r["output"], f"{r['abs']:.1e}", f"{r['rel']:.1e}",
                  tolerance_text(r["tolerance"]), "yes" if r["ok"] else "NO") for r in self.rows]
        comparison = ([f"{self.bundle}: worst errors vs {self.reference}:", *aligned(rows, right={3, 4})] if self.rows
                      else ["nothing to compare: only ONNX Runtime is available here (hashes verified)"])
        return [*(f"{runtime}: {state}" for runtime, state in self.runtimes.items()), *comparison,
                *(f"task {name}: {_task_state_text(state)}" for name, state in self.tasks.items())]

    def problems(self) -> list[str]:
        """One error line per kind of failure, naming the fix; empty when ``ok``."""
        failed = sorted({f"{r['graph']} on {r['runtime']}" for r in self.rows if not r["ok"]})
        broken = [name for name, state in self.tasks.items() if not state["usable"]]
        return ([f"{', '.join(failed)} beyond tolerance; re-export the bundle or rebuild its engines"] if failed else []) + \
            ([f"task(s) {', '.join(broken)} unavailable (see above); learn them again or remove them with "
              "`pah-edge tasks remove NAME`"] if broken else [])


def _task_state_text(state: dict) -> str:
    if not state["usable"]:
        return f"UNAVAILABLE: {state['problem']}"
    if state["task_free"]:
        return "ok"
    return f"task given only: {state['problem'] or 'the bundle has no task-free statistics'}"


def verify_bundle(path: Path, *, images: Path | None = None) -> VerifyReport:
    """Check hashes, run the parity inputs through each runtime, and compare (see `VerifyReport`)."""
    bundle = Bundle.open(path)  # raises BundleError on a hash mismatch of the manifest's files
    bundle.int8_backbone_path()  # ... and of an installed INT8 model against calibration.json
    tasks, prototypes = task_states(bundle)
    feeds, backbone_outputs = _feeds(bundle, prototypes, images)
    outputs: dict[str, dict[str, list[dict]]] = {}  # runtime -> graph -> outputs per feed
    status: dict[str, str] = {}
    tolerances: dict[str, dict[str, Tolerance]] = {}  # runtime -> graph -> tolerance

    outputs["onnxruntime"] = {"backbone": backbone_outputs,
                              **{g: _run_onnxruntime(bundle.graph_path(g), f) for g, f in feeds.items()
                                 if g != "backbone"}}
    status["onnxruntime"] = "ok"
    torch_outputs, status["torch"] = _run_torch(bundle, feeds)
    if torch_outputs is not None:
        outputs["torch"] = torch_outputs
    for name, (engine_outputs, why, tolerance) in _run_engines(bundle, feeds).items():
        status[name] = why
        if engine_outputs is not None:
            outputs[name], tolerances[name] = engine_outputs, tolerance

    reference = "torch" if "torch" in outputs else "onnxruntime"
    rows = []
    for runtime, per_graph in outputs.items():
        if runtime == reference:
            continue
        for graph, results in per_graph.items():
            tolerance = tolerances.get(runtime, {}).get(graph, GRAPH_TOLERANCES[graph])
            errors = merge_worst(*(parity(a, b) for a, b in zip(results, outputs[reference][graph])))
            for output, err in errors.items():
                ok = not tolerance.violations({output: err})
                rows.append({"graph": graph, "runtime": runtime, "reference": reference, "output": output, **err,
                             "tolerance": tolerance.to_dict(), "ok": ok})
    return VerifyReport(bundle=str(bundle.path), inputs={g: len(f) for g, f in feeds.items()}, runtimes=status,
                        reference=reference, rows=rows, tasks=tasks,
                        ok=all(r["ok"] for r in rows) and all(t["usable"] for t in tasks.values()))


def task_states(bundle: Bundle) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """(Per task: ``usable`` (its prototypes verify: task-given prediction works), ``task_free`` (its
    statistics verify too) and ``problem`` (what is wrong and the fix, or None); the usable tasks'
    prototypes, read and checked once here)."""
    states, prototypes = {}, {}
    for record in bundle.tasks():
        state = {"usable": False, "task_free": False, "problem": None}
        try:
            prototypes[record.name] = bundle.load_prototypes(record.name)
            state["usable"] = True
            if bundle.shared_stats() is not None:
                bundle.load_task_stats(record)
                state["task_free"] = True
        except BundleError as exc:
            state["problem"] = str(exc)
        states[record.name] = state
    return states, prototypes


def _feeds(bundle: Bundle, prototypes: dict[str, np.ndarray],
           images: Path | None) -> tuple[dict[str, list[dict[str, np.ndarray]]], list[dict]]:
    """(Per graph, the input batches: the export's parity inputs rebuilt from the bundle alone (the
    tasks' ``prototypes``); ONNX Runtime's backbone outputs for them, which the learner step's
    inputs are made from)."""
    tasks = list(prototypes.items())
    image_batches = [a for _, a in backbone_inputs(bundle.preprocess, tasks, images)]
    proto_sets = [a for _, a in prototype_sets(tasks, bundle.prototype_shape, bundle.fixed_num_classes)]
    # The learner step needs features; ONNX Runtime's are the ones every runtime can reproduce.
    backbone = [{"images": x} for x in image_batches]
    backbone_outputs = _run_onnxruntime(bundle.graph_path("backbone"), backbone)
    features = np.concatenate([o["features"] for o in backbone_outputs])
    return {
        "backbone": backbone,
        "generator": [{"prototypes": p} for p in proto_sets],
        "learner_step": [dict(zip(GRAPH_SPECS["learner_step"].input_names, batch))
                         for batch in learner_step_inputs(proto_sets, features)],
    }, backbone_outputs


def _run_onnxruntime(graph: Path, feeds: list[dict]) -> list[dict]:
    with create_runner("onnxruntime-cpu", graph) as runner:
        return [runner.infer(f) for f in feeds]


def _run_torch(bundle: Bundle, feeds: dict) -> tuple[dict | None, str]:
    """(outputs per graph, "ok") from the source checkpoint's model, or (None, "skipped (reason)")."""
    runners, why_not = torch_runners(bundle)
    if runners is None:
        return None, f"skipped ({why_not})"
    results = {}
    for graph, runner in runners.items():
        with runner:
            results[graph] = [runner.infer(f) for f in feeds[graph]]
    return results, "ok"


def _run_engines(bundle: Bundle, feeds: dict) -> dict[str, tuple[dict | None, str, dict]]:
    """Per engine ``<graph>.<precision>.engine``: (outputs, status, tolerance per graph)."""
    engines = bundle.layout.built_engines()
    if not engines:
        return {"tensorrt": (None, f"skipped (no engines in {bundle.layout.engines_dir})", {})}
    results = {}
    for engine in engines:
        graph, precision = engine_graph_and_precision(engine)
        name = f"tensorrt-{precision or 'engine'}"
        if graph not in feeds:
            results[name] = (None, f"skipped ({engine.name} is not an engine of a bundle graph)", {})
            continue
        tolerance = REDUCED_PRECISION_TOLERANCES.get(precision, GRAPH_TOLERANCES[graph])
        try:
            with create_runner("tensorrt", engine) as runner:
                outs = [_infer_in_chunks(runner, f) for f in feeds[graph]]
        except (ImportError, PahEdgeError) as exc:
            results[name] = (None, f"skipped ({exc})", {})
            continue
        results[name] = ({graph: outs}, "ok", {graph: tolerance})
    return results


def _infer_in_chunks(runner, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Batches beyond the engine's profile run in slices along the first axis, then are joined."""
    max_batch = runner.max_batch
    n = len(next(iter(feeds.values())))
    parts = [runner.infer({k: v[i : i + max_batch] for k, v in feeds.items()}) for i in range(0, n, max_batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
