"""Forecasting whole domains in a memory budget: whole frames when they fit, else overlapping tiles blended back.

A forecast's memory grows with the frame's area (the recurrent states of every step at every level), so a
budget sets how many pixels one run of the model may take: whole frames, as many sequences at once as fit,
or one sequence cut into square tiles. A pixel near a tile's edge is forecast from less than it sees in the
whole frame: the anchored forecaster follows each pixel back along the motion by up to ``MAX_SPEED`` pixels
per lead time; the recurrent convolutions reach further with every step too, but their influence fades with
distance, so the motion sets the halo. Each tile keeps a ``halo`` of that reach (``MAX_SPEED`` per lead plus
the motion search's window) with zero weight, and neighbouring tiles are blended with linear ramps over
``BLEND`` pixels beyond it: no seams, and away from the domain's edge nearly the forecast of the whole frame
(tests/test_tiling.py: within 1e-3 of its largest value), up to what the motion estimate and the far reach of
the convolutions see differently in a tile.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from convgru_cli.model import ModelConfig
from convgru_cli.motion import MAX_SPEED

BLEND = 16  # pixels over which a tile's weight ramps up beyond its halo
MOTION_REACH = 16  # the motion search's window and refinement, beyond what the leads travel
DEFAULT_BUDGET = 10**9  # bytes of one run of the model, by bytes_per_pixel


def bytes_per_pixel(config: ModelConfig, input_frames: int, frames: int) -> int:
    """A generous estimate of the memory a forecast takes per pixel of one sequence. Without gradients the model
    runs a step at a time (model.py), so what it holds of its levels does not grow with the steps: one step's
    gates, convolutions and states, measured at about 17 float32 copies of every level's hidden channels (at
    that level's resolution), counted as 20. The full-resolution frames, extrapolations, motion fields and
    forecast do grow with the steps. Measured peaks (benchmarks/README.md: `fast` 6 → 6 and 6 → 12 at 256² to
    1024², shi-mnist 10 → 10) are 60-80 % of it."""
    scale, levels = config.patch, 0.0
    for hidden, stride in zip(config.hidden, config.strides, strict=True):
        scale *= stride
        levels += hidden / scale**2
    per_frame = 4 * config.channels + 4
    return int(4 * (20 * levels + (input_frames + frames) * per_frame))


def halo(frames: int) -> int:
    """Pixels at a tile's edge that are not used: how far a forecast of ``frames`` lead times reaches back."""
    return MAX_SPEED * frames + MOTION_REACH


def spans(length: int, tile: int, overlap: int, multiple: int) -> list[tuple[int, int]]:
    """Tiles (start, stop) along one axis: one if ``length`` fits in ``tile``, else as few as overlap by at
    least ``overlap``, spaced evenly with starts on ``multiple``."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap - multiple))  # a start rounds by under ``multiple``
    last = length - tile
    starts = sorted({min(last, multiple * round(last * i / (count - 1) / multiple)) for i in range(count)})
    return [(start, start + tile) for start in starts]


def ramp(length: int, start: int, stop: int, reach: int) -> torch.Tensor:
    """A tile's weight along one axis, [stop - start]: zero within ``reach`` of an edge inside the domain, then
    rising linearly over ``BLEND`` pixels to one; one up to the domain's own edges."""
    position = torch.arange(stop - start, dtype=torch.float32) + 0.5
    weight = torch.ones(stop - start)
    if start > 0:
        weight = weight.minimum(((position - reach) / BLEND).clamp(0, 1))
    if stop < length:
        weight = weight.minimum(((stop - start - position - reach) / BLEND).clamp(0, 1))
    return weight


@torch.no_grad()
def predict_tiled(
    run: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    frames: int,
    tile: int,
    multiple: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``run`` (inputs [B, T, C, h, w] -> [B, frames, C, h, w]) over overlapping tiles of ``inputs`` [B, T, C,
    H, W] of ``tile`` pixels a side at most (``fitted``), blended into one forecast [B, frames, C, H, W]: ``out``
    where given (the sum is made in it, so the forecast is held once)."""
    height, width = inputs.shape[-2:]
    reach = halo(frames)
    overlap = 2 * reach + BLEND
    tile = fitted(height, width, tile, overlap, multiple)
    forecast = torch.zeros(inputs.shape[0], frames, inputs.shape[2], height, width) if out is None else out.zero_()
    total = torch.zeros(height, width, device=forecast.device)
    for top, bottom in spans(height, tile, overlap, multiple):
        for left, right in spans(width, tile, overlap, multiple):
            weight = ramp(height, top, bottom, reach)[:, None] * ramp(width, left, right, reach)[None, :]
            weight = weight.to(forecast.device)
            forecast[..., top:bottom, left:right] += run(inputs[..., top:bottom, left:right]).to(forecast) * weight
            total[top:bottom, left:right] += weight
    return forecast.div_(total)


def fitted(height: int, width: int, tile: int, overlap: int, multiple: int) -> int:
    """The smallest side (on ``multiple``) that cuts a height × width frame into no more tiles than ``tile``
    does: every pixel of a tile is forecast, so a tile no larger than its share of the frame wastes least (a
    1024² frame in four tiles of 736² rather than of 992²)."""

    def count(side: int) -> int:
        return len(spans(height, side, overlap, multiple)) * len(spans(width, side, overlap, multiple))

    most = count(tile)
    while tile - multiple > overlap + multiple and count(tile - multiple) <= most:
        tile -= multiple
    return tile


def smallest_tile(frames: int, multiple: int) -> int:
    """The smallest tile worth cutting (twice the overlap of neighbours, on the model's size multiple): below
    it, most of each tile would be halo."""
    return multiple * math.ceil(2 * (2 * halo(frames) + BLEND + multiple) / multiple)
