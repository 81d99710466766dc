"""The training loop: one process, or one of several under torchrun (DistributedDataParallel).

The run is set up once, fresh (``train``) or from its last.pt (``resume``), into a ``Run``; ``fit`` then reads
top to bottom: ``train_epoch`` runs the batches, ``end_epoch`` validates, records, saves and decides to stop.

Batch order is a pure function of (seed, epoch), so a run stopped mid-epoch resumes exactly where it was.
Rank 0 alone logs and writes; batch size is per process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from convgru_cli import checkpoint, distributed, signals, transforms
from convgru_cli.device import autocast, compile_failure, compile_for, pad_batch, pick_device, pick_precision
from convgru_cli.errors import UserError, finite
from convgru_cli.model import ARCHITECTURES, EncoderForecaster, ModelConfig, count_parameters, make_config
from convgru_cli.normalisation import Normalisation, compute_normalisation, quiet_fraction
from convgru_cli.sources import FrameSource, open_frames
from convgru_cli.windowing import DataSpec, WindowDataset, batches, check_batch_size, split_windows, windows

log = logging.getLogger("convgru")

LOSSES = ("mse", "mae", "mse+mae", "balanced")
QUIET_VALIDATION = 0.5  # warn when this share of the validation windows holds no signal
# Under --max-time, validation may take this share of the run's time: a small file cut into crops makes epochs of
# a few steps, and validating after each (whole frames, every held-out window) took a third of a 10-minute run.
VALIDATION_SHARE = 0.1
# Share of augmented windows run backwards: half, so that the training windows hold no net growth or decay. A
# model otherwise learns its training event's life cycle as the rule: with a quarter backwards, trained on KNMI's
# 256² crop it kept another radar's rain area (frequency bias at 2 mm/h 0.94-1.17 at 30 minutes over five
# seeds), and trained on the whole KNMI composite of the same event, which decays, it faded it (0.62)
# (benchmarks/README.md, bench_radar, sessions 14 and 15).
REVERSED_SHARE = 0.5
# The distribution term's weight for rain: what fades a forecast trained on time-symmetric windows is the
# pixel-wise loss's blur, which this term answers. At 1 with half the windows backwards, a KNMI-trained model
# faded the other radar's rain (bias 0.73 at 30 minutes); at 3, it kept it (1.05).
RAIN_DISTRIBUTION_WEIGHT = 3.0
# An epoch's training loss this many times the lowest of the epochs before it: the run has most likely diverged.
# Three of six 10-minute --loss balanced runs on KNMI did, from about 1.4 to 13 within twenty steps, and never came
# back: the encoder's unbounded (leaky) states grew at every step (benchmarks/README.md, bench_radar, session 17).
DIVERGED_FACTOR = 4.0
# Peak learning rates. The balanced loss trains at half the rate: at the full rate three of six 10-minute --loss
# balanced runs on KNMI diverged, at half none of six did (benchmarks/README.md, bench_radar, sessions 17 and 18).
LR = 2e-3
BALANCED_LR = 1e-3


@dataclass
class TrainConfig:
    epochs: int | None = 10  # None: until --max-time is up (what --max-time without --epochs means)
    batch_size: int = 8
    lr: float | None = None  # None: by the loss (rain_aware)
    weight_decay: float = 0.01
    warmup_steps: int = 50
    loss: str = "mse+mae"
    # Shi et al. 2017's balanced loss: per-pixel weights by the target's value in data units (rain: mm/h)
    balance_thresholds: tuple[float, ...] = (2.0, 5.0, 10.0, 30.0)
    balance_weights: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0)
    grad_clip: float = 1.0
    # Weight of the distribution term: the sorted values of each forecast frame against the observed frame's
    # (a 1-D Wasserstein distance), which a forecast that blurs or fades away from the observation pays for.
    # None: by the data (rain_aware).
    distribution_weight: float | None = None
    seed: int = 0
    max_time: float | None = None
    patience: int | None = None
    compile: bool = False
    recompute: bool = False
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    cache: bool | None = None  # hold the data in memory: None decides by size
    crop: tuple[int, int] | None = None  # train on random crops of this (height, width): see WindowDataset
    augment: bool | None = None  # turn, flip and (rain) rescale each training window (augmented); None: by the data
    # Files (or globs) whose windows validate too, read with the training data's spec and normalisation: another
    # event, so that best.pt is not chosen on the training file's last hours alone.
    val_data: tuple[str, ...] = ()

    def check(self) -> None:
        if self.epochs is None and not self.max_time:
            raise UserError("--epochs or --max-time: a run needs an end")
        if self.epochs is not None and self.epochs < 1:
            raise UserError("--epochs must be at least 1")
        check_batch_size(self.batch_size)
        for option, value in (
            ("--lr", self.lr or 0.0),
            ("--grad-clip", self.grad_clip),
            ("--distribution-weight", self.distribution_weight or 0.0),
            ("--max-time", self.max_time or 0.0),
        ):
            finite(value, option)
        if self.lr is not None and self.lr <= 0:
            raise UserError("--lr must be positive")
        if self.distribution_weight is not None and self.distribution_weight < 0:
            raise UserError(f"--distribution-weight {self.distribution_weight:g}: must be 0 or more")
        if self.grad_clip < 0:
            raise UserError(f"--grad-clip {self.grad_clip:g}: must not be negative (0: no clipping)")
        if self.loss not in LOSSES:
            raise UserError(f"--loss {self.loss}: choose one of {', '.join(LOSSES)}")
        if len(self.balance_weights) != len(self.balance_thresholds) + 1:
            raise UserError("--balance-weights needs one weight more than --balance-thresholds")
        if list(self.balance_thresholds) != sorted(self.balance_thresholds):
            raise UserError("--balance-thresholds must be in increasing order")
        if min(self.balance_weights, default=1.0) <= 0:
            raise UserError("--balance-weights must all be positive (a weight of 0 would mark pixels as no data)")
        if self.max_time is not None and self.max_time < 0:
            raise UserError(f"--max-time {self.max_time:g}: must not be negative (0: no limit)")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers {self.workers}: must be 0 or more")


def rain_aware(config: TrainConfig, transform: str) -> TrainConfig:
    """``config`` with the options left to the data (None) decided by it. Rain modelled in dB trains with the
    distribution term and augmented windows: both kept a model trained on one radar's event from fading on
    another's (benchmarks/README.md, bench_radar: KNMI to RMI and back); other data trains without either. The
    balanced loss, Shi's loss for rain, trains at BALANCED_LR, where it did not diverge."""
    rain = transform == "db"
    weight = config.distribution_weight
    return replace(
        config,
        distribution_weight=(RAIN_DISTRIBUTION_WEIGHT if rain else 0.0) if weight is None else weight,
        augment=rain if config.augment is None else config.augment,
        lr=(BALANCED_LR if config.loss == "balanced" else LR) if config.lr is None else config.lr,
    )


