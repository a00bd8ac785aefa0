"""How far an INT8 backbone is from its FP32 original: task accuracy, features, layers, size and speed.

Everything runs on ONNX Runtime's CPU provider. Accuracy and features carry over to a TensorRT
engine built from the same Q/DQ file (same scales and rounding). Speed does not: x86 builds of ONNX
Runtime fuse Q/DQ pairs into integer kernels only for unsigned activations (signed INT8, TensorRT's
form, stays DequantizeLinear -> float kernel -> QuantizeLinear there; ARM builds fuse both).
"""

from __future__ import annotations

import math
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from pah_edge.bundle import Bundle, TaskRecord
from pah_edge.device.bench_timing import alternating, wall_ms_call
from pah_edge.device.bundle_runners import generator_runner
from pah_edge.device.images import BatchStream, ClassFolders, check_no_class_empty, scan_class_folders, warn_skipped
from pah_edge.device.learner import accuracy
from pah_edge.device.runtimes import create_runner
from pah_edge.errors import DataError
from pah_edge.folders import subfolders

TOP_LAYERS = 5


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of [N, D] arrays; a zero row scores 0 (eps), not NaN."""
    num = np.sum(a * b, axis=1, dtype=np.float64)
    return num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


EvalFolder = tuple[ClassFolders, np.ndarray]  # a task's held-out class folders, the task's class index of each


def eval_task_folders(bundle: Bundle, eval_dir: Path | None) -> dict[str, EvalFolder]:
    """{registered task: its held-out folders ``eval_dir/<task>/<class>/*``, scanned}; DataError for an
    unknown task or class folder, found before any work (nothing is decoded)."""
    if eval_dir is None:
        return {}
    root = Path(eval_dir)
    if not root.is_dir():
        raise DataError(f"--eval {root} is not a folder: lay it out as EVAL/<task>/<class>/<images>")
    names = [t.name for t in bundle.tasks()]
    folders = {p.name: p for p in subfolders(root)}
    unknown = sorted(set(folders) - set(names))
    if unknown:
        raise DataError(f"--eval {root} has folders for tasks the bundle lacks ({', '.join(unknown)}); registered "
                        f"tasks: {', '.join(names) or 'none'}. Rename or remove them")
    if not folders:
        raise DataError(f"--eval {root} has no task folders: lay it out as EVAL/<task>/<class>/<images>")
    scans = {name: scan_class_folders(folder) for name, folder in folders.items()}
    return {name: (scan, _task_classes(bundle.task(name), scan)) for name, scan in scans.items()}


def _task_classes(record: TaskRecord, folders: ClassFolders) -> np.ndarray:
    """The task's class index of each class folder; DataError naming folders the task does not know."""
    # A class name may hold "/" (Fashion-MNIST's "T-shirt/top"), which no folder name can: "_" stands in.
    by_folder = {name.replace("/", "_"): i for i, name in enumerate(record.class_names)}
    unknown = sorted(set(folders.class_names) - set(by_folder))
    if unknown:
        raise DataError(f"{folders.root} has class folders task {record.name!r} does not know ({', '.join(unknown)}); "
                        f"its classes: {', '.join(by_folder)}")
    return np.asarray([by_folder[c] for c in folders.class_names], np.int64)


def compare_tasks(bundle: Bundle, fp32_path: Path, int8_path: Path, folders: dict[str, EvalFolder], *,
                  batch_size: int = 32) -> list[dict]:
    """Per registered task: accuracy with FP32 and with INT8 features (its own generated head), and cosine.

    A task's class folders must be among its class names ("/" written as "_"). Tasks without a
    folder are listed with ``evaluated`` False. Accuracies are fractions in [0, 1]; ``agreement``
    is the fraction of images whose predicted class is the same under both.
    """
    rows = []
    with ExitStack() as stack:
        fp32 = stack.enter_context(create_runner("onnxruntime-cpu", fp32_path))
        int8 = stack.enter_context(create_runner("onnxruntime-cpu", int8_path))
        generator = stack.enter_context(generator_runner(bundle))
        for record in bundle.tasks():
            if record.name not in folders:
                rows.append({"task": record.name, "evaluated": False})
                continue
            head = generator.infer({"prototypes": bundle.load_prototypes(record.name)})["head"]
            feats_fp32, feats_int8, labels = _task_features(bundle, folders[record.name], fp32, int8, batch_size)
            same = np.argmax(feats_fp32 @ head.T, axis=1) == np.argmax(feats_int8 @ head.T, axis=1)
            sim = cosine(feats_fp32, feats_int8)
            rows.append({"task": record.name, "evaluated": True, "images": int(len(labels)),
                         "fp32_accuracy": accuracy(head, feats_fp32, labels),
                         "int8_accuracy": accuracy(head, feats_int8, labels),
                         "agreement": float(same.mean()), "cosine_mean": float(sim.mean()),
                         "cosine_min": float(sim.min())})
    return rows


def _task_features(bundle: Bundle, folder: EvalFolder, fp32, int8, batch_size: int):
    """FP32 and INT8 features [N, D] and task labels [N] of a task's held-out images, each decoded once."""
    folders, to_task = folder
    stream = BatchStream(folders.paths(), bundle.preprocess, batch_size)
    parts_fp32, parts_int8, positions = [], [], []
    for inputs, batch_positions in stream:
        parts_fp32.append(fp32.infer({"images": inputs})["features"])
        parts_int8.append(int8.infer({"images": inputs})["features"])
        positions.append(batch_positions)
    read = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    folder_labels = folders.labels()[read]
    check_no_class_empty(folders, folder_labels, stream.skipped)
    warn_skipped(stream.skipped, folders.num_images)
    return np.concatenate(parts_fp32), np.concatenate(parts_int8), to_task[folder_labels]


def layer_errors(fp32_path: Path, int8_path: Path, images: np.ndarray, *, top: int = TOP_LAYERS,
                 excluded: set[str] = frozenset()) -> list[dict]:
    """The ``top`` nodes that add the most INT8 error, measured on ``images``, leaving out the nodes
    already ``excluded`` from INT8 (their output is still rounded for its INT8 readers, but excluding
    them again would change nothing).

    ``fp32_path`` must be the graph the Q/DQ model was made from (the tensor names match). Per
    node output: ``rel_error`` = ||int8 - fp32|| / ||fp32|| (the error accumulated up to there),
    ``sqnr_db`` = 20 log10(1 / rel_error), and ``added_error`` = its rel_error minus the largest
    rel_error among the node's inputs: how much the error grows across it, by its own rounding or
    by amplifying its inputs' (the candidates for ``--exclude``); ``via``: nodes between it and those
    inputs whose outputs the INT8 graph fused away, whose error it is charged with. Graph optimisations are off here,
    so this is the exact Q/DQ arithmetic (what TensorRT implements), not ONNX Runtime's kernels.
    """
    from onnxruntime.quantization import qdq_loss_debug as debug

    def activations(model: Path, work: Path) -> dict:
        augmented = work / f"{model.stem}.debug.onnx"
        debug.modify_model_output_intermediate_tensors(str(model), str(augmented))
        return debug.collect_activations(str(augmented), [{"images": images}])  # any iterable of feeds

    with tempfile.TemporaryDirectory(prefix="pah-edge-layers-") as work:
        int8 = activations(Path(int8_path), Path(work))
        fp32 = activations(Path(fp32_path), Path(work))
    matched = debug.create_activation_matching(int8, fp32)
    # A tensor's value in the INT8 graph is what its readers see: after its Q/DQ pair if it has one.
    errors = {name: _relative_error(values, matched[name]["post_qdq"] if name in matched else int8[name])
              for name, values in fp32.items() if name in int8}
    # A tensor the INT8 graph does not materialise (a Conv output that feeds a Relu/Clip the ONNX
    # Runtime form folded away) carries the error of its producer's inputs, so the node reading it is
    # charged for both nodes' rounding, and ``via`` names the producer: that is the node to --exclude.
    # So does a tensor that only a Relu/Clip reads in the TensorRT form: its Q/DQ has the activation's
    # range (``narrow_clipped_ranges``), and what that range cuts off the activation cuts off anyway.
    nodes = _nodes(fp32_path)
    readers: dict[str, set[str]] = {}  # tensor -> the op types that read it
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    clipped_only = {name for name, ops in readers.items() if ops <= {"Relu", "Clip"}}
    errors = {name: error for name, error in errors.items() if name not in clipped_only}
    carried: dict[str, tuple[float, str | None]] = {}  # tensor -> (error its readers inherit, hidden producer)
    rows = []
    for node in nodes:
        inputs = [carried.get(i, (0.0, None)) for i in node.input]
        inherited = max((error for error, _ in inputs), default=0.0)
        for output in node.output:
            carried[output] = (errors[output], None) if output in errors else (inherited, node.name)
        if not node.output or node.output[0] not in errors:
            continue
        rel = errors[node.output[0]]
        rows.append({"node": node.name, "op": node.op_type, "tensor": node.output[0], "rel_error": rel,
                     "sqnr_db": -20 * math.log10(max(rel, 1e-12)), "added_error": rel - inherited,
                     "via": [hidden for _, hidden in inputs if hidden is not None]})
    candidates = [r for r in rows if r["node"] not in excluded and not excluded & set(r["via"])]
    return sorted(candidates, key=lambda r: -r["added_error"])[:top]


def _relative_error(reference, other) -> float:
    a, b = np.concatenate(reference).ravel(), np.concatenate(other).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))


def _nodes(model_path: Path) -> list:
    import onnx

    return list(onnx.load(str(model_path)).graph.node)


def latency_ms(model_path: Path, image_size: int, batch: int, *, runs: int = 10, warmup: int = 2,
               threads: int | None = None) -> float:
    """Median wall time of one ONNX Runtime CPU call on a [batch, 3, S, S] input, in ms."""
    medians, _ = paired_latency({"model": model_path}, image_size, batch, runs=runs, warmup=warmup, threads=threads)
    return medians["model"]


def paired_latency(models: dict[str, Path], image_size: int, batch: int, *, runs: int = 10, warmup: int = 2,
                   threads: int | None = None) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(median ms per model, ms per model in each of ``runs`` rounds): ONNX Runtime CPU calls on one
    [batch, 3, S, S] input, the models taking turns call by call so that load drift hits them alike."""
    images = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
    with ExitStack() as stack:
        calls = {name: wall_ms_call(stack.enter_context(create_runner("onnxruntime-cpu", path, threads=threads)),
                                    {"images": images}) for name, path in models.items()}
        rounds = alternating(calls, rounds=runs, block=1, warmup=warmup)
    return {name: float(np.median([r[name] for r in rounds])) for name in models}, rounds


def size_mb(path: Path) -> float:
    """File size in MB (10^6 bytes)."""
    return Path(path).stat().st_size / 1e6
