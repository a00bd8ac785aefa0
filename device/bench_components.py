"""The components ``pah-edge bench`` times, each on one runtime and precision.

A component is a generator of result rows (and of ``skip`` records for single batches it cannot
run); it raises :class:`Skipped` when it cannot run at all on that runtime and precision. Graph
runners come from ``create_runner`` on the bundle's files (``Bundle.layout``), so every precision's
file is explicit: fp32 = the exported graph, int8 = the calibrated model (``pah-edge calibrate``),
TensorRT = the backbone engine of that precision. Torch is touched only through ``Context.torch`` runners.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from pah_edge.bundle import Bundle
from pah_edge.device.bench_inputs import BENCH_TASK, IMAGES_PER_CLASS, Inputs
from pah_edge.device.bench_timing import NOISY_CV, alternating, measure, wall_ms_call
from pah_edge.device.bundle_runners import backbone_engine
from pah_edge.device.learner import learn_task
from pah_edge.device.api import Device
from pah_edge.device.runtimes import Runner, create_runner
from pah_edge.device.runtimes.tensorrt import build_command
from pah_edge.machine import peak_rss_mb, reset_peak_rss

log = logging.getLogger("pah_edge")

LEARN_TASK_RUNS = 5  # learn-task takes seconds per run: at most this many timed runs, one warm-up
STREAM_FRAMES = 20  # frames per timed predict-stream call: the thread start is paid once per call
PREDICTION = ("predict-e2e", "predict-frame", "predict-stream")  # timed against the bare backbone
DEVICE_PATH = (*PREDICTION, "predict-task-free", "learn-task")  # components that run the device's own code, not one graph
DEVICE_PATH_ONLY = ("the device path runs on onnxruntime or tensorrt; PyTorch eager is the reference for the "
                    "graphs (backbone, head-generation, learner-step) only")


class Skipped(Exception):
    """A component cannot run on this runtime and precision here; the message says why."""


@dataclass
class Context:
    """What every component reads: the bundle (never written), its scratch copy, inputs and settings."""

    bundle: Bundle
    scratch: Bundle
    inputs: Inputs
    classes: int
    warmup: int
    iterations: int
    batches: tuple[int, ...]
    threads: int | None
    torch: dict[str, Runner] = field(default_factory=dict)  # graph -> PyTorch runner, when torch runs
    rss_per_row: bool = True  # False where the OS cannot reset the RSS high-water mark


def skip(component: str, runtime: str, precision: str | None, reason: str, batch: int | None = None) -> dict:
    """A skipped-measurement record, listed in the report next to the rows."""
    return {"component": component, "runtime": runtime, "precision": precision, "batch": batch, "reason": reason}


def graph_runner(ctx: Context, graph: str, runtime: str, precision: str) -> Runner:
    """An inactive runner of ``graph`` (backbone, generator, learner_step) on ``runtime`` at ``precision``."""
    if runtime == "torch":
        if precision != "fp32":
            raise Skipped("PyTorch eager is measured as the FP32 reference only")
        return ctx.torch[graph]
    if graph != "backbone":
        if runtime == "tensorrt":
            raise Skipped(f"no TensorRT engine of the {graph} graph: the device runs it on ONNX Runtime CPU")
        # As on the device: heads on the CPU (generator_runner), the tiny step graph on one thread (learn_task).
        return create_runner("onnxruntime-cpu", ctx.bundle.graph_path(graph),
                             threads=1 if graph == "learner_step" else ctx.threads)
    if runtime == "tensorrt":
        engine = ctx.bundle.layout.engine(precision)
        if not engine.is_file():
            where = engine.relative_to(ctx.bundle.path)
            raise Skipped(f"no {where}: build it with {build_command(engine, precision)}")
        return create_runner("tensorrt", engine)
    if precision == "fp16":
        raise Skipped("no FP16 ONNX graph for ONNX Runtime CPU: FP16 runs as a TensorRT engine")
    path = ctx.bundle.graph_path("backbone") if precision == "fp32" else ctx.bundle.layout.int8_backbone
    if not path.is_file():
        raise Skipped(f"no {path.name}: run `pah-edge calibrate`")
    return create_runner("onnxruntime", path, threads=ctx.threads)


def timed_row(ctx: Context, call: Callable[[], float], *, items: int, labels: dict, iterations: int | None = None,
              warmup: int | None = None) -> dict:
    """Warm up and time ``call`` (returning ms); the row: ``labels``, latencies, throughput, RSS.

    ``rss_mb`` is the process's peak resident memory while the row ran (the high-water mark is
    reset first where the OS allows); it includes every library and session loaded before.
    """
    if ctx.rss_per_row:
        reset_peak_rss()
    timing = measure(call, warmup=ctx.warmup if warmup is None else warmup,
                     iterations=ctx.iterations if iterations is None else iterations)
    row = {**labels, **timing.fields(items), "rss_mb": peak_rss_mb()}
    if timing.noisy:
        log.warning("%s on %s %s, batch %s: latency varies (cv %.2f > %.2f); use more --warmup/--iterations or a "
                    "quieter machine", labels["component"], labels["runtime"], labels["precision"], labels["batch"],
                    timing.cv, NOISY_CV)
    return row


def runner_row(ctx: Context, runner: Runner, feeds: dict[str, np.ndarray], *, items: int, labels: dict) -> dict:
    """Time ``runner.infer(feeds)``: wall time, or on TensorRT the engine's GPU time (CUDA events)."""
    on_gpu = runner.name == "tensorrt"
    walls: list[float] = []

    def call() -> float:
        runner.infer(feeds)
        walls.append(runner.last_infer_ms)
        return runner.last_gpu_ms if on_gpu else runner.last_infer_ms

    row = timed_row(ctx, call, items=items, labels={**labels, "runner": runner.name,
                                                     "timing": "cuda-events" if on_gpu else "wall"})
    if on_gpu:
        # Host copies included: what a caller of the engine waits for.
        row["wall_p50_ms"] = float(np.percentile(walls[-row["iterations"]:], 50))
        row["device_mem_mb"] = device_mem_mb()
    return row


