"""Several processes under torchrun: NCCL between GPUs, gloo between CPUs. Without torchrun, one process."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist


def setup(device: torch.device) -> tuple[int, int]:
    """(rank, world size), joining the process group that torchrun's environment describes: NCCL when the
    processes compute on CUDA, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), world


def process_device(device: torch.device) -> torch.device:
    """Under torchrun each process drives the GPU of its local rank."""
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def max_over_processes(value: float, device: torch.device) -> float:
    """The largest of each process's ``value`` (itself when there is one process)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def sum_over_processes(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all processes (itself when there is one)."""
    if not dist.is_initialized():
        return tensor
    on_device = tensor.to(device)
    dist.all_reduce(on_device)
    return on_device.to(tensor.device)


# Seconds between the last collective and tearing the group down. Gloo's worker thread releases a finished
# collective's tensors after the caller has moved on, and needs the interpreter lock to do so; a DDP wrapper freed
# in that window joins that thread while holding the lock, and the process hangs (seen under torchrun in tests).
RELEASE_PAUSE_S = 0.2


def finish() -> None:
    """Wait for every process, let the last collective be released, then leave the process group (NCCL warns at
    exit about one left open)."""
    if dist.is_initialized():
        dist.barrier()
        time.sleep(RELEASE_PAUSE_S)
        dist.destroy_process_group()
