"""HDF5 access: opening files (or standard input), picking the frame dataset, its layout, its compression
filters, decoding attributes, and arrays read lazily.

Every frame source reads HDF5 through these functions, so that a file is opened, named in messages and
decoded the same way everywhere.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from datetime import datetime

import h5py
import numpy as np
from h5py import h5z

with contextlib.suppress(ImportError):  # where installed, registers Blosc, Zstandard, LZ4, ... with h5py
    import hdf5plugin  # noqa: F401

from convgru_cli.errors import UserError

LAYOUTS_BY_RANK = {3: "THW", 4: "NTHW", 5: "NTCHW"}
NOT_FRAMES = {"mask", "timestamps", "lead_times"}

log = logging.getLogger("convgru")


def open_hdf5(path: str | None) -> h5py.File:
    """Open a file for reading; ``None`` or ``"-"`` reads an HDF5 file piped in on standard input."""
    if path in (None, "-"):
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("no input file given and standard input is a terminal: name an HDF5 file or pipe one in")
        data = sys.stdin.buffer.read()
        if not data:
            raise UserError("standard input is empty: expected an HDF5 file")
        try:
            return h5py.File(io.BytesIO(data), "r")
        except OSError:
            raise UserError("standard input is not an HDF5 file") from None
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, expected an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise UserError(f"{path}: not a readable HDF5 file ({error})") from None


def file_label(file: h5py.File) -> str:
    """The file's name for messages; a file piped in on standard input has none."""
    return "<stdin>" if file.driver == "fileobj" else file.filename


def plain(value):
    """An attribute value as plain Python: text decoded, small arrays as lists, numpy scalars as numbers."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return [plain(item) for item in value.tolist()] if value.size <= 16 else f"array {value.shape}"
    if isinstance(value, list):  # from a multidimensional array's tolist()
        return [plain(item) for item in value]
    return value.item() if isinstance(value, np.generic) else value


def text_attribute(holder: h5py.Dataset | h5py.File, name: str, default: str = "") -> str:
    """A string attribute, whether stored as variable-length text or as fixed-length bytes."""
    value = holder.attrs.get(name, default)
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    return plain(value) if isinstance(value, bytes) else str(value)


def dataset_names(file: h5py.File) -> list[str]:
    names: list[str] = []
    file.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
    return names


def is_frame_like(name: str) -> bool:
    """False for the datasets that sit beside frames: masks, timestamps, lead times."""
    return name.rsplit("/", 1)[-1] not in NOT_FRAMES


FRAME_NAMES = {"frames", "data"}


def pick_dataset(file: h5py.File, name: str | None, mask_dataset: str | None = None) -> str:
    """The dataset to read: the one named, or the frame-like dataset of the file (masks left aside). Among several,
    those of rank 3 or more, then those with a ``layout`` attribute (our own files record one), then those named
    ``frames`` or ``data``; the one chosen so is logged."""
    label = file_label(file)
    if name:
        if name not in file or not isinstance(file[name], h5py.Dataset):
            raise UserError(f"{label}: no dataset {name!r} (datasets: {', '.join(dataset_names(file)) or 'none'})")
        return name
    candidates = [n for n in dataset_names(file) if is_frame_like(n) and n != (mask_dataset or "").strip("/")]
    preferences = (  # (why, as logged; None: not worth a line), which to keep
        (None, lambda n: file[n].ndim >= 3),
        ("it has a layout attribute", lambda n: "layout" in file[n].attrs),
        ("by its name", lambda n: n.rsplit("/", 1)[-1] in FRAME_NAMES),
    )
    why, set_aside = None, []
    for reason, preferred in preferences:
        kept = [n for n in candidates if preferred(n)]
        if 0 < len(kept) < len(candidates):
            if reason:
                why, set_aside = reason, set_aside + [n for n in candidates if n not in kept]
            candidates = kept
    if len(candidates) != 1:
        found = ", ".join(candidates) or "no frame-like dataset"
        raise UserError(f"{label}: cannot tell which dataset holds the frames ({found}); name it with --dataset")
    chosen = candidates[0]
    if why:
        log.info(
            "%s: frames from dataset %r (%s; not %s); --dataset picks another", label, chosen, why, ", ".join(set_aside)
        )
    return chosen


def frame_times(file: h5py.File, dataset: str, steps: int) -> list[datetime] | None:
    """The valid time of each frame of a series, from a ``timestamps`` dataset of ISO 8601 text beside the frames
    (our radar files carry one); None where the file has none that fits."""
    name = dataset.rsplit("/", 1)[0] + "/timestamps" if "/" in dataset else "timestamps"
    if name not in file or file[name].shape != (steps,):
        return None
    try:
        return [datetime.fromisoformat(str(plain(value))) for value in file[name][()]]
    except ValueError:
        return None


def resolve_layout(shape: tuple[int, ...], layout: str | None, label: str, recorded: str = "") -> str:
    """The layout letters for a dataset: the one given, the one recorded in its ``layout`` attribute, or one
    read off the shape where that is unambiguous enough (rank 4: NTHW, or SEVIR's NHWT when the two middle axes
    are equal and the largest)."""
    if layout:
        layout = layout.upper()
        if sorted(layout) not in (sorted("THW"), sorted("TCHW"), sorted("NTHW"), sorted("NTCHW")):
            raise UserError(f"--layout {layout}: use the letters N, T, C, H, W, e.g. NTHW, NTCHW, THW, TCHW, NHWT")
        if len(layout) != len(shape):
            raise UserError(f"{label}: layout {layout} has {len(layout)} axes but the dataset has shape {shape}")
        return layout
    if recorded and len(recorded) == len(shape):
        return resolve_layout(shape, recorded, label)
    if len(shape) not in LAYOUTS_BY_RANK:
        raise UserError(f"{label}: dataset of shape {shape} is not a frame sequence (expected rank 3, 4 or 5)")
    if len(shape) == 4 and shape[1] == shape[2] and shape[1] > max(shape[0], shape[3]) and shape[3] > 1:
        return "NHWT"
    return LAYOUTS_BY_RANK[len(shape)]


def unavailable_filters(dataset: h5py.Dataset) -> list[str]:
    """The dataset's compression filters that no loaded HDF5 plugin can decode, as "name (id)"."""
    plist = dataset.id.get_create_plist()
    filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
    return [
        f"{name.decode()} ({code})" if name else str(code) for code, _, _, name in filters if not h5z.filter_avail(code)
    ]


