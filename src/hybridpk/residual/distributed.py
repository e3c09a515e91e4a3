"""Data-parallel training of the hybrid on torch.distributed: every rank holds the same data and model, takes its
share of each minibatch's patients, and the gradients are summed over the ranks before every step.

Launched by torchrun (``torchrun --nproc_per_node=N -m hybridpk fit ... --distributed``), which sets RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT; backend gloo on the CPU, nccl on CUDA devices.

Why not the DistributedDataParallel wrapper: its gradient hooks fire on the wrapped module's ``forward``, while
the hybrid's objective calls the encoder, the correction and the structural model separately, and each
patient's ETAs are parameters outside the networks. Summing every gradient explicitly (what DDP does in
buckets) keeps both exact: with the loss of a rank's patients divided by the global minibatch size, the sum over
ranks is the single-process gradient of the same minibatch, up to the order of the floating-point sums. The
noise of the reparametrisation trick is drawn for the whole minibatch on every rank (the same seeded
generator), and each rank takes its patients' rows, so that a distributed training follows the single-process
one (tests/integration/test_distributed.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import HybridPKError
from ..solve.device import resolve_device

__all__ = ["Shard", "current_shard", "init_from_environment"]

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Shard:
    """This process's place among the ranks: ``rank`` of ``world`` (a single process: 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """The rank that writes the run's output and shows progress."""
        return self.rank == 0

    def take(self, idx):
        """This rank's share of the minibatch indices ``idx``: every world-th one from its rank."""
        return idx[self.rank::self.world]

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place (unchanged in a single process)."""
        if self.world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def sum_gradients(self, params) -> None:
        """Every parameter's gradient summed over the ranks (a rank whose patients do not touch a parameter
        contributes zeros)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.all_sum(p.grad)


def current_shard(distributed: bool) -> Shard:
    """The Shard of this process: the initialised process group's rank and size when ``distributed``, else a
    single process."""
    if not distributed:
        return Shard()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise HybridPKError("distributed training needs an initialised torch.distributed process group: launch with "
                            "torchrun --nproc_per_node=N -m hybridpk fit ... --distributed")
    return Shard(torch.distributed.get_rank(), torch.distributed.get_world_size())


def init_from_environment(device: str = "cpu") -> tuple[Shard, str]:
    """Join the process group torchrun describes in the environment (gloo for the CPU, nccl for CUDA, each rank
    on its LOCAL_RANK's GPU). Returns (the Shard, the device this rank trains on)."""
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise HybridPKError(f"--distributed: {', '.join(missing)} not set; launch with torchrun "
                            "--nproc_per_node=N -m hybridpk fit ... --distributed (one process per CPU core or GPU)")
    if not torch.distributed.is_available():
        raise HybridPKError("--distributed: this torch build has no torch.distributed")
    device = str(resolve_device(device))
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(torch.device(device))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return current_shard(True), device
