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
import signal
import sys
import tomllib
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from convgru_cli import __version__
from convgru_cli.atomic import refuse_existing
from convgru_cli.errors import UserError
from convgru_cli.signals import stop_on_signal

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
            # An error raised in a DataLoader worker arrives wrapped with the worker's traceback: keep its message.
            message = str(error).strip().splitlines()[-1].split("UserError: ", 1)[-1]
            typer.echo(f"convgru: error: {message}", err=True)
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
    signal.signal(signal.SIGTERM, stop_on_signal)  # training replaces it with a save of last.pt
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
CompileOpt = Annotated[
    bool, typer.Option(help="torch.compile the model (CUDA graphs on CUDA); minutes to start, pays on long runs.")
]


# Options that say how to run, not what to train: never read from or saved to a config file.
NOT_IN_CONFIG = {"config", "out", "resume", "force", "as_json"}
# Besides what train.resume accepts, what a resumed run may be given; everything else comes from its checkpoint.
RESUME_ALSO = {"data", "resume", "threads", "as_json"}


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
    parameters = {parameter.name: parameter for parameter in ctx.command.params}
    for key, value in from_file.items():
        name = key.replace("-", "_")
        if name not in options or name in NOT_IN_CONFIG:
            raise UserError(f"--config {path}: unknown train option {key!r}")
        parameter = parameters[name]
        single = parameter.nargs == 1 and not parameter.multiple
        if isinstance(value, list) and single:
            value = ",".join(str(item) for item in value)  # clip = [0, 200], as --clip 0,200
        elif isinstance(value, str) and not single:
            value = [value]  # data = "radar.h5"
        try:
            value = parameter.process_value(ctx, value)  # the checks the command line gets
        except typer.BadParameter as error:
            raise UserError(f"--config {path}: {key} = {value!r}: {error.message}") from None
        source = ctx.get_parameter_source(name)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            options[name] = value
    return options


def _cache(choice: str) -> bool | None:
    if choice not in ("auto", "on", "off"):
        raise UserError(f"--cache {choice}: choose auto, on or off")
    return None if choice == "auto" else choice == "on"


def _toml(options: dict) -> str:
    """Flat TOML; JSON's literals for strings, numbers and booleans are valid TOML."""
    lines = [f"{name.replace('_', '-')} = {json.dumps(value)}" for name, value in options.items() if value is not None]
    return "\n".join(lines) + "\n"


