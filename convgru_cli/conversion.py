"""Bringing other arrays into HDF5: what `convgru data import` does."""

from __future__ import annotations

import os

import h5py
import numpy as np

from convgru_cli.atomic import atomic_path
from convgru_cli.errors import UserError
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
