"""The `convgru` command line: parses options, reports errors, calls the library.

Exit codes: 0 success, 2 bad usage or input, 1 an unexpected failure, 130 interrupted (after saving).
Logs and progress go to standard error; standard output carries only results (tables, JSON, HDF5).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
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


@app.command()
@_reported
def train(
    data: Annotated[str, typer.Argument(help="HDF5 file of frame sequences.")],
    dataset: DatasetOpt = None,
    layout: LayoutOpt = None,
    input_frames: Annotated[int, typer.Option(help="Frames the encoder reads.")] = 10,
    output_frames: Annotated[int, typer.Option(help="Frames the forecaster is trained to produce.")] = 10,
    stride: Annotated[int, typer.Option(help="Step between windows cut from long sequences.")] = 1,
    val_fraction: Annotated[float, typer.Option(help="Share of sequences (or of a series' time) held out.")] = 0.1,
    arch: Annotated[str, typer.Option(help="Architecture: fast, shi-mnist or hko7.")] = "fast",
    cell: Annotated[str, typer.Option(help="convgru, convgru-textbook or convlstm.")] = "convgru",
    epochs: Annotated[int | None, typer.Option(help="Passes over the training windows [default: 10].")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per step (per process under torchrun).")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine decay).")] = 2e-3,
    loss: Annotated[str, typer.Option(help="mse, mae or mse+mae.")] = "mse+mae",
    clip: Annotated[float, typer.Option(help="Gradient-norm clipping.")] = 1.0,
    seed: int = 0,
    max_time: Annotated[float | None, typer.Option(help="Stop cleanly after this many seconds of training.")] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: Annotated[int | None, typer.Option(help="DataLoader workers (default: 0 in memory, else 2).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: PyTorch's).")] = None,
    out: Annotated[str | None, typer.Option(help="Run directory (default runs/<data>-<time>).")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue the run in this directory from its last.pt.")] = None,
    force: Annotated[bool, typer.Option(help="Start over in an --out directory that holds a run.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Train an encoder-forecaster on HDF5 frame sequences; writes last.pt, best.pt, config.json and
    metrics.jsonl into the run directory."""
    from convgru_cli import device as devices
    from convgru_cli import train as training
    from convgru_cli.data import DataSpec
    from convgru_cli.model import make_config

    devices.set_threads(threads)
    if input_frames < 1 or output_frames < 1:
        raise UserError("--input-frames and --output-frames must be at least 1")
    if stride < 1:
        raise UserError("--stride must be at least 1")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    show_progress = not settings.get("quiet")
    if resume:
        changes = {"epochs": epochs, "max_time": max_time, "workers": workers}
        changes = {k: v for k, v in changes.items() if v is not None}
        summary = training.resume(data, resume, show_progress, device=device, **changes)
    else:
        spec = DataSpec(dataset, layout, input_frames, output_frames, stride, val_fraction)
        config = training.TrainConfig(
            epochs=epochs or 10,
            batch_size=batch_size,
            lr=lr,
            loss=loss,
            clip=clip,
            seed=seed,
            max_time=max_time,
            device=device,
            precision=precision,
            workers=workers,
        )
        run_dir = out or training.new_run_dir(data)
        model_config = make_config(arch, channels=1, cell=cell)
        summary = training.train(data, spec, model_config, config, run_dir, force, show_progress)
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
