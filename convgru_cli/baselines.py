"""Reference forecasts any model must beat, in a registry by name (as pysteps' ``nowcasts.get_method``).

Every method has one signature, ``(inputs [B, T, C, H, W] raw, frames) -> [B, frames, C, H, W]`` in data units
with no NaN, and says how many input frames it needs. Adding a method (pysteps' extrapolation, say) is adding
an entry to ``METHODS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from convgru_cli.errors import UserError
from convgru_cli.motion import advect, motion_field


def persistence(inputs: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, T, C, H, W] -> the last frame held for ``frames`` steps (no data as 0)."""
    return inputs[:, -1:].float().nan_to_num().expand(-1, frames, -1, -1, -1)


def optical_flow(inputs: torch.Tensor, frames: int, max_speed: int = 6) -> torch.Tensor:
    """[B, T, C, H, W] -> [B, frames, C, H, W]: the last frame carried along the recent motion (motion.py)."""
    last = inputs[:, -1].float().nan_to_num()
    return advect(last, motion_field(inputs, max_speed), frames)


@dataclass(frozen=True)
class Baseline:
    forecast: Callable[[torch.Tensor, int], torch.Tensor]
    min_inputs: int  # input frames the method needs


METHODS = {
    "persistence": Baseline(persistence, 1),
    "optical_flow": Baseline(optical_flow, 2),
}


def get_method(name: str) -> Baseline:
    if name not in METHODS:
        raise UserError(f"unknown baseline {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def usable(input_frames: int) -> list[str]:
    """The baselines that can forecast from ``input_frames`` frames, in the order of ``METHODS``."""
    return [name for name, method in METHODS.items() if input_frames >= method.min_inputs]
