"""torch.distributed helpers: one code path for a single process and for torchrun (NCCL on GPU, gloo on CPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str | torch.device | None = None) -> World:
    """Join the process group torchrun set up (idempotent); a plain run is a world of one."""
    if not launched_by_torchrun():
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)  # before NCCL starts, so its communicator binds this rank's GPU
    if not dist.is_initialized():
        if use_cuda:
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group(backend="gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def default_device(world: World, requested: str | torch.device | None = None) -> torch.device:
    """The user's device, else CUDA when available; under torchrun each rank takes its own local GPU."""
    dev = torch.device(requested) if requested else (
        torch.device(f"cuda:{world.local_rank}") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type == "cuda" and world.world_size > 1:
        dev = torch.device("cuda", world.local_rank)
    return dev


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
