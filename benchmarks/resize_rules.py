"""Do the two resize rules give a model the same answers on camera-sized frames, and how fast are they?

Test images the demo's bundle never learned (MNIST-5k's test split as the demo splits it, Fashion-MNIST's
official test set), 28 x 28, become camera frames: each is enlarged bilinearly to a 480 x 480 square in
the middle of a black 640 x 480 frame, so every frame is shrunk on its way to the network, the path
where the rules differ. Each rule's frames are predicted by the bundle (`Predictor.predict_images`) with
the true task given and task-free. The model was trained on 28-px images enlarged to its input, where
both rules give the same pixels (test_preprocess.py), so the accuracies compare the rules' shrinking
alone. Resize times (CPU time per 640 x 480 frame) are medians over rounds that take turns between the rules.

    python benchmarks/resize_rules.py /tmp/frames-demo-after/bundle --out benchmarks/results/resize_rules.json
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

from pah_edge.atomic import atomic_write_json
from pah_edge.bundle import Bundle
from pah_edge.workstation.data import load_benchmark
from pah_edge.demo import HELD_OUT_PER_CLASS, NEW_PER_CLASS, NEW_TASK
from pah_edge.device.predict import Predictor
from pah_edge.machine import machine_info
from pah_edge.preprocess import RESIZE_RULES, Preprocess, frame_image

FRAME = (640, 480)  # px, width x height


def camera_frame(image: np.ndarray) -> np.ndarray:
    """uint8 [28, 28, 3] enlarged to the frame's height, centred on black: uint8 [480, 640, 3]."""
    width, height = FRAME
    frame = np.zeros((height, width, 3), np.uint8)
    left = (width - height) // 2
    frame[:, left:left + height] = np.asarray(Image.fromarray(image).resize((height, height), Image.Resampling.BILINEAR))
    return frame


def test_images(bundle: Bundle, per_class: int) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """(camera frames, their (task, class)): every digit of the demo's test split, ``per_class`` clothes."""
    raw = Preprocess(image_size=28)
    # The demo's own call: with another limit the test split would hold digits the demo learned from.
    [digits] = load_benchmark("mnist-5k", preprocess=raw, num_tasks=1, classes_per_task=10,
                              limit_per_class=NEW_PER_CLASS + 5 * HELD_OUT_PER_CLASS)
    [clothes] = load_benchmark("split-fashion-mnist", preprocess=raw, num_tasks=1, classes_per_task=10,
                               limit_per_class=per_class)
    task_of = {c: r.name for r in bundle.tasks() if r.name != NEW_TASK for c in r.class_names}
    frames, truth = [], []
    for source in (digits, clothes):
        for image, label in zip(source.test.images, source.test.labels):
            name = source.class_names[label]
            frames.append(camera_frame(image))
            truth.append((NEW_TASK if source is digits else task_of[name], name))
    return frames, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="The bundle of a `pah-edge demo` run.")
    parser.add_argument("--per-class", type=int, default=100, help="Fashion-MNIST test images per class.")
    parser.add_argument("--rounds", type=int, default=20, help="Timing rounds; each resizes 50 frames with each rule in turn.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/resize_rules.json"))
    args = parser.parse_args()

    bundle = Bundle.open(args.bundle)
    frames, truth = test_images(bundle, args.per_class)
    rules = {rule: Preprocess(**{**bundle.preprocess.to_dict(), "resize": rule}) for rule in RESIZE_RULES}
    results, answers = {}, {}
    with Predictor(bundle, runtime="onnxruntime-cpu") as predictor:
        for rule, pre in rules.items():
            images = np.stack([frame_image(f, pre) for f in frames])
            given: list[dict] = [{}] * len(frames)
            for task in {t for t, _ in truth}:
                chosen = [i for i, (t, _) in enumerate(truth) if t == task]
                for i, answer in zip(chosen, predictor.predict_images(images[chosen], task=task)):
                    given[i] = answer
            free = predictor.predict_images(images)
            answers[rule] = [(a["task"], a["label"]) for a in free + given]
            results[rule] = {"task_free": _accuracy(free, truth), "task_given": _accuracy(given, truth)}
    # One image moves an accuracy by 1 / images; the share of identical answers says more.
    first, second = answers.values()
    agree = float(np.mean([a == b for a, b in zip(first, second)]))
    per_round = {rule: [] for rule in rules}
    for _ in range(args.rounds):
        for rule, pre in rules.items():
            start = time.thread_time()  # CPU time: the other jobs' turns on the cores do not count
            for f in frames[:50]:
                frame_image(f, pre)
            per_round[rule].append((time.thread_time() - start) / 50 * 1e3)
    for rule in rules:
        results[rule]["resize_cpu_ms"] = float(np.median(per_round[rule]))
        print(f"{rule}: {results[rule]}")
    print(f"the same (task, class) from both rules for {agree:.1%} of the answers")
    counts = {source: sum((t == NEW_TASK) == (source == "digits") for t, _ in truth) for source in ("digits", "clothes")}
    atomic_write_json(args.out, {"date": date.today().isoformat(), "machine": machine_info(),
                                 "load_average": os.getloadavg(), "frame": list(FRAME), "images": counts,
                                 "image_size": bundle.preprocess.image_size, "rules": results,
                                 "same_answers": agree})
    print(f"results -> {args.out}")


def _accuracy(answers: list[dict], truth: list[tuple[str, str]]) -> dict:
    """Per source (digits: the new task; clothes: the base tasks), the share with task and class right."""
    out = {}
    for source, pick in (("digits", lambda t: t == NEW_TASK), ("clothes", lambda t: t != NEW_TASK)):
        hits = [(a["task"], a["label"]) == t for a, t in zip(answers, truth) if pick(t[0])]
        out[source] = sum(hits) / len(hits)
    return out


if __name__ == "__main__":
    main()
