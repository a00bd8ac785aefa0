"""Text renderings of what `predict` answers and what `tasks` lists, in the reports' table style."""

from __future__ import annotations

from collections.abc import Sequence

from pah_edge.bundle import TaskRecord
from pah_edge.report import aligned, percent


def prediction_lines(results: Sequence[dict]) -> list[str]:
    """``path  task/label  97.1%  novelty 0.52`` (or ``unknown``) per `Prediction.to_dict()`, columns aligned."""
    def answer(r):
        return "unknown" if r["known"] is False and r["task"] is None else f"{r['task']}/{r['label']}"

    def novelty(r):
        if r["novelty"] is None:
            return ""
        return f"novelty {r['novelty']:.2f}" + (" (unknown)" if r["known"] is False and r["task"] is not None else "")

    return aligned([(r["path"], answer(r), percent(r["confidence"]), novelty(r)) for r in results], right={2})


def task_lines(records: Sequence[TaskRecord]) -> list[str]:
    """A header and one line per task: classes, images seen, accuracy, created, size, source."""
    rows = [("task", "classes", "images", "accuracy", "created (UTC)", "bytes", "source")]
    for r in records:
        names = ", ".join(r.class_names[:3]) + (", ..." if len(r.class_names) > 3 else "")
        rows.append((r.name, f"{len(r.class_names)} ({names})", str(r.images_seen), percent(r.accuracy, "-"),
                     r.created.replace("T", " ").removesuffix("Z")[:16], str(r.bytes), r.source))
    return aligned(rows, right={2, 3, 5})
