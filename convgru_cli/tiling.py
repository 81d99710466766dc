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
DEFAULT_BUDGET = 10**9  # bytes of one run of the model, by bytes_per_pixel; a 256² evaluation peaks at 1.0-1.1 GB


def bytes_per_pixel(config: ModelConfig, input_frames: int, frames: int) -> int:
    """A generous estimate of the memory a forecast takes per pixel of one sequence: per step, the gates and
    state of every level's cell (float32, at that level's resolution), and the full-resolution frames,
    extrapolations and motion fields. Measured peaks of the `fast` model (above the process's own, 6 → 6 at
    256² and 6 → 12 at 512²) are 40-55 % of it."""
    scale, per_step = config.patch, 0.0
    for hidden, stride in zip(config.hidden, config.strides, strict=True):
        scale *= stride
        per_step += 5 * hidden / scale**2
    per_step += 4 * config.channels + 4
    return int(4 * (input_frames + frames) * per_step) + 4 * 64


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
    """``run`` (inputs [B, T, C, h, w] -> [B, frames, C, h, w]) over overlapping ``tile``-sized tiles of
    ``inputs`` [B, T, C, H, W], blended into one forecast [B, frames, C, H, W]: ``out`` where given (the sum
    is made in it, so the forecast is held once)."""
    height, width = inputs.shape[-2:]
    reach = halo(frames)
    overlap = 2 * reach + BLEND
    forecast = torch.zeros(inputs.shape[0], frames, inputs.shape[2], height, width) if out is None else out.zero_()
    total = torch.zeros(height, width, device=forecast.device)
    for top, bottom in spans(height, tile, overlap, multiple):
        for left, right in spans(width, tile, overlap, multiple):
            weight = ramp(height, top, bottom, reach)[:, None] * ramp(width, left, right, reach)[None, :]
            weight = weight.to(forecast.device)
            forecast[..., top:bottom, left:right] += run(inputs[..., top:bottom, left:right]).to(forecast) * weight
            total[top:bottom, left:right] += weight
    return forecast.div_(total)


def smallest_tile(frames: int, multiple: int) -> int:
    """The smallest tile worth cutting (twice the overlap of neighbours, on the model's size multiple): below
    it, most of each tile would be halo."""
    return multiple * math.ceil(2 * (2 * halo(frames) + BLEND + multiple) / multiple)
