"""Looking into HDF5 files and archives before training: what `convgru data inspect` reports."""

from __future__ import annotations

import h5py
import numpy as np

from convgru_cli import archives
from convgru_cli.errors import UserError
from convgru_cli.georef import iso
from convgru_cli.hdf5 import dataset_names, is_frame_like, open_hdf5, plain
from convgru_cli.sources import StackedFrames, expand_paths
from convgru_cli.windowing import DataSpec, windows

SAMPLE_FRAMES = 64


def inspect_paths(
    paths: list[str],
    input_frames: int = 10,
    output_frames: int = 10,
    stride: int = 1,
    dataset: str | None = None,
    importer: str | None = None,
) -> dict:
    """An archive's report (a folder, per-time-step radar files, or files for ``importer``), else one file's."""
    names = expand_paths(paths)
    files = archives.archive_files(names, importer)
    if files is None:
        if len(names) != 1:
            raise UserError(f"{names[0]} and {len(names) - 1} more: inspect one HDF5 file at a time, or an archive")
        return inspect_file(names[0], input_frames, output_frames, stride)
    return inspect_archive(archives.Archive(files, dataset, importer), input_frames, output_frames, stride)


def inspect_archive(archive: archives.Archive, input_frames: int, output_frames: int, stride: int) -> dict:
    """The archive's times, step, gaps and grid, and the value range and no-data fraction of up to 64 frames
    spread over it (read one at a time)."""
    DataSpec(dataset=None, layout=None, input_frames=input_frames, output_frames=output_frames, stride=stride).check()
    total = len(archive.frames)
    low, high, missing = np.inf, -np.inf, 0
    picks = np.unique(np.linspace(0, total - 1, min(total, SAMPLE_FRAMES)).astype(int))
    for index in picks:
        frame = archive.read_frame(index)
        valid = frame[np.isfinite(frame)]
        missing += frame.size - valid.size
        if valid.size:
            low, high = min(low, float(valid.min())), max(high, float(valid.max()))
    try:
        window_count, problem = len(windows(archive, input_frames + output_frames, stride)), None
    except UserError as error:
        window_count, problem = 0, str(error)
    entry = {
        "name": archive.dataset,
        "shape": [total, archive.height, archive.width],
        "dtype": "float32",
        "chunks": None,
        "compression": None,
        "units": archive.units,
        "layout": archive.layout,
        "sequences": archive.sequences,
        "min": low if np.isfinite(low) else None,
        "max": high if np.isfinite(high) else None,
        "no_data_fraction": missing / (len(picks) * archive.height * archive.width),
        "windows": window_count,
    }
    if problem:
        entry["problem"] = problem
    grid = archive.georeference
    summary = {
        "files": total,
        "quantity": archive.quantity,
        "first_time": iso(archive.frames[0].time),
        "last_time": iso(archive.frames[-1].time),
        "timestep_minutes": archive.timestep_minutes,
        "segments": [{"first": iso(t[0]), "frames": len(t)} for t in map(archive.times_of, range(archive.sequences))],
        "gaps": [{"after": iso(before), "before": iso(after)} for before, after in archive.gaps()],
        "projection": grid.projection,
        "has_xy": grid.x is not None,
    }
    return {"file": archive.label, "attributes": {}, "archive": summary, "datasets": [entry]}


def inspect_file(path: str, input_frames: int = 10, output_frames: int = 10, stride: int = 1) -> dict:
    """Every dataset's shape, dtype, chunks and compression; for frame datasets also the value range, the
    no-data fraction (over up to 64 frames), the layout we would use and the number of windows it gives."""
    DataSpec(dataset=None, layout=None, input_frames=input_frames, output_frames=output_frames, stride=stride).check()
    with open_hdf5(path) as file:
        report = {"file": path, "attributes": {k: plain(v) for k, v in file.attrs.items()}, "datasets": []}
        for name in dataset_names(file):
            dataset = file[name]
            entry = {
                "name": name,
                "shape": list(dataset.shape),
                "dtype": str(dataset.dtype),
                "chunks": list(dataset.chunks) if dataset.chunks else None,
                "compression": dataset.compression,
                "units": plain(dataset.attrs.get("units", "")),
            }
            if dataset.ndim >= 3 and is_frame_like(name):
                entry.update(_frame_summary(file, name, input_frames + output_frames, stride))
            report["datasets"].append(entry)
    return report


def _frame_summary(file: h5py.File, name: str, window: int, stride: int) -> dict:
    try:
        source = StackedFrames(file, name, cache=False)
    except UserError as error:
        return {"problem": str(error)}
    try:
        sample = np.stack(
            [source.read(n, 0, min(source.steps, SAMPLE_FRAMES)) for n in range(min(source.sequences, 4))]
        )
    except UserError as error:  # e.g. infinite values: a problem of this dataset, not of the whole report
        return {"layout": source.layout, "problem": str(error)}
    finite = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
    summary = {
        "layout": source.layout,
        "sequences": source.sequences,
        "frames_per_sequence": source.steps,
        "channels": source.channels,
        "height": source.height,
        "width": source.width,
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "no_data_fraction": float(1 - finite.size / sample.size),
    }
    try:
        summary["windows"] = len(windows(source, window, stride))
    except UserError as error:
        summary["windows"] = 0
        summary["problem"] = str(error)
    return summary
