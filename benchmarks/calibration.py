"""INT8 calibration benchmark: FP32 vs INT8 accuracy per task, cosine, size and ONNX Runtime CPU latency.

For every bundle (``--bundle PATH``, or a Split-Fashion-MNIST base trained here with ``--train-base
NAME[:EPOCHS]`` at 224 px, efficientnet_lite0 from its ImageNet weights with backbone_lr 0), this
runs ``pah_edge.calibration.calibrate_bundle`` on a private copy of the bundle with:

- calibration images: Fashion-MNIST train images of all ten classes (``--samples``, default 512);
- held-out images: the Fashion-MNIST test images of each registered task's classes
  (``--eval-per-class``, default 200), so every task's FP32 and INT8 accuracy, agreement and
  feature cosine are measured on the same images;
- a new task: ``--new-digits`` MNIST-5k digits (``--new-shots`` per class), learned as `learn-task`
  does with FP32 and with INT8 features (its own 20 % validation split).

The default options (entropy, per-channel, 7-bit weights) run on every bundle for each of
``--targets`` (the ONNX Runtime and the TensorRT INT8 form); ``--sweep NAME`` also tries every
method x per-channel/per-tensor, full-range weights and FP32 first/last layers on that backbone,
for the first target.
``--profile`` adds ONNX Runtime's per-operator times (SessionOptions.enable_profiling) of FP32 and
each target's INT8 model at batch 1, which show where an INT8 speed-up is won or lost.

    python benchmarks/calibration.py --train-base efficientnet_lite0:1 --train-base mobilenet_v3_large:2 \\
        --sweep efficientnet_lite0 --profile --work-dir /tmp/calib-work/bench --out benchmarks/results/calibration.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import numpy as np
from device_learning import _load_digits, _write_folder, train_base
from PIL import Image

from pah_edge.atomic import atomic_write_json
from pah_edge.bundle import Bundle
from pah_edge.calibration.calibrate import calibrate_bundle
from pah_edge.calibration.evaluate import cosine, latency_ms
from pah_edge.calibration.quantize import METHODS, TARGETS, QuantizeOptions
from pah_edge.machine import library_versions
from pah_edge.workstation.data.benchmarks import load_benchmark
from pah_edge.machine import machine_info
from pah_edge.preprocess import Preprocess

FASHION = "split-fashion-mnist"
NATIVE_PX = 28
BASE_LIMIT_PER_CLASS = 100
BASE_IMAGE_SIZE = 224
TARGET_DROP = 1.0  # points, on every task
TARGET_SPEEDUP = 1.5  # at batch 1 and 32
PROFILE_RUNS = 20
TOP_OPS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--bundle", type=Path, action="append", default=[],
                        help="An exported Split-Fashion-MNIST bundle.")
    parser.add_argument("--train-base", action="append", default=[], metavar="NAME[:EPOCHS]",
                        help="Train this backbone here (default 1 epoch, 100 images per class, 224 px) and export it.")
    parser.add_argument("--samples", type=int, default=512, help="Calibration images.")
    parser.add_argument("--eval-per-class", type=int, default=200, help="Held-out test images per class.")
    parser.add_argument("--new-digits", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--new-shots", type=int, default=40)
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                        help="INT8 forms to calibrate with the default options.")
    parser.add_argument("--sweep", action="append", default=[], metavar="NAME",
                        help="Also try every method x per-channel/per-tensor, full-range weights and FP32 "
                             "first/last layers on this backbone.")
    parser.add_argument("--profile", action="store_true", help="Per-operator ONNX Runtime times, batch 1.")
    parser.add_argument("--imagenet-check", action="store_true",
                        help="Also calibrate ImageNet efficientnet_lite0 as shipped (no PAH training) on foolbox's "
                             "ImageNet samples: feature cosine on held-out RGB images.")
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for all timings.")
    parser.add_argument("--work-dir", type=Path, default=None, help="Keep bases, bundles and images here.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/calibration.json"))
    args = parser.parse_args()
    if not args.bundle and not args.train_base:
        parser.error("give --bundle PATH and/or --train-base NAME[:EPOCHS]")

    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="calibration-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        report = run(args, work)
    atomic_write_json(args.out, report)
    print(markdown(report))
    print(f"\n-> {args.out}", file=sys.stderr)


def run(args, work: Path) -> dict:
    bundles, bases = [(p.name, p) for p in args.bundle], []
    for spec in args.train_base:
        backbone, _, epochs = spec.partition(":")
        path, base = train_base(backbone, work / "bases", epochs=int(epochs or 1), limit_per_class=BASE_LIMIT_PER_CLASS,
                                image_size=BASE_IMAGE_SIZE)
        bases.append(base)
        bundles.append((backbone, path))
    data = work / "data"
    calib, new_task = _calibration_and_new_task_images(data, args)
    rows, profiles = [], {}
    for label, path in bundles:
        source = Bundle.open(path)
        evaluation = _eval_images(source, data / f"eval-{label}", args.eval_per_class)
        defaults = [QuantizeOptions(target=t) for t in args.targets]
        configs = defaults + (_sweep(defaults[0]) if label in args.sweep else [])
        for i, options in enumerate(configs):
            copy = work / "runs" / f"{label}-{i}"
            shutil.rmtree(copy, ignore_errors=True)
            source.scratch_copy(copy, engines=False, int8=False)
            started = time.perf_counter()
            # Installed whatever it loses (the profile needs the model); the target is judged below.
            record = calibrate_bundle(copy, calib, options=options, samples=args.samples, eval_dir=evaluation,
                                      new_task=new_task if options in defaults else None, max_drop=100.0,
                                      latency_runs=args.latency_runs, threads=args.threads, progress=False)
            meets = {"accuracy": record.worst_drop_points <= TARGET_DROP,
                     "speed": min(record.speedup.values()) >= TARGET_SPEEDUP}
            rows.append({"bundle": label, "default": options in defaults, "seconds": time.perf_counter() - started,
                         "meets_targets": meets, **{k: v for k, v in record.to_dict().items() if k != "versions"}})
            print(f"{label} {_config(record.options)}: worst drop {record.worst_drop_points:+.2f} points, "
                  f"speed-up {record.speedup['1']:.2f}x / {record.speedup['32']:.2f}x", file=sys.stderr)
            if options in defaults and args.profile:
                opened = Bundle.open(copy)
                size = opened.preprocess.image_size
                if label not in profiles:  # FP32 once per bundle, then each target's INT8
                    profiles[label] = {"fp32": operator_times(opened.graph_path("backbone"), size, args)}
                profiles[label][f"int8 for {options.target}"] = operator_times(copy / "backbone.int8.onnx", size, args)
    imagenet = imagenet_check(work / "imagenet", args) if args.imagenet_check else None
    return {
        "command": "python " + " ".join(sys.argv),
        "date": date.today().isoformat(),
        "machine": machine_info(),
        "versions": library_versions(),
        "settings": {**{k: str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "bundle" else v
                        for k, v in vars(args).items()}, "bases": bases,
                     "targets": {"max_drop_points": TARGET_DROP, "min_speedup": TARGET_SPEEDUP}},
        "rows": rows,
        "profiles": profiles,
        "imagenet_check": imagenet,
    }


def _sweep(default: QuantizeOptions) -> list[QuantizeOptions]:
    """Every method per-channel and per-tensor (the default itself is skipped), then the default with
    full-range weights, with the first layer in INT8 and with the last in FP32; all for the default's target."""
    target = default.target
    options = [QuantizeOptions(target=target, method=m, per_channel=pc) for m in METHODS for pc in (True, False)]
    return [o for o in options if o != default] + [QuantizeOptions(target=target, reduce_range=False),
                                                   QuantizeOptions(target=target, fp32_first=False),
                                                   QuantizeOptions(target=target, fp32_last=True)]


