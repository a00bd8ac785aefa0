"""Typed configuration for a training run: one frozen, keyword-only dataclass per concern.

The resolved configuration is saved as ``config.json`` next to every run, with library versions.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass

from pah_edge.errors import CheckpointError, ConfigError
from pah_edge.generators import generator_kind, generators_help
from pah_edge.options import option

METHODS = ("pah", "finetune", "lwf", "joint")
PROTOTYPE_INITS = ("mean", "random")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the tasks come from: a built-in benchmark or an ImageFolder root."""

    folder: str | None = option(None, "ImageFolder root: ROOT/<task>/<class>/* or ROOT/<class>/*.", argument=True)
    benchmark: str | None = option(None, "Built-in benchmark: split-fashion-mnist, mnist-5k, split-cifar100, tiny-imagenet.")
    data_dir: str | None = option(None, "Where the benchmark's files are (default: its standard place).")
    num_tasks: int | None = option(None, "Number of tasks (benchmarks).", "--tasks")
    classes_per_task: int | None = option(None, "Classes per task (benchmarks).")
    limit_per_class: int | None = option(None, "Use at most N images per class (quick runs): for a folder in all, "
                                                "before the split; for a benchmark in its training pool and its "
                                                "test set each.")
    val_fraction: float = 0.1
    download: bool = option(False, "Download the benchmark's archive if it is missing.", "--download")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Backbone, generator and prototype shape.

    ``prototype_size`` None: the largest side ``s`` with ``channels * s**2 <= D / 2`` (the paper's
    reference is 10). A class-wise generator expresses heads only inside a ``channels * s**2``-dimensional
    span, so a larger span lets a frozen generator fit unseen classes on the device (docs/benchmarks.md,
    "Learning a new task on the device"), while a task still stores at most half of a linear head's
    ``C x D`` floats.
    """

    backbone: str = option("mobilenet_v3_small", "mobilenet_v3_small, mobilenet_v3_large (alias mobilenet_v3), "
                           "mobilenet_v2, resnet18, efficientnet_lite0, tiny_cnn.")
    image_size: int | None = option(None, "Input size in px (default: 32 for 28-32 px benchmarks, 64 otherwise).")
    pretrained: bool = option(False, "Start from ImageNet weights: installed for efficientnet_lite0; torchvision "
                              "backbones need their file in the torch hub cache (never downloaded).", "--pretrained")
    weights: str | None = option(None, "Local backbone state dict to start from.")
    generator: str = option("classwise-linear", f"Hypernetwork: {generators_help()}.")
    hidden_dim: int | None = option(None, "Generator hidden width (default 256 classwise, 16 task-mlp).")
    prototype_channels: int = option(1, "Prototype channels: 1 or 3.")
    prototype_size: int | None = option(None, "Prototype side in px (default: the largest with channels x side^2 <= D/2).")
    prototype_init: str = option("mean", "mean (class-mean images, the paper's) or random.")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation and the continual-learning losses (defaults: the paper's reference values)."""

    method: str = option("pah", "pah, finetune (no distillation), lwf (stored heads), joint (upper bound).")
    epochs: int = option(15, "Epochs per task.")
    batch_size: int = option(64, "Global batch size (split across torchrun processes).")
    lr: float = option(1e-3, "Learning rate of hypernetwork and prototypes.")
    backbone_lr: float = option(1e-4, "Learning rate of the backbone.")
    weight_decay: float = 0.01
    stability: float = option(0.5, "Weight of logit distillation on earlier tasks.")
    temperature: float = 2.0
    proto_distill_weight: float = 1.0
    proto_hard_weight: float = 0.0
    seed: int = option(0, "Seed for splits, initialisation and shuffling.")
    device: str = option("auto", "auto (CUDA if present), cpu, cuda, cuda:N.")
    # A frozen backbone (backbone_lr 0 from trained weights) computes each image's features once and
    # generator and prototypes train on them; False runs it on every batch (same results, slower).
    cache_features: bool = True


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """A run's saved options; CheckpointError for options this pah-edge does not know (a newer one's)."""
        try:
            return cls(data=DataConfig(**d["data"]), model=ModelConfig(**d["model"]), train=TrainConfig(**d["train"]))
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"the run's saved options do not fit this pah-edge ({exc}); use the pah-edge "
                                  "version that wrote it") from None


def resolve(cfg: RunConfig) -> RunConfig:
    """Validate ``cfg`` and apply what ``method`` implies (e.g. LwF stores a linear head per task)."""
    m, t = cfg.model, cfg.train
    _check_choice("method", t.method, METHODS)
    generator_kind(m.generator)  # an unknown kind fails here, naming the kinds
    _check_choice("prototype init", m.prototype_init, PROTOTYPE_INITS)
    if (cfg.data.benchmark is None) == (cfg.data.folder is None):
        raise ConfigError("give either --benchmark NAME or an image folder, not both or neither")
    if m.image_size is None:
        m = dataclasses.replace(m, image_size=default_image_size(cfg.data))
    for name, value in [("epochs", t.epochs), ("batch size", t.batch_size), ("image size", m.image_size),
                        ("prototype size", m.prototype_size)]:
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if m.prototype_channels not in (1, 3):
        raise ConfigError(f"prototype channels must be 1 or 3, got {m.prototype_channels}")
    if not (math.isfinite(t.lr) and t.lr > 0) or not (math.isfinite(t.backbone_lr) and t.backbone_lr >= 0):
        raise ConfigError(f"--lr must be above 0 and --backbone-lr at least 0 (0 freezes the backbone), got "
                          f"{t.lr} and {t.backbone_lr}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise ConfigError(f"unknown device {t.device!r}: choose auto, cpu, cuda or cuda:N")
    if t.method == "finetune":
        t = dataclasses.replace(t, stability=0.0, proto_distill_weight=0.0)
    elif t.method == "lwf":
        m = dataclasses.replace(m, generator="linear-head")
        t = dataclasses.replace(t, proto_distill_weight=0.0)
    elif t.method == "joint":
        t = dataclasses.replace(t, stability=0.0, proto_distill_weight=0.0)
    if m.hidden_dim is None:
        m = dataclasses.replace(m, hidden_dim=generator_kind(m.generator).hidden_dim)
    return dataclasses.replace(absolute_folder(cfg), model=m, train=t)


def absolute_folder(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its image folder as an absolute path: export reloads the run's data from any directory."""
    if cfg.data.folder is None:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, folder=os.path.abspath(cfg.data.folder)))


def auto_prototype_size(feature_dim: int, channels: int) -> int:
    """The largest prototype side ``s`` with ``channels * s**2 <= feature_dim / 2`` (at least 1)."""
    side = 1
    while channels * (side + 1) ** 2 <= feature_dim / 2:
        side += 1
    return side


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} '{value}'; choose one of: {', '.join(choices)}")


def default_image_size(data: DataConfig) -> int:
    """Network input size when the user gives none: the benchmark's native scale, 64 px for folders."""
    return {"split-fashion-mnist": 32, "mnist-5k": 32, "split-cifar100": 32, "tiny-imagenet": 64}.get(data.benchmark, 64)
