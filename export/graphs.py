"""The learner-step graph; the bundle's other two graphs export ``model.backbone`` (images
[N, 3, S, S] -> features [N, D]) and ``model.generator`` (prototypes [C, c, s, s] -> head [C, D]) as they are.

- ``LearnerStepGraph``: (prototypes, features [N, D], labels int64 [N]) -> (loss, grad): one step of
  on-device learning without autograd. The backward pass is written out by hand (and through the
  generator's ``vjp``), so the graph has no training ops and runs in any inference runtime.

Shapes that vary (N, and C for the class-wise generator) are read from tensors, never from Python
ints, so a traced graph stays dynamic in them.
"""

from __future__ import annotations

import torch
from torch import nn

from pah_edge.workstation.hypernetwork import PrototypeGenerator


class LearnerStepGraph(nn.Module):
    """(prototypes [C, c, s, s], features [N, D], labels int64 [N]) -> (loss [], grad [C, c, s, s]).

    loss is the mean cross-entropy of ``features @ generator(prototypes).T``; grad is d loss / d
    prototypes, computed without autograd:
    dlogits = (softmax - onehot) / N, dhead = dlogits.T @ features, grad = generator.vjp(prototypes, dhead).
    """

    def __init__(self, generator: PrototypeGenerator):
        super().__init__()
        self.generator = generator

    def forward(self, prototypes: torch.Tensor, features: torch.Tensor, labels: torch.Tensor):
        head = self.generator(prototypes)
        logits = features @ head.T
        log_probs = torch.log_softmax(logits, dim=1)
        # One-hot by comparison with arange(C): F.one_hot would bake C in as a constant.
        classes = torch.arange(logits.shape[1], device=labels.device, dtype=labels.dtype)
        onehot = (labels.unsqueeze(1) == classes.unsqueeze(0)).to(logits.dtype)
        loss = -(onehot * log_probs).sum(dim=1).mean()
        dlogits = (torch.exp(log_probs) - onehot) / logits.shape[0]
        dhead = dlogits.T @ features
        return loss, self.generator.vjp(prototypes, dhead)
