"""PyTorch reference runner: the ground truth that ``verify`` compares the other runtimes against.

It lives on the workstation side (``export/``) because it needs torch; ``create_runner("torch", ...)``
imports it lazily, so the device side never pays for torch.
"""

from __future__ import annotations

import numpy as np
import torch

from pah_edge.device.runtimes.base import Runner, Spec


class TorchRunner(Runner):
    """Runs ``module`` in eval mode without gradients on CPU, numpy in and out.

    ``input_specs`` ({name: (shape, dtype)}, shape None = any) defaults to float32 of any shape,
    since a module does not declare its inputs. Positional arguments follow ``input_names``.
    """

    name = "torch"

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        input_names: list[str],
        output_names: list[str],
        input_specs: dict[str, Spec] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self._input_names = list(input_names)
        self._output_names = list(output_names)
        self._specs = input_specs or {n: (None, np.dtype(np.float32)) for n in self._input_names}
        self._was_training = False

    def _activate(self) -> None:
        self._was_training = self.module.training
        self.module.eval()

    def _deactivate(self) -> None:
        self.module.train(self._was_training)

    def input_specs(self) -> dict[str, Spec]:
        return dict(self._specs)

    def output_names(self) -> list[str]:
        return list(self._output_names)

    @torch.no_grad()
    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self._input_names))
        if isinstance(result, dict):
            result = [result[n] for n in self._output_names]
        elif isinstance(result, torch.Tensor):
            result = [result]
        if len(result) != len(self._output_names):
            raise ValueError(f"the module returned {len(result)} outputs for output_names {self._output_names}")
        return {n: t.detach().cpu().numpy() for n, t in zip(self._output_names, result)}