PAIRED_ROUNDS = 10


def pair_with_torch(ctx: Context, rows: list[dict]) -> None:
    """Time every ONNX Runtime backbone row again, taking turns with PyTorch eager at its batch.

    Sets ``speedup_vs_torch_paired`` on those rows: the median, lowest and highest over
    ``PAIRED_ROUNDS`` rounds of (PyTorch's block median / ONNX Runtime's), blocks of
    ``iterations / PAIRED_ROUNDS`` calls each. The two rows' own p50s were taken minutes apart; on a
    machine whose load drifts their ratio can be off by a third, the paired one cannot.
    """
    eager = {r["batch"] for r in rows if r["component"] == "backbone" and r["runtime"] == "torch"}
    paired = [r for r in rows if r["component"] == "backbone" and r["runtime"] == "onnxruntime" and r["batch"] in eager]
    block = paired_block(ctx)
    for precision in dict.fromkeys(r["precision"] for r in paired):  # one session per precision, all its batches
        with graph_runner(ctx, "backbone", "onnxruntime", precision) as runner, ctx.torch["backbone"] as torch:
            for row in (r for r in paired if r["precision"] == precision):
                feeds = {"images": ctx.inputs.batch(row["batch"], ctx.bundle.preprocess)}
                rounds = alternating({"onnxruntime": wall_ms_call(runner, feeds), "torch": wall_ms_call(torch, feeds)},
                                     rounds=PAIRED_ROUNDS, block=block, warmup=ctx.warmup)
                row["speedup_vs_torch_paired"] = _spread([r["torch"] / r["onnxruntime"] for r in rounds], block)


