"""HDF5 frame sequences: opening, layout, windows, splits and normalisation.

Frames are handed out as [T, C, H, W] windows in the file's own dtype (uint8 stays uint8 until it is on the
device). A file that fits the cache limit is read once into memory; a larger one is read window by window
with h5py slices, each DataLoader worker opening its own handle.
"""

from __future__ import annotations

import contextlib
import glob
import io
import math
import os
import sys
from dataclasses import asdict, dataclass

import h5py
import numpy as np
import torch
from h5py import h5z

with contextlib.suppress(ImportError):  # where installed, registers Blosc, Zstandard, LZ4, ... with h5py
    import hdf5plugin  # noqa: F401

from convgru_cli import transforms
from convgru_cli.errors import UserError

LAYOUTS_BY_RANK = {3: "THW", 4: "NTHW", 5: "NTCHW"}
NOT_FRAMES = {"mask", "timestamps", "lead_times"}
NAN_POLICIES = ("mask", "zero", "error")
CACHE_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class DataSpec:
    """How windows are cut from a file; stored in checkpoints so evaluation repeats the same split."""

    dataset: str
    layout: str
    input_frames: int = 10
    output_frames: int = 10
    stride: int = 1
    val_fraction: float = 0.1
    nan_policy: str = "mask"  # NaN is no-data: masked out of loss and scores, set to zero, or refused
    mask_dataset: str | None = None
    transform: str = "auto"  # the space the model works in (transforms.py); auto: by the data's units
    clip: tuple[float, float] | None = None  # data-unit bounds applied before anything else

    @property
    def window(self) -> int:
        return self.input_frames + self.output_frames

    def check(self) -> None:
        if self.input_frames < 1 or self.output_frames < 1:
            raise UserError("--input-frames and --output-frames must be at least 1")
        if self.stride < 1:
            raise UserError(f"--stride {self.stride}: must be at least 1")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> DataSpec:
        return cls(**_legacy_transform(saved, default="none"))


def _legacy_transform(saved: dict, default: str) -> dict:
    """Checkpoints from before transforms were named held ``log_transform`` (a bool) instead."""
    values = dict(saved)
    legacy = values.pop("log_transform", None)
    values.setdefault("transform", "log" if legacy else default)
    return values


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


def text_attribute(holder: h5py.Dataset | h5py.File, name: str, default: str = "") -> str:
    """A string attribute, whether stored as variable-length text or as fixed-length bytes."""
    value = holder.attrs.get(name, default)
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def pick_dataset(file: h5py.File, name: str | None, mask_dataset: str | None = None) -> str:
    """The dataset to read: the one named, or the only frame-like dataset in the file (masks left aside)."""
    label = file_label(file)
    if name:
        if name not in file or not isinstance(file[name], h5py.Dataset):
            raise UserError(f"{label}: no dataset {name!r} (datasets: {', '.join(dataset_names(file)) or 'none'})")
        return name
    candidates = [
        n
        for n in dataset_names(file)
        if n.rsplit("/", 1)[-1] not in NOT_FRAMES and n != (mask_dataset or "").strip("/")
    ]
    if len(candidates) > 1:
        candidates = [n for n in candidates if file[n].ndim >= 3]
    if len(candidates) != 1:
        found = ", ".join(candidates) or "no frame-like dataset"
        raise UserError(f"{label}: cannot tell which dataset holds the frames ({found}); name it with --dataset")
    return candidates[0]


def dataset_names(file: h5py.File) -> list[str]:
    names: list[str] = []
    file.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
    return names


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


class _Array:
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


class Frames:
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
        if nan_policy not in NAN_POLICIES:
            raise UserError(f"--nan-policy {nan_policy}: choose one of {', '.join(NAN_POLICIES)}")
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
        in_memory = source.nbytes <= CACHE_BYTES if cache is None else cache
        self._frames = _Array(file, dataset, in_memory, self.label)
        self._mask = self._open_mask(file, source.shape, mask_dataset, in_memory)

    def _open_mask(self, file: h5py.File, shape: tuple, name: str | None, in_memory: bool) -> _Array | None:
        if name is None:
            sibling = self.dataset.rsplit("/", 1)[0] + "/mask" if "/" in self.dataset else "mask"
            if sibling not in file or file[sibling].shape != shape:
                return None
            name = sibling
        if name not in file:
            raise UserError(f"--mask-dataset {name}: no such dataset in {self.label.rsplit(':', 1)[0]}")
        if file[name].shape != shape:
            raise UserError(f"{name}: mask of shape {file[name].shape}, but the frames have shape {shape}")
        return _Array(file, name, in_memory, f"{file_label(file)}:{name}")

    @property
    def in_memory(self) -> bool:
        return self._frames.in_memory

    def steps_of(self, sequence: int) -> int:
        return self.steps

    @property
    def is_series(self) -> bool:
        return "N" not in self.layout

    def read(self, sequence: int, start: int, length: int) -> np.ndarray:
        """Frames [start, start+length) of one sequence as [length, C, H, W], in the stored dtype unless a mask
        applies (then float32 with NaN where there is no data)."""
        index = tuple(
            sequence if axis == "N" else slice(start, start + length) if axis == "T" else slice(None)
            for axis in self.layout
        )
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
        if self.nan_policy != "mask" and np.isnan(looked_at).any():
            if self.nan_policy == "error":
                raise UserError(f"{where}: NaN values (--nan-policy error); use --nan-policy mask or zero")
            block = np.nan_to_num(block, nan=0.0)
        return block


