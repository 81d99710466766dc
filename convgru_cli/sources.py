"""Frame sources: where sequences of [T, C, H, W] frames come from, behind one interface (``FrameSource``).

A stacked HDF5 file is one source (``StackedFrames``); several files of one frame shape are another
(``FrameSet``); an archive of per-time-step files is a third (``archives.Archive``). Frames are handed out in
the file's own dtype (uint8 stays uint8 until it is on the device). A file that fits the cache limit is read once
into memory; a larger one is read window by window with h5py slices, each DataLoader worker opening its own handle.
"""

from __future__ import annotations

import glob
import os
from datetime import datetime
from typing import Protocol

import h5py
import numpy as np

from convgru_cli.errors import UserError
from convgru_cli.georef import Georeference, segments
from convgru_cli.hdf5 import (
    LazyArray,
    file_label,
    frame_times,
    open_hdf5,
    pick_dataset,
    resolve_layout,
    text_attribute,
)

NAN_POLICIES = ("mask", "zero", "error")
CACHE_BYTES = 2 * 1024**3


def check_nan_policy(policy: str) -> None:
    if policy not in NAN_POLICIES:
        raise UserError(f"--nan-policy {policy}: choose one of {', '.join(NAN_POLICIES)}")


def apply_nan_policy(block: np.ndarray, policy: str, refusal: str, looked_at: np.ndarray | None = None) -> np.ndarray:
    """NaN (no data) as --nan-policy says: kept, for the masks (mask), read as 0 (zero), or refused with the
    message ``refusal`` (error); only the pixels ``looked_at`` (all by default) count."""
    if policy == "mask" or not np.isnan(block if looked_at is None else looked_at).any():
        return block
    if policy == "error":
        raise UserError(refusal)
    return np.nan_to_num(block, nan=0.0)


Region = tuple[slice, slice]  # the rows and columns of a crop of a frame


class FrameSource(Protocol):
    """Sequences of frames, each read as [length, C, H, W] blocks; what windows, normalisation, training and
    evaluation ask of the data."""

    label: str  # for messages: file and dataset
    dataset: str
    layout: str  # the axis letters as stored, e.g. NTHW
    dtype: np.dtype
    units: str
    timestep_minutes: float  # 0 where the data does not say
    sequences: int
    steps: int  # frames per sequence (the shortest sequence's, where they differ)
    channels: int
    height: int
    width: int
    is_series: bool  # one long series (its segments, where gaps split it), split by blocks of time
    in_memory: bool
    georeference: Georeference  # where the frames lie on the map (empty where unknown)

    def steps_of(self, sequence: int) -> int:
        """Frames in ``sequence``."""
        ...

    def read(self, sequence: int, start: int, length: int, region: Region | None = None) -> np.ndarray:
        """Frames [start, start+length) of one sequence as [length, C, H, W]; only the rows and columns of
        ``region`` where given (a crop read without decoding the rest of the frame where the format allows)."""
        ...

    def times_of(self, sequence: int) -> list[datetime] | None:
        """The valid time of each frame of ``sequence``, where the data records them."""
        ...


