"""This process's place in a ``torchrun`` job, and the few collectives the package needs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Distributed:
    """``world == 1``: a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, NCCL on CUDA)."""
    if world_size_from_env() <= 1:
        return Distributed()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(device: torch.device, dist: Distributed) -> torch.device:
    """Each rank's own GPU under torchrun (the CPU stays the CPU)."""
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def broadcast(obj: Any, dist: Distributed) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if dist.world == 1:
        return obj
    import torch.distributed as tdist

    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    _let_workers_release()
    return box[0]


def gather_shards(part: np.ndarray, n: int) -> np.ndarray:
    """Undo ``DistributedSampler(shuffle=False)``: rank ``r`` holds items ``r, r + W, …``; every rank
    gets the whole array of ``n`` rows back (the sampler's padding dropped)."""
    import torch.distributed as tdist

    world = tdist.get_world_size()
    parts: list[Any] = [None] * world
    tdist.all_gather_object(parts, part)
    _let_workers_release()
    out = np.empty((len(parts[0]) * world, *part.shape[1:]), dtype=part.dtype)
    for r, p in enumerate(parts):
        out[r::world] = p
    return out[:n]


def _let_workers_release() -> None:
    """Wait in a barrier after an object collective. Gloo's worker thread drops the collective's
    Python-backed tensors only after the caller has its result, and needs the GIL to do so; were the
    interpreter to shut down first (the collective was the rank's last), the thread would be ended
    inside that destructor and the rank die of SIGABRT ("terminate called without an active
    exception") after its work was done. The barrier's wait releases the GIL while the worker does it."""
    import torch.distributed as tdist

    tdist.barrier()
