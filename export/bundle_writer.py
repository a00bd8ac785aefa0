"""Checkpoint -> bundle: export the three graphs, prove their parity, write manifest and task registry.

Everything is written into a temporary sibling directory and moved into place at the end, so an
export that fails (parity, a crash, Ctrl-C) leaves any previous bundle untouched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pah_edge.atomic import atomic_write_json, fsync_dir, umask_mode
from pah_edge.workstation.backbones import canonical_backbone_name
from pah_edge.bundle import (BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, Bundle, folder_lock, sha256_file, unique_task_names,
                             utc_now)
from pah_edge.bundle_layout import GRAPH_SPECS, BundleLayout
from pah_edge.workstation.checkpoint import CHECKPOINT_NAME, load_checkpoint, model_from_checkpoint
from pah_edge.workstation.config import RunConfig
from pah_edge.device.task_stats import TaskFreeReport, install_task_free
from pah_edge.errors import CheckpointError, ConfigError, DataError, PahEdgeError
from pah_edge.export.graphs import LearnerStepGraph
from pah_edge.export.onnx_export import (GRAPH_TOLERANCES, OPSET, ExportError, OnnxGraph, onnx_from_torch, tolerance_text,
                                         torch_outputs)
from pah_edge.export.task_free_data import STATS_PER_CLASS, check_stats_per_class, run_task_features
from pah_edge.export.parity_inputs import Inputs, backbone_inputs, learner_step_inputs, prototype_sets
from pah_edge.generators import GENERATOR_KINDS, generator_kind
from pah_edge.workstation.hypernetwork import TaskMLPGenerator
from pah_edge.machine import library_versions
from pah_edge.workstation.metrics import summarize
from pah_edge.workstation.model import PAHModel
from pah_edge.preprocess import Preprocess
from pah_edge.report import Report, aligned

log = logging.getLogger("pah_edge")



def export_bundle(checkpoint: Path, out_dir: Path, *, opset: int = OPSET, simplify: bool = True,
                  images: Path | None = None, force: bool = False, backbone: str | None = None,
                  stats_per_class: int = STATS_PER_CLASS, engine: str | None = None,
                  progress: bool = False) -> ExportReport:
    """Export the run at ``checkpoint`` (run directory or its checkpoint.pt) as a bundle in ``out_dir``.

    images: a folder whose first 16 images (recursive) join the backbone parity check. force: replace
    an existing bundle. backbone: refuse a checkpoint of another backbone. stats_per_class: images
    per class of the run's data for the task-free statistics (when the data is not here, the bundle
    is written without them, with a warning naming the command that adds them). engine: also build
    a TensorRT engine of this precision (fp32 or fp16), checked for TensorRT before the export.
    Returns the report that is also written to ``out_dir/report.json``; a parity failure raises
    ExportError and writes nothing.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"no run at {checkpoint}: pass a run directory (holding {CHECKPOINT_NAME}) or the file itself")
    ckpt_path = checkpoint / CHECKPOINT_NAME if checkpoint.is_dir() else checkpoint
    out_dir = Path(out_dir)
    _check_destination(out_dir, force)  # before minutes of export work
    if images is not None and not Path(images).is_dir():
        raise DataError(f"--images {images} is not a folder; give a folder of .png/.jpg images")
    check_stats_per_class(stats_per_class)
    if engine is not None:
        _check_engine_possible(engine)
    state = load_checkpoint(ckpt_path)
    cfg = RunConfig.from_dict(state["config"])
    _check_exportable(cfg, ckpt_path, backbone)
    model = model_from_checkpoint(state).eval()
    preprocess = Preprocess.from_dict(state["preprocess"])
    tasks = _workstation_tasks(state, model)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(umask_mode(0o777))  # the bundle it becomes is readable as any folder the user makes
    try:
        layout = BundleLayout(tmp)
        graphs = _export_graphs(model, preprocess, tasks, layout, opset=opset, simplify=simplify, images=images)
        manifest = _manifest(cfg, state, model, preprocess, graphs, ckpt_path, opset)
        atomic_write_json(layout.manifest, manifest)
        bundle = Bundle.open(tmp)
        for task in tasks:
            bundle.add_task(name=task["name"], class_names=task["class_names"], prototypes=task["prototypes"],
                            images_seen=task["images_seen"], accuracy=task["accuracy"], source="workstation")
        task_free = _task_free(bundle, cfg, preprocess, stats_per_class, progress, out_dir)
        report = _report(out_dir, ckpt_path, state, manifest, graphs, tasks, images, task_free)
        atomic_write_json(layout.report, report.to_dict())
        _move_into_place(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if engine is not None:
        from pah_edge.export.tensorrt_build import build_engines

        report = dataclasses.replace(report, engines=[str(path) for path in build_engines(out_dir, precision=engine)])
    return report


def _check_engine_possible(precision: str) -> None:
    """Fail in a moment, not after the export, when the asked-for engine cannot be built here."""
    from pah_edge.device.runtimes.tensorrt import tensorrt_problem
    from pah_edge.export.tensorrt_build import check_precision

    check_precision(precision, "--engine")
    if precision == "int8":  # built from the calibrated model, which a fresh bundle does not have yet
        raise ConfigError("--engine int8 needs the INT8 model `pah-edge calibrate` installs: export with --engine "
                          "fp16, or calibrate the bundle, then `pah-edge build-engine BUNDLE --precision int8`")
    problem = tensorrt_problem()
    if problem is not None:
        raise PahEdgeError(f"--engine needs TensorRT here: {problem}; or export without --engine")


def _task_free(bundle: Bundle, cfg: RunConfig, preprocess: Preprocess, per_class: int, progress: bool,
               out_dir: Path) -> TaskFreeReport | None:
    """Install the task-free statistics from the run's data; None (and a warning) when it is not here."""
    try:
        features = run_task_features(bundle, cfg, preprocess, per_class=per_class, progress=progress)
    except DataError as exc:
        features, why = [], str(exc)
    else:
        why = "none of the run's tasks was exported"
    if not features:
        log.warning("the bundle has no task-free statistics (%s); add them where the data is with "
                    "`pah-edge task-stats %s --checkpoint RUN_DIR` or --images DIR", why, out_dir)
        return None
    return install_task_free(bundle, features, shown_path=out_dir)


def newest_run(runs_dir: Path, backbone: str) -> Path:
    """The run directory under ``runs_dir`` with the newest checkpoint.pt whose backbone is ``backbone``."""
    canonical = canonical_backbone_name(backbone)
    candidates = []
    for ckpt in Path(runs_dir).glob(f"*/{CHECKPOINT_NAME}"):
        try:
            config = json.loads((ckpt.parent / "config.json").read_text())["config"]
            run_backbone = canonical_backbone_name(config["model"]["backbone"])
        except (OSError, ValueError, KeyError, TypeError, ConfigError):
            continue  # not a pah-edge run, or one this version cannot read: not a candidate
        if run_backbone == canonical:
            candidates.append((ckpt.stat().st_mtime, ckpt.parent))
    if not candidates:
        raise ConfigError(f"no {canonical} run in {runs_dir}/: train one with "
                          f"`pah-edge train --backbone {canonical} --out {Path(runs_dir) / 'NAME'}`")
    return max(candidates)[1]


# --- checks ------------------------------------------------------------------------------------------


def _check_destination(out_dir: Path, force: bool) -> None:
    if not out_dir.exists():
        return
    if BundleLayout(out_dir).manifest.is_file():
        if not force:
            raise ExportError(f"{out_dir} already holds a bundle; pass --force to replace it "
                              "(its task registry goes with it) or choose another --out")
    elif not out_dir.is_dir() or any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not a bundle; choose another --out or empty it")


def _check_exportable(cfg: RunConfig, ckpt_path: Path, backbone: str | None) -> None:
    if not generator_kind(cfg.model.generator).prototypes:
        raise ExportError(f"{ckpt_path} was trained with the {cfg.model.generator} generator (a stored head per "
                          "task), which has no prototypes to learn on the device; export a run trained with --generator "
                          f"{' or '.join(k.name for k in GENERATOR_KINDS.values() if k.prototypes)}")
    if backbone is not None and canonical_backbone_name(backbone) != canonical_backbone_name(cfg.model.backbone):
        raise ConfigError(f"{ckpt_path} is a {cfg.model.backbone} run, not {canonical_backbone_name(backbone)}; "
                          f"pass --backbone {cfg.model.backbone} or another --checkpoint")


# --- export ------------------------------------------------------------------------------------------


def _workstation_tasks(state: dict, model: PAHModel) -> list[dict]:
    """The finished tasks as registry entries: valid unique names, prototypes, final test accuracy."""
    final_row = state["acc_matrix"][-1] if state["acc_matrix"] else []
    records = state["tasks"][: model.num_tasks]
    tasks = []
    for i, (record, name) in enumerate(zip(records, unique_task_names([r["name"] for r in records]))):
        tasks.append({"name": name, "class_names": list(record["class_names"]),
                      "prototypes": model.task_params[i].detach().cpu().numpy().astype(np.float32),
                      "images_seen": int(record["train_size"]),
                      "accuracy": float(final_row[i]) if i < len(final_row) else None})
    return tasks


def _export_graphs(model: PAHModel, preprocess: Preprocess, tasks: list[dict], out: BundleLayout, *, opset: int,
                   simplify: bool, images: Path | None) -> dict[str, OnnxGraph]:
    """Export backbone, generator and learner step into ``out``, each checked on the parity inputs."""
    generator = model.generator
    fixed = _fixed_num_classes(generator)
    task_protos: Inputs = [(t["name"], t["prototypes"]) for t in tasks]
    images_in = [torch.from_numpy(a) for _, a in backbone_inputs(preprocess, task_protos, images)]
    shape = (generator.channels, generator.size, generator.size)
    proto_sets = [a for _, a in prototype_sets(task_protos, shape, fixed)]
    backbone = model.backbone.eval()
    (feature_name,) = GRAPH_SPECS["backbone"].output_names
    features = np.concatenate([torch_outputs(backbone, (x,), [feature_name])[feature_name] for x in images_in])
    steps = [tuple(map(torch.from_numpy, batch)) for batch in learner_step_inputs(proto_sets, features)]
    proto_sets = [torch.from_numpy(p) for p in proto_sets]
    # Images per batch always vary; classes per task unless a task-mlp generator fixes them.
    dynamic = {"N"} if fixed is not None else {"N", "C"}
    modules_and_inputs = {
        "backbone": (backbone, [(x,) for x in images_in]),
        "generator": (generator, [(p,) for p in proto_sets]),
        "learner_step": (LearnerStepGraph(generator), steps),
    }
    graphs = {}
    for name, spec in GRAPH_SPECS.items():
        module, inputs = modules_and_inputs[name]
        graphs[name] = onnx_from_torch(module, inputs[0], out.graph(name), input_names=spec.input_names,
                                       output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(dynamic),
                                       tolerance=GRAPH_TOLERANCES[name], check_inputs=inputs[1:], opset=opset,
                                       simplify=simplify)
    return graphs


def _fixed_num_classes(generator) -> int | None:
    """The class count a task-mlp generator is built for; None for the class-wise one (any count)."""
    return generator.num_classes if isinstance(generator, TaskMLPGenerator) else None


# --- records -----------------------------------------------------------------------------------------


def _manifest(cfg: RunConfig, state: dict, model: PAHModel, preprocess: Preprocess, graphs: dict[str, OnnxGraph],
              ckpt_path: Path, opset: int) -> dict:
    generator = model.generator
    fixed = _fixed_num_classes(generator)
    size, dim = preprocess.image_size, model.backbone.feature_dim
    proto = [generator.channels, generator.size, generator.size]
    sizes = {"N": None, "C": fixed, "S": size, "D": dim, "c": generator.channels, "s": generator.size}
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "created": utc_now(),
        "backbone": canonical_backbone_name(cfg.model.backbone),
        "feature_dim": dim,
        "preprocess": preprocess.to_dict(),
        "input_channels": 3,
        "prototype_shape": proto,
        "generator": {"kind": cfg.model.generator, "num_classes": fixed},
        "opset": opset,
        "graphs": {name: spec.manifest_entry(sizes) for name, spec in GRAPH_SPECS.items()},
        "files": {g.path.name: sha256_file(g.path) for g in graphs.values()},
        "training": _training_metrics(ckpt_path, state),
        "versions": library_versions("onnxslim", "onnxscript"),
        "source_checkpoint": {"path": str(ckpt_path.resolve()), "sha256": sha256_file(ckpt_path)},
    }


