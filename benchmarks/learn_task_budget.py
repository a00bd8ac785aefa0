"""Does ``learn-task --budget-mb`` bound the process's peak RSS? One fresh ``pah-edge learn-task`` per budget.

Each budget runs on the same 1,000 MNIST digits (100 per class, written once at the bundle's input
size's source resolution, 28 px) into a fresh copy of ``BUNDLE``; the report's ``peak_rss_mb`` is the
process's VmHWM. A budget below what the process needs must be refused (exit 1) naming the minimum.

    python benchmarks/learn_task_budget.py BUNDLE --budgets 100 200 300 500 --out benchmarks/results/learn_task_budget.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from PIL import Image

from pah_edge.atomic import atomic_write_json
from pah_edge.bundle import Bundle
from pah_edge.workstation.data.benchmarks import load_benchmark
from pah_edge.machine import machine_info
from pah_edge.preprocess import Preprocess

PER_CLASS = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--budgets", type=float, nargs="+", default=[100, 200, 300, 500])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/learn_task_budget.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="budget-"))
    folder = _digits(work / "digits")
    rows = [_run(args.bundle, folder, budget, work) for budget in args.budgets]
    report = {"command": "python " + " ".join(sys.argv), "date": date.today().isoformat(), "machine": machine_info(),
              "image_size": Bundle.open(args.bundle).preprocess.image_size, "images": 10 * PER_CLASS, "rows": rows}
    atomic_write_json(args.out, report)
    shutil.rmtree(work, ignore_errors=True)
    print(f"-> {args.out}", file=sys.stderr)


def _digits(folder: Path) -> Path:
    (task,) = load_benchmark("mnist-5k", preprocess=Preprocess(image_size=28), num_tasks=1, classes_per_task=10,
                             val_fraction=0.0, limit_per_class=PER_CLASS + 50)
    for label, name in enumerate(task.class_names):
        (folder / name).mkdir(parents=True)
        for i, image in enumerate(task.train.images[task.train.labels == label][:PER_CLASS]):
            Image.fromarray(image[:, :, 0]).save(folder / name / f"{i}.png")
    return folder


def _run(bundle: Path, folder: Path, budget: float, work: Path) -> dict:
    copy = work / f"bundle-{budget:g}"
    Bundle.open(bundle, verify=False).scratch_copy(copy)
    done = subprocess.run([sys.executable, "-m", "pah_edge.cli", "learn-task", str(folder), "--bundle", str(copy),
                           "--budget-mb", f"{budget:g}", "--json", "--no-progress", "--runtime", "onnxruntime-cpu"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        row = {"budget_mb": budget, "refused": True, "exit_code": done.returncode,
               "message": next((line for line in done.stderr.splitlines() if line.startswith("error:")), done.stderr)}
    else:
        report = json.loads(done.stdout.strip().splitlines()[-1])
        row = {"budget_mb": budget, "refused": False, "peak_rss_mb": report["peak_rss_mb"],
               "batch_size": report["batch_size"], "within_budget": report["peak_rss_mb"] <= budget,
               "wall_seconds": report["wall_seconds"]}
    print(row, file=sys.stderr, flush=True)
    return row


if __name__ == "__main__":
    main()
