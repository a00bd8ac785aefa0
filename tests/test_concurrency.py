"""Prediction while another process changes the bundle's tasks: every prediction sees the registry as it
was before a change or as it is after it, never a torn mix, and never fails except with BundleError
"no task" for a task given by name that is gone.

First every interleaving, made deterministic: the change happens right after the predictor's n-th
read of the registry. Then real concurrency: `pah-edge learn-task`, `tasks rename` and `tasks
remove` run while a thread predicts in a loop.
"""

import logging
import shutil
import subprocess
import sys
import threading

import pytest
from conftest import write_image_folder
from tiny_bundle import make_tiny_bundle, query_folder

from pah_edge.bundle import Bundle, BundleError
from pah_edge.device.learner import learn_task
from pah_edge.device.predict import Predictor

NEW_TASK = "n"


@pytest.fixture(scope="module")
def made(tmp_path_factory, mnist_digits):
    root = tmp_path_factory.mktemp("concurrency")
    new_task = write_image_folder(root / "new", mnist_digits, {NEW_TASK: [1, 7]}, per_class=12) / NEW_TASK
    return make_tiny_bundle(root, mnist_digits), query_folder(root, mnist_digits), new_task


@pytest.fixture
def bundle_dir(made, tmp_path):
    return shutil.copytree(made[0], tmp_path / "bundle")


def _change(kind, bundle_dir, new_task):
    """Apply one change to the bundle as its command does: the library call under the bundle's lock."""
    bundle = Bundle.open(bundle_dir)
    if kind == "learn-task":
        learn_task(bundle, new_task, runtime="onnxruntime-cpu", progress=False)  # takes the lock itself
        return
    with bundle.lock(60):
        bundle.rename_task("a", "a2") if kind == "rename" else bundle.remove_task("a")


class ChangedWhileRead(Bundle):
    """A bundle whose tasks another writer changes right after this reader's ``at``-th read of the registry."""

    at, change, reads = 0, None, 0

    def tasks(self):
        records = super().tasks()
        self.reads += 1
        if self.reads == self.at:
            self.change()
        return records


def _answers(predictions):
    return [(p["path"], p["task"], p["label"], p["known"], round(p["confidence"], 4)) for p in predictions]


def _predict(bundle, query, task=None):
    with Predictor(bundle, runtime="onnxruntime-cpu") as predictor:
        return _answers(predictor.predict([query], task=task, novelty_threshold=1e9))


@pytest.mark.parametrize("task", [None, "a"], ids=["task-free", "task-given"])
@pytest.mark.parametrize("kind", ["learn-task", "rename", "remove"])
def test_a_change_between_any_two_reads_gives_the_answer_before_or_after_it(made, tmp_path, caplog, kind, task):
    bundle_src, query, new_task = made
    before_dir = shutil.copytree(bundle_src, tmp_path / "before")
    before = _predict(Bundle.open(before_dir), query, task)
    after_dir = shutil.copytree(bundle_src, tmp_path / "after")
    _change(kind, after_dir, new_task)
    try:
        after = _predict(Bundle.open(after_dir), query, task)
    except BundleError as exc:  # the task given by name is gone
        after = str(exc)
    reads = 0
    while True:  # change after the 1st read, the 2nd, ... until one past the last read of a prediction
        reads += 1
        work = shutil.copytree(bundle_src, tmp_path / f"run{reads}")
        bundle = ChangedWhileRead.open(work)
        bundle.at, bundle.change = reads, lambda: _change(kind, work, new_task)
        with caplog.at_level(logging.WARNING, "pah_edge"):
            caplog.clear()
            try:
                answer = _predict(bundle, query, task)
            except BundleError as exc:
                answer = str(exc)
        if isinstance(answer, str):  # allowed only for a task given by name that the change took away
            assert isinstance(after, str) and f"no task {task!r}" in answer, (reads, answer)
        else:
            assert answer in (before, after), (reads, answer)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], (reads, caplog.text)
        if bundle.reads < reads:  # the change came after the prediction: every interleaving is done
            break
    assert reads >= 3


@pytest.mark.slow
def test_predicting_in_a_loop_while_the_cli_changes_the_tasks(bundle_dir, made, caplog):
    _, query, new_task = made
    states = {}  # every registry the commands make -> its answers
    for name, commands in {"start": [], "learned": [("learn-task",)], "renamed": [("learn-task",), ("rename",)]}.items():
        copy = shutil.copytree(bundle_dir, bundle_dir.parent / name)
        for (kind,) in commands:
            _change(kind, copy, new_task)
        states[name] = _predict(Bundle.open(copy), query)
    commands = [["learn-task", new_task, "--name", NEW_TASK, "--runtime", "onnxruntime-cpu", "--no-progress"],
                ["tasks", "rename", "a", "a2"], ["tasks", "rename", "a2", "a"], ["tasks", "remove", NEW_TASK]] * 2
    failures = []

    def change_tasks():
        for command in commands:
            done = subprocess.run([sys.executable, "-m", "pah_edge.cli", *map(str, command), "--bundle",
                                   str(bundle_dir)], capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                failures.append(done.stderr)

    writer = threading.Thread(target=change_tasks)
    seen = {name: 0 for name in states}
    with caplog.at_level(logging.WARNING, "pah_edge"), \
            Predictor(Bundle.open(bundle_dir), runtime="onnxruntime-cpu") as predictor:
        writer.start()
        while writer.is_alive():
            for given in (None, "a"):
                try:
                    answer = _answers(predictor.predict([query], task=given, novelty_threshold=1e9))
                except BundleError as exc:
                    assert given == "a" and "no task 'a'" in str(exc), exc
                    continue
                if given is None:
                    matches = [name for name, expected in states.items() if answer == expected]
                    assert matches, answer  # a torn registry would answer otherwise
                    seen[matches[0]] += 1
    writer.join()
    assert not failures, failures
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert sum(1 for count in seen.values() if count) >= 2, seen  # the loop saw the registry change


def test_a_command_waiting_for_a_bundle_that_export_force_replaces_does_not_write_into_the_new_one(bundle_dir):
    import fcntl
    import os

    waiting = Bundle.open(bundle_dir)
    holder = os.open(waiting.layout.lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process's learn-task, say
    outcome = []

    def change():
        try:
            with waiting.lock(wait_s=30):
                waiting.rename_task("a", "renamed")
                outcome.append("changed")
        except BundleError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=change)
    thread.start()
    old = bundle_dir.with_name("old")
    os.replace(bundle_dir, old)  # what export --force does, under the lock held above
    shutil.copytree(old, bundle_dir, ignore=shutil.ignore_patterns(".lock"))
    os.close(holder)
    thread.join(timeout=30)
    # Whether it opened the old lock file or the new bundle's, it opened the old bundle: it stops.
    assert outcome and "was replaced" in outcome[0] and "run the command again" in outcome[0], outcome
    assert [t.name for t in Bundle.open(bundle_dir).tasks()] == ["a", "b", "c"]