def _config(options: dict) -> str:
    parts = [f"for {options['target']}", options["method"], "per-channel" if options["per_channel"] else "per-tensor",
             "7-bit weights" if options["reduce_range"] else "8-bit weights"]
    layers = [f"{name} layer {'FP32' if options.get(f'fp32_{name}') else 'INT8'}" for name in ("first", "last")]
    return ", ".join(parts + layers)


# --------------------------------------------------------------------------- images


def _fashion_tasks(per_class: int):
    return load_benchmark(FASHION, preprocess=Preprocess(image_size=NATIVE_PX), num_tasks=5, limit_per_class=per_class)


def _calibration_and_new_task_images(root: Path, args) -> tuple[Path, Path]:
    """CALIB/<class>/*.png (Fashion-MNIST train images, every class) and NEW/digit<d>/*.png (MNIST-5k)."""
    calib, new = root / "calib", root / "new-task"
    if not calib.is_dir():
        # More than samples / 10 train images per class are left after the 10 % validation carve.
        for task in _fashion_tasks(args.samples // 10 + 100):
            for label, name in enumerate(task.class_names):
                _write_pngs(calib / name.replace("/", "_"), task.train.images[task.train.labels == label])
    if not new.is_dir():
        digits = _load_digits(None)
        _write_folder(new, {str(d): digits[str(d)]["train"][: args.new_shots] for d in args.new_digits})
    return calib, new


def _eval_images(bundle: Bundle, root: Path, per_class: int) -> Path:
    """EVAL/<task>/<class>/*.png: the test images of each registered task's classes."""
    if root.is_dir():
        return root
    registered = {t.name: t.class_names for t in bundle.tasks()}
    for task in _fashion_tasks(per_class):
        if tuple(task.class_names) != registered.get(task.name):
            raise SystemExit(f"{bundle.path}: task {task.name} is {registered.get(task.name)}, not {task.class_names}; "
                             "pass a bundle trained on split-fashion-mnist with its default 5 tasks")
        for label, name in enumerate(task.class_names):
            _write_pngs(root / task.name / name.replace("/", "_"), task.test.images[task.test.labels == label])
    return root


def _write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")


# --------------------------------------------------------------------------- where the speed goes


def operator_times(model: Path, size: int, args) -> dict:
    """ONNX Runtime's ms per operator type at batch 1, and the model's latency at batch 1 and 32 (``size`` px)."""
    return {"ops_ms_batch1": op_profile(model, size, args.threads),
            "latency_ms": {str(b): latency_ms(model, size, b, runs=args.latency_runs, threads=args.threads)
                           for b in (1, 32)}}


def imagenet_check(work: Path, args) -> dict:
    """ImageNet efficientnet_lite0 as shipped (its own BatchNorm statistics), no PAH training.

    Calibrated with the defaults on foolbox's ImageNet samples 0-9 and compared with FP32 on samples
    10-19 (RGB, 224 px): the feature fidelity of the pipeline on a network whose BatchNorm was not
    re-estimated on a few grayscale classes.
    """
    import foolbox
    import onnxruntime as ort
    import torch

    from pah_edge.workstation.backbones import create_backbone
    from pah_edge.calibration.quantize import int8_onnx_from_fp32
    from pah_edge.calibration.reader import ImageFolderReader
    from pah_edge.device.images import BatchStream
    from pah_edge.bundle_layout import GRAPH_SPECS
    from pah_edge.export.onnx_export import GRAPH_TOLERANCES, onnx_from_torch

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    preprocess = Preprocess(image_size=BASE_IMAGE_SIZE)
    files = sorted((Path(foolbox.__file__).parent / "data").glob("imagenet_*"))
    calibrate_on, held_out = files[:10], files[10:]
    images = next(iter(BatchStream(held_out, preprocess, len(held_out))))[0]
    fp32 = work / "backbone.onnx"
    spec = GRAPH_SPECS["backbone"]
    onnx_from_torch(create_backbone("efficientnet_lite0", image_size=BASE_IMAGE_SIZE, pretrained=True),
                    [torch.from_numpy(images[:1])], fp32, input_names=spec.input_names, output_names=spec.output_names,
                    dynamic_axes=spec.dynamic_axes({"N"}), tolerance=GRAPH_TOLERANCES["backbone"])
    int8 = work / "backbone.int8.onnx"
    int8_onnx_from_fp32(fp32, int8, ImageFolderReader(calibrate_on, preprocess, samples=len(calibrate_on)),
                        QuantizeOptions(), work)
    a, b = (ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
            for m in (fp32, int8))
    return {"calibration_images": len(calibrate_on), "held_out_images": len(held_out),
            "cosine_mean": float(cosine(a, b).mean()), "cosine_min": float(cosine(a, b).min()),
            "rel_error": float(np.linalg.norm(b - a) / np.linalg.norm(a)),
            "latency_ms": {name: {str(batch): latency_ms(m, BASE_IMAGE_SIZE, batch, runs=args.latency_runs,
                                                         threads=args.threads) for batch in (1, 32)}
                           for name, m in (("fp32", fp32), ("int8", int8))}}


# --------------------------------------------------------------------------- per-operator profile


def op_profile(model: Path, image_size: int, threads: int, runs: int = PROFILE_RUNS) -> dict[str, float]:
    """ms per call spent in each operator type (ONNX Runtime's kernel times, batch 1), largest first."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        images = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size), dtype=np.float32)
        for _ in range(runs):
            session.run(None, {"images": images})
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1e3 / runs  # us -> ms, per call
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


# --------------------------------------------------------------------------- markdown


def markdown(report: dict) -> str:
    lines = ["| backbone | options | task | FP32 % | INT8 % | drop | agree % | cosine | MB FP32 / INT8 | "
             "ms b1 FP32 / INT8 (x) | ms b32 FP32 / INT8 (x) |", "|---" * 11 + "|"]
    for row in report["rows"]:
        lat, size = row["latency_ms"], row["size_mb"]
        speed = [f"{lat['fp32'][b]:.1f} / {lat['int8'][b]:.1f} ({row['speedup'][b]:.2f}x)" for b in ("1", "32")]
        tasks = [t for t in row["tasks"] if t["evaluated"]]
        if row["new_task"] is not None:
            new = row["new_task"]
            tasks.append({"task": f"new: {new['images']['val']} val images",
                          "fp32_accuracy": new["fp32"]["val_accuracy"], "int8_accuracy": new["int8"]["val_accuracy"]})
        for i, t in enumerate(tasks):
            first = i == 0
            drop = 100 * (t["fp32_accuracy"] - t["int8_accuracy"])
            agree = f"{100 * t['agreement']:.1f}" if "agreement" in t else ""
            cos = f"{t['cosine_mean']:.4f}" if "cosine_mean" in t else ""
            head = [row["bundle"], _config(row["options"])] if first else ["", ""]
            tail = [f"{size['fp32']:.1f} / {size['int8']:.1f}", *speed] if first else ["", "", ""]
            cells = [*head, t["task"], f"{100 * t['fp32_accuracy']:.2f}", f"{100 * t['int8_accuracy']:.2f}",
                     f"{drop:+.2f}", agree, cos, *tail]
            lines.append("| " + " | ".join(cells) + " |")
    for label, variants in report["profiles"].items():
        names = list(variants)
        ops = {op: sum(v["ops_ms_batch1"].get(op, 0) for v in variants.values())
               for v in variants.values() for op in list(v["ops_ms_batch1"])[:TOP_OPS]}
        lines += ["", f"{label}: ms per call by operator, batch 1 (ONNX Runtime profiling):", "",
                  "| operator | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {op} | " + " | ".join(f"{variants[n]['ops_ms_batch1'].get(op, 0):.2f}" for n in names) + " |"
                  for op in sorted(ops, key=lambda op: -ops[op])]
        lines.append("| all operators | " + " | ".join(f"{sum(variants[n]['ops_ms_batch1'].values()):.2f}"
                                                     for n in names) + " |")
        for batch in ("1", "32"):
            lines.append(f"| latency, batch {batch} (ms) | "
                         + " | ".join(f"{variants[n]['latency_ms'][batch]:.1f}" for n in names) + " |")
    check = report["imagenet_check"]
    if check:
        lat = check["latency_ms"]
        lines += ["", f"ImageNet efficientnet_lite0 as shipped, {check['held_out_images']} held-out RGB images: "
                      f"cosine {check['cosine_mean']:.4f} (min {check['cosine_min']:.4f}), relative error "
                      f"{check['rel_error']:.3f}; ms FP32 / INT8 batch 1 {lat['fp32']['1']:.1f} / "
                      f"{lat['int8']['1']:.1f}, "
                      f"batch 32 {lat['fp32']['32']:.1f} / {lat['int8']['32']:.1f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
