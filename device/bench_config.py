"""What `pah-edge bench` measures (`BenchConfig`), parsed from the command line's texts.

Light on purpose: the CLI reads its option defaults from here at start-up, before any command runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pah_edge.bundle_layout import ENGINE_PRECISIONS
from pah_edge.errors import ConfigError
from pah_edge.options import names, whole_numbers

# Measured in this order: torch last, so that its libraries are not yet in memory during the others' rows.
RUNTIMES = ("onnxruntime", "tensorrt", "torch")


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to measure. ``threads`` sets the intra-op threads of the runners bench builds (ONNX Runtime
    backbone and generator, torch); None leaves each runtime's default (one per core)."""

    runtimes: tuple[str, ...] = RUNTIMES
    precisions: tuple[str, ...] = ENGINE_PRECISIONS
    batches: tuple[int, ...] = (1, 8, 32)
    iterations: int = 50
    warmup: int = 10
    images: Path | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        _check_choices("--runtime", self.runtimes, RUNTIMES, extra="all")
        _check_choices("--precision", self.precisions, ENGINE_PRECISIONS)
        if not self.batches or min(self.batches) < 1:
            raise ConfigError(f"--batch takes positive whole numbers such as 1,8,32; got {_listed(self.batches)}")
        if self.iterations < 1 or self.warmup < 0:
            raise ConfigError(f"--iterations must be >= 1 and --warmup >= 0; got {self.iterations} and {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1 (or left out for each runtime's default); got {self.threads}")
        # Canonical order and no repeats: the table and the JSON read the same whatever the typing.
        object.__setattr__(self, "runtimes", tuple(r for r in RUNTIMES if r in self.runtimes))
        object.__setattr__(self, "precisions", tuple(p for p in ENGINE_PRECISIONS if p in self.precisions))
        object.__setattr__(self, "batches", tuple(sorted(set(self.batches))))

    @classmethod
    def from_options(cls, *, runtime: str, precision: str, batch: str, **kw) -> BenchConfig:
        """From the CLI's comma-separated texts (``--runtime all`` = every runtime)."""
        runtimes = RUNTIMES if runtime.strip() == "all" else names(runtime)
        return cls(runtimes=runtimes, precisions=names(precision), batches=whole_numbers(batch, "--batch"), **kw)


def _listed(values) -> str:
    return ",".join(map(str, values)) or "nothing"


def _check_choices(option: str, values: tuple, allowed: tuple[str, ...], extra: str | None = None) -> None:
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        choices = ", ".join(((extra,) if extra else ()) + allowed)
        what = f"unknown {option} {unknown[0]!r}" if unknown else f"{option} is empty"
        raise ConfigError(f"{what}: choose from {choices} (comma-separated)")
