"""Reference forecasts any model must beat: persistence and optical-flow extrapolation (motion.py)."""

from __future__ import annotations

import torch

from convgru_cli.motion import advect, motion_field


def persistence(inputs: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, T, C, H, W] -> the last frame held for ``frames`` steps."""
    return inputs[:, -1:].expand(-1, frames, -1, -1, -1)


def optical_flow(inputs: torch.Tensor, frames: int, max_speed: int = 6) -> torch.Tensor:
    """[B, T, C, H, W] -> [B, frames, C, H, W]: the last frame carried along the recent motion."""
    last = inputs[:, -1].float().nan_to_num()
    return advect(last, motion_field(inputs, max_speed), frames)
