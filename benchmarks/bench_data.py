"""Is the reader ever the bottleneck? Sequences/s of shuffled batches read from HDF5, beside the training step.

Writes a [2000, 20, 64, 64] uint8 moving-digits file three times (gzip, lzf, no compression; one chunk per
sequence), reads every sequence once in shuffled batches through convgru's own WindowDataset and DataLoader
set-up, lazily (--cache off, each worker with its own handle) and from memory (--cache auto), and times a
training step of the default model at the same batch size for comparison.

    python benchmarks/bench_data.py [--sequences 2000] [--batch 16] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import h5py
import torch

from convgru_cli import sources, windowing
from convgru_cli.device import autocast, pick_precision
from convgru_cli.model import EncoderForecaster, make_config
from convgru_cli.synth import font_glyphs, moving_digits
from convgru_cli.train import epoch_batches


def read_rate(path: str, cache: bool, batch: int, workers: int) -> float:
    with h5py.File(path, "r") as file:
        frames = sources.StackedFrames(file, "frames", cache=cache)
    windows = windowing.windows(frames, 20, 1)
    loader = torch.utils.data.DataLoader(
        windowing.WindowDataset(frames, windows, 20),
        batch_sampler=epoch_batches(len(windows), batch, 0, 0, 0, 1),
        num_workers=workers,
    )
    start = time.perf_counter()
    seen = sum(len(b) for b in loader)
    return seen / (time.perf_counter() - start)


def train_rate(batch: int, steps: int = 3) -> float:
    model = EncoderForecaster(make_config("fast", 1))
    optimizer = torch.optim.AdamW(model.parameters())
    precision = pick_precision("auto", torch.device("cpu"))
    x, y = torch.randn(batch, 10, 1, 64, 64), torch.randn(batch, 10, 1, 64, 64)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with autocast(torch.device("cpu"), precision):
            loss = (model(x, 10).float() - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch / min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for lazy reads (train's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    array = moving_digits(args.sequences, 20, font_glyphs(), seed=0)
    step = train_rate(args.batch)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for compression in ("gzip", "lzf", None):
            path = os.path.join(folder, f"{compression}.h5")
            with h5py.File(path, "w") as file:
                file.create_dataset("frames", data=array, chunks=(1, 20, 64, 64), compression=compression)
            size_mb = os.path.getsize(path) / 1e6
            for cache, workers in ((False, args.workers), (True, 0)):
                rate = read_rate(path, cache, args.batch, workers)
                rows.append(
                    {
                        "compression": compression or "none",
                        "file_mb": size_mb,
                        "cache": cache,
                        "workers": workers,
                        "read_seq_s": rate,
                        "times_training_rate": rate / step,
                    }
                )
    result = {"train_step_seq_s": step, "batch": args.batch, "sequences": args.sequences, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"training step (default model, batch {args.batch}): {step:.1f} sequences/s")
    print(f"{'compression':<12}{'file MB':>9}{'read':>10}{'workers':>9}{'read seq/s':>12}{'x training':>12}")
    for row in rows:
        mode = "memory" if row["cache"] else "lazy"
        print(
            f"{row['compression']:<12}{row['file_mb']:>9.1f}{mode:>10}{row['workers']:>9}"
            f"{row['read_seq_s']:>12.0f}{row['times_training_rate']:>12.0f}"
        )


if __name__ == "__main__":
    main()
