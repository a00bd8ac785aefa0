"""Acceptance run for a new device: one command, one JSON report with pass/fail per step.

On a CUDA machine with TensorRT it builds the FP16 and INT8 backbone engines, checks TensorRT
against ONNX Runtime (``pah-edge verify``), runs learn-task and predict on both runtimes and
``pah-edge bench --runtime all``; elsewhere the TensorRT steps are "skipped" with the reason. Each
step calls the library function behind its CLI command, in a scratch copy of BUNDLE (the bundle is
never written). Exit code 0 when no step failed, 1 otherwise; bad input is one ``error:`` line.

    python benchmarks/device_acceptance.py bundle --out report.json [--images DIR]

``--images DIR``: real images for learn-task, predict and bench (classes assigned in turn, as
``bench`` does) and, when the bundle has no INT8 model calibrated for TensorRT, for calibrating one
(in the copy). Without it the images are synthetic and the INT8 engine needs an installed model.
Report: ``{"passed", "seconds", "machine", "bundle", "steps": [{"step", "status", "reason",
"seconds", "detail"}], "bench"}``; status is "pass", "fail" or "skipped".
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from pah_edge.atomic import atomic_write_json
from pah_edge.bundle import Bundle
from pah_edge.device.bench import BenchConfig, run_bench
from pah_edge.device.bench_inputs import DEFAULT_CLASSES, prepare_inputs
from pah_edge.device.learner import learn_task
from pah_edge.device.predict import Predictor, image_files
from pah_edge.bundle_layout import engine_record
from pah_edge.device.runtimes import tensorrt_problem
from pah_edge.errors import PahEdgeError
from pah_edge.export.tensorrt_build import build_engines
from pah_edge.export.verify import verify_bundle
from pah_edge.machine import machine_info

RUNTIMES = ("onnxruntime", "tensorrt")


class Skip(Exception):
    """A step that cannot run here; the message says why."""


class Acceptance:
    """Runs steps in order and records each as pass, fail (with the error) or skipped (with the reason)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def run(self, name: str, step, *, skip_reason: str | None = None):
        """Record ``step()``'s outcome under ``name``; returns its detail (None unless it passed)."""
        start, detail, status, reason = time.perf_counter(), None, "pass", skip_reason
        if skip_reason is not None:
            status = "skipped"
        else:
            try:
                detail = step()
            except Skip as exc:
                status, reason = "skipped", str(exc)
            except Exception as exc:  # an acceptance run records what broke and goes on with the rest
                status, reason = "fail", f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, PahEdgeError):  # a bug, not a setup problem: keep where it happened
                    detail = {"traceback": traceback.format_exc(limit=-4).splitlines()}
        self.steps.append({"step": name, "status": status, "reason": reason,
                           "seconds": round(time.perf_counter() - start, 2), "detail": detail})
        print(f"{status:>7}  {name}" + (f": {reason}" if reason else ""), flush=True)
        return detail if status == "pass" else None

    def failed(self) -> bool:
        return any(s["status"] == "fail" for s in self.steps)


def run_acceptance(bundle_dir: Path, work: Path, *, images: Path | None = None, bench_iterations: int = 20) -> dict:
    """Every step on a copy of ``bundle_dir`` made in ``work``; returns the report (see the module docstring)."""
    started = time.perf_counter()
    bundle = Bundle.open(bundle_dir)  # BundleError (one line, exit 1) for a missing or altered bundle
    inputs = prepare_inputs(bundle.preprocess, images, work, classes=bundle.fixed_num_classes or DEFAULT_CLASSES)
    copy = bundle.scratch_copy(work / "bundle", engines=False).path
    trt_problem = tensorrt_problem()
    acc = Acceptance()

    acc.run("verify onnxruntime", lambda: _verify(copy, "onnxruntime"))
    acc.run("build-engine fp16", lambda: _build(copy, "fp16"), skip_reason=trt_problem)
    acc.run("build-engine int8", lambda: _build_int8(copy, images), skip_reason=trt_problem)
    acc.run("verify tensorrt", lambda: _verify(copy, "tensorrt"), skip_reason=trt_problem)
    reference = None  # ONNX Runtime's predictions, which TensorRT's are compared with
    for runtime in RUNTIMES:
        why = trt_problem if runtime == "tensorrt" else None
        acc.run(f"learn-task {runtime}", lambda r=runtime: _learn(copy, inputs.learn_folder, r), skip_reason=why)
        predicted = acc.run(f"predict {runtime}", lambda r=runtime: _predict(copy, inputs.learn_folder, r, reference),
                            skip_reason=why)
        reference = reference or (predicted or {}).get("results")
    bench = acc.run("bench --runtime all", lambda: _bench(copy, images, bench_iterations))
    acc.run("bench tensorrt rows", lambda: _bench_rows(bench, "tensorrt"), skip_reason=trt_problem)
    return {"passed": not acc.failed(), "seconds": round(time.perf_counter() - started, 1),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "bundle": str(bundle.path),
            "inputs": inputs.source, "machine": machine_info(), "steps": acc.steps, "bench": bench}