@app.command()
@_reported
def train(
    ctx: typer.Context,
    data: Annotated[
        list[str] | None, typer.Argument(help="HDF5 file(s) or globs of frame sequences (or 'data' in --config).")
    ] = None,
    config: Annotated[str | None, typer.Option(help="TOML file of train options; the command line wins.")] = None,
    dataset: DatasetOpt = None,
    layout: LayoutOpt = None,
    input_frames: Annotated[int, typer.Option(help="Frames the encoder reads.")] = 10,
    output_frames: Annotated[int, typer.Option(help="Frames the forecaster is trained to produce.")] = 10,
    stride: Annotated[int, typer.Option(help="Step between windows cut from long sequences.")] = 1,
    val_fraction: Annotated[float, typer.Option(help="Share of sequences (or of a series' time) held out.")] = 0.1,
    nan_policy: Annotated[
        str, typer.Option(help="NaN (no data): mask (out of loss and scores), zero, error.")
    ] = "mask",
    mask_dataset: Annotated[str | None, typer.Option(help="Boolean dataset, True = valid (auto: 'mask').")] = None,
    log_transform: Annotated[bool, typer.Option(help="Model log(1 + x), e.g. for rain rates.")] = False,
    clip: Annotated[str | None, typer.Option(help="LOW,HIGH bounds in data units, applied first.")] = None,
    cache: Annotated[str, typer.Option(help="Hold the data in memory: auto (if it fits in 2 GiB), on, off.")] = "auto",
    arch: Annotated[str, typer.Option(help="Architecture: fast, shi-mnist or hko7.")] = "fast",
    cell: Annotated[str, typer.Option(help="convgru, convgru-textbook or convlstm.")] = "convgru",
    epochs: Annotated[int | None, typer.Option(help="Passes over the training windows [default: 10].")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per step (per process under torchrun).")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine decay).")] = 2e-3,
    loss: Annotated[str, typer.Option(help="mse, mae, mse+mae or balanced (Shi 2017, for rain).")] = "mse+mae",
    balance_thresholds: Annotated[str, typer.Option(help="--loss balanced: data-unit levels.")] = "2,5,10,30",
    balance_weights: Annotated[
        str, typer.Option(help="--loss balanced: weight below, between, above.")
    ] = "1,2,5,10,30",
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm to this; 0: no clipping.")] = 1.0,
    seed: int = 0,
    max_time: Annotated[float | None, typer.Option(help="Stop cleanly after this many seconds of training.")] = None,
    patience: Annotated[int | None, typer.Option(help="Stop after this many epochs without a better val loss.")] = None,
    compile: CompileOpt = False,
    recompute: Annotated[
        bool, typer.Option(help="Recompute each step's activations in the backward pass: less memory, more time.")
    ] = False,
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
    from convgru_cli.model import make_config
    from convgru_cli.windowing import DataSpec

    o = _merge_config(ctx, config)
    if not o["data"]:
        raise UserError("no data file: name one, or give 'data' in --config")
    if isinstance(o["data"], str):
        o["data"] = [o["data"]]
    devices.set_threads(o["threads"])
    show_progress = not settings.get("quiet")
    if resume:
        given = {name for name in ctx.params if ctx.get_parameter_source(name).name == "COMMANDLINE"}
        fixed = given - set(training.RESUME_CHANGES) - RESUME_ALSO
        if fixed:
            options = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(fixed))
            raise UserError(f"--resume continues a run as it was saved: {options} cannot change")
        changes = {k: _cache(o[k]) if k == "cache" else o[k] for k in training.RESUME_CHANGES if k in given}
        summary = training.resume(o["data"], resume, show_progress, **changes)
    else:
        clip_bounds = _floats(o["clip"], "--clip")
        if o["clip"] and (len(clip_bounds) != 2 or clip_bounds[0] >= clip_bounds[1]):
            raise UserError(f"--clip {o['clip']}: expected LOW,HIGH with LOW < HIGH")
        spec = DataSpec(
            o["dataset"],
            o["layout"],
            o["input_frames"],
            o["output_frames"],
            o["stride"],
            o["val_fraction"],
            o["nan_policy"],
            o["mask_dataset"],
            o["log_transform"],
            clip_bounds or None,
        )
        train_config = training.TrainConfig(
            epochs=10 if o["epochs"] is None else o["epochs"],
            batch_size=o["batch_size"],
            lr=o["lr"],
            loss=o["loss"],
            grad_clip=o["grad_clip"],
            seed=o["seed"],
            max_time=o["max_time"],
            patience=o["patience"],
            compile=o["compile"],
            recompute=o["recompute"],
            balance_thresholds=_floats(o["balance_thresholds"], "--balance-thresholds"),
            balance_weights=_floats(o["balance_weights"], "--balance-weights"),
            cache=_cache(o["cache"]),
            device=o["device"],
            precision=o["precision"],
            workers=o["workers"],
        )
        run_dir = out or training.new_run_dir(o["data"][0])
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
    force: Annotated[bool, typer.Option(help="Overwrite existing output files.")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    png: Annotated[str | None, typer.Option(help="Draw inputs | truth | forecast of one sequence as a PNG.")] = None,
    gif: Annotated[str | None, typer.Option(help="The same as an animated GIF, one frame per lead time.")] = None,
    picture_sequence: Annotated[int, typer.Option(help="Which sequence --png/--gif draw.")] = 0,
) -> None:
    """Forecast the frames that follow each sequence; HDF5 in, HDF5 out (in the data's units)."""
    from convgru_cli.forecast import predict_file

    result = predict_file(
        data,
        frames,
        checkpoint,
        output,
        dataset,
        layout,
        start,
        batch_size,
        force,
        device,
        precision,
        png,
        gif,
        picture_sequence,
        compile=compile,
    )
    log.info(
        "forecast %s from %s written to %s", "x".join(map(str, result["shape"])), result["checkpoint"], result["output"]
    )


