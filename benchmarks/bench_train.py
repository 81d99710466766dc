"""Training and inference speed of our model against a plain six-convolution float32 ConvGRU.

In one process, alternating configurations round by round (warm-up excluded, median of the rounds):
  reference  the tutorial ConvGRU written here: per-gate convolutions (three over the input, three over the
             hidden state, the candidate's over r*h), every convolution run step by step, NCHW, float32;
  ours fp32  convgru_cli's model at the same architecture, float32;
  ours auto  the same under --precision auto (bf16 autocast where the hardware is fast at it);
  recompute  ours auto with --recompute (activations recomputed in the backward pass, for memory);
  compiled   with --compile: ours auto under torch.compile; its compile time is the first call's time less
             the median call's, for training and for inference (two graphs).
For each: sequences/s, GFLOP/s (FlopCounterMode), and the fraction of a conv roofline measured in the same
run: the model's own convolution shapes timed alone, in the same precision and memory format.

    python benchmarks/bench_train.py [--arch shi-mnist] [--batch 8] [--rounds 3] [--device cpu|cuda|mps]
                                     [--compile] [--quick] [--json]

On a GPU run it at each batch size of interest (8 to 256), with and without --compile. Peak memory is the
resident high-water mark of a fresh process on the CPU (and on MPS, where it may leave out Metal's buffers),
the caching allocator's peak of live tensors on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from convgru_cli.device import autocast, compile_for, pick_device, pick_precision
from convgru_cli.model import EncoderForecaster, ModelConfig, make_config

INPUT_FRAMES = OUTPUT_FRAMES = 10


class PlainConvGRUCell(nn.Module):
    """The textbook cell: six convolutions, candidate from a convolution over r*h."""

    def __init__(self, in_channels: int, hidden: int, input_kernel: int, hidden_kernel: int):
        super().__init__()

        def conv(cin, kernel):
            return nn.Conv2d(cin, hidden, kernel, padding=kernel // 2)

        self.hidden = hidden
        self.xr, self.xu, self.xn = (conv(in_channels, input_kernel) for _ in range(3)) if in_channels else (None,) * 3
        self.hr, self.hu, self.hn = (conv(hidden, hidden_kernel) for _ in range(3))

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        def gate(conv_x, conv_h, state):
            return conv_h(state) if x is None else conv_x(x) + conv_h(state)

        r = torch.sigmoid(gate(self.xr, self.hr, h))
        u = torch.sigmoid(gate(self.xu, self.hu, h))
        n = F.leaky_relu(gate(self.xn, self.hn, r * h), 0.2)
        return u * h + (1 - u) * n


class PlainEncoderForecaster(nn.Module):
    """Shi's encoder-forecaster as tutorials write it: every convolution inside the time loop."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        below = [c.stem_channels, *c.hidden[:-1]]
        levels = len(c.hidden)
        self.down, self.enc, self.fc, self.up = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in range(levels):
            source = c.channels * c.patch**2 if i == 0 else c.hidden[i - 1]
            pad = (c.down_kernels[i] - c.strides[i] + 1) // 2
            self.down.append(nn.Conv2d(source, below[i], c.down_kernels[i], c.strides[i], pad))
            self.enc.append(PlainConvGRUCell(below[i], c.hidden[i], c.input_kernel, c.hidden_kernel))
            fc_in = 0 if i == levels - 1 else c.hidden[i]
            self.fc.append(PlainConvGRUCell(fc_in, c.hidden[i], c.input_kernel, c.hidden_kernel))
            k, s = c.up_kernels[i], c.strides[i]
            pad = (k - s + 1) // 2
            self.up.append(nn.ConvTranspose2d(c.hidden[i], below[i], k, s, pad, 2 * pad - (k - s)))
        self.head = nn.Conv2d(c.stem_channels, c.channels * c.patch**2, 1)
        self.refine = nn.Conv2d(c.channels, c.channels, 3, padding=1) if c.patch > 1 else None

    def forward(self, inputs: torch.Tensor, frames: int) -> torch.Tensor:
        batch = inputs.shape[0]
        states = [None] * len(self.enc)
        outputs = []
        for t in range(inputs.shape[1]):
            x = inputs[:, t]
            if self.c.patch > 1:
                x = F.pixel_unshuffle(x, self.c.patch)
            for i, (down, cell) in enumerate(zip(self.down, self.enc, strict=True)):
                x = F.leaky_relu(down(x), 0.2)
                if states[i] is None:
                    states[i] = x.new_zeros(batch, cell.hidden, *x.shape[-2:])
                states[i] = cell(x, states[i])
                x = states[i]
        for _ in range(frames):
            x = None
            for i in reversed(range(len(self.fc))):
                states[i] = self.fc[i](x, states[i])
                x = F.leaky_relu(self.up[i](states[i]), 0.2)
            y = self.head(x)
            if self.c.patch > 1:
                y = F.pixel_shuffle(y, self.c.patch)
                y = y + self.refine(y)
            outputs.append(y)
        return torch.stack(outputs, dim=1)


