"""Seconds per epoch of a frozen backbone with cached features against the backbone on every batch.

Times what ``pah-edge train --benchmark split-fashion-mnist --backbone efficientnet_lite0 --pretrained
--backbone-lr 0 --image-size 128 --tasks 2 --limit-per-class 200 --epochs 3`` runs, once with
``cache_features`` (the default) and once without, from the trainer's per-epoch log records. Epochs
from the second on are compared: the cached path spends its one pass over the images before the first.
Writes a JSON report and prints a Markdown table for docs/benchmarks.md.

    OMP_NUM_THREADS=1 python benchmarks/cached_features.py --out benchmarks/results/cached_features.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from pah_edge.atomic import atomic_write_json
from pah_edge.workstation.config import DataConfig, ModelConfig, RunConfig, TrainConfig, resolve
from pah_edge.workstation.data import load_benchmark
from pah_edge.machine import machine_info
from pah_edge.preprocess import Preprocess
from pah_edge.workstation.trainer import train_continual

MODES = {"cached": True, "uncached": False}  # name -> TrainConfig.cache_features


class _EpochTimes(logging.Handler):
    """Collects the trainer's per-epoch records: (task, epoch, seconds)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.epochs: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "epoch_seconds"):
            self.epochs.append({"task": record.phase[0], "epoch": record.epoch + 1, "seconds": record.epoch_seconds})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="split-fashion-mnist")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--classes-per-task", type=int, default=2)
    parser.add_argument("--limit-per-class", type=int, default=200)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="Epochs per task; at least 2.")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/cached_features.json"))
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2")
    torch.set_num_threads(args.threads)
    logger = logging.getLogger("pah_edge")
    logger.setLevel(logging.DEBUG)

    preprocess = Preprocess(image_size=args.image_size)
    tasks = load_benchmark(args.benchmark, preprocess=preprocess, num_tasks=args.tasks,
                           classes_per_task=args.classes_per_task, limit_per_class=args.limit_per_class, seed=0)
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        for mode, cache_features in MODES.items():
            times = _EpochTimes()
            logger.addHandler(times)
            started = time.perf_counter()
            metrics = train_continual(_config(args, cache_features), tasks, preprocess, Path(scratch) / mode,
                                      show_progress=False)
            logger.removeHandler(times)
            later = [e["seconds"] for e in times.epochs if e["epoch"] > 1]
            runs[mode] = {"seconds_per_epoch_from_the_second": statistics.mean(later),
                          "run_seconds": time.perf_counter() - started, "epochs": times.epochs,
                          "acc_matrix": metrics["acc_matrix"]}
            print(f"{mode}: {runs[mode]['seconds_per_epoch_from_the_second']:.2f} s per epoch from the second, "
                  f"run {runs[mode]['run_seconds']:.0f} s", file=sys.stderr)
    speedup = runs["uncached"]["seconds_per_epoch_from_the_second"] / runs["cached"]["seconds_per_epoch_from_the_second"]
    atomic_write_json(args.out, {
        "command": "python " + " ".join(sys.argv),
        "date": date.today().isoformat(),
        "machine": {**machine_info(), "device": "cpu", "torch_threads": args.threads},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_images_per_task": [len(t.train) for t in tasks],
        "speedup_from_the_second_epoch": speedup,
        "runs": runs,
    })
    print("| path | s / epoch (from the 2nd) | whole run (s) |\n|---|---|---|")
    for mode, run in runs.items():
        print(f"| {mode} | {run['seconds_per_epoch_from_the_second']:.2f} | {run['run_seconds']:.0f} |")
    print(f"speed-up {speedup:.1f}x")


def _config(args, cache_features: bool) -> RunConfig:
    return resolve(RunConfig(
        data=DataConfig(benchmark=args.benchmark, num_tasks=args.tasks, classes_per_task=args.classes_per_task,
                        limit_per_class=args.limit_per_class),
        model=ModelConfig(backbone=args.backbone, image_size=args.image_size, pretrained=True),
        train=TrainConfig(epochs=args.epochs, backbone_lr=0.0, device="cpu", cache_features=cache_features),
    ))


if __name__ == "__main__":
    main()
