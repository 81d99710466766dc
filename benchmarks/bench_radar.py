"""Cross-event radar skill: train on one event from one radar, score on another event from another radar.

    python benchmarks/bench_radar.py                       # train 10 minutes on KNMI, score on the RMI archive
    python benchmarks/bench_radar.py --checkpoint RUN/best.pt   # score a trained model only
    python benchmarks/bench_radar.py --train-option=--loss --train-option=balanced
    python benchmarks/bench_radar.py --checkpoint RUN/last.pt --matching none   # a balanced model unmatched

The model is scored beside persistence, the built-in extrapolation (which the anchored forecaster starts
from) and, where pysteps is installed, pysteps' Lucas–Kanade + semi-Lagrangian extrapolation, per lead time:
MSE, CSI and frequency bias at 2 mm/h, the mean CSI at 0.5/2/5 mm/h, and the ratio of the forecast's 99.9th
percentile to the observation's (a forecast that paints storms never observed shows here). Events are
counted as value >= threshold for every method alike. Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import torch

from convgru_cli import baselines
from convgru_cli.forecast import Forecaster
from convgru_cli.metrics import Scores, format_threshold

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "radar")
THRESHOLDS = (0.5, 2.0, 5.0)


def stack_odim(folder: str, out: str, size: int = 384) -> str:
    """The RMI archive (ODIM_H5, one file per 5 minutes, 700 x 700) as one [T, H, W] file: the size x size crop,
    inside radar coverage in every frame, that holds the most rain."""
    paths = sorted(glob.glob(os.path.join(folder, "*")))
    frames = np.stack([h5py.File(path, "r")["dataset1/data1/data"][:] for path in paths]).astype(np.float32)
    covered = np.isfinite(frames).all(axis=0)
    rainy = np.nan_to_num(frames) > 0.1
    best, corner = -1.0, (0, 0)
    for row in range(0, frames.shape[1] - size + 1, 8):
        for col in range(0, frames.shape[2] - size + 1, 8):
            if covered[row : row + size, col : col + size].all():
                share = rainy[:, row : row + size, col : col + size].mean()
                if share > best:
                    best, corner = share, (row, col)
    row, col = corner
    with h5py.File(out, "w") as file:
        file.create_dataset("frames", data=frames[:, row : row + size, col : col + size], chunks=(1, size, size))
        file.attrs.update(units="mm/h", layout="THW", timestep_minutes=5.0, source=folder, crop=f"{row},{col}")
    return out


class Tally:
    """One method's scores as `convgru evaluate` computes them (``metrics.Scores``: MSE, and CSI and frequency bias
    at THRESHOLDS, per lead time), and its values, for the 99.9th percentile."""

    def __init__(self, leads: int):
        self.scores = Scores(leads, data_range=1.0, thresholds=THRESHOLDS)  # the range only scales SSIM and PSNR
        self.values: list[np.ndarray] = []

    def add(self, forecast: torch.Tensor, truth: torch.Tensor) -> None:
        self.scores.update(forecast, truth)
        f = forecast[:, :, 0].double().numpy()
        self.values.append(f.transpose(1, 0, 2, 3).reshape(f.shape[1], -1))

    def _score(self, name: str) -> np.ndarray:
        return np.array(self.scores.compute()[name])

    def mse(self) -> np.ndarray:
        return self._score("mse")

    def csi(self, t: float) -> np.ndarray:
        return self._score(f"csi@{format_threshold(t)}")

    def bias(self, t: float) -> np.ndarray:
        return self._score(f"bias@{format_threshold(t)}")

    def p999(self) -> np.ndarray:
        return np.percentile(np.concatenate(self.values, axis=1), 99.9, axis=1)


def score(
    checkpoint: str, test_file: str, inputs: int, leads: int, batch: int = 4, matching: str = "auto"
) -> dict[str, Tally]:
    forecaster = Forecaster.load(checkpoint, device="cpu", matching=matching)
    series = torch.from_numpy(h5py.File(test_file, "r")["frames"][:]).float()
    starts = list(range(len(series) - inputs - leads + 1))
    tallies: dict[str, Tally] = {}
    with_pysteps = "pysteps" in baselines.METHODS
    for first in range(0, len(starts), batch):
        windows = torch.stack([series[s : s + inputs + leads] for s in starts[first : first + batch]])[:, :, None]
        past, truth = windows[:, :inputs], windows[:, inputs:]
        forecasts = {
            "model": forecaster.predict(past, leads),
            "persistence": baselines.persistence(past, leads),
            "built-in flow": baselines.optical_flow(past, leads),
            "pysteps": baselines.get_method("pysteps").forecast(past, leads, "mm/h") if with_pysteps else None,
            "observed": truth,
        }
        for name, forecast in forecasts.items():
            if forecast is not None:
                tallies.setdefault(name, Tally(leads)).add(forecast, truth)
    return tallies


def table(tallies: dict[str, Tally]) -> str:
    observed = tallies.pop("observed")
    leads = len(observed.mse())
    header = "| method | " + " | ".join(f"lead {k + 1}" for k in range(leads)) + " | mean |"
    rule = "|---|" + "---:|" * (leads + 1)
    rows = []
    for metric, values in (
        ("MSE (mm/h)²", lambda t: t.mse()),
        ("CSI@2", lambda t: t.csi(2.0)),
        ("bias@2", lambda t: t.bias(2.0)),
        ("p99.9 / observed", lambda t: t.p999() / observed.p999()),
    ):
        rows += [f"\n{metric}\n", header, rule]
        for name, tally in tallies.items():
            v = values(tally)
            rows.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in v) + f" | {v.mean():.3f} |")
    rows += ["\nmean CSI at 0.5 / 2 / 5 mm/h\n", "| method | 0.5 | 2 | 5 |", "|---|---:|---:|---:|"]
    for name, tally in tallies.items():
        rows.append(f"| {name} | " + " | ".join(f"{tally.csi(t).mean():.3f}" for t in THRESHOLDS) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default=os.path.join(SHARED, "knmi.h5"), help="training file")
    parser.add_argument("--test", default=os.path.join(SHARED, "archives", "rmi-odim"), help="test archive folder")
    parser.add_argument("--checkpoint", help="score this checkpoint instead of training one")
    parser.add_argument("--max-time", type=float, default=600, help="training budget in seconds")
    parser.add_argument("--inputs", type=int, default=6)
    parser.add_argument("--leads", type=int, default=6)
    parser.add_argument("--train-option", action="append", default=[], help="extra option for convgru train")
    parser.add_argument("--matching", default="auto", help="the model's probability matching (auto, none, cdf)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        test_file = stack_odim(args.test, os.path.join(scratch, "test.h5"))
        checkpoints = [args.checkpoint]
        if args.checkpoint is None:
            # train's defaults (for rain: dB, the distribution term, augmented windows) on 128² crops, which make a
            # step four times cheaper on KNMI's 256² frames, and on every window: held out, the event's last tenth
            # (45 minutes) would be left untrained, to pick a best.pt that does not pick for another radar
            # (benchmarks/README.md). --max-time without --epochs: the run trains until its budget is spent.
            run = os.path.join(scratch, "run")
            command = [sys.executable, "-m", "convgru_cli", "--quiet", "train", args.train]
            command += ["--input-frames", str(args.inputs), "--output-frames", str(args.leads)]
            command += ["--max-time", str(args.max_time), "--crop", "128", "--val-fraction", "0"]
            command += ["--out", run, *args.train_option]
            subprocess.run(command, check=True)
            # best.pt (lowest validation loss, what predict takes by default) and last.pt (the end of the schedule)
            checkpoints = [os.path.join(run, "best.pt"), os.path.join(run, "last.pt")]
            if open(checkpoints[0], "rb").read() == open(checkpoints[1], "rb").read():
                checkpoints = checkpoints[1:]  # the last epoch was the best (or nothing was held out)
        for checkpoint in checkpoints:
            tallies = score(checkpoint, test_file, args.inputs, args.leads, matching=args.matching)
            print(f"train {args.train} -> test {args.test}, {args.inputs} -> {args.leads} frames, {checkpoint}, "
                  f"matching {args.matching}")  # fmt: skip
            print(table(tallies))


if __name__ == "__main__":
    main()