def train_step(model, optimizer, x, y, precision):
    with autocast(x.device, precision):
        prediction = model(x, OUTPUT_FRAMES)
    loss = F.mse_loss(prediction.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def infer_step(model, x, precision):
    with autocast(x.device, precision):
        model(x, OUTPUT_FRAMES)


def seconds(fn, device: torch.device) -> float:
    """Wall-clock time of fn, waiting for the work it queued on a GPU."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def conv_roofline_seconds(model: nn.Module, x: torch.Tensor, precision: torch.dtype, train: bool) -> float:
    """Time each of the model's convolution calls alone (same shapes, precision and memory format), summed."""
    calls: Counter = Counter()
    hooks = [
        module.register_forward_hook(
            lambda mod, inputs, _: calls.update([(mod, tuple(inputs[0].shape), inputs[0].is_contiguous())])
        )
        for module in model.modules()
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d)
    ]
    with torch.no_grad(), autocast(x.device, precision):
        model(x, OUTPUT_FRAMES)
    for hook in hooks:
        hook.remove()
    total = 0.0
    for (module, shape, contiguous), count in calls.items():
        memory_format = torch.contiguous_format if contiguous else torch.channels_last
        sample = torch.randn(shape, device=x.device).contiguous(memory_format=memory_format).requires_grad_(train)

        def once(module=module, sample=sample):
            with autocast(x.device, precision):
                out = module(sample)
            if train:
                out.float().sum().backward()

        once()
        total += statistics.median(seconds(once, x.device) for _ in range(3)) * count
    return total


