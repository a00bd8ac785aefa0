"""Where prediction's time goes beyond the backbone, per image file and per in-memory frame, at batch 1.

For each image file given (or the frame sizes in ``--synthetic``, written as JPEG quality 90 the way
`pah-edge bench` writes its synthetic frame), times in alternating order so that every part sees
the same machine: ``decode`` (open, JPEG draft, decode), ``resize`` (the decoded file to the bundle's
input), ``frame`` (the same picture as a full-size frame in memory: ``frame_image``), ``to_input``
(normalise, NCHW float32), ``scores`` (the task-free rule over every task), ``backbone`` (ONNX Runtime
CPU) and the whole calls: ``predict`` (``Predictor.predict`` of the file) and ``predict_frame``
(``Device.predict`` of the frame), both with the bench task given, registry and cached head included.
``overhead`` and ``frame_overhead`` are their ratios to the backbone minus 1, the quantities the
frame issue bounds at 30 % and 10 %.

The single-threaded parts are also timed in CPU time of the calling thread (``cpu_ms``): on a machine
whose other jobs take turns on the cores, wall time counts their turns too, CPU time does not. And
each of them right after a backbone call and then again at once (``after_backbone_vs_hot_ms``): what
a frame pays, as the backbone's weights and activations have pushed its code and data out of the
caches, against the same work back to back.

    python benchmarks/predict_breakdown.py /tmp/frames-demo/bundle --synthetic 640x480 \\
        --out benchmarks/results/predict_breakdown.json
"""

from __future__ import annotations

import pah_edge.blas_threads  # noqa: F401  (first, as in the pah-edge command: one BLAS thread)

import argparse
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

from pah_edge.atomic import atomic_write_json
from pah_edge.bundle import Bundle
from pah_edge.device.api import Device
from pah_edge.device.bench_inputs import BENCH_TASK, prepare_inputs, scratch_bundle, synthetic_images
from pah_edge.machine import library_versions, machine_info
from pah_edge.preprocess import frame_image, resize_image, to_input

PARTS = ("decode", "resize", "frame", "to_input", "scores", "backbone", "predict", "predict_frame")
SINGLE_THREADED = ("decode", "resize", "frame", "to_input", "scores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("images", type=Path, nargs="*", help="Image files to time.")
    parser.add_argument("--synthetic", nargs="*", default=[], metavar="WxH",
                        help="Also synthetic JPEG frames of these sizes (N means NxN).")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/predict_breakdown.json"))
    args = parser.parse_args()

    bundle = Bundle.open(args.bundle)
    rows = []
    with tempfile.TemporaryDirectory(prefix="predict-breakdown-") as tmp:
        work = Path(tmp)
        files = list(args.images) + [_synthetic_frame(work, size) for size in args.synthetic]
        if not files:
            parser.error("give image files and/or --synthetic sizes")
        scratch = scratch_bundle(bundle, work, prepare_inputs(bundle.preprocess, None, work, classes=10), classes=10)
        with Device(scratch, runtime="onnxruntime-cpu") as device:
            for file in files:
                rows.append(breakdown(device, file, args.iterations))
                r = rows[-1]
                print(f"{r['file']} ({r['width']}x{r['height']}, {r['kb']:.0f} KB): "
                      + ", ".join(f"{p} {r['p50_ms'][p]:.2f}" for p in PARTS)
                      + f" ms; overhead {100 * r['overhead']:+.0f} %, frame {100 * r['frame_overhead']:+.0f} %; CPU "
                      + ", ".join(f"{p} {r['cpu_ms'][p]:.2f}" for p in SINGLE_THREADED)
                      + "; CPU after a backbone call / back to back: "
                      + ", ".join(f"{p} {t['after_backbone']:.2f} / {t['hot']:.2f}"
                                  for p, t in r["after_backbone_vs_hot_ms"].items()), file=sys.stderr)
    atomic_write_json(args.out, {"command": "python " + " ".join(sys.argv), "date": date.today().isoformat(),
                                 "machine": machine_info(), "versions": library_versions(),
                                 "bundle": str(args.bundle), "load_average": os.getloadavg(),
                                 "image_size": bundle.preprocess.image_size, "resize": bundle.preprocess.resize,
                                 "rows": rows})
    print(f"-> {args.out}", file=sys.stderr)


def _synthetic_frame(work: Path, size: str) -> Path:
    width, _, height = size.partition("x")
    width, height = int(width), int(height or width)
    path = work / f"frame-{width}x{height}.jpg"
    Image.fromarray(synthetic_images(1, height, width, classes=1, seed=1)[0]).save(path, quality=90)
    return path


def breakdown(device: Device, file: Path, iterations: int) -> dict:
    """Median wall and CPU ms of each part over ``iterations`` rounds, the parts timed in turn within a round."""
    predictor = device.predictor
    pre = predictor.bundle.preprocess
    size = pre.image_size
    with Image.open(file) as probe:
        width, height = probe.size
        frame = np.asarray(probe.convert("RGB"))

    def decode():
        with Image.open(file) as img:
            img.draft(img.mode, (size, size))
            img.load()
            return img.copy()

    img = decode()
    pixels = resize_image(img, pre)
    batch = to_input(pixels[None], pre)
    features = predictor.backbone.infer({"images": batch})["features"]
    rule = predictor.rule()
    steps = {"decode": decode, "resize": lambda: resize_image(img, pre), "frame": lambda: frame_image(frame, pre),
             "to_input": lambda: to_input(pixels[None], pre), "scores": lambda: rule.scores(features),
             "backbone": lambda: predictor.backbone.infer({"images": batch}),
             "predict": lambda: predictor.predict([file], task=BENCH_TASK, batch_size=1),
             "predict_frame": lambda: device.predict(frame, task=BENCH_TASK)}
    walls: dict[str, list[float]] = {p: [] for p in PARTS}
    cpus: dict[str, list[float]] = {p: [] for p in PARTS}
    for _ in range(10):  # warm-up
        for step in steps.values():
            step()
    for _ in range(iterations):
        for part, step in steps.items():
            start, cpu = time.perf_counter(), time.thread_time()
            step()
            walls[part].append((time.perf_counter() - start) * 1e3)
            cpus[part].append((time.thread_time() - cpu) * 1e3)
    p50 = {part: float(np.median(t)) for part, t in walls.items()}
    return {"file": file.name, "width": width, "height": height, "kb": file.stat().st_size / 1024, "p50_ms": p50,
            "cpu_ms": {part: float(np.median(cpus[part])) for part in SINGLE_THREADED},
            "after_backbone_vs_hot_ms": _after_backbone_vs_hot({p: steps[p] for p in SINGLE_THREADED},
                                                               steps["backbone"], iterations),
            "overhead": p50["predict"] / p50["backbone"] - 1, "frame_overhead": p50["predict_frame"] / p50["backbone"] - 1}


def _after_backbone_vs_hot(parts: dict, backbone, iterations: int) -> dict:
    """Median CPU ms of each part run right after a backbone call, as a frame meets it, and back to back
    (its code and data left in the caches by its previous run)."""
    after: dict[str, list[float]] = {p: [] for p in parts}
    hot: dict[str, list[float]] = {p: [] for p in parts}
    for _ in range(iterations):
        for part, step in parts.items():
            backbone()
            for times in (after[part], hot[part]):
                cpu = time.thread_time()
                step()
                times.append((time.thread_time() - cpu) * 1e3)
    return {part: {"after_backbone": float(np.median(after[part])), "hot": float(np.median(hot[part]))}
            for part in parts}


if __name__ == "__main__":
    main()
