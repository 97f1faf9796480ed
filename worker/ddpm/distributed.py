"""One job on several GPUs: torch.distributed with DistributedDataParallel, one process per GPU.

Rank r of k trains on `cuda:r` (NCCL) or on the CPU (gloo). Every rank draws the same global
batch of images, timesteps and noise from the same seeds and keeps its own share of it, so k
ranks with a global batch B compute the gradient of the same loss as one process with batch B
(DDP averages the shards' gradients; GroupNorm sees one image at a time). The reported loss is
the mean over ranks; weights, optimizer and EMA stay identical on every rank, and rank 0 alone
reports (metrics, checkpoints, samples).

`spawn_ranks` starts the k processes (torch.multiprocessing, spawn: CUDA is never initialised in
the parent); the caller supervises them with the returned context's `join`.
"""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp


@dataclass(frozen=True)
class Ranks:
    """Which process of a distributed job this is."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device_type: str) -> torch.device:
        return torch.device(f"cuda:{self.rank}") if device_type == "cuda" else torch.device("cpu")

    def share(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a tensor laid out along the global batch."""
        size = global_batch.shape[0] // self.world_size
        return global_batch[self.rank * size : (self.rank + 1) * size]


# DistributedDataParallel's options for the U-Net (bench/ddp.py measures them; BENCHMARKS.md).
# gradient_as_bucket_view: the gradients live in the reducer's buckets, no copy into them.
DDP_OPTIONS: dict[str, Any] = {"gradient_as_bucket_view": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process_group(ranks: Ranks, device_type: str, init_method: str, timeout_s: float) -> Iterator[None]:
    """Join the job's process group for the block: NCCL on CUDA, gloo on the CPU. A collective
    that waits longer than `timeout_s` (a rank hung or gone) fails instead of hanging."""
    if device_type == "cuda":
        torch.cuda.set_device(ranks.rank)
    else:
        # k processes share the host's cores: split them instead of oversubscribing each.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks.world_size))
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method=init_method,
        rank=ranks.rank,
        world_size=ranks.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        yield
        # Leave together: a rank that tore its group down while another was still finishing its
        # last collective made that one abort (gloo, once in CI). Not after an error: a peer may be gone.
        dist.barrier()
    finally:
        # The job's DDP module (its reducer holds the group, and gloo's worker threads) outlives
        # train() in reference cycles: free it now. Left to the interpreter's exit, the group's
        # teardown aborted a rank now and then (SIGABRT, "terminate called without an active
        # exception", about one 2-rank run in ten on this machine).
        gc.collect()
        dist.destroy_process_group()


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over all ranks, as a new tensor. No host sync."""
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (gloo has no AVG: sum, then divide). No host sync."""
    return sum_over_ranks(value) / dist.get_world_size()


def agree_to_stop(stop: bool, dev: torch.device) -> bool:
    """Rank 0's decision (stop or go on), known to every rank. Every rank calls this at the same
    steps, so that all of them leave the loop together."""
    flag = torch.tensor([1 if stop else 0], dtype=torch.int32, device=dev)
    dist.broadcast(flag, src=0)
    return bool(flag.item())  # SYNC (report steps only)


# How a collective reports a peer that is gone: NCCL raises DistBackendError; gloo's TCP transport
# raises a plain RuntimeError naming itself ("gloo/transport/tcp/pair.cc ... Connection reset by peer").
_PEER_LOSS_MARKERS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "NCCL")


def is_peer_loss(exc: BaseException) -> bool:
    """Whether an error raised in a collective means that another rank is gone (killed, crashed)."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _PEER_LOSS_MARKERS)


def spawn_ranks(fn: Callable[..., Any], args: tuple[Any, ...], world_size: int) -> torch_mp.ProcessContext:
    """Start `fn(rank, *args)` in `world_size` fresh processes; returns at once.

    The context's `join(timeout)` returns True once all exited cleanly, and raises
    `torch.multiprocessing.ProcessException` (after stopping the rest) when one failed or was killed.
    """
    context = torch_mp.start_processes(fn, args=args, nprocs=world_size, join=False, start_method="spawn")
    assert context is not None
    return context
