"""Whole domains in bounded memory: `convgru predict` and `convgru evaluate` on series of synthetic moving
rain of 256², 1024², 2200×1904 and 4400×3800 frames, each command in a fresh process, with its wall time and
peak resident memory; and today's evaluate against the code of another git revision (``--old REF``) on the
256² series (50 windows of 6 → 6 at the default batch of 16), same data and checkpoint, side by side.

The checkpoint is an untrained `fast` anchored model (it extrapolates the motion it estimates), made here:
time and memory do not depend on the weights.

    python benchmarks/bench_domain.py --sizes 256,1024 --old main
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import h5py
import numpy as np
import torch

from convgru_cli import checkpoint
from convgru_cli.model import EncoderForecaster, make_config
from convgru_cli.normalisation import Normalisation
from convgru_cli.train import Progress, TrainConfig
from convgru_cli.windowing import DataSpec

# OPERA's 2-km grid is 2200×1900; 1900 is not a multiple of the `fast` model's 8, so 2200×1904 stands in for it.
SIZES = {"256": (256, 256), "1024": (1024, 1024), "2200x1904": (2200, 1904), "4400x3800": (4400, 3800)}
INPUTS = 6


def write_series(path: str, height: int, width: int, steps: int) -> None:
    """[steps, H, W] float32 rain in mm/h: a separable wave pattern (cells about 160 px across) drifting 3 px
    down and 5 px right per step, written frame by frame."""
    y, x = np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32)
    with h5py.File(path, "w") as file:
        frames = file.create_dataset("rain", (steps, height, width), np.float32, chunks=(1, height, width))
        frames.attrs["units"] = "mm/h"
        frames.attrs["layout"] = "THW"
        for t in range(steps):
            wave_y, wave_x = np.sin((y - 3 * t) / 25.0), np.sin((x - 5 * t) / 25.0)
            ripple_y, ripple_x = np.cos((y - 3 * t) / 9.0), np.cos((x - 5 * t) / 11.0)
            rain = 12 * np.outer(wave_y, wave_x) + 3 * np.outer(ripple_y, ripple_x) - 2
            frames[t] = np.maximum(rain, 0)


def write_checkpoint(path: str, height: int, width: int, outputs: int) -> None:
    """An untrained `fast` anchored model for [6 → outputs] windows of this series, with a climatology frame of
    the series' size (so the climatology baseline is scored too)."""
    config = make_config("fast", channels=1)
    spec = DataSpec(dataset="rain", layout="THW", input_frames=INPUTS, output_frames=outputs, val_fraction=0.0)
    normalisation = Normalisation(
        offset=[0.0], scale=[5.0], data_min=0.0, data_max=15.0, dtype="float32", units="mm/h",
        mean_frame=torch.full((1, height, width), 2.0),
    )  # fmt: skip
    checkpoint.save(
        path,
        {
            "model_config": config.to_dict(),
            "data_spec": spec.to_dict(),
            "normalisation": normalisation.to_dict(),
            "train_config": asdict(TrainConfig()),
            "progress": asdict(Progress()),
            "model": EncoderForecaster(config).state_dict(),
        },
    )


def measure(command: list[str], env: dict | None = None) -> dict:
    """Wall seconds, CPU seconds (user + system: what a shared machine's other load disturbs least) and peak
    resident memory (GB) of ``command`` run in a fresh process."""
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    user, system, peak_kib = done.stderr.strip().splitlines()[-1].split()  # /usr/bin/time's line, printed last
    cpu = float(user) + float(system)
    return {"seconds": seconds, "cpu": cpu, "peak_gb": int(peak_kib) * 1024 / 1e9, "stdout": done.stdout}


def convgru(*args: str) -> list[str]:
    return ["/usr/bin/time", "-f", "%U %S %M", sys.executable, "-m", "convgru_cli", *args]


def evaluate_command(data: str, ckpt: str, extra: tuple[str, ...] = ()) -> list[str]:
    return convgru("evaluate", data, "--checkpoint", ckpt, "--device", "cpu", "--json", *extra)


