"""Normalisation: the statistics of the training split that map data units to what the model sees, and
back, with the data's range and mean frame kept beside them for evaluation.

Values are sampled, never read whole: a radar archive's one long series can be far larger than memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from convgru_cli import transforms
from convgru_cli.errors import UserError
from convgru_cli.sources import FrameSource


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
    """Statistics of up to ``samples`` training windows spread evenly over the training split: offset and scale
    in the transformed space, range and mean frame (the climatology) in data units."""
    step = max(1, len(train) // samples)
    total = np.zeros((source.channels, source.height, source.width))
    total_sq = np.zeros(source.channels)
    transformed_total = np.zeros(source.channels)
    count = np.zeros((source.channels, source.height, source.width))
    data_min, data_max = math.inf, -math.inf
    for sequence, start in train[::step]:
        block = source.read(sequence, start, length).astype(np.float64)
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
        nan_fraction=float(1 - count.sum() / (len(train[::step]) * length * count.size)),
        transform=transform,
        clip=clip,
    )


def value_range(source: FrameSource, samples: int = 512) -> tuple[float, float]:
    """Smallest and largest value in up to ``samples`` frames spread over all sequences."""
    picks = np.linspace(0, source.sequences * source.steps - 1, min(samples, source.sequences * source.steps))
    values = np.concatenate([source.read(i // source.steps, i % source.steps, 1).ravel() for i in picks.astype(int)])
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)


def quiet_fraction(
    source: FrameSource, windows: list[tuple[int, int]], skip: int, length: int, samples: int = 256
) -> float:
    """The share of ``windows`` (up to ``samples`` of them, spread evenly) that hold no signal in their frames
    after the first ``skip``: constant, or for rain rates dry (below transforms.RAIN_THRESHOLD) everywhere. A
    validation loss measured on such windows says nothing about a forecast."""
    rain = source.units.strip().lower() in transforms.RAIN_UNITS
    sampled = windows[:: max(1, len(windows) // samples)]
    quiet = 0
    for sequence, start in sampled:
        block = source.read(sequence, start, length)[skip:].astype(np.float64)
        values = block[np.isfinite(block)]
        quiet += values.size == 0 or values.min() == values.max() or (rain and values.max() < transforms.RAIN_THRESHOLD)
    return quiet / len(sampled) if sampled else 0.0