class LazyArray:
    """A dataset held in memory when asked to, else read lazily with a handle opened once per process."""

    def __init__(self, file: h5py.File, dataset: str, in_memory: bool, label: str):
        self.path = file.filename if isinstance(file.filename, str) and os.path.exists(file.filename) else None
        self.dataset = dataset
        self.label = label
        self.array: np.ndarray | h5py.Dataset | None = None
        if in_memory or not self.path:
            self.array = self._reading(lambda: file[dataset][()], file[dataset])
        self.pid = os.getpid()

    def __getitem__(self, index: tuple) -> np.ndarray:
        # Each DataLoader worker opens its own handle: h5py handles must not cross a fork.
        if not self.in_memory and (self.array is None or self.pid != os.getpid()):
            self.array = h5py.File(self.path, "r")[self.dataset]
            self.pid = os.getpid()
        return self._reading(lambda: self.array[index], self.array)

    def _reading(self, read, source: h5py.Dataset | np.ndarray) -> np.ndarray:
        try:
            return read()
        except OSError as error:
            missing = unavailable_filters(source)
            if missing:
                raise UserError(
                    f"{self.label}: compressed with HDF5 filter {', '.join(missing)}, which this h5py cannot "
                    "decode; pip install hdf5plugin (Blosc, Zstandard, LZ4, bitshuffle, ...) or re-save the file "
                    "with gzip or lzf"
                ) from None
            raise UserError(f"{self.label}: cannot read ({error})") from None

    @property
    def in_memory(self) -> bool:
        return isinstance(self.array, np.ndarray)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "array": self.array if self.in_memory else None}
