"""`convgru data ...`: make, inspect and import frame-sequence files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from convgru_cli.console import print_inspection, reported, to_json
from convgru_cli.errors import UserError
from convgru_cli.options import DatasetOpt, ImporterOpt, JsonOpt

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
    files: Annotated[list[str], typer.Argument(help="HDF5 file, or an archive folder or glob of per-time-step files.")],
    input_frames: int = 10,
    output_frames: int = 10,
    stride: int = 1,
    dataset: DatasetOpt = None,
    importer: ImporterOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Datasets, shapes, dtypes, chunking, compression, value ranges, no-data fraction, layout and windows; for
    an archive also its times, time step and gaps."""
    from convgru_cli.inspection import inspect_paths

    report = inspect_paths(files, input_frames, output_frames, stride, dataset, importer)
    if as_json:
        typer.echo(to_json(report))
    else:
        print_inspection(report)


@data_app.command("import")
@reported
def import_(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            help="A radar archive (a folder, or a quoted glob, of per-time-step ODIM_H5 or CF netCDF files), or a "
            "numpy .npy array, e.g. Moving MNIST's mnist_test_seq.npy."
        ),
    ],
    output: Annotated[str, typer.Argument(help="HDF5 file to write.")],
    layout: Annotated[str | None, typer.Option(help="Axis letters of a .npy array, e.g. TNHW.")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="The .npy array's dataset name (default frames), or an archive's field.")
    ] = None,
    importer: ImporterOpt = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write an archive as one chunked series file (frames, mask, timestamps, units, georeference), or a numpy
    array with its layout recorded, chunked up to 20 frames of a sequence per chunk."""
    from convgru_cli import archives, conversion
    from convgru_cli.atomic import refuse_existing
    from convgru_cli.sources import expand_paths

    refuse_existing([output], force)
    files = None if source.endswith(".npy") else archives.archive_files(expand_paths([source]), importer)
    if files is not None:
        result = conversion.import_archive(archives.Archive(files, dataset, importer), output, force=force)
        shape = "x".join(map(str, result["shape"]))
        log.info("wrote %s: frames %s (THW), %d gap(s) in the times", output, shape, result["gaps"])
        return
    if layout is None:
        raise UserError(f"{source}: a numpy array needs --layout (e.g. TNHW for mnist_test_seq.npy)")
    result = conversion.import_array(source, output, layout, dataset=dataset or "frames", force=force)
    log.info("wrote %s: %s %s", output, result["layout"], "x".join(map(str, result["shape"])))