def data_aware_model(model_config: ModelConfig, transform: str) -> ModelConfig:
    """``model_config`` with forecaster and activation ``auto`` decided by the data: for rain and reflectivity
    (modelled in a transform), the anchored forecaster with bounded (tanh) cells; for other data, Shi's forecaster
    with his leaky cells. Trained on one radar's event, the anchored forecaster beat persistence and extrapolation
    on another radar's, where Shi's painted storms never observed; with tanh cells it did so at every lead for
    each of five seeds, where leaky cells' unbounded states let two of five grow the rain past extrapolation's
    error by 30 minutes. On Moving MNIST, digits that bounce and cross defeat motion extrapolation and Shi's is
    ahead (bench_skill at 10 minutes: MSE 102.9 against 130.6). See benchmarks/README.md."""
    rain = transform != "none"
    if model_config.forecaster == "auto":
        model_config = replace(model_config, forecaster="anchored" if rain else "shi")
    if model_config.activation == "auto":
        model_config = replace(model_config, activation="tanh" if rain else "leaky")
    return model_config


class Interrupted(Exception):
    """Training stopped by Ctrl-C or SIGTERM after saving a checkpoint to resume from."""

    def __init__(self, run_dir: str):
        super().__init__(run_dir)
        self.run_dir = run_dir


@dataclass
class Progress:
    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps in all
    elapsed: float = 0.0  # training seconds in all, across resumes
    best_val: float = math.inf
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    processes: int = 1  # batches, steps and the schedule are counted for this many processes
    # This process's loss x sequences over the current epoch's batches so far. Only rank 0's is saved: after a
    # mid-epoch resume under torchrun, every process starts from it, an estimate of its own.
    epoch_loss: float = 0.0
    epoch_sequences: int = 0
    validation_s: float = 0.0  # seconds spent validating, across resumes


def weighted_loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-pixel loss weighted by ``weight`` (0 for no-data pixels, which neither help nor hurt), averaged over
    the pixels that have data. ``balanced`` is Shi 2017's weighted MSE + MAE; the weights carry the balance."""
    error = prediction - target
    if kind == "mse":
        per_pixel = error.square()
    elif kind == "mae":
        per_pixel = error.abs()
    else:
        per_pixel = error.square() + error.abs()
    return (per_pixel * weight).sum() / (weight > 0).sum().clamp(min=1)


