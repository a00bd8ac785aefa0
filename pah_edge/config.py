"""Typed configuration for a training run: one frozen, keyword-only dataclass per concern.

The resolved configuration is saved as ``config.json`` next to every run, with library versions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pah_edge.errors import ConfigError

METHODS = ("pah", "finetune", "lwf", "joint")
GENERATORS = ("classwise-linear", "classwise", "task-mlp", "linear-head")
PROTOTYPE_INITS = ("mean", "random")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the tasks come from: a built-in benchmark or an ImageFolder root."""

    benchmark: str | None = None
    folder: str | None = None
    data_dir: str | None = None
    num_tasks: int | None = None
    classes_per_task: int | None = None
    limit_per_class: int | None = None
    val_fraction: float = 0.1
    download: bool = False


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Backbone, generator and prototype shape.

    ``prototype_size`` None: the largest side ``s`` with ``channels * s**2 <= D / 2`` (the paper's
    reference is 10). A class-wise generator expresses heads only inside a ``channels * s**2``-dimensional
    span, so a larger span lets a frozen generator fit unseen classes on the device (measured on novel
    digits with an ImageNet EfficientNet-Lite0, D = 1280: 256 dimensions 78.2 %, 625 dimensions 81.1 %,
    linear probe 79.1 %), while a task still stores at most half of a linear head's ``C x D`` floats.
    """

    backbone: str = "mobilenet_v3_small"
    image_size: int | None = None  # None: default_image_size(data)
    pretrained: bool = False
    weights: str | None = None
    generator: str = "classwise-linear"
    hidden_dim: int | None = None  # None: 256 for classwise, 16 for task-mlp (the paper's)
    prototype_channels: int = 1
    prototype_size: int | None = None  # None: auto_prototype_size(D, channels)
    prototype_init: str = "mean"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation and the continual-learning losses (defaults: the paper's reference values)."""

    method: str = "pah"
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3  # hypernetwork and prototypes
    backbone_lr: float = 1e-4
    weight_decay: float = 0.01
    stability: float = 0.5  # weight of logit distillation on earlier tasks
    temperature: float = 2.0
    proto_distill_weight: float = 1.0
    proto_hard_weight: float = 0.0
    seed: int = 0
    device: str = "auto"
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
        return cls(data=DataConfig(**d["data"]), model=ModelConfig(**d["model"]), train=TrainConfig(**d["train"]))


def resolve(cfg: RunConfig) -> RunConfig:
    """Validate ``cfg`` and apply what ``method`` implies (e.g. LwF stores a linear head per task)."""
    m, t = cfg.model, cfg.train
    _check_choice("method", t.method, METHODS)
    _check_choice("generator", m.generator, GENERATORS)
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
    if t.method == "finetune":
        t = dataclasses.replace(t, stability=0.0, proto_distill_weight=0.0)
    elif t.method == "lwf":
        m = dataclasses.replace(m, generator="linear-head")
        t = dataclasses.replace(t, proto_distill_weight=0.0)
    elif t.method == "joint":
        t = dataclasses.replace(t, stability=0.0, proto_distill_weight=0.0)
    if m.hidden_dim is None:
        m = dataclasses.replace(m, hidden_dim=16 if m.generator == "task-mlp" else 256)
    return dataclasses.replace(cfg, model=m, train=t)


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