def _training_metrics(ckpt_path: Path, state: dict) -> dict:
    """The run's metrics.json, or the same summary rebuilt from the checkpoint when it is missing."""
    try:
        return json.loads((ckpt_path.parent / "metrics.json").read_text())
    except (OSError, ValueError):
        return summarize(state["acc_matrix"]) if state["acc_matrix"] else {}


@dataclass(frozen=True, kw_only=True)
class ExportReport(Report):
    """What `export_bundle` wrote (also ``report.json`` in the bundle). ``graphs``: per graph its file,
    size_mb (MB), simplified, inputs_checked, tracer_warnings, tolerance and ``errors`` (per output
    the worst "abs" and "rel" error against PyTorch); ``task_free``: `install_task_free`'s report or None."""

    bundle: str
    checkpoint: str
    created: str
    backbone: str
    generator: dict
    opset: int
    tasks_exported: int
    tasks_in_run: int
    note: str | None
    parity_images: str
    graphs: dict[str, dict]
    tasks: list[str]
    task_free: TaskFreeReport | None
    engines: list[str] = field(default_factory=list)  # TensorRT engines built after the export

    def lines(self) -> list[str]:
        rows = [("graph", "MB", "output", "abs err", "rel err", "limit", "onnxslim")]
        for name, graph in self.graphs.items():
            for i, (output, err) in enumerate(graph["errors"].items()):
                first = i == 0
                rows.append((name if first else "", f"{graph['size_mb']:.2f}" if first else "", output,
                             f"{err['abs']:.1e}", f"{err['rel']:.1e}", tolerance_text(graph["tolerance"]),
                             graph["simplified"] if first else ""))
        return [f"{self.backbone} + {self.generator['kind']} generator, opset {self.opset}:",
                *aligned(rows, right={1, 3, 4}),
                *([f"note: {self.note}"] if self.note else []),
                f"tasks: {', '.join(self.tasks) or 'none'}",
                f"bundle -> {self.bundle}",
                *(f"engine -> {path}" for path in self.engines)]


