"""The training loop: one process, or one of several under torchrun (DistributedDataParallel).

Batch order is a pure function of (seed, epoch), so a run stopped mid-epoch resumes exactly where it was.
Rank 0 alone logs and writes; batch size is per process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from convgru_cli import checkpoint, distributed
from convgru_cli.device import autocast, compile_failure, compile_for, pad_batch, pick_device, pick_precision
from convgru_cli.errors import UserError
from convgru_cli.model import EncoderForecaster, ModelConfig, count_parameters
from convgru_cli.normalisation import Normalisation, compute_normalisation
from convgru_cli.sources import open_frames
from convgru_cli.windowing import DataSpec, WindowDataset, split_windows

log = logging.getLogger("convgru")

LOSSES = ("mse", "mae", "mse+mae", "balanced")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    loss: str = "mse+mae"
    # Shi et al. 2017's balanced loss: per-pixel weights by the target's value in data units (rain: mm/h)
    balance_thresholds: tuple[float, ...] = (2.0, 5.0, 10.0, 30.0)
    balance_weights: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0)
    grad_clip: float = 1.0
    seed: int = 0
    max_time: float | None = None
    patience: int | None = None
    compile: bool = False
    recompute: bool = False
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    cache: bool | None = None  # hold the data in memory: None decides by size

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise UserError("--lr must be positive")
        if self.grad_clip < 0:
            raise UserError(f"--grad-clip {self.grad_clip:g}: must not be negative (0: no clipping)")
        if self.loss not in LOSSES:
            raise UserError(f"--loss {self.loss}: choose one of {', '.join(LOSSES)}")
        if len(self.balance_weights) != len(self.balance_thresholds) + 1:
            raise UserError("--balance-weights needs one weight more than --balance-thresholds")
        if list(self.balance_thresholds) != sorted(self.balance_thresholds):
            raise UserError("--balance-thresholds must be in increasing order")
        if self.max_time is not None and self.max_time < 0:
            raise UserError(f"--max-time {self.max_time:g}: must not be negative (0: no limit)")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers {self.workers}: must be 0 or more")


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


def _loader(dataset: WindowDataset, batches: list[list[int]], workers: int, device: torch.device):
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda"
    )


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C or SIGTERM inside the block takes effect, as KeyboardInterrupt, when the block is done."""
    caught, previous = [], {}
    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, lambda number, frame: caught.append(number))
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if caught:
        raise KeyboardInterrupt


