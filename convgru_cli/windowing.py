"""Windows cut from frame sequences: how (``DataSpec``), which (every one, or a training/validation split that
shares no frame), and in batches (a torch dataset for training, ``batches`` and ``stack`` elsewhere)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np
import torch

from convgru_cli import transforms
from convgru_cli.errors import UserError, finite
from convgru_cli.sources import FrameSource

Window = tuple[int, int]  # (sequence, first frame)
Item = TypeVar("Item")

log = logging.getLogger("convgru")


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
    importer: str | None = None  # the pysteps importer an archive was read with (archives.get_reader)

    @property
    def window(self) -> int:
        return self.input_frames + self.output_frames

    def check(self) -> None:
        if self.input_frames < 1 or self.output_frames < 1:
            raise UserError("--input-frames and --output-frames must be at least 1")
        if self.stride < 1:
            raise UserError(f"--stride {self.stride}: must be at least 1")
        if not 0 <= finite(self.val_fraction, "--val-fraction") < 1:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.clip is not None and (len(self.clip) != 2 or self.clip[0] >= self.clip[1]):
            raise UserError(f"--clip {','.join(f'{v:g}' for v in self.clip)}: expected LOW,HIGH with LOW < HIGH")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> DataSpec:
        return cls(**transforms.from_saved(saved))


def windows(source: FrameSource, length: int, stride: int) -> list[Window]:
    """Every (sequence, start) whose window of ``length`` frames lies inside the data."""
    found = [(n, s) for n in range(source.sequences) for s in range(0, source.steps_of(n) - length + 1, stride)]
    if not found:
        raise UserError(
            f"{source.label}: sequences have {source.steps} frames, fewer than the {length} needed "
            f"(input frames + output frames); lower --input-frames/--output-frames, or give --layout if "
            f"{source.layout} is not how the data is stored"
        )
    return found


def split_windows(source: FrameSource, spec: DataSpec) -> tuple[list[Window], list[Window]]:
    """Training and validation windows that share no frame: the last sequences of a [N, ...] dataset, or
    the last block of time of a long series (counted over all its segments, where gaps split it), are held out.
    In a series one window's length of frames between
    the blocks is left out too, so that the validation block does not start where training ended: weather
    a few minutes apart is nearly the same, and adjacent blocks would flatter the validation scores."""
    every = windows(source, spec.window, spec.stride)
    if source.is_series:
        position = series_positions(source)
        total = sum(source.steps_of(n) for n in range(source.sequences))
        cut = math.floor(total * (1 - spec.val_fraction))
        gap = spec.window if spec.val_fraction > 0 else 0
        last_start = position(every[-1])
        if spec.val_fraction > 0 and cut > last_start:  # a short series: hold out one window all the same
            log.info(
                "%s: the last %.0f%% of %d frames hold no window of %d; holding out the last %d frames (%.0f%%) "
                "instead, after a gap of %d",
                source.label,
                100 * spec.val_fraction,
                total,
                spec.window,
                total - last_start,
                100 * (total - last_start) / total,
                gap,
            )
            cut = last_start
        train = [w for w in every if position(w) + spec.window + gap <= cut]
        val = [w for w in every if position(w) >= cut]
        held = f"the last {total - cut} of {total} frames and a gap of {gap}"
    else:
        held_out = max(1, math.ceil(source.sequences * spec.val_fraction)) if spec.val_fraction > 0 else 0
        first_val = source.sequences - held_out
        train = [w for w in every if w[0] < first_val]
        val = [w for w in every if w[0] >= first_val]
        held = f"{held_out} of {source.sequences} sequences"
    if not train:
        raise UserError(
            f"{source.label}: no training window left after holding out {held} for validation; "
            "lower --val-fraction or the frame counts"
        )
    if spec.val_fraction > 0 and not val:  # held-out sequences shorter than a window
        raise UserError(
            f"{source.label}: the held-out {spec.val_fraction:.0%} of the sequences are too short for one window of "
            f"{spec.window} frames; raise --val-fraction or lower the frame counts"
        )
    return train, val


def series_positions(source: FrameSource):
    """A window's first frame counted along the whole series: a series split at gaps into several sequences
    (segments) is split for validation by time all the same."""
    offsets = [0]
    for n in range(source.sequences - 1):
        offsets.append(offsets[-1] + source.steps_of(n))
    return lambda window: offsets[window[0]] + window[1]


CROP_TRIES = 4  # crops drawn per window before one without signal is accepted


class WindowDataset(torch.utils.data.Dataset):
    """Windows of ``length`` frames; with ``crop`` (height, width), a random crop of each, drawn anew for every
    ``seed`` (train passes one per epoch) and reproducible from it, so a resumed epoch sees the same crops."""

    def __init__(
        self,
        source: FrameSource,
        window_list: list[Window],
        length: int,
        crop: tuple[int, int] | None = None,
        seed: int = 0,
    ):
        self.source = source
        self.window_list = window_list
        self.length = length
        self.crop = crop
        self.seed = seed

    def __len__(self) -> int:
        return len(self.window_list)

    def __getitem__(self, index: int) -> torch.Tensor:
        sequence, start = self.window_list[index]
        if self.crop is None:
            return torch.from_numpy(self.source.read(sequence, start, self.length))
        return self._cropped(sequence, start, index)

    def _cropped(self, sequence: int, start: int, index: int) -> torch.Tensor:
        """Up to CROP_TRIES random crops, the first that holds signal: at least half of its pixels with data and
        values that vary (not all dry, not all no-data); failing that, the one that varies most. Only the crop
        is read, so memory and reading time follow the crop, not the domain."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        height, width = self.crop
        best, best_spread = None, -1.0
        for _ in range(CROP_TRIES):
            top = int(torch.randint(self.source.height - height + 1, (1,), generator=generator))
            left = int(torch.randint(self.source.width - width + 1, (1,), generator=generator))
            region = (slice(top, top + height), slice(left, left + width))
            crop = torch.from_numpy(self.source.read(sequence, start, self.length, region))
            values = crop.float()
            valid = torch.isfinite(values)
            spread = float(values[valid].std()) if valid.sum() > 1 else 0.0
            if valid.float().mean() >= 0.5 and spread > 0:
                return crop
            if spread > best_spread:
                best, best_spread = crop, spread
        return best


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")


def batches(items: Sequence[Item], batch_size: int) -> list[Sequence[Item]]:
    """``items`` in consecutive batches of ``batch_size`` (the last one may be smaller)."""
    return [items[begin : begin + batch_size] for begin in range(0, len(items), batch_size)]


def stack(blocks: Iterable[np.ndarray]) -> torch.Tensor:
    """Frame blocks read one by one, as one batch tensor."""
    return torch.from_numpy(np.stack(list(blocks)))