def _report(out_dir: Path, ckpt_path: Path, state: dict, manifest: dict, graphs: dict[str, OnnxGraph],
            tasks: list[dict], images: Path | None, task_free: TaskFreeReport | None) -> ExportReport:
    done, total = len(tasks), len(state["tasks"])
    return ExportReport(
        bundle=str(out_dir),
        checkpoint=str(ckpt_path),
        created=manifest["created"],
        backbone=manifest["backbone"],
        generator=manifest["generator"],
        opset=manifest["opset"],
        tasks_exported=done,
        tasks_in_run=total,
        note=None if done == total else f"the run stopped after {done} of its {total} tasks; "
                                        f"the bundle holds those {done}",
        parity_images=str(images) if images is not None else "task prototypes as images",
        graphs={name: {"file": g.path.name, "size_mb": round(g.path.stat().st_size / 1e6, 3),
                       "simplified": g.simplified, "inputs_checked": g.checked,
                       "tracer_warnings": g.tracer_warnings,
                       "tolerance": GRAPH_TOLERANCES[name].to_dict(), "errors": g.errors}
                for name, g in graphs.items()},
        tasks=[t["name"] for t in tasks],
        task_free=task_free,
    )


def _move_into_place(tmp: Path, out_dir: Path, force: bool) -> None:
    """Rename ``tmp`` to ``out_dir``; an old bundle is renamed aside first and deleted only afterwards."""
    _check_destination(out_dir, force)  # again: another export may have finished meanwhile
    old = None
    if out_dir.exists() and BundleLayout(out_dir).manifest.is_file():
        # Under its lock: no learn-task is halfway through a change, and one waiting for the lock
        # finds the bundle replaced instead of writing into the new one.
        with folder_lock(BundleLayout(out_dir)):
            old = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old)  # onto the empty placeholder directory
            os.replace(tmp, out_dir)
    else:
        if out_dir.exists():
            out_dir.rmdir()  # an empty directory
        os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old)
