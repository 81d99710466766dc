"""Forecast quality per CPU-minute: train for fixed time budgets on Moving MNIST, score 1,000 test sequences.

Moving MNIST (two digits bouncing on 64x64, 10 -> 10) is made from a real MNIST idx file; training and test
sequences use disjoint digit images (the first 8,000 images and the last 2,000). Each budget is its own run
(`convgru train --max-time BUDGET`, whose cosine schedule is sized to the budget) with otherwise default
options, so each row is what a user gets from that many minutes. Not a test: CI does not run it.

    python benchmarks/bench_skill.py --mnist ../shared/data/mnist/t10k-images-idx3-ubyte.gz \
        [--budgets 60,120,300,600] [--arch fast] [--forecaster anchored] [--activation tanh] \
        [--set lr=0.004 --set batch_size=8] [--json]

``--set`` changes one training option (a TrainConfig field) from its default, to measure an alternative.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile

import torch

from convgru_cli import train
from convgru_cli.evaluate import evaluate_file
from convgru_cli.model import make_config
from convgru_cli.synth import moving_digits, read_mnist_images, write_sequences
from convgru_cli.windowing import DataSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", required=True, help="t10k-images-idx3-ubyte.gz (or any MNIST idx3 file)")
    parser.add_argument("--budgets", default="60,120,300,600", help="training seconds, comma-separated")
    parser.add_argument("--arch", default="fast")
    parser.add_argument("--forecaster", default="auto", help="auto (train's default: shi for digits), anchored or shi")
    parser.add_argument("--activation", default="auto", help="auto (train's default: leaky for digits), tanh or leaky")
    parser.add_argument("--train-sequences", type=int, default=10000)
    parser.add_argument("--test-sequences", type=int, default=1000)
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", help="a TrainConfig field")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    options = {}
    for assignment in args.set:
        name, value = assignment.split("=", 1)
        try:
            options[name] = json.loads(value)  # numbers, true/false
        except json.JSONDecodeError:
            options[name] = value  # words: --set loss=mse

    images = read_mnist_images(args.mnist)
    split = len(images) * 4 // 5
    rows, baselines = [], {}
    with tempfile.TemporaryDirectory() as folder:
        train_path, test_path = os.path.join(folder, "train.h5"), os.path.join(folder, "test.h5")
        write_sequences(train_path, moving_digits(args.train_sequences, 20, images[:split], seed=1))
        write_sequences(test_path, moving_digits(args.test_sequences, 20, images[split:], seed=2))
        for budget in (float(b) for b in args.budgets.split(",")):
            run_dir = os.path.join(folder, f"run-{budget:g}")
            config = dataclasses.replace(train.TrainConfig(epochs=1000, max_time=budget), **options)
            spec = DataSpec(dataset=None, layout=None, val_fraction=0.05)
            model_config = make_config(args.arch, 1, forecaster=args.forecaster, activation=args.activation)
            summary = train.train(train_path, spec, model_config, config, run_dir, show_progress=False)
            saved = torch.load(summary["last_checkpoint"], weights_only=True)
            last, model = saved["progress"], saved["model_config"]
            # the baselines do not depend on the budget: score them once (the optical flow takes minutes)
            report = evaluate_file([test_path], summary["last_checkpoint"], with_baselines=not baselines)
            mean = report["mean"]
            baselines = baselines or {method: mean[method]["mse_frame_sum"] for method in mean if method != "model"}
            rows.append({
                "budget_s": budget,
                "sequences_seen": last["step"] * config.batch_size,
                "mse_frame_sum": mean["model"]["mse_frame_sum"],
                "ssim": mean["model"]["ssim"],
                "mse_frame_sum_by_lead": report["scores"]["model"]["mse_frame_sum"],
            })  # fmt: skip
    result = {
        "arch": args.arch,
        "forecaster": model["forecaster"],
        "activation": model["activation"],
        "options": args.set,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "rows": rows,
        "baselines_mse_frame_sum": baselines,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    described = f"arch {args.arch}, {model['forecaster']} forecaster, {model['activation']} cells {' '.join(args.set)}"
    print(f"{described}; {result['machine']}; {args.test_sequences} test sequences")
    print("MSE: per-frame sum on [0, 1]")
    print(f"{'budget':>8}{'sequences':>11}{'MSE':>8}{'SSIM':>7}")
    for row in rows:
        print(f"{row['budget_s']:>7g}s{row['sequences_seen']:>11}{row['mse_frame_sum']:>8.1f}{row['ssim']:>7.3f}")
    print("baselines, MSE: " + ", ".join(f"{method} {value:.1f}" for method, value in baselines.items()))


if __name__ == "__main__":
    main()