class FrameSet:
    """Several files of the same frame shape seen as one: their sequences one after another (a file holding a
    long series counts as one sequence), so that splits hold out whole sequences or whole files."""

    def __init__(self, parts: list[Frames]):
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
        for name in ("layout", "dtype", "channels", "height", "width", "units", "timestep_minutes", "dataset"):
            setattr(self, name, getattr(first, name))
        self.sequences = len(self.index)
        self.steps = min(part.steps for part in parts)
        self.is_series = False
        self.in_memory = all(part.in_memory for part in parts)

    def steps_of(self, sequence: int) -> int:
        return self.parts[self.index[sequence][0]].steps

    def read(self, sequence: int, start: int, length: int) -> np.ndarray:
        part, local = self.index[sequence]
        return self.parts[part].read(local, start, length)


def expand_paths(paths: list[str]) -> list[str]:
    """File names, with shell globs expanded here too (for configs and quoted patterns)."""
    names: list[str] = []
    for path in paths:
        literal = not glob.has_magic(path) or os.path.exists(path)  # "obs[1].h5" may be a file's own name
        matches = [path] if literal else sorted(glob.glob(path))
        if not matches:
            raise UserError(f"{path}: the pattern matches no file")
        names += matches
    return names


def open_frames(
    paths: list[str],
    dataset: str | None,
    layout: str | None = None,
    cache: bool | None = None,
    nan_policy: str = "mask",
    mask_dataset: str | None = None,
) -> Frames | FrameSet:
    """One file, or several (shell globs expanded here too, for configs and quoted patterns), as frames."""
    names = expand_paths(paths)
    if cache is None and len(names) > 1:  # in memory only if all of them fit together
        total = 0
        for name in names:
            with open_hdf5(name) as file:
                total += file[pick_dataset(file, dataset, mask_dataset)].nbytes
        cache = total <= CACHE_BYTES
    parts = []
    for name in names:
        with open_hdf5(name) as file:
            parts.append(
                Frames(file, pick_dataset(file, dataset, mask_dataset), layout, cache, nan_policy, mask_dataset)
            )
    return parts[0] if len(parts) == 1 else FrameSet(parts)


def windows(frames: Frames | FrameSet, length: int, stride: int) -> list[tuple[int, int]]:
    """Every (sequence, start) whose window of ``length`` frames lies inside the data."""
    found = [(n, s) for n in range(frames.sequences) for s in range(0, frames.steps_of(n) - length + 1, stride)]
    if not found:
        raise UserError(
            f"{frames.label}: sequences have {frames.steps} frames, fewer than the {length} needed "
            f"(input frames + output frames); lower --input-frames/--output-frames, or give --layout if "
            f"{frames.layout} is not how the data is stored"
        )
    return found


