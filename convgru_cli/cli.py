"""The `convgru` command line: one thin command per verb, parsing options and calling the library by keyword.

`convgru data ...` lives in cli_data.py, shared options and option parsing in options.py, errors, exit codes
and printing in console.py.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from convgru_cli import __version__, options, signals
from convgru_cli.atomic import refuse_existing
from convgru_cli.cli_data import data_app
from convgru_cli.console import Settings, main_process, print_scores, reported, settings, to_json
from convgru_cli.errors import UserError

app = typer.Typer(
    help="Spatiotemporal forecasting with encoder-forecaster ConvGRU stacks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")

log = logging.getLogger("convgru")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"convgru {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    ctx.obj = Settings(debug=debug, quiet=quiet)
    signals.exit_on_sigterm()  # training turns it into a save of last.pt
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="convgru: %(message)s", stream=sys.stderr, force=True
    )


@app.command()
@reported
def train(
    ctx: typer.Context,
    data: Annotated[
        list[str] | None,
        typer.Argument(
            help="HDF5 file(s) or globs of frame sequences, or an archive folder of per-time-step radar files "
            "(or 'data' in --config)."
        ),
    ] = None,
    config: Annotated[str | None, typer.Option(help="TOML file of train options; the command line wins.")] = None,
    dataset: options.DatasetOpt = None,
    layout: options.LayoutOpt = None,
    input_frames: Annotated[int, typer.Option(help="Frames the encoder reads.")] = 10,
    output_frames: Annotated[int, typer.Option(help="Frames the forecaster is trained to produce.")] = 10,
    stride: Annotated[int, typer.Option(help="Step between windows cut from long sequences.")] = 1,
    val_fraction: Annotated[float, typer.Option(help="Share of sequences (or of a series' time) held out.")] = 0.1,
    val_data: Annotated[
        list[str] | None,
        typer.Option(
            help="Also validate on this file's windows (or a glob's; repeat for more): another event or radar, read "
            "as DATA is. With it --val-fraction 0 trains on all of DATA."
        ),
    ] = None,
    nan_policy: options.NanPolicyOpt = "mask",
    mask_dataset: Annotated[str | None, typer.Option(help="Boolean dataset, True = valid (auto: 'mask').")] = None,
    importer: options.ImporterOpt = None,
    transform: options.TransformOpt = "auto",
    clip: Annotated[str | None, typer.Option(help="LOW,HIGH bounds in data units, applied first.")] = None,
    cache: options.CacheOpt = "auto",
    crop: Annotated[
        str | None,
        typer.Option(help="Train on random crops of SIZE or H,W pixels, drawn anew each epoch; forecasts stay whole."),
    ] = None,
    augment: options.AugmentOpt = None,
    arch: options.ArchOpt = "fast",
    cell: options.CellOpt = "convgru",
    forecaster: options.ForecasterOpt = "auto",
    activation: options.ActivationOpt = "auto",
    epochs: options.EpochsOpt = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per step (per process under torchrun).")] = 8,
    lr: options.LrOpt = None,
    loss: options.LossOpt = "mse+mae",
    balance_thresholds: Annotated[str, typer.Option(help="--loss balanced: data-unit levels.")] = "2,5,10,30",
    balance_weights: Annotated[
        str, typer.Option(help="--loss balanced: weight below, between, above.")
    ] = "1,2,5,10,30",
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm to this; 0: no clipping.")] = 1.0,
    distribution_weight: options.DistributionWeightOpt = None,
    seed: int = 0,
    max_time: Annotated[
        float | None, typer.Option(help="Stop cleanly after this many seconds of training (default: no limit).")
    ] = None,
    patience: Annotated[int | None, typer.Option(help="Stop after this many epochs without a better val loss.")] = None,
    compile: options.CompileOpt = False,
    recompute: Annotated[
        bool, typer.Option(help="Recompute each step's activations in the backward pass: less memory, more time.")
    ] = False,
    device: options.DeviceOpt = "auto",
    precision: options.PrecisionOpt = "auto",
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

    o = options.train_options(ctx, config)
    devices.set_threads(o["threads"])
    show_progress = not settings(ctx).quiet
    if resume:
        summary = training.resume(o["data"], resume, show_progress=show_progress, **options.resume_changes(ctx, o))
    else:
        spec, train_config = options.train_configs(o)
        summary = training.train(
            o["data"],
            spec,
            make_config(o["arch"], channels=1, cell=o["cell"], forecaster=o["forecaster"], activation=o["activation"]),
            train_config,
            run_dir=out or training.new_run_dir(o["data"][0]),
            force=force,
            show_progress=show_progress,
            options_toml=options.to_toml(o),
        )
    if not main_process():
        return
    if as_json:
        typer.echo(to_json(summary))
    elif summary["best_val_loss"] is None:
        log.info(
            "epoch %d, not validated (no validation windows): %s", summary["best_epoch"], summary["best_checkpoint"]
        )
    else:
        log.info(
            "best epoch %d, validation loss %.4f: %s",
            summary["best_epoch"],
            summary["best_val_loss"],
            summary["best_checkpoint"],
        )


@app.command()
@reported
def predict(
    ctx: typer.Context,
    data: options.DataArg = None,
    frames: Annotated[int, typer.Option(help="Future frames to forecast (any number).")] = 10,
    checkpoint: options.CheckpointOpt = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="HDF5 file; default standard output.")] = None,
    dataset: options.DatasetOpt = None,
    layout: options.LayoutOpt = None,
    start: Annotated[int | None, typer.Option(help="First input frame (default: the last frames).")] = None,
    batch_size: options.BatchSizeOpt = 16,
    force: Annotated[bool, typer.Option(help="Overwrite existing output files.")] = False,
    device: options.DeviceOpt = "auto",
    precision: options.PrecisionOpt = "auto",
    compile: options.CompileOpt = False,
    memory_budget: options.MemoryBudgetOpt = None,
    matching: options.MatchingOpt = "auto",
    png: Annotated[str | None, typer.Option(help="Draw inputs | truth | forecast of one sequence as a PNG.")] = None,
    gif: Annotated[str | None, typer.Option(help="The same as an animated GIF, one frame per lead time.")] = None,
    picture_sequence: Annotated[int, typer.Option(help="Which sequence --png/--gif draw.")] = 0,
    importer: options.ImporterOpt = None,
) -> None:
    """Forecast the frames that follow each sequence; HDF5 in, HDF5 out (in the data's units)."""
    from convgru_cli.forecast import predict_file

    result = predict_file(
        data_path=data,
        frames=frames,
        checkpoint_path=checkpoint,
        output=output,
        dataset=dataset,
        layout=layout,
        start=start,
        batch_size=batch_size,
        force=force,
        device=device,
        precision=precision,
        png=png,
        gif=gif,
        picture_sequence=picture_sequence,
        compile=compile,
        importer=importer,
        memory_budget=options.memory_budget(memory_budget),
        matching=matching,
    )
    log.info(
        "forecast %s from %s written to %s", "x".join(map(str, result["shape"])), result["checkpoint"], result["output"]
    )


@app.command()
@reported
def evaluate(
    ctx: typer.Context,
    data: options.DataFilesArg = None,
    checkpoint: options.CheckpointOpt = None,
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
    dataset: options.DatasetOpt = None,
    layout: options.LayoutOpt = None,
    importer: options.ImporterOpt = None,
    batch_size: options.BatchSizeOpt = 16,
    device: options.DeviceOpt = "auto",
    precision: options.PrecisionOpt = "auto",
    compile: options.CompileOpt = False,
    memory_budget: options.MemoryBudgetOpt = None,
    matching: options.MatchingOpt = "auto",
    as_json: options.JsonOpt = False,
    csv: Annotated[str | None, typer.Option(help="Also write method,metric,lead_time,value rows here.")] = None,
    plot: Annotated[str | None, typer.Option(help="Also draw each score against lead time (PNG).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite existing --csv/--plot files.")] = False,
) -> None:
    """Score forecasts per lead time against persistence, optical flow and climatology (MSE, MAE, SSIM, PSNR;
    CSI, POD, FAR, HSS, ETS and bias at --thresholds)."""
    from convgru_cli import evaluate as verification
    from convgru_cli import pictures

    scoring = dict(
        thresholds=options.words(thresholds),
        zr=options.floats(zr, "--zr"),
        fss_scales=tuple(int(v) for v in options.floats(fss_scales, "--fss-scales")),
        dataset=dataset,
        layout=layout,
        batch_size=batch_size,
        memory_budget=options.memory_budget(memory_budget),
    )
    refuse_existing([csv, plot], force)
    if forecast:
        if truth is None or data:
            raise UserError("--forecast needs --truth FILE (and no DATA argument)")
        if compile:
            raise UserError("--compile: --forecast scores a file, there is no model to compile")
        if matching != "auto":
            raise UserError("--matching: --forecast scores a file as it is, there is no model's forecast to match")
        report = verification.evaluate_forecasts(
            forecast_path=forecast, truth_path=truth, truth_start=truth_start, **scoring
        )
    else:
        report = verification.evaluate_file(
            data_paths=data,
            checkpoint_path=checkpoint,
            split=split,
            device=device,
            precision=precision,
            with_baselines=baselines,
            compile=compile,
            importer=importer,
            matching=matching,
            **scoring,
        )
    if not main_process():
        return
    if csv:
        verification.write_csv(csv, report, force)
    if plot:
        pictures.save_png(plot, pictures.plot_scores(report), force)
    if as_json:
        typer.echo(to_json(report))
    else:
        print_scores(report)


@app.command()
@reported
def info(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint file (.pt).")],
    as_json: options.JsonOpt = False,
) -> None:
    """What a checkpoint holds: model and data configuration, normalisation, training progress."""
    from convgru_cli.checkpoint import describe

    summary = describe(checkpoint)
    typer.echo(to_json(summary) if as_json else "\n".join(f"{k}: {v}" for k, v in summary.items()))


def main() -> None:
    app()