@app.command()
@_reported
def evaluate(
    data: Annotated[
        list[str] | None, typer.Argument(help="HDF5 file(s) or globs to score, scored as one set (default: stdin).")
    ] = None,
    checkpoint: CheckpointOpt = None,
    split: Annotated[str, typer.Option(help="all: every window; val: the checkpoint's validation split.")] = "all",
    thresholds: Annotated[
        str | None,
        typer.Option(help="Event thresholds in data units (0.5,2,5) or with a unit (1mm/h,35dBZ); default by units."),
    ] = None,
    zr: Annotated[str, typer.Option(help="Z-R relation a,b (Z = a R^b) for thresholds in the other unit.")] = "200,1.6",
    fss_scales: Annotated[str | None, typer.Option(help="With --thresholds: FSS window sizes in pixels.")] = None,
    baselines: Annotated[
        bool, typer.Option(help="Also score persistence, optical flow and climatology (the flow takes time).")
    ] = True,
    forecast: Annotated[str | None, typer.Option(help="Score this forecast file (any model's) instead.")] = None,
    truth: Annotated[str | None, typer.Option(help="With --forecast: the observed frames.")] = None,
    truth_start: Annotated[int | None, typer.Option(help="With --forecast: truth frame of lead 1.")] = None,
    dataset: DatasetOpt = None,
    layout: LayoutOpt = None,
    batch_size: int = 16,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    csv: Annotated[str | None, typer.Option(help="Also write method,metric,lead_time,value rows here.")] = None,
    plot: Annotated[str | None, typer.Option(help="Also draw each score against lead time (PNG).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite existing --csv/--plot files.")] = False,
) -> None:
    """Score forecasts per lead time against persistence, optical flow and climatology (MSE, MAE, SSIM, PSNR;
    CSI, POD, FAR, HSS, ETS and bias at --thresholds)."""
    from convgru_cli import evaluate as verification
    from convgru_cli import pictures

    levels = tuple(part.strip() for part in (thresholds or "").split(",") if part.strip())
    relation = _floats(zr, "--zr")
    if len(relation) != 2 or min(relation) <= 0:
        raise UserError(f"--zr {zr}: expected two positive numbers a,b")
    scales = tuple(int(v) for v in _floats(fss_scales, "--fss-scales"))
    if scales and (not levels or min(scales) < 1):
        raise UserError("--fss-scales needs --thresholds, and window sizes of at least 1 pixel")
    refuse_existing([csv, plot], force)
    if forecast:
        if truth is None or data:
            raise UserError("--forecast needs --truth FILE (and no DATA argument)")
        if compile:
            raise UserError("--compile: --forecast scores a file, there is no model to compile")
        report = verification.evaluate_forecasts(
            forecast, truth, truth_start, dataset, layout, levels, batch_size, scales, relation
        )
    else:
        report = verification.evaluate_file(
            data,
            checkpoint,
            dataset,
            layout,
            split,
            levels,
            batch_size,
            device,
            precision,
            scales,
            relation,
            baselines,
            compile=compile,
        )
    if not _main_process():
        return
    if csv:
        verification.write_csv(csv, report, force)
    if plot:
        pictures.save_png(plot, pictures.plot_scores(report), force)
    if as_json:
        typer.echo(_json(report))
    else:
        _print_report(report)


def _print_report(report: dict) -> None:
    methods = list(report["scores"])
    first = next(iter(report["scores"].values()))
    metrics = [m for m in first if m in ("mse", "mae", "ssim") or m.startswith("csi@")]  # the rest: --json, --csv
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


@data_app.command()
@_reported
def inspect(
    file: Annotated[str, typer.Argument(help="HDF5 file.")],
    input_frames: int = 10,
    output_frames: int = 10,
    stride: int = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Datasets, shapes, dtypes, chunking, compression, value ranges, no-data fraction, layout and windows."""
    from convgru_cli.inspection import inspect_file

    report = inspect_file(file, input_frames, output_frames, stride)
    if as_json:
        typer.echo(_json(report))
        return
    table = Table(title=file)
    for column in ("dataset", "shape", "dtype", "chunks", "compression", "layout", "range", "no data", "windows"):
        table.add_column(column)
    for d in report["datasets"]:
        value_range = f"{d['min']:.4g} .. {d['max']:.4g}" if d.get("min") is not None else ""
        no_data = f"{d['no_data_fraction']:.1%}" if "no_data_fraction" in d else ""
        table.add_row(
            d["name"],
            "x".join(map(str, d["shape"])),
            d["dtype"],
            str(d["chunks"] or "-"),
            str(d["compression"] or "-"),
            d.get("layout", ""),
            value_range,
            no_data,
            str(d.get("windows", "")),
        )
    Console(width=140).print(table)
    for d in report["datasets"]:
        if "problem" in d:
            typer.echo(f"{d['name']}: {d['problem']}")


@data_app.command("import")
@_reported
def import_(
    source: Annotated[str, typer.Argument(help="A numpy .npy array, e.g. Moving MNIST's mnist_test_seq.npy.")],
    output: Annotated[str, typer.Argument(help="HDF5 file to write.")],
    layout: Annotated[str, typer.Option(help="Axis letters of the array, e.g. TNHW for mnist_test_seq.npy.")],
    dataset: str = "frames",
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a numpy array to HDF5 with its layout recorded, chunked one sequence per chunk."""
    from convgru_cli.conversion import import_array

    result = import_array(source, output, layout, dataset, force)
    log.info("wrote %s: %s %s", output, result["layout"], "x".join(map(str, result["shape"])))


def main() -> None:
    app()
