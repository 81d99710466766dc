"""Normalisation: the statistics of the training split that map data units to what the model sees, and
back, with the data's range and mean frame kept beside them for evaluation.

Values are sampled, never read whole: a radar archive's one long series can be far larger than memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from convgru_cli import transforms
from convgru_cli.errors import UserError
from convgru_cli.sources import FrameSource

BAND_PIXELS = 1 << 20  # statistics read frames in bands of about this many pixels (8 MB in float64)


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
    transform: str = "none"  # transforms.py
    clip: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> Normalisation:
        return cls(**transforms.from_saved(saved))

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
    source: FrameSource,
    train: list[tuple[int, int]],
    length: int,
    transform: str = "none",
    clip: tuple[float, float] | None = None,
    samples: int = 512,
) -> Normalisation:
    """Statistics of the frames of up to ``samples`` training windows spread evenly over the training split, each
    frame read once, in bands of rows (memory: a few copies of a band, whatever the window or the domain):
    offset and scale in the transformed space, range and mean frame (the climatology) in data units."""
    sampled = train[:: max(1, len(train) // samples)]
    frames = sorted({(sequence, start + k) for sequence, start in sampled for k in range(length)})
    total = np.zeros((source.channels, source.height, source.width))
    total_sq = np.zeros(source.channels)
    transformed_total = np.zeros(source.channels)
    count = np.zeros((source.channels, source.height, source.width))
    data_min, data_max = math.inf, -math.inf
    for sequence, index in frames:
        for rows, band in frame_bands(source, sequence, index):
            band = band.astype(np.float64)
            if clip:
                band = np.clip(band, *clip)
            valid = np.isfinite(band)
            band = np.where(valid, band, 0.0)
            total[:, rows] += band
            moved = np.where(valid, transforms.forward(transform, torch.from_numpy(band)).numpy(), 0.0)
            transformed_total += moved.sum(axis=(1, 2))
            total_sq += (moved**2).sum(axis=(1, 2))
            count[:, rows] += valid
            if valid.any():
                data_min = min(data_min, float(band[valid].min()))
                data_max = max(data_max, float(band[valid].max()))
    if not count.any():
        raise UserError(f"{source.label}: the training split holds no valid value (all NaN)")
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
        dtype=str(source.dtype),
        units=source.units,
        mean_frame=torch.from_numpy(mean_frame).float(),
        nan_fraction=float(1 - count.sum() / (len(frames) * count.size)),
        transform=transform,
        clip=clip,
    )


def value_range(source: FrameSource, samples: int = 512) -> tuple[float, float]:
    """Smallest and largest value in up to ``samples`` frames spread over all sequences, read a band of rows at a
    time (frame_bands)."""
    picks = np.linspace(0, source.sequences * source.steps - 1, min(samples, source.sequences * source.steps))
    low, high = _finite_range(source, ((i // source.steps, i % source.steps) for i in picks.astype(int)))
    return (low, high) if low <= high else (0.0, 1.0)


def quiet_fraction(
    source: FrameSource, windows: list[tuple[int, int]], skip: int, length: int, samples: int = 256
) -> float:
    """The share of ``windows`` (up to ``samples`` of them, spread evenly) that hold no signal in their frames
    after the first ``skip``: constant, or for rain rates dry (below transforms.RAIN_THRESHOLD) everywhere. A
    validation loss measured on such windows says nothing about a forecast."""
    rain = source.units.strip().lower() in transforms.RAIN_UNITS
    sampled = windows[:: max(1, len(windows) // samples)]
    quiet = sum(_is_quiet(source, sequence, range(start + skip, start + length), rain) for sequence, start in sampled)
    return quiet / len(sampled) if sampled else 0.0


def _is_quiet(source: FrameSource, sequence: int, indices: range, rain: bool) -> bool:
    """Whether frames ``indices`` of ``sequence`` hold no signal."""
    low, high = _finite_range(source, ((sequence, index) for index in indices))
    return high < low or low == high or (rain and high < transforms.RAIN_THRESHOLD)


def _finite_range(source: FrameSource, frames: Iterable[tuple[int, int]]) -> tuple[float, float]:
    """Smallest and largest finite value of the (sequence, index) ``frames``, read a band of rows at a time;
    (inf, -inf) where there is none."""
    low, high = math.inf, -math.inf
    for sequence, index in frames:
        for _, values in frame_bands(source, sequence, index):
            values = values[np.isfinite(values)]
            if values.size:
                low, high = min(low, float(values.min())), max(high, float(values.max()))
    return low, high


def frame_bands(source: FrameSource, sequence: int, index: int) -> Iterator[tuple[slice, np.ndarray]]:
    """Frame ``index`` of ``sequence`` band by band: (rows, [C, rows, W] values); the statistics hold one band
    at a time, never a whole frame or window."""
    for rows in row_bands(source):
        yield rows, source.read(sequence, index, 1, (rows, slice(None)))[0]


def row_bands(source: FrameSource) -> list[slice]:
    """Consecutive bands of rows of about BAND_PIXELS pixels (all channels), covering the frame."""
    rows = max(1, BAND_PIXELS // (source.width * source.channels))
    return [slice(top, min(top + rows, source.height)) for top in range(0, source.height, rows)]