def _verify(bundle_dir: Path, runtime: str) -> dict:
    """`pah-edge verify`: ``onnxruntime`` passes when every compared pair is within tolerance (hashes
    checked first); ``tensorrt`` needs every engine to have run and matched ONNX Runtime (or PyTorch)."""
    report = verify_bundle(bundle_dir)
    rows = [r for r in report.rows if r["runtime"].startswith("tensorrt") == (runtime == "tensorrt")]
    detail = {"reference": report.reference, "runtimes": report.runtimes,
              "worst": {f"{r['graph']} on {r['runtime']} {r['output']}": {"abs": r["abs"], "rel": r["rel"], "ok": r["ok"]}
                        for r in rows}}
    if runtime == "tensorrt":
        not_run = {k: v for k, v in report.runtimes.items() if k.startswith("tensorrt") and v != "ok"}
        if not_run or not rows:
            raise PahEdgeError(f"TensorRT engines did not run: {not_run or 'no engines'}")
    bad = [k for k, v in detail["worst"].items() if not v["ok"]]
    if bad:
        raise PahEdgeError(f"beyond tolerance: {', '.join(bad)}")
    return detail


def _build(bundle_dir: Path, precision: str) -> dict:
    """`pah-edge build-engine --precision P`; the detail is the engine's build record."""
    (engine,) = build_engines(bundle_dir, precision=precision)
    return json.loads(engine_record(engine).read_text())


def _build_int8(bundle_dir: Path, images: Path | None) -> dict:
    """The INT8 engine from the bundle's TensorRT-form Q/DQ model, calibrated here from ``images`` if it has none."""
    target = Bundle.open(bundle_dir, verify=False).int8_target()
    if target != "tensorrt":
        have = "an INT8 model calibrated for ONNX Runtime" if target else "no INT8 model"
        if images is None:
            raise Skip(f"the bundle has {have}: pass --images DIR to calibrate one for TensorRT here, or run "
                       "`pah-edge calibrate BUNDLE --images DIR --target tensorrt` first")
        _calibrate(bundle_dir, images)
    return _build(bundle_dir, "int8")


def _calibrate(bundle_dir: Path, images: Path) -> None:
    from pah_edge.calibration.calibrate import DEFAULT_SAMPLES, calibrate_bundle
    from pah_edge.calibration.quantize import QuantizeOptions

    samples = min(DEFAULT_SAMPLES, len(image_files([images])))
    report = calibrate_bundle(bundle_dir, images, options=QuantizeOptions(target="tensorrt"), samples=samples,
                              progress=False)
    if not report.passed:
        raise PahEdgeError(f"INT8 calibration lost {report.worst_drop_points:.2f} points; no INT8 engine")


def _learn(bundle_dir: Path, folder: Path, runtime: str) -> dict:
    """`pah-edge learn-task` on ``runtime`` (the FP16 engine on TensorRT), as task ``acceptance-<runtime>``."""
    return learn_task(Bundle.open(bundle_dir), folder, name=f"acceptance-{runtime}", runtime=runtime,
                      progress=False).to_dict()


def _predict(bundle_dir: Path, folder: Path, runtime: str, reference: list[dict] | None) -> dict:
    """`pah-edge predict` over every image of ``folder`` on ``runtime``: one result per image, and the share
    of images answered with the same task and label as ``reference`` (ONNX Runtime's), when given."""
    files = image_files([folder])
    with Predictor(Bundle.open(bundle_dir), runtime=runtime) as predictor:
        results = predictor.predict(files)
    if len(results) != len(files):
        raise PahEdgeError(f"{len(results)} predictions for {len(files)} images")
    same = None if reference is None else sum(
        (a["task"], a["label"]) == (b["task"], b["label"]) for a, b in zip(results, reference)) / len(results)
    return {"images": len(results), "agreement_with_onnxruntime": same, "results": results}


def _bench(bundle_dir: Path, images: Path | None, iterations: int) -> dict:
    """`pah-edge bench --runtime all --batch 1,8` with fewer iterations, to stay within minutes."""
    config = BenchConfig(batches=(1, 8), iterations=iterations, warmup=max(1, iterations // 10), images=images)
    return run_bench(bundle_dir, config).to_dict()


def _bench_rows(bench: dict | None, runtime: str) -> dict:
    if bench is None:
        raise PahEdgeError("bench failed (see its step)")
    rows = [r for r in bench["results"] if r["runtime"] == runtime]
    if not rows:
        reasons = "; ".join(f"{s['component']}: {s['reason']}" for s in bench["skipped"] if s["runtime"] == runtime)
        raise PahEdgeError(f"no {runtime} rows ({reasons or 'nothing ran'})")
    return {f"{r['component']} {r['precision']} batch {r['batch']}": r["p50_ms"] for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="Bundle directory written by `pah-edge export` (not written).")
    parser.add_argument("--out", type=Path, required=True, help="Where the JSON report goes.")
    parser.add_argument("--images", type=Path, help="Real images for the steps and for INT8 calibration.")
    parser.add_argument("--bench-iterations", type=int, default=20, help="Timed iterations per bench row.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.bench_iterations < 1:
            raise PahEdgeError(f"--bench-iterations must be >= 1; got {args.bench_iterations}")
        with tempfile.TemporaryDirectory(prefix="pah-edge-acceptance-") as work:
            report = run_acceptance(args.bundle, Path(work), images=args.images,
                                    bench_iterations=args.bench_iterations)
    except PahEdgeError as exc:  # bad input: before any step ran
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    atomic_write_json(args.out, report)
    print(f"{'passed' if report['passed'] else 'FAILED'} in {report['seconds']:.0f} s -> {args.out}")
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
