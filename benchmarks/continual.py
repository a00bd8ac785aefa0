"""Continual-learning benchmark: PAH vs fine-tuning vs LwF vs joint training, several seeds.

Writes one JSON with every run's accuracy matrix and the mean/std of AA, FM and BWT (in percent)
per method, and prints a Markdown table for docs/benchmarks.md.

    python benchmarks/continual.py --out benchmarks/out/continual.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from pah_edge.atomic import atomic_write_json
from pah_edge.machine import machine_info
from pah_edge.workstation.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pah_edge.machine import library_versions
from pah_edge.workstation.trainer import run_training

METHODS = ("pah", "finetune", "lwf", "joint")
METRICS = ("average_accuracy", "forgetting", "bwt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="split-fashion-mnist")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--classes-per-task", type=int, default=2)
    parser.add_argument("--backbone", default="mobilenet_v3_small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--limit-per-class", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/continual.json"))
    args = parser.parse_args()

    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods:
            for seed in args.seeds:
                started = time.perf_counter()
                metrics = run_training(_config(args, method, seed), Path(scratch) / f"{method}-{seed}", show_progress=False)
                runs.append({"method": method, "seed": seed, "seconds": time.perf_counter() - started,
                             **{k: metrics[k] for k in ("acc_matrix", *METRICS)}})
                print(f"{method} seed {seed}: AA {100 * metrics['average_accuracy']:.2f}  "
                      f"FM {100 * metrics['forgetting']:.2f}  ({runs[-1]['seconds']:.0f} s)", file=sys.stderr)
    summary = {m: _mean_std([r for r in runs if r["method"] == m]) for m in args.methods}
    report = {
        "command": "python " + " ".join(sys.argv),
        "date": date.today().isoformat(),
        "machine": {**machine_info(), "device": args.device},
        "versions": library_versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary_percent": summary,
        "runs": runs,
    }
    atomic_write_json(args.out, report)
    print(_markdown(summary))


def _config(args, method: str, seed: int) -> RunConfig:
    return RunConfig(
        data=DataConfig(benchmark=args.benchmark, num_tasks=args.tasks, classes_per_task=args.classes_per_task,
                        limit_per_class=args.limit_per_class),
        model=ModelConfig(backbone=args.backbone, image_size=args.image_size),
        train=TrainConfig(method=method, epochs=args.epochs, seed=seed, device=args.device),
    )


def _mean_std(runs: list[dict]) -> dict:
    """Mean and sample standard deviation of each metric over seeds, in percent."""
    out = {}
    for key in METRICS:
        values = [100 * r[key] for r in runs]
        out[key] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    out["seconds_per_run"] = statistics.mean(r["seconds"] for r in runs)
    return out


def _markdown(summary: dict) -> str:
    lines = ["| method | AA (%) | FM (%) | BWT (%) | s / run |", "|---|---|---|---|---|"]
    for method, s in summary.items():
        cells = [f"{s[k]['mean']:.2f} ± {s[k]['std']:.2f}" for k in METRICS]
        lines.append(f"| {method} | {' | '.join(cells)} | {s['seconds_per_run']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