class StackedFrames:
    """A frame dataset seen as sequences of [T, C, H, W] frames, whatever its layout on disk.

    No-data pixels are NaN in float data, or False in a boolean ``mask`` dataset of the same shape (used when
    the file has one, or named with ``mask_dataset``); masked pixels are read as NaN."""

    def __init__(
        self,
        file: h5py.File,
        dataset: str,
        layout: str | None = None,
        cache: bool | None = None,
        nan_policy: str = "mask",
        mask_dataset: str | None = None,
    ):
        check_nan_policy(nan_policy)
        self.nan_policy = nan_policy
        source = file[dataset]
        self.label = f"{file_label(file)}:{dataset}"
        self.layout = resolve_layout(source.shape, layout, self.label, text_attribute(source, "layout"))
        if not (np.issubdtype(source.dtype, np.integer) or np.issubdtype(source.dtype, np.floating)):
            raise UserError(f"{self.label}: dtype {source.dtype} is not numeric")
        if source.size == 0:
            raise UserError(f"{self.label}: dataset is empty (shape {source.shape})")
        self.dtype = source.dtype
        sizes = dict(zip(self.layout, source.shape, strict=True))
        self.sequences = sizes.get("N", 1)
        self.steps = sizes["T"]
        self.channels = sizes.get("C", 1)
        self.height, self.width = sizes["H"], sizes["W"]
        self.units = text_attribute(source, "units") or text_attribute(file, "units")
        self.timestep_minutes = float(source.attrs.get("timestep_minutes", file.attrs.get("timestep_minutes", 0)))
        self.dataset = dataset
        self.georeference = Georeference.read(file)
        self._split_at_gaps(frame_times(file, dataset, self.steps) if self.is_series else None)
        in_memory = source.nbytes <= CACHE_BYTES if cache is None else cache
        self._frames = LazyArray(file, dataset, in_memory, self.label)
        self._mask = self._open_mask(file, source.shape, mask_dataset, in_memory)

    def _split_at_gaps(self, times: list[datetime] | None) -> None:
        """A series with timestamps is split where a time step is missing: each segment is a sequence."""
        self.times = times
        self.segments = [(0, self.steps)]
        if times:
            step, self.segments = segments(times)
            self.timestep_minutes = self.timestep_minutes or step.total_seconds() / 60
            self.sequences = len(self.segments)
            self.steps = min(length for _, length in self.segments)

    def times_of(self, sequence: int) -> list[datetime] | None:
        """The valid times of a series' segment, where the file records them."""
        if not self.times:
            return None
        begin, length = self.segments[sequence]
        return self.times[begin : begin + length]

    def _open_mask(self, file: h5py.File, shape: tuple, name: str | None, in_memory: bool) -> LazyArray | None:
        if name is None:
            sibling = self.dataset.rsplit("/", 1)[0] + "/mask" if "/" in self.dataset else "mask"
            if sibling not in file or file[sibling].shape != shape:
                return None
            name = sibling
        if name not in file:
            raise UserError(f"--mask-dataset {name}: no such dataset in {self.label.rsplit(':', 1)[0]}")
        if file[name].shape != shape:
            raise UserError(f"{name}: mask of shape {file[name].shape}, but the frames have shape {shape}")
        return LazyArray(file, name, in_memory, f"{file_label(file)}:{name}")

    @property
    def in_memory(self) -> bool:
        return self._frames.in_memory

    def steps_of(self, sequence: int) -> int:
        return self.segments[sequence][1] if self.is_series else self.steps  # [N, ...]: all as long

    @property
    def is_series(self) -> bool:
        return "N" not in self.layout

    def read(self, sequence: int, start: int, length: int, region: Region | None = None) -> np.ndarray:
        """Frames [start, start+length) of one sequence as [length, C, H, W], in the stored dtype unless a mask
        applies (then float32 with NaN where there is no data)."""
        if self.is_series:
            start += self.segments[sequence][0]
        rows, columns = region or (slice(None), slice(None))
        along = {"N": sequence, "T": slice(start, start + length), "C": slice(None), "H": rows, "W": columns}
        index = tuple(along[axis] for axis in self.layout)
        block = self._frames[index]
        valid = None if self._mask is None else self._mask[index].astype(bool)
        if np.issubdtype(block.dtype, np.floating):
            block = self._checked(block, valid, sequence, start)
        if valid is not None:  # after --nan-policy, which is about the data's own NaN, not the mask's
            block = np.where(valid, block.astype(np.float32), np.float32(np.nan))
        axes = [a for a in self.layout if a != "N"]
        if "C" not in axes:
            block = block[..., np.newaxis]
            axes.append("C")
        return np.ascontiguousarray(np.transpose(block, [axes.index(a) for a in "TCHW"]))

    def _checked(self, block: np.ndarray, valid: np.ndarray | None, sequence: int, start: int) -> np.ndarray:
        """Inf is always an error; NaN follows the policy. Pixels the mask marks as no data are not looked at."""
        where = f"{self.label}: sequence {sequence}, frames from {start}"
        looked_at = block if valid is None else block[valid]
        if np.isinf(looked_at).any():
            raise UserError(f"{where}: infinite values; fix the data or mark them as NaN (no data)")
        refusal = f"{where}: NaN values (--nan-policy error); use --nan-policy mask or zero"
        return apply_nan_policy(block, self.nan_policy, refusal, looked_at)


