"""`convgru data ...`: make, inspect and import frame-sequence files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from convgru_cli.console import print_inspection, reported, to_json
from convgru_cli.options import JsonOpt

data_app = typer.Typer(help="Make and inspect frame-sequence files.", no_args_is_help=True)

log = logging.getLogger("convgru")


@data_app.command()
@reported
def synth(
    ctx: typer.Context,
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

    glyphs = synthesis.read_mnist_images(str(mnist)) if mnist else synthesis.font_glyphs()
    array = synthesis.moving_digits(sequences, frames, glyphs, size=size, digits=digits, seed=seed)
    source = f"MNIST {mnist.name}" if mnist else "built-in 5x7 font"
    synthesis.write_sequences(output, array, force=force, description=f"moving digits ({source}), seed {seed}")
    log.info("wrote %s: %d sequences of %d frames, %dx%d", output, sequences, frames, size, size)


@data_app.command()
@reported
def inspect(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="HDF5 file.")],
    input_frames: int = 10,
    output_frames: int = 10,
    stride: int = 1,
    as_json: JsonOpt = False,
) -> None:
    """Datasets, shapes, dtypes, chunking, compression, value ranges, no-data fraction, layout and windows."""
    from convgru_cli.inspection import inspect_file

    report = inspect_file(file, input_frames=input_frames, output_frames=output_frames, stride=stride)
    if as_json:
        typer.echo(to_json(report))
    else:
        print_inspection(report)


@data_app.command("import")
@reported
def import_(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="A numpy .npy array, e.g. Moving MNIST's mnist_test_seq.npy.")],
    output: Annotated[str, typer.Argument(help="HDF5 file to write.")],
    layout: Annotated[str, typer.Option(help="Axis letters of the array, e.g. TNHW for mnist_test_seq.npy.")],
    dataset: str = "frames",
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a numpy array to HDF5 with its layout recorded, chunked up to 20 frames of a sequence per chunk."""
    from convgru_cli.conversion import import_array

    result = import_array(source, output, layout, dataset=dataset, force=force)
    log.info("wrote %s: %s %s", output, result["layout"], "x".join(map(str, result["shape"])))
