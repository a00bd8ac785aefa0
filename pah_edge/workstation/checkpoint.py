"""The run checkpoint: everything needed to resume training or export, written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from pah_edge.atomic import atomic_write_bytes
from pah_edge.workstation.config import RunConfig
from pah_edge.errors import CheckpointError
from pah_edge.workstation.model import PAHModel, build_model

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (tensors, lists, dicts, numbers, strings) so a crash leaves the old file intact."""
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by ``save_checkpoint``; user-fixable problems raise CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train one with `pah-edge train --out {path.parent}`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}); retrain or restore it") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a pah-edge checkpoint; pass the "
                              "checkpoint.pt of a `pah-edge train` run")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {state.get('format_version')}, this pah-edge reads {FORMAT_VERSION}; "
            "use the pah-edge version that wrote it"
        )
    return state


def model_from_checkpoint(state: dict) -> PAHModel:
    """Rebuild the trained model (backbone, generator, every task's prototypes) from a checkpoint."""
    cfg = RunConfig.from_dict(state["config"])
    tasks = state["tasks"]
    model = build_model(cfg.model, first_task_classes=len(tasks[0]["class_names"]), load_weights=False)
    for task in tasks[: state["completed"]]:
        model.add_task(torch.zeros(model.generator.param_shape(len(task["class_names"]))))
    model.load_state_dict(state["model"])
    return model
