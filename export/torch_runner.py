"""PyTorch reference runtime: the ground truth that ``verify`` and ``bench`` compare the other runtimes against.

It lives on the workstation side (``export/``) because it needs torch; ``verify`` calls
``torch_runners`` itself, and the ``bench`` command hands it to ``run_bench``, so the device side
never imports this package. Importing it does not import torch; making a runner does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pah_edge.bundle import Bundle, sha256_file
from pah_edge.bundle_layout import GRAPH_SPECS
from pah_edge.device.runtimes.base import Runner, Spec

if TYPE_CHECKING:
    import torch


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

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            result = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self._input_names))
        if isinstance(result, dict):
            result = [result[n] for n in self._output_names]
        elif isinstance(result, torch.Tensor):
            result = [result]
        if len(result) != len(self._output_names):
            raise ValueError(f"the module returned {len(result)} outputs for output_names {self._output_names}")
        return {n: t.detach().cpu().numpy() for n, t in zip(self._output_names, result)}


def torch_runners(bundle: Bundle, threads: int | None = None) -> tuple[dict[str, Runner] | None, str | None]:
    """({graph: inactive PyTorch runner} of the bundle's source checkpoint, None), or (None, why not).

    The checkpoint counts only while it is where the export found it and unchanged since; torch is
    imported only when it is installed and the checkpoint is there. ``threads``: torch's intra-op
    threads (None leaves its default).
    """
    if importlib.util.find_spec("torch") is None:
        return None, "torch is not installed"
    source = bundle.manifest.get("source_checkpoint") or {}
    checkpoint = Path(source.get("path", ""))
    if not source.get("path") or not checkpoint.is_file():
        return None, f"source checkpoint {checkpoint} is not on this machine"
    if sha256_file(checkpoint) != source.get("sha256"):
        return None, f"{checkpoint} changed since the export"
    import torch

    from pah_edge.workstation.checkpoint import load_checkpoint, model_from_checkpoint
    from pah_edge.export.graphs import LearnerStepGraph

    if threads is not None:
        torch.set_num_threads(threads)

    model = model_from_checkpoint(load_checkpoint(checkpoint)).eval()
    modules = {"backbone": model.backbone, "generator": model.generator,
               "learner_step": LearnerStepGraph(model.generator)}
    runners = {}
    for graph, module in modules.items():
        spec = GRAPH_SPECS[graph]
        runners[graph] = TorchRunner(module, input_names=spec.input_names, output_names=spec.output_names,
                                     input_specs={t.name: (None, np.dtype(t.dtype)) for t in spec.inputs})
    return runners, None
