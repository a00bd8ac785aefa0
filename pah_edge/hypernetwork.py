"""Hypernetworks that turn a task's parameters (its prototypes) into a classifier head.

Every generator maps a task parameter tensor of ``param_shape(C)`` to a head ``[C, D]``; logits are
``features @ head.T`` (bias-free, as in the paper).

- ``classwise`` (default): each class's head row comes from that class's prototype alone,
  ``w_c = A z_c + MLP(z_c)`` with ``z_c`` the flattened prototype. Any number of classes per task, and
  the linear path keeps a frozen generator able to express every head in the ``K``-dimensional span
  of ``A`` (``K = channels * size**2``), so classes it never saw can still get a good head by
  optimising prototypes alone. The MLP's last layer starts at zero: training starts from the
  well-conditioned linear map and learns the non-linear correction.
- ``task-mlp``: the paper's generator. All prototypes of a task, flattened into one vector, through
  a one-hidden-layer MLP; fixed number of classes per task.
- ``linear-head``: no hypernetwork; the task parameter *is* its ``[C, D]`` head (the LwF baseline).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pah_edge.errors import ConfigError


class Generator(nn.Module):
    """Task parameters -> classifier head ``[C, D]``."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.feature_dim = feature_dim

    def param_shape(self, num_classes: int) -> tuple[int, ...]:
        raise NotImplementedError

    def init_params(self, class_means: torch.Tensor, *, random: bool, generator: torch.Generator) -> torch.Tensor:
        """Initial task parameters from class-mean input images ``[C, 3, S, S]`` (or random)."""
        raise NotImplementedError

    def vjp(self, params: torch.Tensor, grad_head: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. ``params`` given the gradient w.r.t. the head ``[C, D]``.

        Written out in plain tensor ops (no autograd) so that it exports to ONNX: the device learns
        prototypes with no autograd framework.
        """
        raise NotImplementedError


class PrototypeGenerator(Generator):
    """A generator whose task parameters are small prototype images ``[C, c, s, s]``."""

    def __init__(self, feature_dim: int, *, channels: int, size: int):
        super().__init__(feature_dim)
        self.channels, self.size = channels, size

    @property
    def prototype_numel(self) -> int:
        return self.channels * self.size * self.size

    def param_shape(self, num_classes: int) -> tuple[int, ...]:
        return (num_classes, self.channels, self.size, self.size)

    def init_params(self, class_means, *, random, generator):
        """The paper's data init: class-mean image, to ``c`` channels, area-pooled to ``s x s``."""
        if random:
            return torch.randn(self.param_shape(len(class_means)), generator=generator)
        images = class_means.mean(dim=1, keepdim=True) if self.channels == 1 else class_means
        return nn.functional.adaptive_avg_pool2d(images, self.size)


class ClasswiseGenerator(PrototypeGenerator):
    def __init__(self, feature_dim: int, *, channels: int, size: int, hidden_dim: int):
        super().__init__(feature_dim, channels=channels, size=size)
        k = self.prototype_numel
        self.linear = nn.Linear(k, feature_dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(k, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, feature_dim))
        nn.init.orthogonal_(self.linear.weight, gain=1 / math.sqrt(k))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        z = prototypes.flatten(1)
        return self.linear(z) + self.mlp(z)

    def vjp(self, prototypes: torch.Tensor, grad_head: torch.Tensor) -> torch.Tensor:
        first, _, last = self.mlp
        active = (first(prototypes.flatten(1)) > 0).to(grad_head.dtype)
        grad_z = grad_head @ self.linear.weight + ((grad_head @ last.weight) * active) @ first.weight
        return grad_z.reshape(prototypes.shape)


class TaskMLPGenerator(PrototypeGenerator):
    def __init__(self, feature_dim: int, *, channels: int, size: int, hidden_dim: int, num_classes: int):
        super().__init__(feature_dim, channels=channels, size=size)
        self.num_classes = num_classes
        self.mlp = nn.Sequential(
            nn.Linear(num_classes * self.prototype_numel, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, num_classes * feature_dim),
        )

    def param_shape(self, num_classes: int) -> tuple[int, ...]:
        if num_classes != self.num_classes:
            raise ConfigError(
                f"the task-mlp generator is built for {self.num_classes} classes per task, got a task with "
                f"{num_classes}; use --generator classwise for tasks of any size"
            )
        return super().param_shape(num_classes)

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        return self.mlp(prototypes.reshape(1, -1)).reshape(len(prototypes), self.feature_dim)

    def vjp(self, prototypes: torch.Tensor, grad_head: torch.Tensor) -> torch.Tensor:
        first, _, last = self.mlp
        active = (first(prototypes.reshape(1, -1)) > 0).to(grad_head.dtype)
        grad_z = ((grad_head.reshape(1, -1) @ last.weight) * active) @ first.weight
        return grad_z.reshape(prototypes.shape)


class LinearHeadGenerator(Generator):
    def param_shape(self, num_classes: int) -> tuple[int, ...]:
        return (num_classes, self.feature_dim)

    def init_params(self, class_means, *, random, generator):
        if random:
            return 0.01 * torch.randn(self.param_shape(len(class_means)), generator=generator)
        return torch.zeros(self.param_shape(len(class_means)))

    def forward(self, heads: torch.Tensor) -> torch.Tensor:
        return heads

    def vjp(self, heads: torch.Tensor, grad_head: torch.Tensor) -> torch.Tensor:
        return grad_head


def create_generator(kind: str, *, feature_dim: int, channels: int, size: int, hidden_dim: int,
                     num_classes: int) -> Generator:
    """Build a generator by name; ``num_classes`` matters only for ``task-mlp`` (its fixed task size)."""
    if kind == "classwise":
        return ClasswiseGenerator(feature_dim, channels=channels, size=size, hidden_dim=hidden_dim)
    if kind == "task-mlp":
        return TaskMLPGenerator(feature_dim, channels=channels, size=size, hidden_dim=hidden_dim,
                                num_classes=num_classes)
    if kind == "linear-head":
        return LinearHeadGenerator(feature_dim)
    raise ConfigError(f"unknown generator '{kind}'; choose one of: classwise, task-mlp, linear-head")
