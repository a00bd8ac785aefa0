"""The PAH model: a backbone, a hypernetwork, and one small parameter tensor per task.

Nothing per task is stored but its prototypes; heads are generated on demand.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pah_edge.workstation.backbones import Backbone, create_backbone
from pah_edge.workstation.config import ModelConfig, auto_prototype_size
from pah_edge.workstation.hypernetwork import Generator, PrototypeGenerator, create_generator


class PAHModel(nn.Module):
    def __init__(self, backbone: Backbone, generator: Generator):
        super().__init__()
        self.backbone = backbone
        self.generator = generator
        self.task_params = nn.ParameterList()

    @property
    def num_tasks(self) -> int:
        return len(self.task_params)

    def add_task(self, init: torch.Tensor) -> int:
        """Append a task's parameters (see ``generator.param_shape``); returns the task index."""
        self.task_params.append(nn.Parameter(init.detach().clone()))
        return self.num_tasks - 1

    def head(self, task: int) -> torch.Tensor:
        """The generated classifier head ``[C, D]`` of ``task``."""
        return self.generator(self.task_params[task])

    def logits(self, features: torch.Tensor, task: int) -> torch.Tensor:
        return features @ self.head(task).T

    def forward(self, x: torch.Tensor, tasks: Sequence[int], *, cached: bool = False) -> list[torch.Tensor]:
        """Logits of each task in ``tasks`` for one batch of images (the backbone runs once), or of their
        backbone features when ``cached`` (computed before, for a frozen backbone)."""
        features = x if cached else self.backbone(x)
        return [self.logits(features, t) for t in tasks]

    def prototype_logits(self, task: int) -> torch.Tensor:
        """A task's prototypes, upsampled to input images, through the backbone and their own head."""
        assert isinstance(self.generator, PrototypeGenerator)
        protos = self.task_params[task]
        images = nn.functional.interpolate(protos, size=self.backbone.image_size, mode="bilinear",
                                           align_corners=False)
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return self.logits(self.backbone(images), task)


def build_model(cfg: ModelConfig, *, first_task_classes: int, load_weights: bool = True) -> PAHModel:
    """A fresh model for ``cfg``; ``load_weights=False`` skips pretrained weights (a checkpoint follows)."""
    backbone = create_backbone(
        cfg.backbone,
        image_size=cfg.image_size,
        pretrained=cfg.pretrained and load_weights,
        weights=cfg.weights if load_weights else None,
    )
    generator = create_generator(
        cfg.generator,
        feature_dim=backbone.feature_dim,
        channels=cfg.prototype_channels,
        size=cfg.prototype_size or auto_prototype_size(backbone.feature_dim, cfg.prototype_channels),
        hidden_dim=cfg.hidden_dim,
        num_classes=first_task_classes,
    )
    for module in backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # torchvision's MobileNetV3 uses 0.01, which leaves the running statistics near their
            # initial values after the few hundred steps of a small task: eval-mode accuracy collapses.
            module.momentum = 0.1
    return PAHModel(backbone, generator)