def peak_kb(device: torch.device) -> int:
    """This process's peak memory: on CUDA the caching allocator's peak of live tensors; elsewhere the
    kernel's high-water mark of resident memory. ru_maxrss only where /proc is missing: a child process
    inherits the parent's peak in it at fork (measured: a child of a 2.3 GB parent reports 2.3 GB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) // 1024
    status = Path("/proc/self/status")
    if status.exists():
        return int(re.search(r"VmHWM:\s*(\d+)", status.read_text()).group(1))
    import resource  # not on Windows

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)


# glibc keeps freed blocks below its mmap threshold (which grows to 32 MB) in a heap that fragments; mapping every
# block of 4 MB or more and unmapping it on free keeps resident memory near the live tensors. Mapped fresh, those
# blocks fault in page by page; transparent huge pages (glibc >= 2.35 asks for them) make that 512 times fewer
# faults, which takes the cost in speed from about 1.5x to about 1.1x. Unknown tunables are ignored.
LOW_HEAP = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4194304:glibc.malloc.hugetlb=1"}


def peak_memory(arch: str, batch: int, device: torch.device, recompute: bool = False, env: dict | None = None):
    """Peak memory (MB) of a fresh process that runs three training steps in the auto precision, and the time
    of its last step: resident memory, the runtime included, on the CPU; allocated tensors on CUDA."""
    code = (
        "import torch; from benchmarks.bench_train import *; "
        f"d = torch.device({str(device)!r}); "
        f"m = EncoderForecaster(make_config({arch!r}, 1), recompute={recompute}).to(d); "
        "o = torch.optim.AdamW(m.parameters()); "
        f"x = torch.randn({batch}, 10, 1, 64, 64, device=d); y = torch.randn_like(x); "
        "p = pick_precision('auto', d); "
        "last = [seconds(lambda: train_step(m, o, x, y, p), d) for _ in range(3)][-1]; print(peak_kb(d), last)"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env={**os.environ, **(env or {})},
    )
    kb, last = done.stdout.strip().splitlines()[-1].split()
    return int(kb) / 1024, float(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="shi-mnist")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--compile", action="store_true", help="add ours auto under torch.compile (slow start)")
    parser.add_argument("--quick", action="store_true", help="one small round (smoke check, under a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    if args.quick:
        args.arch, args.batch, args.rounds = "fast", 2, 1

    torch.manual_seed(0)
    device = pick_device(args.device)
    config = make_config(args.arch, 1)
    auto = pick_precision("auto", device)
    ours = EncoderForecaster(config).to(device)
    recomputing = EncoderForecaster(config, recompute=True).to(device)
    reference = PlainEncoderForecaster(config).to(device)
    auto_name = str(auto).removeprefix("torch.")
    ours_auto = f"ours auto ({auto_name})"
    candidates = {
        "reference fp32": (reference, torch.float32),
        "ours fp32": (ours, torch.float32),
        ours_auto: (ours, auto),
        f"recompute ({auto_name})": (recomputing, auto),
    }
    if args.compile:
        compiled = EncoderForecaster(config).to(device)
        compiled.load_state_dict(ours.state_dict())
        candidates[f"compiled ({auto_name})"] = (compile_for(compiled, device), auto)
    x = torch.randn(args.batch, INPUT_FRAMES, 1, 64, 64, device=device)
    y = torch.randn(args.batch, OUTPUT_FRAMES, 1, 64, 64, device=device)
    optimizers = {name: torch.optim.AdamW(model.parameters(), 1e-4) for name, (model, _) in candidates.items()}

    def train_once(name):
        model, precision = candidates[name]
        train_step(model, optimizers[name], x, y, precision)

    def infer_once(name):
        infer_step(candidates[name][0], x, candidates[name][1])

    times = {(name, mode): [] for name in candidates for mode in ("train", "infer")}
    first_call = {}
    for name in candidates:  # warm-up, and for the compiled model its compilation
        for mode, fn in (("train", train_once), ("infer", infer_once)):
            first_call[(name, mode)] = seconds(lambda fn=fn, name=name: fn(name), device)
    for _ in range(args.rounds):
        for name in candidates:
            for mode, fn in (("train", train_once), ("infer", infer_once)):
                times[(name, mode)].append(seconds(lambda fn=fn, name=name: fn(name), device))

    rows = []
    for name, (_, precision) in candidates.items():
        row = {"config": name}
        # The compiled model does the work of the eager one; count and roofline that.
        counted = ours_auto if name.startswith("compiled") else name
        for mode, fn in (("train", train_once), ("infer", infer_once)):
            median = statistics.median(times[(name, mode)])
            work = flops(lambda fn=fn, counted=counted: fn(counted))
            row[f"{mode}_seq_s"] = args.batch / median
            row[f"{mode}_gflop_s"] = work / median / 1e9
            row[f"{mode}_gflop_per_seq"] = work / args.batch / 1e9
            if counted.startswith("ours"):
                roofline = conv_roofline_seconds(candidates[counted][0], x, precision, mode == "train")
                row[f"{mode}_roofline_fraction"] = roofline / median
            if name.startswith("compiled"):
                row[f"{mode}_compile_seconds"] = first_call[(name, mode)] - median
        rows.append(row)

    base, fp32, fast, recompute, *compiled_rows = rows
    memory_batch = 2 if args.quick else 16
    peak_plain, _ = peak_memory(args.arch, memory_batch, device)
    peak_recompute, recompute_step = peak_memory(args.arch, memory_batch, device, recompute=True)
    # glibc's tunables shape resident memory on a Linux CPU only; a GPU's peak is its caching allocator's.
    low_heap = None, None
    if device.type == "cpu" and sys.platform == "linux":
        low_heap = peak_memory(args.arch, memory_batch, device, recompute=True, env=LOW_HEAP)
    peak_low_heap, low_heap_step = low_heap
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)} ({machine})"
    result = {
        "machine": machine,
        "device": str(device),
        "torch": torch.__version__,
        "arch": args.arch,
        "batch": args.batch,
        "rounds": args.rounds,
        "rows": rows,
        "train_ratio": fast["train_seq_s"] / base["train_seq_s"],
        "infer_ratio": fast["infer_seq_s"] / base["infer_seq_s"],
        "fp32_train_ratio": fp32["train_seq_s"] / base["train_seq_s"],
        "roofline_fraction": fast["train_roofline_fraction"],
        # The most that faster glue could give: every convolution at its speed alone and nothing else.
        "ceiling_train_ratio": fast["train_seq_s"] / fast["train_roofline_fraction"] / base["train_seq_s"],
        "ceiling_infer_ratio": fast["infer_seq_s"] / fast["infer_roofline_fraction"] / base["infer_seq_s"],
        "recompute_train_ratio": recompute["train_seq_s"] / base["train_seq_s"],
        "peak_train_mb_batch16": peak_plain,
        "peak_train_mb_batch16_recompute": peak_recompute,
        "peak_train_mb_batch16_recompute_low_heap": peak_low_heap,
        "low_heap_step_time_ratio": None if low_heap_step is None else low_heap_step / recompute_step,
    }
    for row in compiled_rows:
        result["compiled_train_ratio"] = row["train_seq_s"] / base["train_seq_s"]
        result["compiled_infer_ratio"] = row["infer_seq_s"] / base["infer_seq_s"]
        result["compile_seconds"] = {mode: row[f"{mode}_compile_seconds"] for mode in ("train", "infer")}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.arch}, batch {args.batch}, 64x64, 10->10, median of {args.rounds} rounds; {result['machine']}")
    header = f"{'config':<22}{'train seq/s':>12}{'GFLOP/s':>9}{'roofline':>9}{'infer seq/s':>13}{'GFLOP/s':>9}"
    print(header + f"{'roofline':>9}")
    for row in rows:
        fractions = [row.get(f"{mode}_roofline_fraction") for mode in ("train", "infer")]
        roof = [" " * 9 if fraction is None else f"{fraction:>9.0%}" for fraction in fractions]
        print(
            f"{row['config']:<22}{row['train_seq_s']:>12.2f}{row['train_gflop_s']:>9.0f}{roof[0]}"
            f"{row['infer_seq_s']:>13.2f}{row['infer_gflop_s']:>9.0f}{roof[1]}"
        )
    print(
        f"ours auto / reference: training {result['train_ratio']:.2f}x, inference {result['infer_ratio']:.2f}x; "
        f"ours fp32 / reference: training {result['fp32_train_ratio']:.2f}x"
    )
    print(
        f"conv roofline ceiling (ours auto's convolutions at their speed alone, nothing else): training "
        f"{result['ceiling_train_ratio']:.2f}x, inference {result['ceiling_infer_ratio']:.2f}x the reference"
    )
    print(
        f"GFLOP per training sequence: {fast['train_gflop_per_seq']:.1f} (ours), "
        f"{base['train_gflop_per_seq']:.1f} (reference)"
    )
    print(
        f"peak memory, training at batch {memory_batch} ({'allocated' if device.type == 'cuda' else 'resident'}, "
        f"fresh process): {peak_plain:.0f} MB, {peak_recompute:.0f} MB with --recompute "
        f"({result['recompute_train_ratio']:.2f}x the reference's training speed)"
    )
    if peak_low_heap is not None:
        print(
            f"  {peak_low_heap:.0f} MB with --recompute and GLIBC_TUNABLES={LOW_HEAP['GLIBC_TUNABLES']} (its step "
            f"takes {result['low_heap_step_time_ratio']:.2f}x the time)"
        )
    if compiled_rows:
        print(
            f"torch.compile: training {result['compiled_train_ratio']:.2f}x, inference "
            f"{result['compiled_infer_ratio']:.2f}x the reference; compile time "
            f"{result['compile_seconds']['train']:.0f} s (training graph), {result['compile_seconds']['infer']:.0f} s "
            "(inference graph)"
        )


if __name__ == "__main__":
    main()