def augmented(batch: torch.Tensor, seed: int, rescale: bool) -> torch.Tensor:
    """Each window [T, C, H, W] of ``batch`` turned by a multiple of 90 degrees (square frames), mirrored or not,
    run backwards in time with probability ``REVERSED_SHARE``, and with ``rescale`` (rain rates) multiplied by a
    factor from 1/2 to 4: rain moves the same way whatever the compass direction, one event's growing cells
    played backwards are decaying ones, and a model trained on one event meets heavier and lighter rain on
    others. Drawn from ``seed`` (train passes one per step), so a resumed run repeats them."""
    generator = torch.Generator().manual_seed(seed)
    square = batch.shape[-1] == batch.shape[-2]
    windows = []
    for window in batch:
        turns = int(torch.randint(4 if square else 1, (1,), generator=generator))
        window = torch.rot90(window, turns, dims=(-2, -1))
        if torch.rand(1, generator=generator) < 0.5:
            window = window.flip(-1)
        if torch.rand(1, generator=generator) < REVERSED_SHARE:
            window = window.flip(0)
        if rescale:
            window = window * float(2 ** (3 * torch.rand(1, generator=generator) - 1))
        windows.append(window)
    return torch.stack(windows)


def distribution_loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between the sorted values of each forecast frame and of its observed frame, over
    the pixels with data, each rank weighted as the observed pixel there is in ``weight`` (0: no data; under
    --loss balanced, the balance weights, so that heavy rain counts here as it does in the pixel-wise loss, and
    the two stay in proportion). Zero for any rearrangement of the observed values: it leaves placement to the
    pixel-wise loss and only asks that the forecast keep the observation's intensities."""
    valid = weight > 0
    floor = torch.finfo(prediction.dtype).min  # no-data pixels sort first, in both, and carry no weight
    flat_prediction = torch.where(valid, prediction, floor).flatten(2).sort(dim=-1).values
    flat_target, order = torch.where(valid, target, floor).flatten(2).sort(dim=-1)
    rank_weight = weight.to(prediction.dtype).flatten(2).gather(-1, order)
    return ((flat_prediction - flat_target).abs() * rank_weight).sum() / valid.sum().clamp(min=1)


