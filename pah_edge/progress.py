"""Progress bars with one look everywhere (training, learn-task, calibration); torch-free."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def bar_progress(**kwargs) -> Progress:
    """A transient Rich ``Progress`` with description, bar, n/total and time left."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=True, **kwargs)


@contextmanager
def progress_bar(enabled: bool, label: str, total: int):
    """``with progress_bar(on, label, total) as advance: advance(n)``; a bar on stderr when on."""
    if not enabled:
        yield lambda n: None
        return
    # stderr: stdout carries the result (one JSON object with --json).
    with bar_progress(console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
