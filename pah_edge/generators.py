"""The generator kinds, known without torch: what the CLI offers, what a bundle can hold, and what
the device may assume about each (the torch modules that implement them: `pah_edge.workstation.hypernetwork`)."""

from __future__ import annotations

from dataclasses import dataclass

from pah_edge.errors import ConfigError


@dataclass(frozen=True)
class GeneratorKind:
    """``linear``: a head row is a linear map of its class's prototype, so the device's fit is convex and
    starts from the class-mean head; ``prototypes``: a task's parameter is prototypes (not a stored
    head), so it exports and learns on a device; ``hidden_dim``: the default hidden width (recorded,
    unused, by kinds without one)."""

    name: str
    linear: bool
    prototypes: bool
    hidden_dim: int
    summary: str


GENERATOR_KINDS = {kind.name: kind for kind in (
    GeneratorKind("classwise-linear", linear=True, prototypes=True, hidden_dim=256,
                  summary="any class count; best for learning on the device"),
    GeneratorKind("classwise", linear=False, prototypes=True, hidden_dim=256, summary="adds an MLP"),
    GeneratorKind("task-mlp", linear=False, prototypes=True, hidden_dim=16, summary="the paper's"),
    GeneratorKind("linear-head", linear=False, prototypes=False, hidden_dim=256,
                  summary="a stored head per task, the LwF baseline"),
)}


def generator_kind(name: str) -> GeneratorKind:
    """The kind called ``name``; a ConfigError listing the kinds otherwise."""
    try:
        return GENERATOR_KINDS[name]
    except KeyError:
        raise ConfigError(f"unknown generator '{name}'; choose one of: {', '.join(GENERATOR_KINDS)}") from None


def generators_help() -> str:
    """``classwise-linear (any class count; ...), classwise (adds an MLP), ...`` for an option's help."""
    return ", ".join(f"{k.name} ({k.summary})" for k in GENERATOR_KINDS.values())
