"""Continual-learning metrics from an accuracy matrix (fractions in [0, 1]).

``acc[i][j]`` is the test accuracy on task ``j`` after training task ``i``; row ``i`` holds tasks
``0..i`` (task-incremental: the task id is given at test time).
"""

from __future__ import annotations

from statistics import mean


def average_accuracy(acc: list[list[float]]) -> float:
    """Mean accuracy over all tasks after the last one (AA)."""
    return mean(acc[-1])


def forgetting(acc: list[list[float]]) -> float:
    """Mean drop from each earlier task's best accuracy to its final accuracy (FM); 0 for one task."""
    last = len(acc) - 1
    if last == 0:
        return 0.0
    return mean(max(acc[i][j] for i in range(j, last)) - acc[last][j] for j in range(last))


def backward_transfer(acc: list[list[float]]) -> float:
    """Mean change from just-learned to final accuracy on earlier tasks (BWT, negative = forgetting)."""
    last = len(acc) - 1
    if last == 0:
        return 0.0
    return mean(acc[last][j] - acc[j][j] for j in range(last))


def summarize(acc: list[list[float]]) -> dict:
    """The metrics.json core: the matrix plus AA, FM and BWT."""
    return {
        "acc_matrix": acc,
        "average_accuracy": average_accuracy(acc),
        "forgetting": forgetting(acc),
        "bwt": backward_transfer(acc),
    }