class FrameSet:
    """Several files of the same frame shape seen as one: their sequences one after another (a file holding a
    long series counts as one sequence), so that splits hold out whole sequences or whole files."""

    def __init__(self, parts: list[FrameSource]):
        first = parts[0]
        for part in parts[1:]:
            if (part.channels, part.height, part.width) != (first.channels, first.height, first.width):
                raise UserError(
                    f"{part.label}: frames of {part.channels}x{part.height}x{part.width}, but {first.label} has "
                    f"{first.channels}x{first.height}x{first.width}"
                )
        self.parts = parts
        self.index = [(i, n) for i, part in enumerate(parts) for n in range(part.sequences)]
        self.label = f"{first.label} and {len(parts) - 1} more file(s)"
        self.dataset, self.layout, self.dtype = first.dataset, first.layout, first.dtype
        self.units, self.timestep_minutes = first.units, first.timestep_minutes
        self.channels, self.height, self.width = first.channels, first.height, first.width
        self.sequences = len(self.index)
        self.steps = min(part.steps for part in parts)
        self.is_series = False
        self.in_memory = all(part.in_memory for part in parts)
        self.georeference = Georeference()  # files of one shape, not necessarily of one grid

    def steps_of(self, sequence: int) -> int:
        part, local = self.index[sequence]
        return self.parts[part].steps_of(local)

    def read(self, sequence: int, start: int, length: int, region: Region | None = None) -> np.ndarray:
        part, local = self.index[sequence]
        return self.parts[part].read(local, start, length, region)

    def times_of(self, sequence: int) -> list[datetime] | None:
        part, local = self.index[sequence]
        return self.parts[part].times_of(local)


def expand_paths(paths: list[str]) -> list[str]:
    """File names, with shell globs expanded here too (for configs and quoted patterns)."""
    names: list[str] = []
    for path in paths:
        literal = not glob.has_magic(path) or os.path.exists(path)  # "obs[1].h5" may be a file's own name
        matches = [path] if literal else sorted(p for p in glob.glob(path) if not os.path.isdir(p))
        if not matches:
            raise UserError(f"{path}: the pattern matches no file")
        names += matches
    return names


def check_exists(paths: list[str | None]) -> None:
    """Fail on a missing input before anything slow is done (standard input, None or "-", aside)."""
    for name in expand_paths([p for p in paths if p not in (None, "-")]):
        if not os.path.exists(name):
            raise UserError(f"{name}: no such file")


def open_frames(
    paths: list[str],
    dataset: str | None,
    layout: str | None = None,
    cache: bool | None = None,
    nan_policy: str = "mask",
    mask_dataset: str | None = None,
    importer: str | None = None,
) -> FrameSource:
    """One file, or several (shell globs expanded here too, for configs and quoted patterns), as frames; a
    folder, or files of one time step each (ODIM_H5, CF netCDF, or read by a pysteps ``importer``), as an
    archive."""
    from convgru_cli import archives

    names = expand_paths(paths)
    radar_files = archives.archive_files(names, importer)
    if radar_files is not None:
        return archives.Archive(radar_files, dataset, importer, nan_policy)
    picked, total = {}, 0
    for name in names:
        with open_hdf5(name) as file:
            picked[name] = pick_dataset(file, dataset, mask_dataset)
            total += file[picked[name]].nbytes
    if cache is None and len(names) > 1:  # in memory only if all of them fit together
        cache = total <= CACHE_BYTES
    parts = []
    for name in names:
        with open_hdf5(name) as file:
            parts.append(StackedFrames(file, picked[name], layout, cache, nan_policy, mask_dataset))
    return parts[0] if len(parts) == 1 else FrameSet(parts)


def mask_in(file: h5py.File, mask_dataset: str | None) -> str | None:
    """The mask dataset a model was trained with, where this file has it too (else the file's own ``mask``)."""
    return mask_dataset if mask_dataset and mask_dataset in file else None
