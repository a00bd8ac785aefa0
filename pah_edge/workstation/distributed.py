"""One process or many: the same training code runs plain or under ``torchrun`` with DDP.

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) every process joins a process group (NCCL
on GPUs, gloo on CPU), trains on its shard of each batch, and DDP averages gradients, so N processes
with ``batch_size / N`` each take the same steps as one process with ``batch_size`` in expectation.
Only rank 0 writes outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pah_edge.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str = "auto") -> DistContext:
        """Join the process group when launched by torchrun; pick the device (``auto``: CUDA if present)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        if use_cuda and not torch.cuda.is_available():
            raise ConfigError(f"--device {device} asked for CUDA but no GPU is visible; use --device cpu")
        if world_size > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if not use_cuda:
            dev = torch.device("cpu")
        elif world_size > 1:
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cuda" if device == "auto" else device)
        return cls(rank=rank, world_size=world_size, device=dev)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around ``model`` when distributed; old tasks' prototypes may go unused in a step."""
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def loader(self, dataset: Dataset, *, batch_size: int, seed: int) -> tuple[DataLoader, DistributedSampler]:
        """A shuffling loader over this rank's shard; call ``sampler.set_epoch`` every epoch."""
        sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed)
        per_rank = max(1, batch_size // self.world_size)
        return DataLoader(dataset, batch_size=per_rank, sampler=sampler), sampler

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def shutdown(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
