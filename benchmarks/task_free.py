"""Task-free prediction benchmark: the shipped rule against task given, max softmax and class means.

For each base (``--train-base BACKBONE``: Split-Fashion-MNIST, 5 tasks of 2 classes, exported with
its task-free statistics; efficientnet_lite0 keeps its ImageNet weights frozen) and each seed, the
device learns two tasks with ``learn_task`` exactly as ``pah-edge learn-task`` does: digits 0-4
(MNIST-5k) and letters A-F (rendered with the DejaVu fonts, random font, size, offset and rotation),
``--shots`` images per class drawn by the seed. Then, on held-out images (100 per Fashion class from
the Fashion test set, 50 per digit and letter, none used for any choice), right = task and label
both right:

- task given: each task's generated head (``predict --task``);
- max softmax: today's old ``--any-task`` rule, the (task, class) of highest head softmax;
- centred nearest class mean over all classes (cosine, features centred on the workstation mean);
- shipped: ``Predictor.predict`` without a task (pah_edge.task_free), with --novelty-threshold off.

Novelty AUROC, measured before the letters are learned (tasks: Fashion + digits 0-4): (a) letters,
a domain never learned, and (b) digits 5-9, unseen classes of a learned domain, against held-out
images of the learned classes. Also: the share of held-out known images the bundle's threshold calls
unknown, bytes stored per task, and task-free vs task-given prediction time at batch 1.

    python benchmarks/task_free.py --train-base efficientnet_lite0 --train-base mobilenet_v3_small \\
        --seeds 0 1 2 --out benchmarks/results/task_free.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from device_learning import _load_digits, train_base  # the same bases as the device-learning benchmark

from pah_edge.atomic import atomic_write_json
from pah_edge.bundle import Bundle
from pah_edge.workstation.data.benchmarks import load_benchmark
from pah_edge.device.bundle_runners import features
from pah_edge.device.learner import learn_task
from pah_edge.device.predict import Predictor, softmax
from pah_edge.machine import machine_info
from pah_edge.preprocess import Preprocess, load_image, to_input
from pah_edge.task_free import transform

FONTS = Path("/usr/share/fonts/truetype/dejavu")
LETTERS = "ABCDEF"
HELD_FASHION, HELD_NEW = 100, 50
IMAGE_SIZES = {"efficientnet_lite0": 128, "mobilenet_v3_small": 32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--train-base", action="append", required=True, metavar="BACKBONE")
    parser.add_argument("--base-epochs", type=int, default=1)
    parser.add_argument("--base-limit-per-class", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, default=60, help="Images per class of each device task.")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/task_free.json"))
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="task-free-"))
    digits = _load_digits(None)
    fashion = _fashion_test()
    rows = []
    for backbone in args.train_base:
        size = IMAGE_SIZES.get(backbone, 64)
        path, base = train_base(backbone, work, epochs=args.base_epochs, limit_per_class=args.base_limit_per_class,
                                image_size=size)
        for seed in args.seeds:
            rows.append({"base": base, "seed": seed,
                         **bench_seed(path, digits, fashion, seed, args.shots, work / f"{backbone}-{seed}")})
            print(rows[-1]["summary"], file=sys.stderr, flush=True)
    report = {"command": "python " + " ".join(sys.argv), "date": date.today().isoformat(),
              "machine": machine_info(), "rows": rows}
    atomic_write_json(args.out, report)
    print(f"-> {args.out}", file=sys.stderr)


def bench_seed(base_bundle: Path, digits: dict, fashion: dict, seed: int, shots: int, work: Path) -> dict:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    bundle_dir = Bundle.open(base_bundle).scratch_copy(work / "bundle").path
    rng = np.random.default_rng(seed)
    letters = _letters(shots + HELD_NEW, rng)
    learn, held = {}, {}
    for d in range(10):
        pool = digits[str(d)]["train"]
        order = rng.permutation(len(pool))
        learn[f"d{d}"], held[f"d{d}"] = pool[order[:shots]], pool[order[shots:shots + HELD_NEW]]
    for name, images in letters.items():
        learn[name], held[name] = images[:shots], images[shots:]
    _write(work / "digits", {k: learn[f"d{k}"] for k in range(5)}, "d")
    _write(work / "letters", {c: learn[c] for c in LETTERS}, "")
    bundle = Bundle.open(bundle_dir)
    learned_digits = learn_task(bundle, work / "digits", name="digits", runtime="onnxruntime-cpu", progress=False)
    queries = _write(work / "held", {**{f"fashion-{k}": v for k, v in fashion.items()}, **held}, "")

    with Predictor(bundle, runtime="onnxruntime-cpu") as predictor:
        novelty = {group: np.array([p["novelty"] for p in predictor.predict(files)]) for group, files in {
            "known": queries["fashion"] + queries["digits_learned"], "domain": queries["letters"],
            "classes": queries["digits_unseen"]}.items()}
        threshold = bundle.shared_stats().threshold
    learned_letters = learn_task(bundle, work / "letters", name="letters", runtime="onnxruntime-cpu", progress=False)
    evaluated = queries["fashion"] + queries["digits_learned"] + queries["letters"]
    truth = [_truth(bundle, f) for f in evaluated]
    with Predictor(bundle, runtime="onnxruntime-cpu") as predictor:
        shipped = predictor.predict(evaluated, novelty_threshold=np.inf)
        feats = np.concatenate([features(predictor.backbone, to_input(
            np.stack([load_image(f, bundle.preprocess) for f in evaluated[i:i + 64]]), bundle.preprocess))
            for i in range(0, len(evaluated), 64)])
        heads = {r.name: predictor.head(r) for r in bundle.tasks()}
        latency = _latency(predictor, evaluated[0])
    records = bundle.tasks()
    given = [(t, bundle.task(t).class_names[int(np.argmax(f @ heads[t].T))]) for f, (t, _) in zip(feats, truth)]
    probs = {r.name: softmax(feats @ heads[r.name].T) for r in records}
    best = [max(records, key=lambda r: probs[r.name][i].max()) for i in range(len(evaluated))]
    max_softmax = [(r.name, r.class_names[int(probs[r.name][i].argmax())]) for i, r in enumerate(best)]
    ncm = _nearest_mean(bundle, feats, records)
    rules = {"task_given": given, "max_softmax": max_softmax, "nearest_class_mean": ncm,
             "shipped": [(p["task"], p["label"]) for p in shipped]}
    groups = {"fashion": [f.parent.name.startswith("fashion") for f in evaluated],
              "digits": [f.parent.name.startswith("d") for f in evaluated],
              "letters": [f.parent.name in LETTERS for f in evaluated]}
    accuracy = {rule: {"all": _acc(answers, truth), "class_balanced": _balanced(answers, truth),
                       **{g: _acc(answers, truth, mask) for g, mask in groups.items()}}
                for rule, answers in rules.items()}
    result = {
        "accuracy": accuracy,
        "auroc": {"unseen_domain": _auroc(novelty["known"], novelty["domain"]),
                  "unseen_classes": _auroc(novelty["known"], novelty["classes"])},
        "known_called_unknown": float(np.mean(novelty["known"] > threshold)),
        "unseen_domain_called_unknown": float(np.mean(novelty["domain"] > threshold)),
        "bytes_per_task": {r.name: {"prototypes": r.bytes, "statistics": (bundle_dir / r.stats_file).stat().st_size,
                                    "classes": len(r.class_names)} for r in records},
        "feature_dim": bundle.feature_dim,
        "learn_task_val_accuracy": {"digits": learned_digits.val_accuracy,
                                    "letters": learned_letters.val_accuracy},
        "predict_ms_batch1": latency,
        "held_out_images": len(evaluated),
    }
    result["summary"] = (f"{bundle.manifest['backbone']} seed {seed}: " + ", ".join(
        f"{rule} {100 * a['all']:.1f} ({100 * a['class_balanced']:.1f} class-balanced)" for rule, a in accuracy.items()) +
        f"; AUROC {result['auroc']['unseen_domain']:.3f} / {result['auroc']['unseen_classes']:.3f}")
    return result


def _latency(predictor: Predictor, file: Path, rounds: int = 40) -> dict:
    """Median ms of predict() of one file, task-free and task-given taking turns."""
    times = {"task_free": [], "task_given": []}
    task = predictor.bundle.tasks()[0].name
    for i in range(rounds + 5):
        for mode, kw in (("task_free", {}), ("task_given", {"task": task})):
            start = time.perf_counter()
            predictor.predict([file], **kw)
            if i >= 5:
                times[mode].append(1000 * (time.perf_counter() - start))
    medians = {k: float(np.median(v)) for k, v in times.items()}
    ratios = np.array(times["task_free"]) / np.array(times["task_given"])
    return {**medians, "overhead_median": float(np.median(ratios) - 1)}


def _nearest_mean(bundle: Bundle, feats: np.ndarray, records) -> list[tuple[str, str]]:
    """Cosine nearest class mean over every class, features centred on the workstation's mean feature."""
    shared = bundle.shared_stats()
    means, names = [], []
    for r in records:
        means.append(bundle.load_task_stats(r).means - shared.mean)
        names += [(r.name, c) for c in r.class_names]
    means = np.concatenate(means)
    z = transform(feats, shared.mean)
    cos = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
    return [names[k] for k in cos.argmax(1)]


