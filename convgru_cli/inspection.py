"""Looking into HDF5 files before training: what `convgru data inspect` reports."""

from __future__ import annotations

import h5py
import numpy as np

from convgru_cli.errors import UserError
from convgru_cli.hdf5 import dataset_names, is_frame_like, open_hdf5, plain
from convgru_cli.sources import StackedFrames
from convgru_cli.windowing import DataSpec, windows

SAMPLE_FRAMES = 64


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