def old_vs_new(workdir: str, ref: str, windows: int) -> None:
    """Today's evaluate at ``ref`` against this tree's on the 256² series: time, peak and the largest score
    difference."""
    data, ckpt = os.path.join(workdir, "s256.h5"), os.path.join(workdir, "s256.pt")
    write_series(data, 256, 256, windows + INPUTS + INPUTS - 1)
    write_checkpoint(ckpt, 256, 256, INPUTS)
    old_tree = ref  # a directory holding an older convgru_cli, or a revision of this repository to unpack
    if not os.path.isdir(os.path.join(ref, "convgru_cli")):
        old_tree = os.path.join(workdir, "old")
        os.makedirs(old_tree, exist_ok=True)
        archive = subprocess.run(["git", "archive", ref, "convgru_cli"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old_tree], input=archive, check=True)
    trees = {"old": old_tree, "new": os.getcwd()}
    for baselines in ("--baselines", "--no-baselines"):
        reports = {}
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": tree}
            result = measure(evaluate_command(data, ckpt, (baselines,)), env)
            reports[name] = json.loads(result["stdout"])
            print(f"256² evaluate {baselines} {name} ({ref if name == 'old' else 'this tree'}): "
                  f"{result['seconds']:.1f} s wall, {result['cpu']:.1f} s CPU, peak {result['peak_gb']:.2f} GB",
                  flush=True)  # fmt: skip
        print(f"  largest score difference old/new: {_largest_difference(reports['old'], reports['new']):.2e}")


def _largest_difference(old: dict, new: dict) -> float:
    largest = 0.0
    for method, scores in old["scores"].items():
        for metric, values in scores.items():
            for a, b in zip(values, new["scores"][method][metric], strict=True):
                if (a is None) != (b is None):  # JSON's null: undefined
                    return math.inf
                if a is not None:
                    largest = max(largest, abs(a - b))
    return largest


def domain(workdir: str, label: str, outputs: int, budget: str | None) -> None:
    """`predict` of one window (6 → ``outputs``) of a series of ``label`` frames, then `evaluate --forecast` of
    that forecast against the truth with the baselines (persistence, optical flow, pysteps where installed)."""
    height, width = SIZES[label]
    data, ckpt = os.path.join(workdir, f"d{label}.h5"), os.path.join(workdir, f"d{label}.pt")
    write_series(data, height, width, INPUTS + outputs)
    write_checkpoint(ckpt, height, width, outputs)
    extra = ("--memory-budget", budget) if budget else ()
    out = os.path.join(workdir, f"f{label}.h5")
    device = ("--device", "cpu")
    predict = measure(
        convgru("predict", data, "--frames", str(outputs), "--start", "0", "--checkpoint", ckpt, *device, "-o", out,
                *extra)
    )  # fmt: skip
    evaluate = measure(convgru("evaluate", "--forecast", out, "--truth", data, "--json", *extra))
    pixels = height * width / 1e6
    for name, result in (("predict", predict), ("evaluate --forecast", evaluate)):
        print(f"{label:>10} {name:20} 6→{outputs}: {result['seconds']:7.1f} s wall, {result['cpu']:7.1f} s CPU, "
              f"peak {result['peak_gb']:5.2f} GB "
              f"({result['peak_gb'] / pixels:.3f} GB per megapixel)", flush=True)  # fmt: skip
    for path in (data, out):
        os.remove(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"of {', '.join(SIZES)}")
    parser.add_argument("--outputs", type=int, default=12, help="lead times of the domain runs")
    parser.add_argument("--memory-budget", default=None, help="passed to predict and evaluate")
    parser.add_argument(
        "--old",
        default=None,
        help="git revision, or a directory holding its convgru_cli: whose evaluate to compare on 256²",
    )
    parser.add_argument("--old-windows", type=int, default=50)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench_domain_")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; work files in {workdir}", flush=True)
    try:
        if args.old:
            old_vs_new(workdir, args.old, args.old_windows)
        for label in [size for size in args.sizes.split(",") if size]:
            domain(workdir, label, args.outputs, args.memory_budget)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