def paired_block(ctx: Context) -> int:
    """Calls per runner per paired round: --iterations spread over ``PAIRED_ROUNDS`` rounds."""
    return max(1, ctx.iterations // PAIRED_ROUNDS)


def _spread(per_round: list[float], block: int) -> dict:
    """Median, lowest and highest of a per-round quantity, with the rounds and calls per block."""
    return {"median": float(np.median(per_round)), "lowest": min(per_round), "highest": max(per_round),
            "rounds": len(per_round), "block": block}


def device_mem_mb() -> float:
    """GPU memory in use (MB, whole device) in the current CUDA context: TensorRT's buffers persist
    after the timed iterations, so this includes their peak; other processes count too."""
    import pycuda.driver as cuda  # present wherever a TensorRT runner ran

    free, total = cuda.mem_get_info()
    return (total - free) / 2**20


def backbone(ctx: Context, runtime: str, precision: str) -> Iterator[dict]:
    """images [N, 3, S, S] -> features [N, D]; N = each --batch."""
    with graph_runner(ctx, "backbone", runtime, precision) as runner:
        limit = runner.max_batch
        for batch in ctx.batches:
            if limit is not None and batch > limit:
                yield skip("backbone", runtime, precision, f"batch {batch} is beyond the engine's profile (max "
                           f"{limit}): rebuild it with `pah-edge build-engine --batch 1,8,{batch}`", batch)
                continue
            feeds = {"images": ctx.inputs.batch(batch, ctx.bundle.preprocess)}
            yield runner_row(ctx, runner, feeds, items=batch, labels=_labels("backbone", runtime, precision, batch))


def head_generation(ctx: Context, runtime: str, precision: str) -> Iterator[dict]:
    """prototypes [C, c, s, s] -> head [C, D] for one task of C classes; items are classes."""
    feeds = {"prototypes": _prototypes(ctx)}
    with graph_runner(ctx, "generator", runtime, precision) as runner:
        yield runner_row(ctx, runner, feeds, items=ctx.classes,
                         labels=_labels("head-generation", runtime, precision, ctx.classes))


def learner_step(ctx: Context, runtime: str, precision: str) -> Iterator[dict]:
    """One prototype gradient of a C-class task on N cached features; N = each --batch."""
    rng = np.random.default_rng(0)
    with graph_runner(ctx, "learner_step", runtime, precision) as runner:
        for batch in ctx.batches:
            feeds = {"prototypes": _prototypes(ctx),
                     "features": rng.standard_normal((batch, ctx.bundle.feature_dim), dtype=np.float32),
                     "labels": np.arange(batch, dtype=np.int64) % ctx.classes}
            yield runner_row(ctx, runner, feeds, items=batch, labels=_labels("learner-step", runtime, precision, batch))


def predict_e2e(ctx: Context, runtime: str, precision: str | None) -> Iterator[dict]:
    """One image file -> decode, resize, preprocess, backbone, cached head, softmax: ``Device.predict_files``."""
    files = [ctx.inputs.frame]
    with _device(ctx, runtime, precision) as (device, runner):
        row = _against_backbone(ctx, "predict-e2e", runtime, precision, runner,
                                _timed(lambda: device.predict_files(files, task=BENCH_TASK, batch_size=1)))
    yield row


def predict_frame(ctx: Context, runtime: str, precision: str | None) -> Iterator[dict]:
    """One in-memory RGB frame (the file's pixels, 640 x 480 when synthetic) -> resize, preprocess,
    backbone, cached head, softmax: ``Device.predict``, as an application loop calls it."""
    frame = ctx.inputs.frame_pixels
    with _device(ctx, runtime, precision) as (device, runner):
        row = _against_backbone(ctx, "predict-frame", runtime, precision, runner,
                                _timed(lambda: device.predict(frame, task=BENCH_TASK)))
    yield row


def predict_stream(ctx: Context, runtime: str, precision: str | None) -> Iterator[dict]:
    """predict-frame's frame as a camera loop would hand it over, ``STREAM_FRAMES`` in a row through
    ``Device.predict_stream`` (the next frame resized while the backbone runs); ms per frame."""
    frames = [ctx.inputs.frame_pixels] * STREAM_FRAMES
    with _device(ctx, runtime, precision) as (device, runner):
        stream = _timed(lambda: list(device.predict_stream(frames, task=BENCH_TASK)))
        row = _against_backbone(ctx, "predict-stream", runtime, precision, runner,
                                lambda: stream() / STREAM_FRAMES)
    yield row


def predict_task_free(ctx: Context, runtime: str, precision: str | None) -> Iterator[dict]:
    """One image file, no task given: predict-e2e's path with the discriminant over every task's
    classes and the novelty score in place of one generated head."""
    if ctx.scratch.shared_stats() is None:
        raise Skipped(f"the bundle has no task-free statistics: add them with `pah-edge task-stats {ctx.bundle.path} --checkpoint RUN_DIR` (or --images DIR)")
    files = [ctx.inputs.frame]
    with _device(ctx, runtime, precision) as (device, runner):
        free = _timed(lambda: device.predict_files(files, batch_size=1))
        given = _timed(lambda: device.predict_files(files, task=BENCH_TASK, batch_size=1))
        row = timed_row(ctx, free, items=1, labels={**_labels("predict-task-free", runtime, precision, 1),
                                                     "runner": runner.name, "timing": "wall"})
        row["overhead_vs_task_given_paired"] = _overhead_taking_turns(ctx, free, given)
    yield row


@contextmanager
def _device(ctx: Context, runtime: str, precision: str | None):
    """(Device on the scratch bundle, its backbone runner of ``runtime`` and ``precision``), active."""
    if runtime == "torch":
        raise Skipped(DEVICE_PATH_ONLY)
    runner = graph_runner(ctx, "backbone", runtime, precision)
    device = Device(ctx.scratch, runtime="onnxruntime-cpu")
    # Device picks its backbone by runtime only; the runner of this precision replaces it before
    # activation, so everything else timed is the device's own path.
    device.predictor.backbone = runner
    with _quiet(), device:
        yield device, runner


def _timed(predict: Callable[[], object]) -> Callable[[], float]:
    """``predict`` as a call that returns its wall time, ms."""
    def call() -> float:
        start = time.perf_counter()
        predict()
        return (time.perf_counter() - start) * 1e3
    return call


def _against_backbone(ctx: Context, component: str, runtime: str, precision: str | None, runner: Runner,
                      call: Callable[[], float]) -> dict:
    """``call`` timed, then taking turns with the bare backbone for its overhead."""
    row = timed_row(ctx, call, items=1, labels={**_labels(component, runtime, precision, 1),
                                                 "runner": runner.name, "timing": "wall"})
    # The bare backbone's own row ran minutes earlier: take turns with it for the overhead.
    bare = wall_ms_call(runner, {"images": ctx.inputs.batch(1, ctx.bundle.preprocess)})
    row["overhead_vs_backbone_paired"] = _overhead_taking_turns(ctx, call, bare)
    return row


def _overhead_taking_turns(ctx: Context, call: Callable[[], float], other: Callable[[], float]) -> dict:
    """The spread over ``PAIRED_ROUNDS`` rounds of ``call``'s time / ``other``'s - 1, the two taking
    turns block by block so that drifting load hits both alike."""
    block = paired_block(ctx)
    rounds = alternating({"call": call, "other": other}, rounds=PAIRED_ROUNDS, block=block, warmup=1)
    return _spread([r["call"] / r["other"] - 1 for r in rounds], block)


def learn_task_run(ctx: Context, runtime: str, precision: str | None) -> Iterator[dict]:
    """``learn_task`` on the synthetic (or --images) task in the scratch copy; items are its images.

    learn-task picks its backbone itself (precision ``auto``): ONNX Runtime's FP32 graph, or on
    TensorRT the fastest engine built.
    """
    if runtime == "torch":
        raise Skipped(DEVICE_PATH_ONLY)
    if runtime == "tensorrt" and backbone_engine(ctx.scratch) is None:
        raise Skipped(f"no TensorRT engine in {ctx.bundle.layout.engines_dir}: build one with "
                      f"`pah-edge build-engine {ctx.bundle.path}`")
    images = ctx.classes * IMAGES_PER_CLASS
    runner_names = []

    def call() -> float:
        start = time.perf_counter()
        report = learn_task(ctx.scratch, ctx.inputs.learn_folder, name="bench-learned", runtime=runtime,
                            replace=True, progress=False)
        runner_names.append(report.runtime)
        return (time.perf_counter() - start) * 1e3

    with _quiet():
        row = timed_row(ctx, call, items=images, labels=_labels("learn-task", runtime, precision, images),
                        iterations=min(ctx.iterations, LEARN_TASK_RUNS), warmup=min(ctx.warmup, 1))
    yield {**row, "runner": runner_names[-1], "timing": "wall"}


COMPONENTS: dict[str, Callable[[Context, str, str], Iterator[dict]]] = {
    "backbone": backbone,
    "head-generation": head_generation,
    "learner-step": learner_step,
    "predict-e2e": predict_e2e,
    "predict-frame": predict_frame,
    "predict-stream": predict_stream,
    "predict-task-free": predict_task_free,
    "learn-task": learn_task_run,
}


def component_precisions(component: str, runtime: str, requested: tuple[str, ...]) -> tuple[str | None, ...]:
    """The precisions a component is timed at on ``runtime``.

    The backbone's are chosen (``requested``); the generator and learner step exist in FP32 only (the
    device runs them so whatever the backbone's precision); learn-task picks its own backbone
    (``auto``). The device path does not run on torch at all: one skip (None), not one per precision.
    """
    if runtime == "torch" and component in DEVICE_PATH:
        return (None,)
    if component in ("backbone", *PREDICTION, "predict-task-free"):
        return requested
    return ("auto",) if component == "learn-task" else ("fp32",)


def _labels(component: str, runtime: str, precision: str, batch: int) -> dict:
    return {"component": component, "runtime": runtime, "precision": precision, "batch": batch}


def _prototypes(ctx: Context) -> np.ndarray:
    shape = (ctx.classes, *ctx.bundle.prototype_shape)
    return 0.1 * np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


@contextmanager
def _quiet():
    """Predictor and learn_task log each start at INFO; timed dozens of times, that is noise."""
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
