"""The `convgru` command line: parses options, reports errors, calls the library.

Exit codes: 0 success, 2 bad usage or input, 1 an unexpected failure, 130 interrupted (after saving).
Logs and progress go to standard error; standard output carries only results (tables, JSON, HDF5).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import tomllib
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from convgru_cli import __version__
from convgru_cli.errors import UserError

app = typer.Typer(
    help="Spatiotemporal forecasting with encoder-forecaster ConvGRU stacks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Make and inspect frame-sequence files.", no_args_is_help=True)
app.add_typer(data_app, name="data")

log = logging.getLogger("convgru")
settings = {"debug": False}


def _reported(command):
    """Turn a UserError into one line on stderr and exit code 2; --debug shows the traceback instead."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from convgru_cli.train import Interrupted

        try:
            return command(*args, **kwargs)
        except UserError as error:
            if settings["debug"]:
                raise
            typer.echo(f"convgru: error: {error}", err=True)
            raise typer.Exit(2) from None
        except Interrupted as stop:
            typer.echo(
                f"convgru: interrupted; last.pt saved. Resume with: convgru train DATA --resume {stop.run_dir}",
                err=True,
            )
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            typer.echo("convgru: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"convgru {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    settings["debug"] = debug
    settings["quiet"] = quiet
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="convgru: %(message)s", stream=sys.stderr, force=True
    )


def _floats(text: str | None, option: str) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"{option} {text}: expected numbers separated by commas, e.g. 0.5,2,5") from None


def _main_process() -> bool:
    """Under torchrun only rank 0 prints results."""
    return os.environ.get("RANK", "0") == "0"


