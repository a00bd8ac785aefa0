"""Timing statistics for ``pah-edge bench``: warm-up, timed iterations, percentiles and noise.

Torch-free and runtime-free: a measurement is any call that returns its own latency in ms, so a
runner can report its wall time (``last_infer_ms``) or its GPU time (CUDA events, ``last_gpu_ms``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

# Above this coefficient of variation (std / mean of the timed iterations) a row is flagged as noisy:
# its percentiles say more about the machine's other jobs than about the model.
NOISY_CV = 0.15


@dataclass(frozen=True)
class Timing:
    """Latencies of the timed iterations, in ms, and their summary."""

    samples_ms: tuple[float, ...]

    def percentile(self, q: float) -> float:
        """The q-th percentile in ms, linearly interpolated between iterations."""
        return float(np.percentile(self.samples_ms, q))

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.samples_ms))

    @property
    def cv(self) -> float:
        """Coefficient of variation: sample std / mean (0 for a single iteration)."""
        if len(self.samples_ms) < 2 or self.mean_ms == 0:
            return 0.0
        return float(np.std(self.samples_ms, ddof=1) / self.mean_ms)

    @property
    def noisy(self) -> bool:
        return self.cv > NOISY_CV

    def fields(self, items: int) -> dict:
        """The row fields: p50/p90/p99/mean in ms, cv, iterations, and ``items`` per s at the median."""
        p50 = self.percentile(50)
        return {"p50_ms": p50, "p90_ms": self.percentile(90), "p99_ms": self.percentile(99),
                "mean_ms": self.mean_ms, "cv": self.cv, "iterations": len(self.samples_ms),
                "throughput_ips": items * 1000 / p50 if p50 > 0 else None}


def measure(call: Callable[[], float], *, warmup: int, iterations: int) -> Timing:
    """Run ``call`` ``warmup`` times untimed (caches, allocators, lazy initialisation), then
    ``iterations`` times keeping the ms each call returns; every timed iteration counts."""
    if iterations < 1 or warmup < 0:
        raise ValueError(f"need iterations >= 1 and warmup >= 0, got {iterations} and {warmup}")
    for _ in range(warmup):
        call()
    return Timing(tuple(float(call()) for _ in range(iterations)))


def alternating(calls: Mapping[str, Callable[[], float]], *, rounds: int, block: int,
                warmup: int) -> list[dict[str, float]]:
    """Per round, the median ms of ``block`` calls of each entry, the entries taking turns.

    Two measurements taken one after the other see different machines when the load drifts; taking
    turns in short blocks gives every entry the same stretch of time, so the ratio of two entries
    within a round is what their speed alone decides. ``warmup`` untimed calls of each entry first.
    """
    if rounds < 1 or block < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1, block >= 1 and warmup >= 0, got {rounds}, {block} and {warmup}")
    for call in calls.values():
        for _ in range(warmup):
            call()
    return [{name: float(np.median([call() for _ in range(block)])) for name, call in calls.items()}
            for _ in range(rounds)]


def wall_ms_call(runner, feeds: dict) -> Callable[[], float]:
    """A call of ``runner.infer(feeds)`` (any runner) that returns its wall time, ms."""
    def call() -> float:
        runner.infer(feeds)
        return runner.last_infer_ms
    return call