def split_windows(frames: Frames, spec: DataSpec) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Training and validation windows that share no frame: the last sequences of a [N, ...] dataset, or
    the last block of time of a long series, are held out. In a series one window's length of frames between
    the blocks is left out too, so that the validation block does not start where training ended: weather
    a few minutes apart is nearly the same, and adjacent blocks would flatter the validation scores."""
    every = windows(frames, spec.window, spec.stride)
    if frames.is_series:
        cut = math.floor(frames.steps * (1 - spec.val_fraction))
        gap = spec.window if spec.val_fraction > 0 else 0
        train = [w for w in every if w[1] + spec.window + gap <= cut]
        val = [w for w in every if w[1] >= cut]
    else:
        held_out = max(1, math.ceil(frames.sequences * spec.val_fraction)) if spec.val_fraction > 0 else 0
        first_val = frames.sequences - held_out
        train = [w for w in every if w[0] < first_val]
        val = [w for w in every if w[0] >= first_val]
    if not train:
        raise UserError(f"{frames.label}: no training window left after holding out {spec.val_fraction:.0%}")
    if spec.val_fraction > 0 and not val:
        raise UserError(
            f"{frames.label}: the held-out {spec.val_fraction:.0%} of the data is too short for one window of "
            f"{spec.window} frames; raise --val-fraction or lower the frame counts"
        )
    return train, val


def mask_in(file: h5py.File, spec: DataSpec) -> str | None:
    """The mask dataset a model was trained with, where this file has it too (else the file's own ``mask``)."""
    return spec.mask_dataset if spec.mask_dataset and spec.mask_dataset in file else None


class WindowDataset(torch.utils.data.Dataset):
    def __init__(self, frames: Frames, window_list: list[tuple[int, int]], length: int):
        self.frames = frames
        self.window_list = window_list
        self.length = length

    def __len__(self) -> int:
        return len(self.window_list)

    def __getitem__(self, index: int) -> torch.Tensor:
        sequence, start = self.window_list[index]
        return torch.from_numpy(self.frames.read(sequence, start, self.length))


@dataclass
class Normalisation:
    """x_normalised = (x - offset) / scale per channel; plus what evaluation needs from the training split."""

    offset: list[float]
    scale: list[float]
    data_min: float
    data_max: float
    dtype: str
    units: str
    mean_frame: torch.Tensor  # [C, H, W] in data units: the climatology baseline
    nan_fraction: float = 0.0  # share of no-data pixels in the sampled training windows
    transform: str = "none"
    clip: tuple[float, float] | None = None

    @classmethod
    def from_dict(cls, saved: dict) -> Normalisation:
        return cls(**_legacy_transform(saved, default="none"))

    @property
    def zero_one_scale(self) -> float | None:
        """Divisor that maps the data onto [0, 1] where that is its natural range (uint8 or 0–1 floats)."""
        if self.dtype == "uint8":
            return 255.0
        if self.data_min >= 0 and self.data_max <= 1:
            return 1.0
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch [B, T, C, H, W] of raw frames -> (normalised float32 frames, mask of valid pixels)."""
        x = self.to_model_space(x.float())
        valid = torch.isfinite(x)
        offset, scale = self._broadcast(x)
        return torch.where(valid, (x - offset) / scale, 0.0), valid

    def to_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """Data units -> the space the statistics live in (clipped, then transformed)."""
        if self.clip:
            x = x.clamp(*self.clip)
        return transforms.forward(self.transform, x)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        offset, scale = self._broadcast(x)
        x = transforms.inverse(self.transform, x * scale + offset)
        return x.clamp(*self.clip) if self.clip else x

    def _broadcast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (len(self.offset), 1, 1)
        offset = torch.tensor(self.offset, device=x.device).view(shape)
        scale = torch.tensor(self.scale, device=x.device).view(shape)
        return offset, scale


def compute_normalisation(
    frames: Frames,
    train: list[tuple[int, int]],
    length: int,
    transform: str = "none",
    clip: tuple[float, float] | None = None,
    samples: int = 512,
) -> Normalisation:
    """Statistics of up to ``samples`` training windows spread evenly over the training split: offset and scale
    in the transformed space, range and mean frame (the climatology) in data units."""
    step = max(1, len(train) // samples)
    total = np.zeros((frames.channels, frames.height, frames.width))
    total_sq = np.zeros(frames.channels)
    transformed_total = np.zeros(frames.channels)
    count = np.zeros((frames.channels, frames.height, frames.width))
    data_min, data_max = math.inf, -math.inf
    for sequence, start in train[::step]:
        block = frames.read(sequence, start, length).astype(np.float64)
        if clip:
            block = np.clip(block, *clip)
        valid = np.isfinite(block)
        block = np.where(valid, block, 0.0)
        total += block.sum(axis=0)
        moved = np.where(valid, transforms.forward(transform, torch.from_numpy(block)).numpy(), 0.0)
        transformed_total += moved.sum(axis=(0, 2, 3))
        total_sq += (moved**2).sum(axis=(0, 2, 3))
        count += valid.sum(axis=0)
        if valid.any():
            data_min = min(data_min, float(block[valid].min()))
            data_max = max(data_max, float(block[valid].max()))
    if not count.any():
        raise UserError(f"{frames.label}: the training split holds no valid value (all NaN)")
    per_channel = count.sum(axis=(1, 2))
    mean = transformed_total / per_channel
    std = np.sqrt(np.maximum(total_sq / per_channel - mean**2, 0.0))
    raw_mean = total.sum(axis=(1, 2)) / per_channel
    mean_frame = np.where(count > 0, total / np.maximum(count, 1), raw_mean[:, None, None])
    return Normalisation(
        offset=mean.tolist(),
        scale=np.where(std > 1e-8, std, 1.0).tolist(),
        data_min=data_min,
        data_max=data_max,
        dtype=str(frames.dtype),
        units=frames.units,
        mean_frame=torch.from_numpy(mean_frame).float(),
        nan_fraction=float(1 - count.sum() / (len(train[::step]) * length * count.size)),
        transform=transform,
        clip=clip,
    )