def _json(value: object) -> str:
    """JSON with NaN (an undefined score) written as null."""

    def clean(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {k: clean(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [clean(v) for v in item]
        return item

    return json.dumps(clean(value), indent=2)


DataArg = Annotated[str | None, typer.Argument(help="HDF5 file; standard input when omitted.", show_default=False)]
DatasetOpt = Annotated[str | None, typer.Option(help="HDF5 dataset holding the frames (auto when only one).")]
LayoutOpt = Annotated[str | None, typer.Option(help="Axis letters, e.g. NTHW, NTCHW, THW, TCHW (auto by rank).")]
CheckpointOpt = Annotated[str | None, typer.Option(help="Checkpoint; default: the newest runs/*/best.pt.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[str, typer.Option(help="auto (bf16 where fast), fp32, bf16 or fp16.")]


# Options that say how to run, not what to train: never read from or saved to a config file.
NOT_IN_CONFIG = {"config", "out", "resume", "force", "as_json"}


def _merge_config(ctx: typer.Context, path: str | None) -> dict:
    """The train options: a TOML file's values where the command line left the default."""
    options = dict(ctx.params)
    if path is None:
        return options
    try:
        with open(path, "rb") as file:
            from_file = tomllib.load(file)
    except OSError as error:
        raise UserError(f"--config {path}: cannot read ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"--config {path}: not valid TOML ({error})") from None
    for key, value in from_file.items():
        name = key.replace("-", "_")
        if name not in options or name in NOT_IN_CONFIG:
            raise UserError(f"--config {path}: unknown train option {key!r}")
        source = ctx.get_parameter_source(name)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            options[name] = value
    return options


def _toml(options: dict) -> str:
    """Flat TOML; JSON's literals for strings, numbers and booleans are valid TOML."""
    lines = [f"{name.replace('_', '-')} = {json.dumps(value)}" for name, value in options.items() if value is not None]
    return "\n".join(lines) + "\n"


@app.command()
@_reported
def train(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Argument(help="HDF5 file of frame sequences (or 'data' in --config).")] = None,
    config: Annotated[str | None, typer.Option(help="TOML file of train options; the command line wins.")] = None,
    dataset: DatasetOpt = None,
    layout: LayoutOpt = None,
    input_frames: Annotated[int, typer.Option(help="Frames the encoder reads.")] = 10,
    output_frames: Annotated[int, typer.Option(help="Frames the forecaster is trained to produce.")] = 10,
    stride: Annotated[int, typer.Option(help="Step between windows cut from long sequences.")] = 1,
    val_fraction: Annotated[float, typer.Option(help="Share of sequences (or of a series' time) held out.")] = 0.1,
    nan_policy: Annotated[
        str, typer.Option(help="NaN (no data): mask (left out of loss and scores), zero, error.")
    ] = "mask",
    arch: Annotated[str, typer.Option(help="Architecture: fast, shi-mnist or hko7.")] = "fast",
    cell: Annotated[str, typer.Option(help="convgru, convgru-textbook or convlstm.")] = "convgru",
    epochs: Annotated[int | None, typer.Option(help="Passes over the training windows [default: 10].")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per step (per process under torchrun).")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine decay).")] = 2e-3,
    loss: Annotated[str, typer.Option(help="mse, mae or mse+mae.")] = "mse+mae",
    clip: Annotated[float, typer.Option(help="Gradient-norm clipping.")] = 1.0,
    seed: int = 0,
    max_time: Annotated[float | None, typer.Option(help="Stop cleanly after this many seconds of training.")] = None,
    patience: Annotated[int | None, typer.Option(help="Stop after this many epochs without a better val loss.")] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: Annotated[int | None, typer.Option(help="DataLoader workers (default: 0 in memory, else 2).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: PyTorch's).")] = None,
    out: Annotated[str | None, typer.Option(help="Run directory (default runs/<data>-<time>).")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue the run in this directory from its last.pt.")] = None,
    force: Annotated[bool, typer.Option(help="Start over in an --out directory that holds a run.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Train an encoder-forecaster on HDF5 frame sequences; writes last.pt, best.pt, config.json, config.toml
    and metrics.jsonl into the run directory. `convgru train --config RUN/config.toml` repeats a run."""
    from convgru_cli import device as devices
    from convgru_cli import train as training
    from convgru_cli.data import DataSpec
    from convgru_cli.model import make_config

    o = _merge_config(ctx, config)
    if o["data"] is None:
        raise UserError("no data file: name one, or give 'data' in --config")
    devices.set_threads(o["threads"])
    if o["input_frames"] < 1 or o["output_frames"] < 1:
        raise UserError("--input-frames and --output-frames must be at least 1")
    if o["stride"] < 1:
        raise UserError("--stride must be at least 1")
    if not 0 <= o["val_fraction"] < 1:
        raise UserError(f"--val-fraction {o['val_fraction']}: must be in [0, 1)")
    show_progress = not settings.get("quiet")
    if resume:
        changes = {k: o[k] for k in ("epochs", "max_time", "workers", "patience") if o[k] is not None}
        summary = training.resume(o["data"], resume, show_progress, device=o["device"], **changes)
    else:
        spec = DataSpec(
            o["dataset"],
            o["layout"],
            o["input_frames"],
            o["output_frames"],
            o["stride"],
            o["val_fraction"],
            o["nan_policy"],
        )
        train_config = training.TrainConfig(
            epochs=o["epochs"] or 10,
            batch_size=o["batch_size"],
            lr=o["lr"],
            loss=o["loss"],
            clip=o["clip"],
            seed=o["seed"],
            max_time=o["max_time"],
            patience=o["patience"],
            device=o["device"],
            precision=o["precision"],
            workers=o["workers"],
        )
        run_dir = out or training.new_run_dir(o["data"])
        model_config = make_config(o["arch"], channels=1, cell=o["cell"])
        saved_options = _toml({k: v for k, v in o.items() if k not in NOT_IN_CONFIG})
        summary = training.train(
            o["data"], spec, model_config, train_config, run_dir, force, show_progress, saved_options
        )
    if not _main_process():
        return
    if as_json:
        typer.echo(_json(summary))
    else:
        log.info(
            "best epoch %d, validation loss %.4f: %s",
            summary["best_epoch"],
            summary["best_val_loss"],
            summary["best_checkpoint"],
        )


@app.command()
@_reported
def predict(
    data: DataArg = None,
    frames: Annotated[int, typer.Option(help="Future frames to forecast (any number).")] = 10,
    checkpoint: CheckpointOpt = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="HDF5 file; default standard output.")] = None,
    dataset: DatasetOpt = None,
    layout: LayoutOpt = None,
    start: Annotated[int | None, typer.Option(help="First input frame (default: the last frames).")] = None,
    batch_size: int = 16,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output file.")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Forecast the frames that follow each sequence; HDF5 in, HDF5 out (in the data's units)."""
    from convgru_cli.forecast import predict_file

    result = predict_file(
        data, frames, checkpoint, output, dataset, layout, start, batch_size, force, device, precision
    )
    log.info(
        "forecast %s from %s written to %s", "x".join(map(str, result["shape"])), result["checkpoint"], result["output"]
    )


@app.command()
@_reported
def evaluate(
    data: DataArg = None,
    checkpoint: CheckpointOpt = None,
    split: Annotated[str, typer.Option(help="all: every window; val: the checkpoint's validation split.")] = "all",
    thresholds: Annotated[str | None, typer.Option(help="Event thresholds in data units, e.g. 0.5,2,5.")] = None,
    dataset: DatasetOpt = None,
    layout: LayoutOpt = None,
    batch_size: int = 16,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Score the model per lead time against persistence and climatology (MSE, MAE, SSIM, PSNR, CSI...)."""
    from convgru_cli.evaluate import evaluate_file

    report = evaluate_file(
        data, checkpoint, dataset, layout, split, _floats(thresholds, "--thresholds"), batch_size, device, precision
    )
    if not _main_process():
        return
    if as_json:
        typer.echo(_json(report))
    else:
        _print_report(report)


def _print_report(report: dict) -> None:
    methods = list(report["scores"])
    metrics = [m for m in report["scores"]["model"] if "@" not in m or m.startswith("csi@")]
    table = Table(title=f"{report['data']}: {report['windows']} windows, units {report['units'] or '-'}")
    table.add_column("lead", justify="right")
    for metric in metrics:
        for method in methods:
            table.add_column(f"{metric}\n{method[:5]}", justify="right")
    rows = [
        (str(lead), {m: {k: v[i] for k, v in report["scores"][m].items()} for m in methods})
        for i, lead in enumerate(report["lead_times"])
    ]
    rows.append(("mean", report["mean"]))
    for label, values in rows:
        table.add_row(label, *[f"{values[method][metric]:.4g}" for metric in metrics for method in methods])
    Console(width=max(120, 12 * len(metrics) * len(methods))).print(table)


@app.command()
@_reported
def info(
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint file (.pt).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """What a checkpoint holds: model and data configuration, normalisation, training progress."""
    from convgru_cli import checkpoint as checkpoints

    saved = checkpoints.load(checkpoint)
    parameters = sum(t.numel() for t in saved["model"].values())
    normalisation = {k: v for k, v in saved["normalisation"].items() if k != "mean_frame"}
    progress = {k: v for k, v in saved["progress"].items() if k != "history"}
    summary = {
        "checkpoint": checkpoint,
        "software_version": saved["software_version"],
        "format_version": saved["format_version"],
        "parameters": parameters,
        "model_config": saved["model_config"],
        "data_spec": saved["data_spec"],
        "normalisation": normalisation,
        "train_config": saved["train_config"],
        "progress": progress,
    }
    typer.echo(_json(summary) if as_json else "\n".join(f"{k}: {v}" for k, v in summary.items()))


@data_app.command()
@_reported
def synth(
    output: Annotated[str, typer.Argument(help="HDF5 file to write (dataset 'frames', [N, T, H, W] uint8).")],
    sequences: int = 1000,
    frames: int = 20,
    size: int = 64,
    digits: int = 2,
    mnist: Annotated[Path | None, typer.Option(help="MNIST idx3 images (.gz) to draw digits from.")] = None,
    seed: int = 0,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Moving-digits sequences (Moving MNIST style): real MNIST digits with --mnist, else a built-in font."""
    from convgru_cli import synth as synthesis

    if sequences < 1 or frames < 1 or digits < 1:
        raise UserError("--sequences, --frames and --digits must be at least 1")
    glyphs = synthesis.read_mnist_images(str(mnist)) if mnist else synthesis.font_glyphs()
    array = synthesis.moving_digits(sequences, frames, glyphs, size, digits, seed)
    source = f"MNIST {mnist.name}" if mnist else "built-in 5x7 font"
    synthesis.write_sequences(output, array, force=force, description=f"moving digits ({source}), seed {seed}")
    log.info("wrote %s: %d sequences of %d frames, %dx%d", output, sequences, frames, size, size)


def main() -> None:
    app()
