"""Bringing other arrays and radar archives into HDF5: what `convgru data import` does."""

from __future__ import annotations

import os

import h5py
import numpy as np

from convgru_cli.archives import Archive
from convgru_cli.atomic import atomic_path
from convgru_cli.errors import UserError
from convgru_cli.georef import iso, write_cf
from convgru_cli.hdf5 import resolve_layout


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
    layout = resolve_layout(array.shape, layout, source)
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


def import_archive(archive: Archive, output: str, force: bool = False) -> dict:
    """An archive as one series file that train reads like any stacked file: ``frames`` [T, H, W] float32 (NaN:
    no data) and ``mask`` (True: data), one frame per chunk, gzip; ``timestamps`` (ISO 8601, UTC), units and the
    georeference, also as CF coordinates (time, y, x, grid mapping). Written frame by frame: memory holds one."""
    total, shape = len(archive.frames), (len(archive.frames), archive.height, archive.width)
    chunks = (1, archive.height, archive.width)
    with atomic_path(output, force) as temporary, h5py.File(temporary, "w") as file:
        frames = file.create_dataset("frames", shape, np.float32, chunks=chunks, compression="gzip", shuffle=True)
        mask = file.create_dataset("mask", shape, bool, chunks=chunks, compression="gzip")
        for index in range(total):
            frame = archive.read_frame(index)
            frames[index] = frame
            mask[index] = np.isfinite(frame)
        times = [frame.time for frame in archive.frames]
        stamps = file.create_dataset("timestamps", data=[iso(t) for t in times], dtype=h5py.string_dtype())
        frames.attrs.update({"layout": "THW", "units": archive.units, "quantity": archive.quantity})
        write_cf(file, [(frames, "THW"), (mask, "THW"), (stamps, "T")], times, archive.georeference)
        file.attrs.update(
            {
                "units": archive.units,
                "quantity": archive.quantity,
                "timestep_minutes": archive.timestep_minutes,
                "projection": archive.georeference.projection,
                "source": archive.label,
                "source_field": archive.frames[0].field,
                "first_file": archive.frames[0].path,
                "last_file": archive.frames[-1].path,
                "gaps": len(archive.segments) - 1,
            }
        )
    return {
        "output": output,
        "frames": total,
        "shape": list(shape),
        "gaps": len(archive.segments) - 1,
    }
