"""Reference forecasts any model must beat, in a registry by name (as pysteps' ``nowcasts.get_method``).

Every method has one signature, ``(inputs [B, T, C, H, W] raw, frames, units) -> [B, frames, C, H, W]`` in data
units with no NaN, and says how many input frames it needs. Adding a method is adding an entry to ``METHODS``;
pysteps' extrapolation nowcast is one where pysteps is installed (``pip install convgru[pysteps]``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from convgru_cli import transforms
from convgru_cli.errors import UserError
from convgru_cli.motion import advect, motion_field


def persistence(inputs: torch.Tensor, frames: int, units: str = "") -> torch.Tensor:
    """[B, T, C, H, W] -> the last frame held for ``frames`` steps (no data as 0)."""
    return inputs[:, -1:].float().nan_to_num().expand(-1, frames, -1, -1, -1)


def optical_flow(inputs: torch.Tensor, frames: int, units: str = "") -> torch.Tensor:
    """[B, T, C, H, W] -> [B, frames, C, H, W]: the last frame carried along the recent motion (motion.py)."""
    last = inputs[:, -1].float().nan_to_num()
    return advect(last, motion_field(inputs), frames)


PYSTEPS_CHUNK_PIXELS = 2**18  # grid points whose motion vectors pysteps interpolates at once


def pysteps_extrapolation(inputs: torch.Tensor, frames: int, units: str = "") -> torch.Tensor:
    """[B, T, C, H, W] -> [B, frames, C, H, W]: pysteps' extrapolation nowcast, the field's reference: Lucas–Kanade
    motion of the last three inputs (``motion.get_method("LK")``; rain rates in dBR, pysteps' habit, through the
    transform ``units`` resolve to) and semi-Lagrangian extrapolation of the last one
    (``nowcasts.get_method("extrapolation")``), per sequence and channel. What pysteps leaves as no data
    (outside the domain, upwind) is given the last frame's smallest value: dry. The extrapolation runs one lead
    time per call, continuing from the previous call's displacement (the same steps as one call for all lead
    times), in float32, so that it holds one frame of forecast at a time, not all of them twice in float64; and
    the sparse vectors are interpolated onto the grid in chunks of ``PYSTEPS_CHUNK_PIXELS`` (the same values:
    each grid point is interpolated from its own nearest vectors), where pysteps' default of four chunks holds
    20 neighbours' distances and indices for a quarter of the frame at once (5 GB at 4400×3800)."""
    with contextlib.redirect_stdout(sys.stderr):  # pysteps announces its configuration file on stdout
        from pysteps import motion, nowcasts
    estimate, extrapolate = motion.get_method("LK"), nowcasts.get_method("extrapolation")
    recent = inputs[:, -3:].double().cpu()
    tracked = transforms.forward(transforms.resolve("auto", units), recent).numpy()
    recent = recent.numpy()
    out = np.empty((recent.shape[0], frames, *recent.shape[2:]), dtype=np.float32)
    side = max(2, math.ceil(math.sqrt(out[0, 0, 0].size / PYSTEPS_CHUNK_PIXELS)))  # chunks along each axis
    for b, sequence in enumerate(recent):
        for c in range(sequence.shape[1]):
            last = sequence[-1, c].astype(np.float32)
            velocity = estimate(tracked[b, :, c], interp_kwargs={"nchunks": side**2})
            dry = np.nanmin(last) if np.isfinite(last).any() else 0.0
            displacement = None
            for lead in range(frames):
                steps = {"displacement_prev": displacement, "return_displacement": True}
                forecast, displacement = extrapolate(last, velocity, 1, extrap_kwargs=steps)
                out[b, lead, c] = np.nan_to_num(forecast[0], nan=dry, copy=False)
    return torch.from_numpy(out).to(inputs.device)


@dataclass(frozen=True)
class Baseline:
    forecast: Callable[[torch.Tensor, int, str], torch.Tensor]
    min_inputs: int  # input frames the method needs


METHODS = {
    "persistence": Baseline(persistence, 1),
    "optical_flow": Baseline(optical_flow, 2),
}
if importlib.util.find_spec("pysteps") is not None:  # the optional extra convgru[pysteps]
    METHODS["pysteps"] = Baseline(pysteps_extrapolation, 3)


def get_method(name: str) -> Baseline:
    if name not in METHODS:
        raise UserError(f"unknown baseline {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def usable(input_frames: int) -> list[str]:
    """The baselines that can forecast from ``input_frames`` frames, in the order of ``METHODS``."""
    return [name for name, method in METHODS.items() if input_frames >= method.min_inputs]
