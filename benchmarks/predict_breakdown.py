"""Where end-to-end prediction's time goes beyond the backbone, per image file, at batch 1.

For each image file given (or the frame sizes in ``--synthetic``, written as JPEG quality 90 the way
`pah-edge bench` writes its synthetic frame), times in alternating order so that every part sees
the same machine: ``decode`` (open, JPEG draft, decode), ``resize`` (to the bundle's input, RGB),
``to_input`` (normalise, NCHW float32), ``backbone`` (ONNX Runtime CPU) and ``predict`` (the whole
``Predictor.predict`` call, registry and cached head included). ``overhead`` is predict / backbone - 1,
the quantity the bench issue bounds at 20 %.

    python benchmarks/predict_breakdown.py /tmp/bench-work/bundle-mnv3l-224 --synthetic 224 320 640x480 1280x720 \\
        --out benchmarks/results/predict_breakdown.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

from pah_edge.atomic import atomic_write_json
from pah_edge.bundle import Bundle
from pah_edge.machine import library_versions
from pah_edge.device.bench_inputs import BENCH_TASK, scratch_bundle, synthetic_images
from pah_edge.device.predict import Predictor
from pah_edge.machine import machine_info
from pah_edge.preprocess import resize_image, to_input

PARTS = ("decode", "resize", "to_input", "backbone", "predict")


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
        scratch = scratch_bundle(bundle, work, classes=10)
        with Predictor(scratch, runtime="onnxruntime-cpu") as predictor:
            for file in files:
                rows.append(breakdown(predictor, file, args.iterations))
                r = rows[-1]
                print(f"{r['file']} ({r['width']}x{r['height']}, {r['kb']:.0f} KB): "
                      + ", ".join(f"{p} {r['p50_ms'][p]:.2f}" for p in PARTS)
                      + f" ms; overhead {100 * r['overhead']:+.0f} %", file=sys.stderr)
    atomic_write_json(args.out, {"command": "python " + " ".join(sys.argv), "date": date.today().isoformat(),
                                 "machine": machine_info(), "versions": library_versions(),
                                 "bundle": str(args.bundle), "image_size": bundle.preprocess.image_size,
                                 "rows": rows})
    print(f"-> {args.out}", file=sys.stderr)


def _synthetic_frame(work: Path, size: str) -> Path:
    width, _, height = size.partition("x")
    width, height = int(width), int(height or width)
    path = work / f"frame-{width}x{height}.jpg"
    Image.fromarray(synthetic_images(1, height, width, classes=1, seed=1)[0]).save(path, quality=90)
    return path


def breakdown(predictor: Predictor, file: Path, iterations: int) -> dict:
    """Median ms of each part over ``iterations`` rounds, the parts timed in turn within a round."""
    pre = predictor.bundle.preprocess
    size = pre.image_size
    times: dict[str, list[float]] = {p: [] for p in PARTS}
    with Image.open(file) as probe:
        width, height = probe.size

    def decode():
        with Image.open(file) as img:
            img.draft(img.mode, (size, size))
            img.load()
            return img.copy()

    img = decode()
    pixels = resize_image(img, pre)
    batch = to_input(pixels[None], pre)
    steps = {"decode": decode, "resize": lambda: resize_image(img, pre), "to_input": lambda: to_input(pixels[None], pre),
             "backbone": lambda: predictor.backbone.infer({"images": batch}),
             "predict": lambda: predictor.predict([file], task=BENCH_TASK, batch_size=1)}
    for _ in range(10):  # warm-up
        for step in steps.values():
            step()
    for _ in range(iterations):
        for part, step in steps.items():
            start = time.perf_counter()
            step()
            times[part].append((time.perf_counter() - start) * 1e3)
    p50 = {part: float(np.median(t)) for part, t in times.items()}
    return {"file": file.name, "width": width, "height": height, "kb": file.stat().st_size / 1024, "p50_ms": p50,
            "overhead": p50["predict"] / p50["backbone"] - 1}


if __name__ == "__main__":
    main()
