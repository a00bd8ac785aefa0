"""Hypernetworks that turn a task's parameters (its prototypes) into a classifier head.

Every generator maps a task parameter tensor of ``param_shape(C)`` to a head ``[C, D]``; logits are
``features @ head.T`` (bias-free, as in the paper).

- ``classwise-linear`` (default): each class's head row is a linear map of that class's prototype
  alone, ``w_c = A z_c`` with ``z_c`` the flattened prototype (``K = channels * size**2`` numbers).
  Any number of classes per task, and a frozen generator expresses every head in the
  ``K``-dimensional span of ``A``: a device learning unseen classes solves a convex problem,
  starts from the least-squares prototypes of the class-mean head, and old tasks' heads stay exact.
- ``classwise``: ``w_c = A z_c + MLP(z_c)``; the MLP (last layer zero-initialised) adds a non-linear
  correction on the training tasks but makes the device's problem non-convex and its
  class-mean start inexact (lower on novel tasks: docs/benchmarks.md, "Learning a new task on the device").
- ``task-mlp``: the paper's generator. All prototypes of a task, flattened into one vector, through
  a one-hidden-layer MLP; fixed number of classes per task.
- ``linear-head``: no hypernetwork; the task parameter *is* its ``[C, D]`` head (the LwF baseline).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pah_edge.errors import ConfigError
from pah_edge.generators import generator_kind


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


class LinearGenerator(PrototypeGenerator):
    """``w_c = A z_c / sqrt(K)`` with ``A`` initialised orthogonal at unit scale.

    The fixed ``1 / sqrt(K)`` keeps heads at the scale of an ``A`` initialised with gain
    ``1 / sqrt(K)`` while Adam's steps, of a fixed size per entry, move ``A`` by a few percent instead
    of ~40 % a step: old tasks' heads drift less between distillation steps (forgetting on
    Split-Fashion-MNIST: docs/benchmarks.md, "Continual learning on the workstation").
    """

    def __init__(self, feature_dim: int, *, channels: int, size: int):
        super().__init__(feature_dim, channels=channels, size=size)
        k = self.prototype_numel
        self.linear = nn.Linear(k, feature_dim, bias=False)
        nn.init.orthogonal_(self.linear.weight)
        self.scale = 1 / math.sqrt(k)

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        return self.scale * self.linear(prototypes.flatten(1))

    def vjp(self, prototypes: torch.Tensor, grad_head: torch.Tensor) -> torch.Tensor:
        return self.scale * (grad_head @ self.linear.weight).reshape(prototypes.shape)


class ClasswiseGenerator(LinearGenerator):
    """``w_c = A z_c + MLP(z_c)``."""

    def __init__(self, feature_dim: int, *, channels: int, size: int, hidden_dim: int):
        super().__init__(feature_dim, channels=channels, size=size)
        k = self.prototype_numel
        self.mlp = nn.Sequential(nn.Linear(k, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, feature_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        return super().forward(prototypes) + self.mlp(prototypes.flatten(1))

    def vjp(self, prototypes: torch.Tensor, grad_head: torch.Tensor) -> torch.Tensor:
        first, _, last = self.mlp
        active = (first(prototypes.flatten(1)) > 0).to(grad_head.dtype)
        grad_mlp = ((grad_head @ last.weight) * active) @ first.weight
        return super().vjp(prototypes, grad_head) + grad_mlp.reshape(prototypes.shape)


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


# Per kind (`pah_edge.generators`): (feature_dim, channels, size, hidden_dim, num_classes) -> module.
FACTORIES: dict[str, Callable[[int, int, int, int, int], Generator]] = {
    "classwise-linear": lambda d, c, s, h, n: LinearGenerator(d, channels=c, size=s),
    "classwise": lambda d, c, s, h, n: ClasswiseGenerator(d, channels=c, size=s, hidden_dim=h),
    "task-mlp": lambda d, c, s, h, n: TaskMLPGenerator(d, channels=c, size=s, hidden_dim=h, num_classes=n),
    "linear-head": lambda d, c, s, h, n: LinearHeadGenerator(d),
}


def create_generator(kind: str, *, feature_dim: int, channels: int, size: int, hidden_dim: int,
                     num_classes: int) -> Generator:
    """Build a generator by kind name; ``num_classes`` matters only for ``task-mlp`` (its fixed task
    size), ``hidden_dim`` only for kinds with a hidden layer."""
    return FACTORIES[generator_kind(kind).name](feature_dim, channels, size, hidden_dim, num_classes)