def balance_weights(raw_target: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Weight per pixel from the target's value in data units: heavy rain counts more."""
    thresholds = torch.tensor(config.balance_thresholds, device=raw_target.device)
    weights = torch.tensor(config.balance_weights, device=raw_target.device)
    return weights[torch.bucketize(raw_target.float().nan_to_num(), thresholds, right=True)]


def learning_rate(config: TrainConfig, step: int, fraction_done: float) -> float:
    """Linear warm-up, then cosine decay to zero over the run (epochs or --max-time, whichever ends first)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction_done)))


def epoch_batches(windows: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches for an epoch: a seeded permutation, cut into per-process batches, dealt round-robin."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(windows, generator=generator).tolist()
    global_batch = batch_size * world
    batches = [order[i : i + global_batch] for i in range(0, windows - global_batch + 1, global_batch)]
    return [b[rank * batch_size : (rank + 1) * batch_size] for b in batches]


RESUME_CHANGES = ("epochs", "max_time", "patience", "device", "workers", "cache", "recompute")


def check_resume_changes(changes: dict, saved: dict) -> None:
    """A resumed run continues as it was saved: of its options only ``RESUME_CHANGES`` may be given a new value.
    The others may be repeated, as when --resume is added to the command that started the run, but not changed;
    ``saved`` holds the run's values by option name."""
    changed = sorted(
        name for name, value in changes.items() if name not in RESUME_CHANGES and value != saved.get(name, value)
    )
    unknown = sorted(name for name in changes if name not in saved and name not in RESUME_CHANGES)
    if changed or unknown:
        details = [
            f"--{name.replace('_', '-')} {_shown(changes[name])} (saved: {_shown(saved[name])})" for name in changed
        ]
        details += [f"--{name.replace('_', '-')}" for name in unknown]
        raise UserError(f"--resume continues a run as it was saved: {', '.join(details)} cannot change")


def saved_options(saved: dict, model_config: ModelConfig) -> dict:
    """A checkpoint's run as the values of train's options, to compare with those given to --resume."""
    arch = next(
        (
            name
            for name in ARCHITECTURES
            if make_config(
                name, model_config.channels, model_config.cell, model_config.forecaster, model_config.activation
            )
            == model_config
        ),
        None,
    )
    options = {**saved["data_spec"], **saved["train_config"]}
    options.update(
        arch=arch, cell=model_config.cell, forecaster=model_config.forecaster, activation=model_config.activation
    )
    return options


def _shown(value) -> str:
    """An option's value as it is typed."""
    if isinstance(value, tuple | list):
        return ",".join(_shown(item) for item in value)
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


class Placement(NamedTuple):
    """Where this process trains: its device and autocast dtype, its rank among ``world`` processes."""

    device: torch.device
    precision: torch.dtype
    rank: int
    world: int


Validation = list[tuple[FrameSource, list[tuple[int, int]]]]  # windows by source: the held-out split, --val-data's


class TrainingData(NamedTuple):
    source: FrameSource
    spec: DataSpec  # with the dataset and layout that were found
    train_windows: list[tuple[int, int]]
    validation: Validation


@dataclass
class Run:
    """Everything a training run holds once set up, whether fresh or resumed."""

    run_dir: str
    config: TrainConfig
    spec: DataSpec
    model_config: ModelConfig
    source: FrameSource
    train_windows: list[tuple[int, int]]
    validation: Validation
    normalisation: Normalisation
    model: EncoderForecaster
    net: torch.nn.Module  # what batches run through: the model, wrapped for DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    progress: Progress
    device: torch.device
    precision: torch.dtype
    rank: int
    world: int

    @property
    def workers(self) -> int:
        return self.config.workers if self.config.workers is not None else (0 if self.source.in_memory else 2)

    @functools.cached_property
    def total_steps(self) -> int | None:
        """Optimizer steps in the whole run (computed once: it draws an epoch's batches); None: until --max-time."""
        if self.config.epochs is None:
            return None
        steps_per_epoch = len(epoch_batches(len(self.train_windows), self.config.batch_size, 0, 0, 0, self.world))
        return steps_per_epoch * self.config.epochs

    def save(self, name: str) -> None:
        """A checkpoint in the run directory (rank 0 alone writes)."""
        if self.rank != 0:
            return
        checkpoint.save(
            os.path.join(self.run_dir, name),
            {
                "model_config": self.model_config.to_dict(),
                "data_spec": self.spec.to_dict(),
                "normalisation": self.normalisation.to_dict(),
                "train_config": asdict(self.config),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "progress": asdict(self.progress),
            },
        )


@dataclass
class Epoch:
    """How one epoch's training went in this process."""

    batches: int  # the epoch's batches in all, done before a resume included
    seen: int = 0  # sequences trained on since this process (re)started the epoch
    began: float = field(default_factory=time.perf_counter)
    out_of_time: bool = False

    def rate(self, world: int) -> float:
        return self.seen * world / (time.perf_counter() - self.began)


def train(
    data_path: str | list[str],
    spec: DataSpec,
    model_config: ModelConfig,
    config: TrainConfig,
    run_dir: str,
    force: bool = False,
    show_progress: bool = True,
    options_toml: str | None = None,
) -> dict:
    """Train on ``data_path`` (a file, or several files or globs) into ``run_dir``; returns a summary.

    The model takes its channel count from the data. A ``run_dir`` that holds a run is refused unless ``force``.
    ``options_toml``, the command-line options that made the run, is saved as config.toml to repeat it."""
    placement = _placement(config, spec)
    data = _open_data(data_path, spec, config, placement.world)
    source, spec = data.source, data.spec
    config = rain_aware(config, spec.transform)
    normalisation = compute_normalisation(source, data.train_windows, spec.window, spec.transform, spec.clip)
    if placement.rank == 0 and spec.transform != "none":
        log.info(
            "%s: modelled in the %r transform of its %s (--transform); distribution term weight %g, %s windows "
            "(--distribution-weight, --augment)",
            source.label,
            spec.transform,
            source.units,
            config.distribution_weight,
            "augmented" if config.augment else "plain",
        )
    if normalisation.nan_fraction > 0 and placement.rank == 0:
        log.warning(
            "%s: %.2f%% of the sampled training pixels are NaN (no data); they are left out of the loss "
            "and the scores (--nan-policy mask)",
            source.label,
            100 * normalisation.nan_fraction,
        )
    model_config = replace(data_aware_model(model_config, spec.transform), channels=source.channels)
    _check_fits(model_config, data, config.crop)
    if placement.rank == 0:
        _prepare_run_dir(run_dir, force)
    run = _build(run_dir, config, model_config, normalisation, data, placement)
    return fit(run, data_path, show_progress, options_toml)


def resume(data_path: str | list[str], run_dir: str, show_progress: bool = True, **changes) -> dict:
    """Continue the run in ``run_dir`` from its last.pt, exactly where it stopped (mid-epoch included).
    ``changes`` may set epochs (to train longer), max_time, device or workers; all else is as saved (and may be
    given as saved)."""
    saved = checkpoint.load(os.path.join(run_dir, "last.pt"))
    model_config, spec, normalisation = checkpoint.configs(saved)
    if changes.get("transform") == "auto":  # resolved by the data's units when the run began
        changes = {**changes, "transform": transforms.resolve("auto", normalisation.units)}
    for name in ("forecaster", "activation"):  # likewise, by the transform
        if changes.get(name) == "auto":
            decided = data_aware_model(replace(model_config, **{name: "auto"}), spec.transform)
            changes = {**changes, name: getattr(decided, name)}
    check_resume_changes(changes, saved_options(saved, model_config))
    new_values = {name: value for name, value in changes.items() if name in RESUME_CHANGES}
    config = TrainConfig(**{**saved["train_config"], **new_values})
    placement = _placement(config, spec)
    data = _open_data(data_path, spec, config, placement.world)
    _check_fits(model_config, data, config.crop)
    run = _build(run_dir, config, model_config, normalisation, data, placement)
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scaler.load_state_dict(saved["scaler"])
    run.progress = Progress(**{"processes": run.world, **saved["progress"]})  # older checkpoints do not record it
    if run.progress.processes != run.world:
        trained_by = run.progress.processes
        raise UserError(
            f"--resume {run_dir}: the run was trained by {trained_by} process(es) and this is {run.world}; "
            f"resume it with as many (torchrun --nproc-per-node {trained_by}) to continue where it was"
        )
    return fit(run, data_path, show_progress, None)


def fit(run: Run, data_path: str | list[str], show_progress: bool = True, options_toml: str | None = None) -> dict:
    """Train ``run`` until its epochs are done, --max-time is up or --patience runs out; returns a summary."""
    # -- what made the run, for people and for `convgru train --config`
    if run.rank == 0:
        _write_run_files(run, data_path, options_toml)
        _log_start(run)

    # -- epochs; Ctrl-C or SIGTERM saves last.pt, from which --resume continues
    with signals.deferred():
        started = time.perf_counter() - run.progress.elapsed
        try:
            while run.config.epochs is None or run.progress.epoch < run.config.epochs:
                epoch = train_epoch(run, started, show_progress)
                if end_epoch(run, epoch):
                    break
        except KeyboardInterrupt:
            run.progress.elapsed = time.perf_counter() - started
            run.save("last.pt")
            raise Interrupted(run.run_dir) from None
        except torch._dynamo.exc.BackendCompilerFailed as error:  # at the first compiled step: no C++ compiler
            raise compile_failure(error, "train") from None

    # -- done
    distributed.finish()
    progress = run.progress
    return {
        "run_dir": run.run_dir,
        "best_epoch": progress.best_epoch,
        "best_val_loss": progress.best_val if math.isfinite(progress.best_val) else None,  # None: no validation
        "last_checkpoint": os.path.join(run.run_dir, "last.pt"),
        "best_checkpoint": os.path.join(run.run_dir, "best.pt"),
        "epochs": progress.epoch,
        "steps": progress.step,
        "seq_per_s": progress.history[-1]["seq_per_s"] if progress.history else 0.0,
        "wall_s": round(progress.elapsed, 2),
    }


def train_epoch(run: Run, started: float, show_progress: bool) -> Epoch:
    """The current epoch's batches from where progress stands, to the epoch's end or to --max-time."""
    config, progress = run.config, run.progress
    batch_lists = epoch_batches(
        len(run.train_windows), config.batch_size, config.seed, progress.epoch, run.rank, run.world
    )
    run.net.train()
    bar = tqdm(
        total=len(batch_lists),
        initial=progress.batch,
        desc=f"epoch {_of_epochs(progress.epoch + 1, config.epochs)}",
        disable=not show_progress or run.rank != 0 or not sys.stderr.isatty(),
        file=sys.stderr,
        leave=False,
    )
    epoch = Epoch(len(batch_lists))
    epoch_seed = config.seed * 100_003 + progress.epoch
    train_set = WindowDataset(run.source, run.train_windows, run.spec.window, crop=config.crop, seed=epoch_seed)
    for batch in _loader(train_set, batch_lists[progress.batch :], run.workers, run.device):
        loss_value, epoch.out_of_time = train_step(run, batch, started)
        epoch.seen += len(batch)
        bar.set_postfix(loss=f"{loss_value:.4f}", seq_s=f"{epoch.rate(run.world):.1f}")
        bar.update()
        if epoch.out_of_time:
            break
    bar.close()
    progress.elapsed = time.perf_counter() - started
    return epoch


def train_step(run: Run, batch: torch.Tensor, started: float) -> tuple[float, bool]:
    """One optimizer step on ``batch``: (its loss, whether --max-time is reached)."""
    config, spec, progress = run.config, run.spec, run.progress
    raw = batch.to(run.device, non_blocking=True)
    if config.augment:
        raw = augmented(raw, config.seed * 1_000_003 + progress.step, rescale=spec.transform == "db")
    inputs, target, valid = _split(raw, run.normalisation, spec)
    weight = valid.float()
    if config.loss == "balanced":
        weight = weight * balance_weights(raw[:, spec.input_frames :], config)
    fraction, out_of_time = (progress.step / run.total_steps if run.total_steps else 0.0), False
    if config.max_time:
        # One clock for all processes: the same learning rate everywhere, and all stop together.
        elapsed = distributed.max_over_processes(time.perf_counter() - started, run.device)
        fraction = max(fraction, elapsed / config.max_time)
        out_of_time = elapsed >= config.max_time
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(config, progress.step, fraction)
    with autocast(run.device, run.precision):
        prediction = run.net(inputs, spec.output_frames)
    loss = weighted_loss(prediction.float(), target, weight, config.loss)
    if config.distribution_weight:
        loss = loss + config.distribution_weight * distribution_loss(prediction.float(), target, weight)
    loss_value = loss.item()  # the one host-device sync of the step
    if not math.isfinite(loss_value):
        raise UserError(
            f"training diverged: the loss is {loss_value} at step {progress.step + 1}; "
            "lower --lr or check the data (try --transform log or --clip for heavy-tailed values)"
        )
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if config.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    progress.batch += 1
    progress.step += 1
    progress.epoch_loss += loss_value * len(batch)
    progress.epoch_sequences += len(batch)
    signals.check()  # here, a checkpoint never holds the new weights with the old step count
    return loss_value, out_of_time


def end_epoch(run: Run, epoch: Epoch) -> bool:
    """Validate, record, save last.pt (and best.pt), log; True when training stops here."""
    config, progress = run.config, run.progress
    # The epoch counts as done only after validation (a Ctrl-C during it resumes into validation) and only when
    # all its batches ran: one cut short by --max-time goes on from there when resumed.
    has_validation = any(val_windows for _, val_windows in run.validation)
    validated = has_validation and _validation_due(run, epoch)
    val_loss = None
    if validated:
        began = time.perf_counter()
        val_loss = validate(run)
        progress.validation_s += time.perf_counter() - began
    loss_sum, sequences = distributed.sum_over_processes(
        torch.tensor([progress.epoch_loss, progress.epoch_sequences], dtype=torch.float64), run.device
    ).tolist()
    number = progress.epoch + 1
    if progress.batch == epoch.batches:
        progress.epoch, progress.batch, progress.epoch_loss, progress.epoch_sequences = number, 0, 0.0, 0
    record = {
        "epoch": number,
        "step": progress.step,
        "train_loss": loss_sum / sequences if sequences else None,  # the epoch's, across resumes
        "val_loss": val_loss,
        "seq_per_s": epoch.rate(run.world) if epoch.seen else None,
        "elapsed_s": round(progress.elapsed, 2),
        "complete": progress.batch == 0,  # false: cut short by --max-time, continued by --resume
    }
    # Without a validation split every epoch is the best so far; a NaN loss never is, nor an epoch not validated.
    improved = not has_validation or (validated and val_loss < progress.best_val)
    if improved:
        progress.best_epoch = number
        progress.best_val = val_loss if validated else progress.best_val
    progress.history.append(record)
    run.save("last.pt")
    if improved:
        run.save("best.pt")
    if run.rank == 0:
        _write_metrics(run.run_dir, record)
        _log_epoch(record, config.epochs, progress.batch, epoch.batches, improved)
        _warn_if_diverged(progress.history)
    if epoch.out_of_time:
        log.info("stopping: --max-time %gs reached", config.max_time)
        return True
    if config.patience and number - progress.best_epoch >= config.patience:
        log.info("stopping: no better validation loss for %d epochs (--patience)", config.patience)
        return True
    return False


def _warn_if_diverged(history: list[dict]) -> None:
    """Say so, once, when the last epoch's training loss has risen past DIVERGED_FACTOR times the lowest before
    it: the checkpoints from there on forecast nothing useful, and the run would otherwise go on quietly."""
    losses = [record["train_loss"] for record in history if record["train_loss"] is not None]
    if len(losses) < 3 or history[-1]["train_loss"] is None:  # no new loss: nothing new to say
        return
    *before, previous, last = losses
    lowest = min(*before, previous)
    if last > DIVERGED_FACTOR * lowest and previous <= DIVERGED_FACTOR * min(before):
        log.warning(
            "training loss %.4g at step %d is %.0fx the lowest before it (%.4g): the run has likely diverged and "
            "its checkpoints from here on are not worth using; start again with a lower --lr or another --seed",
            last, history[-1]["step"], last / lowest, lowest,
        )  # fmt: skip


def _validation_due(run: Run, epoch: Epoch) -> bool:
    """Every epoch is validated, except under --max-time without --patience (whose count of epochs without a
    better loss needs every epoch validated): there, only while validation has taken at most VALIDATION_SHARE
    of the time so far, and always the run's last epoch, so that best.pt weighs the final weights too. Under
    torchrun every process validates where any one would (each times itself): validation is a collective."""
    config, progress = run.config, run.progress
    if not config.max_time or config.patience:
        return True
    last = epoch.out_of_time or (config.epochs is not None and progress.epoch + 1 >= config.epochs)
    due = last or progress.validation_s <= VALIDATION_SHARE * progress.elapsed
    return distributed.max_over_processes(float(due), run.device) > 0


@torch.no_grad()
def validate(run: Run) -> float | None:
    """Mean per-pixel MSE (normalised units) on the validation windows, plus the distribution term where the run
    trains with one (--distribution-weight), summed over all ranks; None without any."""
    if not any(val_windows for _, val_windows in run.validation):
        return None
    spec, batch_size = run.spec, run.config.batch_size
    run.net.eval()
    total = torch.zeros(2, dtype=torch.float64)  # summed on the CPU: Apple's MPS has no float64
    for source, val_windows in run.validation:
        mine = val_windows[run.rank :: run.world]
        batch_lists = [list(indices) for indices in batches(range(len(mine)), batch_size)]
        for batch in _loader(WindowDataset(source, mine, spec.window), batch_lists, 0, run.device):
            signals.check()
            batch, count = batch.to(run.device), len(batch)
            if run.config.compile:  # the ragged last batch
                batch = pad_batch(batch, batch_size)
            inputs, target, valid = _split(batch, run.normalisation, spec)
            with autocast(run.device, run.precision):
                prediction = run.net(inputs, spec.output_frames)
            prediction, target, valid = prediction[:count].float(), target[:count], valid[:count]
            weight = valid.float()
            loss_sum = ((prediction - target) ** 2 * weight).sum()
            if run.config.distribution_weight:  # the training objective's term, so best.pt does not favour fading
                distribution = distribution_loss(prediction, target, weight) * weight.sum()
                loss_sum = loss_sum + run.config.distribution_weight * distribution
            total += torch.stack([loss_sum, weight.sum()]).cpu()
    total = distributed.sum_over_processes(total, run.device)
    return (total[0] / total[1].clamp(min=1)).item()


# -- setup


def _placement(config: TrainConfig, spec: DataSpec) -> Placement:
    """This process's device, precision and rank, joining torchrun's processes; the configurations are checked
    on the way."""
    device = pick_device(config.device)
    rank, world = distributed.setup(device)
    device = distributed.process_device(device)
    config.check()
    spec.check()
    return Placement(device, pick_precision(config.precision, device), rank, world)


def _open_data(data_path: str | list[str], spec: DataSpec, config: TrainConfig, world: int) -> TrainingData:
    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    source = open_frames(
        paths, spec.dataset, spec.layout, config.cache, spec.nan_policy, spec.mask_dataset, spec.importer
    )
    transform = transforms.resolve(spec.transform, source.units)
    spec = replace(spec, dataset=source.dataset, layout=source.layout, transform=transform)
    train_windows, val_windows = split_windows(source, spec)
    if len(train_windows) < config.batch_size * world:
        raise UserError(
            f"--batch-size {config.batch_size}: larger than the {len(train_windows)} training windows "
            f"{'per process ' if world > 1 else ''}in {source.label}; lower it"
        )
    validation = [(source, val_windows)]
    for path in config.val_data:  # each its own source: another radar's frames may be of another size
        other = open_frames(
            [path], spec.dataset, spec.layout, config.cache, spec.nan_policy, spec.mask_dataset, spec.importer
        )
        validation.append((other, windows(other, spec.window, spec.stride)))
    return TrainingData(source, spec, train_windows, validation)


def _check_fits(model_config: ModelConfig, data: TrainingData, crop: tuple[int, int] | None) -> None:
    """The training frames and every validation file's suit the model (any frame size it accepts: validation
    forecasts whole frames), and so does the training crop."""
    for source, _ in data.validation:  # the training source first, with its held-out windows
        if model_config.channels != source.channels:
            raise UserError(
                f"{source.label}: {source.channels} channels, but the model expects {model_config.channels}"
            )
        model_config.check_frame_size(source.label, source.height, source.width)
    if crop is not None:
        if crop[0] > data.source.height or crop[1] > data.source.width:
            raise UserError(
                f"--crop {crop[0]},{crop[1]}: larger than the {data.source.height}x{data.source.width} frames"
            )
        multiple = model_config.size_multiple
        if crop[0] % multiple or crop[1] % multiple:
            raise UserError(
                f"--crop {crop[0]},{crop[1]}: height and width must be multiples of {multiple} for this model"
            )
    for source, _ in data.validation:  # after the checks, so that a refusal stays one line
        model_config.log_padding(source.label, source.height, source.width)


def _prepare_run_dir(run_dir: str, force: bool) -> None:
    if os.path.exists(os.path.join(run_dir, "last.pt")) and not force:
        raise UserError(f"{run_dir}: holds a run already; use --resume {run_dir} or --force to start over")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {run_dir}: cannot create the run directory ({error.strerror})") from None
    for stale in ("metrics.jsonl", "best.pt", "last.pt", "config.toml"):  # a --force restart starts clean
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, stale))


