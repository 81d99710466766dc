"""Looking into HDF5 files before training, and bringing other arrays into HDF5."""

from __future__ import annotations

import os

import h5py
import numpy as np

from convgru_cli import data
from convgru_cli.errors import UserError
from convgru_cli.files import atomic_path

SAMPLE_FRAMES = 64


def inspect_file(path: str, input_frames: int = 10, output_frames: int = 10, stride: int = 1) -> dict:
    """Every dataset's shape, dtype, chunks and compression; for frame datasets also the value range, the
    no-data fraction (over up to 64 frames), the layout we would use and the number of windows it gives."""
    data.DataSpec(None, None, input_frames, output_frames, stride).check()
    with data.open_hdf5(path) as file:
        report = {"file": path, "attributes": {k: _plain(v) for k, v in file.attrs.items()}, "datasets": []}
        for name in data.dataset_names(file):
            dataset = file[name]
            entry = {
                "name": name,
                "shape": list(dataset.shape),
                "dtype": str(dataset.dtype),
                "chunks": list(dataset.chunks) if dataset.chunks else None,
                "compression": dataset.compression,
                "units": _plain(dataset.attrs.get("units", "")),
            }
            if dataset.ndim >= 3 and name.rsplit("/", 1)[-1] not in data.NOT_FRAMES:
                entry.update(_frame_summary(file, name, input_frames + output_frames, stride))
            report["datasets"].append(entry)
    return report


def _frame_summary(file: h5py.File, name: str, window: int, stride: int) -> dict:
    try:
        frames = data.Frames(file, name, cache=False)
    except UserError as error:
        return {"problem": str(error)}
    try:
        sample = np.stack(
            [frames.read(n, 0, min(frames.steps, SAMPLE_FRAMES)) for n in range(min(frames.sequences, 4))]
        )
    except UserError as error:  # e.g. infinite values: a problem of this dataset, not of the whole report
        return {"layout": frames.layout, "problem": str(error)}
    finite = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
    summary = {
        "layout": frames.layout,
        "sequences": frames.sequences,
        "frames_per_sequence": frames.steps,
        "channels": frames.channels,
        "height": frames.height,
        "width": frames.width,
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "no_data_fraction": float(1 - finite.size / sample.size),
    }
    try:
        summary["windows"] = len(data.windows(frames, window, stride))
    except UserError as error:
        summary["windows"] = 0
        summary["problem"] = str(error)
    return summary


def _plain(value):
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value.tolist()] if value.size <= 16 else f"array {value.shape}"
    if isinstance(value, list):  # from a multidimensional array's tolist()
        return [_plain(item) for item in value]
    return value.item() if isinstance(value, np.generic) else value


def import_array(source: str, output: str, layout: str, dataset: str = "frames", force: bool = False) -> dict:
    """A numpy ``.npy`` array (memory-mapped, so larger than memory is fine) to HDF5, with its layout recorded.
    The standard Moving MNIST file ``mnist_test_seq.npy`` is [20, 10000, 64, 64]: layout TNHW."""
    if not os.path.isfile(source):
        raise UserError(f"{source}: no such file")
    try:
        array = np.load(source, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise UserError(f"{source}: not a numpy .npy array ({error})") from None
    if not isinstance(array, np.ndarray):
        raise UserError(f"{source}: a .npz archive; save the array alone with numpy.save (.npy)")
    layout = data.resolve_layout(array.shape, layout, source)
    sizes = dict(zip(layout, array.shape, strict=True))
    # A chunk holds up to 20 frames of one sequence (a Moving MNIST window reads one chunk, a window of a long
    # sequence two, not the whole sequence), or one frame of a long series.
    series = "N" not in layout
    chunks = tuple(
        1 if axis == "N" or (axis == "T" and series) else min(size, 20) if axis == "T" else size
        for axis, size in sizes.items()
    )
    with atomic_path(output, force) as temporary, h5py.File(temporary, "w") as file:
        target = file.create_dataset(
            dataset, shape=array.shape, dtype=array.dtype, chunks=chunks, compression="gzip", shuffle=True
        )
        target.attrs["layout"] = layout
        step = max(1, (256 * 1024**2) // max(1, array[:1].nbytes))
        for begin in range(0, array.shape[0], step):
            target[begin : begin + step] = array[begin : begin + step]
    return {"output": output, "dataset": dataset, "layout": layout, "shape": list(array.shape)}