def _write_metrics(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as file:
        file.write(json.dumps(record) + "\n")


def new_run_dir(data_path: str) -> str:
    stem = os.path.splitext(os.path.basename(data_path))[0] or "run"
    return os.path.join("runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


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
    return _fit(data_path, spec, model_config, config, run_dir, None, force, show_progress, options_toml)


RESUME_CHANGES = ("epochs", "max_time", "patience", "device", "workers", "cache", "recompute")


def resume(data_path: str | list[str], run_dir: str, show_progress: bool = True, **changes) -> dict:
    """Continue the run in ``run_dir`` from its last.pt, exactly where it stopped (mid-epoch included).
    ``changes`` may set epochs (to train longer), max_time, device or workers; all else is as saved."""
    unknown = set(changes) - set(RESUME_CHANGES)
    if unknown:
        raise UserError(f"--resume: {', '.join(sorted(unknown))} cannot change in a resumed run")
    saved = checkpoint.load(os.path.join(run_dir, "last.pt"))
    config = TrainConfig(**{**saved["train_config"], **changes})
    spec = DataSpec(**saved["data_spec"])
    model_config = ModelConfig.from_dict(saved["model_config"])
    return _fit(data_path, spec, model_config, config, run_dir, saved, False, show_progress, None)


def _fit(
    data_path: str | list[str],
    spec: DataSpec,
    model_config: ModelConfig,
    config: TrainConfig,
    run_dir: str,
    saved: dict | None,
    force: bool,
    show_progress: bool,
    options_toml: str | None,
) -> dict:
    device = pick_device(config.device)
    rank, world = distributed.setup(device)
    device = distributed.process_device(device)
    config.check()
    spec.check()
    precision = pick_precision(config.precision, device)

    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    frames = open_frames(paths, spec.dataset, spec.layout, config.cache, spec.nan_policy, spec.mask_dataset)
    spec = DataSpec(**{**spec.to_dict(), "dataset": frames.dataset, "layout": frames.layout})
    train_windows, val_windows = split_windows(frames, spec)
    if len(train_windows) < config.batch_size * world:
        raise UserError(
            f"--batch-size {config.batch_size}: larger than the {len(train_windows)} training windows "
            f"{'per process ' if world > 1 else ''}in {frames.label}; lower it"
        )
    if saved:
        normalisation = Normalisation(**saved["normalisation"])
    else:
        normalisation = compute_normalisation(frames, train_windows, spec.window, spec.log_transform, spec.clip)
        model_config = replace(model_config, channels=frames.channels)
        if normalisation.nan_fraction > 0 and rank == 0:
            log.warning(
                "%s: %.2f%% of the sampled training pixels are NaN (no data); they are left out of the loss "
                "and the scores (--nan-policy mask)",
                frames.label,
                100 * normalisation.nan_fraction,
            )
    if model_config.channels != frames.channels:
        raise UserError(f"{frames.label}: {frames.channels} channels, but the model expects {model_config.channels}")
    model_config.check_frame_size(frames.height, frames.width)

    torch.manual_seed(config.seed)
    model = EncoderForecaster(model_config, recompute=config.recompute).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    progress = Progress(processes=world)
    if saved:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        progress = Progress(**{"processes": world, **saved["progress"]})  # older checkpoints do not record it
        if progress.processes != world:
            raise UserError(
                f"--resume {run_dir}: the run was trained by {progress.processes} process(es) and this is {world}; "
                f"resume it with as many (torchrun --nproc-per-node {progress.processes}) to continue where it was"
            )
    elif rank == 0:
        if os.path.exists(os.path.join(run_dir, "last.pt")) and not force:
            raise UserError(f"{run_dir}: holds a run already; use --resume {run_dir} or --force to start over")
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as error:
            raise UserError(f"--out {run_dir}: cannot create the run directory ({error.strerror})") from None
        for stale in ("metrics.jsonl", "best.pt", "last.pt", "config.toml"):  # a --force restart starts clean
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run_dir, stale))
    # With one input frame the encoder's hidden convolutions never run (a zero state convolves to its bias), and
    # DDP must be told to expect weights without gradients.
    net = DistributedDataParallel(model, find_unused_parameters=spec.input_frames == 1) if world > 1 else model
    if config.compile:
        net = compile_for(net, device)

    def save(name: str) -> None:
        if rank != 0:
            return
        checkpoint.save(
            os.path.join(run_dir, name),
            {
                "model_config": model_config.to_dict(),
                "data_spec": spec.to_dict(),
                "normalisation": normalisation.to_dict(),
                "train_config": asdict(config),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "progress": asdict(progress),
            },
        )

    if rank == 0 and options_toml is not None:
        with open(os.path.join(run_dir, "config.toml"), "w") as file:
            file.write(options_toml)
    if rank == 0:
        with open(os.path.join(run_dir, "config.json"), "w") as file:
            json.dump(
                {
                    "data": data_path,
                    "data_spec": spec.to_dict(),
                    "model_config": model_config.to_dict(),
                    "train_config": asdict(config),
                },
                file,
                indent=2,
            )
        log.info(
            "%s: layout %s, %d sequence(s) of %d frames",
            frames.label,
            frames.layout,
            frames.sequences,
            frames.steps,
        )
        log.info(
            "training %s parameters on %d windows (%d held out) on %s, %s, %d process(es); run directory %s",
            f"{count_parameters(model):,}",
            len(train_windows),
            len(val_windows),
            device,
            str(precision).removeprefix("torch."),
            world,
            run_dir,
        )

    workers = config.workers if config.workers is not None else (0 if frames.in_memory else 2)
    train_set = WindowDataset(frames, train_windows, spec.window)
    steps_per_epoch = len(epoch_batches(len(train_windows), config.batch_size, 0, 0, 0, world))
    total_steps = steps_per_epoch * config.epochs
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.perf_counter() - progress.elapsed
    try:
        while progress.epoch < config.epochs:
            batches = epoch_batches(len(train_windows), config.batch_size, config.seed, progress.epoch, rank, world)
            net.train()
            bar = tqdm(
                total=len(batches),
                initial=progress.batch,
                desc=f"epoch {progress.epoch + 1}/{config.epochs}",
                disable=not show_progress or rank != 0 or not sys.stderr.isatty(),
                file=sys.stderr,
                leave=False,
            )
            seen_here, epoch_start = 0, time.perf_counter()  # this process's sequences since it (re)started
            out_of_time = False
            for batch in _loader(train_set, batches[progress.batch :], workers, device):
                raw = batch.to(device, non_blocking=True)
                inputs, target, valid = _split(raw, normalisation, spec)
                weight = valid.float()
                if config.loss == "balanced":
                    weight = weight * balance_weights(raw[:, spec.input_frames :], config)
                fraction = progress.step / total_steps
                if config.max_time:
                    # One clock for all processes: the same learning rate everywhere, and all stop together.
                    elapsed = distributed.max_over_processes(time.perf_counter() - started, device)
                    fraction = max(fraction, elapsed / config.max_time)
                    out_of_time = elapsed >= config.max_time
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(config, progress.step, fraction)
                with autocast(device, precision):
                    prediction = net(inputs, spec.output_frames)
                loss = weighted_loss(prediction.float(), target, weight, config.loss)
                loss_value = loss.item()  # the one host-device sync of the step
                if not math.isfinite(loss_value):
                    raise UserError(
                        f"training diverged: the loss is {loss_value} at step {progress.step + 1}; "
                        "lower --lr or check the data (try --log-transform or --clip for heavy-tailed values)"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                with _signals_held():  # a checkpoint never holds the new weights with the old step count
                    scaler.step(optimizer)
                    scaler.update()
                    progress.batch += 1
                    progress.step += 1
                    progress.epoch_loss += loss_value * len(batch)
                    progress.epoch_sequences += len(batch)
                seen_here += len(batch)
                rate = seen_here * world / (time.perf_counter() - epoch_start)
                bar.set_postfix(loss=f"{loss_value:.4f}", seq_s=f"{rate:.1f}")
                bar.update()
                if out_of_time:
                    break
            bar.close()
            progress.elapsed = time.perf_counter() - started
            # The epoch counts as done only after validation (a Ctrl-C during it resumes into validation) and
            # only when all its batches ran: one cut short by --max-time goes on from there when resumed.
            val_loss = validate(net, frames, val_windows, spec, normalisation, config, device, precision, rank, world)
            loss_sum, sequences = distributed.sum_over_processes(
                torch.tensor([progress.epoch_loss, progress.epoch_sequences], dtype=torch.float64), device
            ).tolist()
            epoch = progress.epoch + 1
            if progress.batch == len(batches):
                progress.epoch, progress.batch, progress.epoch_loss, progress.epoch_sequences = epoch, 0, 0.0, 0
            record = {
                "epoch": epoch,
                "step": progress.step,
                "train_loss": loss_sum / sequences if sequences else None,  # the epoch's, across resumes
                "val_loss": val_loss,
                "seq_per_s": seen_here * world / (time.perf_counter() - epoch_start) if seen_here else None,
                "elapsed_s": round(progress.elapsed, 2),
                "complete": progress.batch == 0,  # false: cut short by --max-time, continued by --resume
            }
            # Without a validation split every epoch is the best so far; a NaN loss never is.
            improved = val_loss is None or val_loss < progress.best_val
            if improved:
                progress.best_epoch = epoch
                progress.best_val = progress.best_val if val_loss is None else val_loss
            progress.history.append(record)
            save("last.pt")
            if improved:
                save("best.pt")
            if rank == 0:
                _write_metrics(run_dir, record)
                log.info(
                    "epoch %d/%d%s  train loss %s  val loss %s  %s seq/s%s",
                    epoch,
                    config.epochs,
                    f" (cut short: {progress.batch} of {len(batches)} batches)" if progress.batch else "",
                    "-" if record["train_loss"] is None else f"{record['train_loss']:.4f}",
                    "-" if val_loss is None else f"{val_loss:.4f}",
                    "-" if record["seq_per_s"] is None else f"{record['seq_per_s']:.1f}",
                    "  (best)" if improved else "",
                )
            if out_of_time:
                log.info("stopping: --max-time %gs reached", config.max_time)
                break
            if config.patience and epoch - progress.best_epoch >= config.patience:
                log.info("stopping: no better validation loss for %d epochs (--patience)", config.patience)
                break
    except KeyboardInterrupt:
        progress.elapsed = time.perf_counter() - started
        save("last.pt")
        raise Interrupted(run_dir) from None
    except torch._dynamo.exc.BackendCompilerFailed as error:  # at the first compiled step: no C++ compiler, say
        raise compile_failure(error, "train") from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    distributed.finish()
    return {
        "run_dir": run_dir,
        "best_epoch": progress.best_epoch,
        "best_val_loss": progress.best_val,
        "last_checkpoint": os.path.join(run_dir, "last.pt"),
        "best_checkpoint": os.path.join(run_dir, "best.pt"),
        "epochs": progress.epoch,
        "steps": progress.step,
        "seq_per_s": progress.history[-1]["seq_per_s"] if progress.history else 0.0,
        "wall_s": round(progress.elapsed, 2),
    }


def _split(
    batch: torch.Tensor, normalisation: Normalisation, spec: DataSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    frames, valid = normalisation.normalise(batch)
    return frames[:, : spec.input_frames], frames[:, spec.input_frames :], valid[:, spec.input_frames :]


@torch.no_grad()
def validate(net, frames, windows, spec, normalisation, config, device, precision, rank, world) -> float | None:
    """Mean per-pixel MSE (normalised units) on the held-out windows, summed over all ranks; None without any."""
    if not windows:
        return None
    net.eval()
    mine = windows[rank::world]
    batches = [list(range(i, min(i + config.batch_size, len(mine)))) for i in range(0, len(mine), config.batch_size)]
    total = torch.zeros(2, dtype=torch.float64)  # summed on the CPU: Apple's MPS has no float64
    for batch in _loader(WindowDataset(frames, mine, spec.window), batches, 0, device):
        batch, count = batch.to(device), len(batch)
        if config.compile:  # the ragged last batch
            batch = pad_batch(batch, config.batch_size)
        inputs, target, valid = _split(batch, normalisation, spec)
        with autocast(device, precision):
            prediction = net(inputs, spec.output_frames)
        error, weight = prediction[:count].float() - target[:count], valid[:count].float()
        total += torch.stack([(error**2 * weight).sum(), weight.sum()]).cpu()
    total = distributed.sum_over_processes(total, device)
    return (total[0] / total[1].clamp(min=1)).item()