def _build(
    run_dir: str,
    config: TrainConfig,
    model_config: ModelConfig,
    normalisation: Normalisation,
    data: TrainingData,
    placement: Placement,
) -> Run:
    """The run with a freshly initialised model (seeded), its optimizer and gradient scaler."""
    torch.manual_seed(config.seed)
    model = EncoderForecaster(model_config, recompute=config.recompute).to(placement.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(placement.device.type, enabled=placement.precision == torch.float16)
    # With one input frame the encoder's hidden convolutions never run (a zero state convolves to its bias), and
    # DDP must be told to expect weights without gradients.
    unused = data.spec.input_frames == 1
    net = DistributedDataParallel(model, find_unused_parameters=unused) if placement.world > 1 else model
    if config.compile:
        net = compile_for(net, placement.device)
    return Run(
        run_dir=run_dir,
        config=config,
        spec=data.spec,
        model_config=model_config,
        source=data.source,
        train_windows=data.train_windows,
        validation=data.validation,
        normalisation=normalisation,
        model=model,
        net=net,
        optimizer=optimizer,
        scaler=scaler,
        progress=Progress(processes=placement.world),
        device=placement.device,
        precision=placement.precision,
        rank=placement.rank,
        world=placement.world,
    )


def _write_run_files(run: Run, data_path: str | list[str], options_toml: str | None) -> None:
    """config.toml (the options that made the run, to repeat it) and config.json (what it trains)."""
    if options_toml is not None:
        with open(os.path.join(run.run_dir, "config.toml"), "w") as file:
            file.write(options_toml)
    with open(os.path.join(run.run_dir, "config.json"), "w") as file:
        json.dump(
            {
                "data": data_path,
                "data_spec": run.spec.to_dict(),
                "model_config": run.model_config.to_dict(),
                "train_config": asdict(run.config),
            },
            file,
            indent=2,
        )


def _log_start(run: Run) -> None:
    source = run.source
    log.info("%s: layout %s, %d sequence(s) of %d frames", source.label, source.layout, source.sequences, source.steps)
    held_out = len(run.validation[0][1])
    from_files = sum(len(val_windows) for _, val_windows in run.validation[1:])
    log.info(
        "training %s parameters, the %s forecaster (--forecaster) with %s cells (--activation), at a peak learning "
        "rate of %g (--lr), on %d windows (%d held out%s) on %s, %s, %d process(es); run directory %s",
        f"{count_parameters(run.model):,}",
        run.model_config.forecaster,
        run.model_config.activation,
        run.config.lr,
        len(run.train_windows),
        held_out,
        f", {from_files} from --val-data" if run.config.val_data else "",
        run.device,
        str(run.precision).removeprefix("torch."),
        run.world,
        run.run_dir,
    )
    _warn_if_quiet(run)


def _warn_if_quiet(run: Run) -> None:
    """Warn when most validation windows hold no signal (a dry evening of radar): best.pt would be chosen on them."""
    counted = [
        (len(w), quiet_fraction(source, w, run.spec.input_frames, run.spec.window)) for source, w in run.validation
    ]
    windows_in_all = sum(count for count, _ in counted)
    if not windows_in_all:
        return
    quiet = sum(count * fraction for count, fraction in counted) / windows_in_all
    if quiet >= QUIET_VALIDATION:
        units = run.source.units
        rain = units.strip().lower() in transforms.RAIN_UNITS
        what = f"dry (below {transforms.RAIN_THRESHOLD:g} {units}) or constant" if rain else "constant"
        log.warning(
            "%.0f%% of the %d validation windows are %s in the frames they forecast: the validation loss, and the "
            "choice of best.pt, rest on almost nothing; validate on another event with --val-data FILE",
            100 * quiet,
            windows_in_all,
            what,
        )


def _of_epochs(epoch: int, epochs: int | None) -> str:
    return f"{epoch}/{epochs}" if epochs else str(epoch)


def _log_epoch(record: dict, epochs: int | None, batch: int, batches_in_epoch: int, improved: bool) -> None:
    def shown(value: float | None, digits: str) -> str:
        return "-" if value is None else format(value, digits)

    log.info(
        "epoch %s%s  train loss %s  val loss %s  %s seq/s%s",
        _of_epochs(record["epoch"], epochs),
        f" (cut short: {batch} of {batches_in_epoch} batches)" if batch else "",
        shown(record["train_loss"], ".4f"),
        shown(record["val_loss"], ".4f"),
        shown(record["seq_per_s"], ".1f"),
        "  (best)" if improved else "",
    )


# -- small helpers


def new_run_dir(data_path: str) -> str:
    stem = os.path.splitext(os.path.basename(os.path.normpath(data_path)))[0] or "run"  # "radar/rmi/": rmi
    return os.path.join("runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def _loader(dataset: WindowDataset, batch_lists: list[list[int]], workers: int, device: torch.device):
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_lists, num_workers=workers, pin_memory=device.type == "cuda"
    )


def _write_metrics(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as file:
        file.write(json.dumps(record) + "\n")


def _split(
    batch: torch.Tensor, normalisation: Normalisation, spec: DataSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    frames, valid = normalisation.normalise(batch)
    return frames[:, : spec.input_frames], frames[:, spec.input_frames :], valid[:, spec.input_frames :]