def _truth(bundle: Bundle, file: Path) -> tuple[str, str]:
    folder = file.parent.name
    if folder.startswith("fashion-"):
        label = int(folder.split("-")[1])
        task = f"task{label // 2}"
        return task, bundle.task(task).class_names[label % 2]
    return ("digits", folder) if folder.startswith("d") else ("letters", folder)


def _acc(answers, truth, mask=None) -> float:
    right = np.array([a == t for a, t in zip(answers, truth)])
    return float(right[np.asarray(mask)].mean() if mask is not None else right.mean())


def _balanced(answers, truth) -> float:
    """Mean over classes of each class's accuracy: 10 Fashion classes weigh as much as 10 digits,
    whatever the held-out images per class."""
    right = np.array([a == t for a, t in zip(answers, truth)])
    return float(np.mean([right[[t == c for t in truth]].mean() for c in dict.fromkeys(truth)]))


def _auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(novelty of an unknown image > of a known one), ties counted half (Mann-Whitney)."""
    scores = np.concatenate([known, unknown])
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="mergesort")] = np.arange(1, len(scores) + 1)
    return float((ranks[len(known):].sum() - len(unknown) * (len(unknown) + 1) / 2) / (len(known) * len(unknown)))


def _fashion_test() -> dict[int, np.ndarray]:
    """HELD_FASHION Fashion-MNIST test images per class (the bases train on the train split only)."""
    tasks = load_benchmark("split-fashion-mnist", preprocess=Preprocess(image_size=28), seed=0, val_fraction=0.1)
    out = {}
    for t, task in enumerate(tasks):
        for label in range(2):
            out[2 * t + label] = task.test.images[task.test.labels == label][:HELD_FASHION]
    return out


def _letters(per_class: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rendered capital letters, 28 x 28 white on black: random DejaVu font, size, offset, rotation."""
    fonts = sorted(FONTS.glob("*.ttf"))
    if not fonts:
        raise SystemExit(f"no fonts in {FONTS}: apt-get install fonts-dejavu-core")
    out = {}
    for letter in LETTERS:
        images = []
        for _ in range(per_class):
            font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.integers(16, 24)))
            image = Image.new("L", (28, 28))
            ImageDraw.Draw(image).text((14 + int(rng.integers(-3, 4)), 14 + int(rng.integers(-3, 4))), letter,
                                       fill=255, font=font, anchor="mm")
            images.append(np.asarray(image.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)))
        out[letter] = np.stack(images)
    return out


def _write(root: Path, class_images: dict, prefix: str) -> dict[str, list[Path]]:
    """PNG folders root/<prefix><class>/; returns the files per group (fashion, digits, letters)."""
    groups: dict[str, list[Path]] = {"fashion": [], "digits_learned": [], "digits_unseen": [], "letters": []}
    for name, images in class_images.items():
        folder = root / f"{prefix}{name}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(np.asarray(image).squeeze()).save(folder / f"{i:04d}.png")
        files = sorted(folder.glob("*.png"))
        key = folder.name
        group = ("fashion" if key.startswith("fashion") else "letters" if key in LETTERS
                 else "digits_learned" if int(key[1:]) < 5 else "digits_unseen")
        groups[group] += files
    return groups


if __name__ == "__main__":
    main()
