"""Choosing the device, the precision and the thread count, with clean fallbacks."""

from __future__ import annotations

import contextlib
import logging
import sys

import torch

from convgru_cli.errors import UserError

log = logging.getLogger("convgru")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: unknown device; choose auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here; use --device auto or cpu")
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple MPS is not available here; use --device auto or cpu")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions (AMX or AVX512-BF16) that oneDNN uses."""
    if sys.platform != "linux":
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype (float32 means no autocast). auto = bf16 where the hardware runs it fast."""
    if name not in PRECISIONS:
        raise UserError(f"--precision {name}: choose one of {', '.join(PRECISIONS)}")
    if name == "fp32":
        return torch.float32
    if name == "fp16":
        if device.type not in ("cuda", "mps"):
            raise UserError("--precision fp16 needs a GPU (cuda or mps); use bf16 or fp32 on the CPU")
        return torch.float16
    if device.type == "cuda":
        # bf16 tensor cores came with Ampere (8.0); torch.cuda.is_bf16_supported() also says yes where bf16 is
        # only emulated, slower than fp32. ROCm builds run bf16 natively on the GPUs they support.
        fast = torch.version.hip is not None or torch.cuda.get_device_capability(device) >= (8, 0)
    elif device.type == "cpu":
        fast = cpu_has_fast_bf16()
    else:
        fast = False
    if name == "bf16" or fast:
        return torch.bfloat16
    log.info("no fast bf16 on this %s: running in fp32", device.type)
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def compile_for(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile, on CUDA with CUDA graphs: they replay the many small kernels of the unrolled steps
    without a launch each."""
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)


def pad_batch(batch: torch.Tensor, size: int) -> torch.Tensor:
    """``batch`` grown to ``size`` items with copies of its last: a smaller last batch runs through the graph
    compiled for the full ones instead of compiling another (a minute or more on a CPU)."""
    if len(batch) >= size:
        return batch
    return torch.cat([batch, batch[-1:].expand(size - len(batch), *batch.shape[1:])])


def compile_failure(error: Exception, command: str) -> UserError:
    """torch.compile fails at the first compiled call (no C++ compiler, say): one line, not Inductor's
    traceback."""
    cause = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return UserError(f"--compile: torch.compile failed ({cause}); {command} without --compile")


def set_threads(threads: int | None) -> None:
    """Use the given count; without one PyTorch's default stands (OMP_NUM_THREADS, else the physical cores)."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads {threads}: must be at least 1")
        torch.set_num_threads(threads)
